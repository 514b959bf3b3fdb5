//! Idempotent writes: a `request_id` seen before returns the first result;
//! the same id with a different payload is refused with `ALREADY_EXISTS`.
//!
//! # Convention
//!
//! Every write rpc of every service is one call to [`write`]: validate the
//! request first (bad input never claims a key), then
//!
//! ```ignore
//! let now = clm_domain::clock::micros(rt.clock.now());
//! idempotency::write(&rt, "CreateThing", request_id, &req, now, async |txn| {
//!     let thing = store::insert(txn, ...).await?;
//!     let out = convert::thing_to_proto(&thing);
//!     Ok((out.clone(), vec![events::thing_created(&out)]))
//! })
//! .await
//! ```
//!
//! The work runs in one transaction; its response and its outbox events
//! commit with it, and the response is stored under the key so a retry
//! answers it (times included: take `now` once, from the clock, at
//! microsecond precision). A write whose idempotency comes from elsewhere
//! (touchpoints, keyed by event id) passes `None` as the key. A resource
//! changed under an etag checks it with `convert::check_etag`; list rpcs
//! page with [`crate::page::Pager`]; each rpc body in the tonic impl is one
//! [`crate::error::respond`] call; ids are declared with
//! `clm_domain::resource_id!`.
//!
//! # Keys
//!
//! Inside the rpc's transaction, [`claim`] inserts the key first
//! (`ON CONFLICT DO NOTHING`). A concurrent duplicate on PostgreSQL blocks
//! on that insert until the first transaction ends, then finds the stored
//! response. [`complete`] stores the response before commit. Keys older
//! than the retention are removed by [`purge_older_than`].
//!
//! # One statement
//!
//! A hot write whose response is known before it runs (CreateCustomer on
//! PostgreSQL) may first try itself as one statement with no BEGIN or
//! COMMIT: the key and its response are claimed by a CTE of that statement
//! ([`pg_claims_sql`]) on which its other writes depend. When it wrote
//! nothing (a key seen before, or its own precondition failed), the rpc
//! goes on to [`write`] as usual, which replays or runs the general path.

use crate::db::to_micros;
use crate::error::Error;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, OnConflict, Query};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr};
use sha2::{Digest, Sha256};

/// Outcome of [`claim`].
#[derive(Debug)]
pub enum Claim<R> {
    /// First time: do the work, then [`complete`].
    New,
    /// Seen before with the same payload: return this.
    Replay(R),
}

/// Hash of a request payload (its canonical protobuf encoding; maps are
/// generated as `BTreeMap`, so the encoding is deterministic).
pub fn hash<M: prost::Message>(request: &M) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(request.encode_to_vec());
    let mut out = String::with_capacity(digest.len() * 2);
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// A key to claim in one statement ([`pg_claims_sql`]) with the response
/// to store under it: made by [`pg_claim`] for a request with a
/// `request_id`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PgClaim {
    scope: &'static str,
    request_id: String,
    request_hash: String,
    create_us: i64,
    /// The encoded response, base64.
    response: String,
}

impl PgClaim {
    /// The scope and request id claimed.
    pub fn key(&self) -> (&str, &str) {
        (self.scope, &self.request_id)
    }
}

/// PostgreSQL, for writes done in one statement (its own implicit
/// transaction) whose responses are known before it runs: the body of a
/// data-modifying CTE that claims the keys and stores the responses at
/// once, `INSERT … SELECT … FROM json_to_recordset($param) … WHERE
/// ({when}) ON CONFLICT DO NOTHING RETURNING 1`. It answers one row per key
/// claimed; a key seen before answers none (a concurrent duplicate first
/// waits for the other statement or transaction to end), and so does a key
/// listed twice. The statement's writes check that every key was claimed;
/// when they did nothing, the caller answers through [`write`], which
/// replays the stored response. `$param` binds [`pg_claims_value`].
pub fn pg_claims_sql(param: usize, when: &str) -> String {
    format!(
        "INSERT INTO idempotency_keys (scope, request_id, request_hash, create_us, response) \
         SELECT scope, request_id, request_hash, create_us, decode(response, 'base64') \
         FROM json_to_recordset(${param}::json) \
           AS c(scope text, request_id text, request_hash text, create_us int8, response text) \
         WHERE ({when}) \
         ON CONFLICT (scope, request_id) DO NOTHING RETURNING 1"
    )
}

/// The key of `request` in `scope` with the `response` to store under it;
/// `None` without a `request_id` (nothing to claim).
pub fn pg_claim<Q: prost::Message, R: prost::Message>(
    scope: &'static str,
    request_id: Option<&str>,
    request: &Q,
    response: &R,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<PgClaim> {
    use base64::Engine;
    request_id.map(|rid| PgClaim {
        scope,
        request_id: rid.to_owned(),
        request_hash: hash(request),
        create_us: to_micros(now),
        response: base64::engine::general_purpose::STANDARD.encode(response.encode_to_vec()),
    })
}

/// [`pg_claims_sql`]'s parameter: `claims` as JSON rows.
pub fn pg_claims_value<'a>(claims: impl IntoIterator<Item = &'a PgClaim>) -> sea_orm::Value {
    let claims: Vec<&PgClaim> = claims.into_iter().collect();
    // Strings and numbers only: serializing cannot fail.
    serde_json::to_string(&claims).unwrap_or_default().into()
}

/// Claims `request_id` in `scope` (usually the rpc name) for a request with `request_hash`.
pub async fn claim<R: prost::Message + Default>(
    txn: &DatabaseTransaction,
    scope: &str,
    request_id: &str,
    request_hash: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Claim<R>, Error> {
    let mut insert = Query::insert();
    insert
        .into_table(Alias::new("idempotency_keys"))
        .columns(["scope", "request_id", "request_hash", "create_us"].map(Alias::new))
        .values_panic([
            scope.into(),
            request_id.into(),
            request_hash.into(),
            to_micros(now).into(),
        ])
        .on_conflict(
            OnConflict::columns([Alias::new("scope"), Alias::new("request_id")])
                .do_nothing()
                .to_owned(),
        );
    let inserted = txn.execute(&insert).await?.rows_affected();
    if inserted == 1 {
        return Ok(Claim::New);
    }
    stored(txn, scope, request_id, request_hash)
        .await
        .map(Claim::Replay)
}

/// The stored response of a key that was claimed before (its insert
/// changed no row): `ALREADY_EXISTS` for another payload, `ABORTED` while
/// the first request is still in flight.
async fn stored<R: prost::Message + Default>(
    txn: &DatabaseTransaction,
    scope: &str,
    request_id: &str,
    request_hash: &str,
) -> Result<R, Error> {
    let row = txn
        .query_one(
            Query::select()
                .columns(["request_hash", "response"].map(Alias::new))
                .from(Alias::new("idempotency_keys"))
                .and_where(Expr::col(Alias::new("scope")).eq(scope))
                .and_where(Expr::col(Alias::new("request_id")).eq(request_id)),
        )
        .await?
        .ok_or_else(|| {
            Error::Aborted(
                "a concurrent request with the same request_id is in flight; retry".into(),
            )
        })?;
    let stored_hash: String = row.try_get("", "request_hash")?;
    if stored_hash != request_hash {
        return Err(Error::AlreadyExists {
            reason: "REQUEST_ID_REUSED",
            message: format!("request_id {request_id:?} was already used for a different request"),
        });
    }
    let response: Option<Vec<u8>> = row.try_get("", "response")?;
    let bytes = response.ok_or_else(|| {
        Error::Aborted("the first request with this request_id has not finished; retry".into())
    })?;
    R::decode(bytes.as_slice()).map_err(Error::internal)
}

/// Stores the response of a claimed request (in the same transaction).
pub async fn complete<R: prost::Message>(
    txn: &DatabaseTransaction,
    scope: &str,
    request_id: &str,
    response: &R,
) -> Result<(), DbErr> {
    let mut update = Query::update();
    update
        .table(Alias::new("idempotency_keys"))
        .value(Alias::new("response"), response.encode_to_vec())
        .and_where(Expr::col(Alias::new("scope")).eq(scope))
        .and_where(Expr::col(Alias::new("request_id")).eq(request_id));
    txn.execute(&update).await?;
    Ok(())
}

/// Deletes keys created before `cutoff`; returns how many.
pub async fn purge_older_than(
    db: &impl ConnectionTrait,
    cutoff: chrono::DateTime<chrono::Utc>,
) -> Result<u64, DbErr> {
    let mut delete = Query::delete();
    delete
        .from_table(Alias::new("idempotency_keys"))
        .and_where(Expr::col(Alias::new("create_us")).lt(to_micros(cutoff)));
    Ok(db.execute(&delete).await?.rows_affected())
}

/// A write transaction that may carry an idempotency key: begin it with
/// [`begin`], do the work on [`Write::txn`], and end it with
/// [`Write::finish`], which appends the outbox events, stores the response
/// for retries and commits, all at once.
#[derive(Debug)]
pub struct Write {
    txn: DatabaseTransaction,
    scope: &'static str,
    request_id: Option<String>,
}

/// Outcome of [`begin`].
#[derive(Debug)]
pub enum Begun<R> {
    /// First time (or no key): do the work.
    New(Write),
    /// A retry of a finished request: return its response.
    Replay(R),
}

/// Begins a write for `request` in `scope` (the rpc name), keyed by
/// `request_id` when there is one.
pub async fn begin<R: prost::Message + Default, Q: prost::Message>(
    db: &sea_orm::DatabaseConnection,
    scope: &'static str,
    request_id: Option<String>,
    request: &Q,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Begun<R>, Error> {
    let txn = sea_orm::TransactionTrait::begin(db).await?;
    if let Some(rid) = &request_id
        && let Claim::Replay(r) = claim::<R>(&txn, scope, rid, &hash(request), now).await?
    {
        return Ok(Begun::Replay(r));
    }
    Ok(Begun::New(Write {
        txn,
        scope,
        request_id,
    }))
}

impl Write {
    /// The transaction to do the work in.
    pub fn txn(&self) -> &DatabaseTransaction {
        &self.txn
    }

    /// Appends `events` to `outbox`, remembers `response` under the key and commits.
    pub async fn finish<R: prost::Message>(
        self,
        outbox: &crate::outbox::Outbox,
        events: &[crate::outbox::NewEvent],
        response: &R,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), Error> {
        match &self.request_id {
            // PostgreSQL: the events and the stored response in one
            // statement (the insert as a data-modifying CTE).
            Some(rid) if !events.is_empty() && crate::db::is_postgres(&self.txn) => {
                static FINISH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
                    format!(
                        "WITH appended AS ({}) UPDATE idempotency_keys \
                         SET response = $2 WHERE scope = $3 AND request_id = $4",
                        crate::outbox::PG_INSERT
                    )
                });
                self.txn
                    .execute_raw(sea_orm::Statement::from_sql_and_values(
                        sea_orm::DbBackend::Postgres,
                        FINISH.as_str(),
                        [
                            crate::outbox::pg_rows(events, now)?,
                            response.encode_to_vec().into(),
                            self.scope.into(),
                            rid.as_str().into(),
                        ],
                    ))
                    .await?;
            }
            Some(rid) => {
                outbox.append(&self.txn, events, now).await?;
                complete(&self.txn, self.scope, rid, response).await?;
            }
            None => outbox.append(&self.txn, events, now).await?,
        }
        outbox.commit(self.txn).await?;
        Ok(())
    }
}

/// Runs `work` as one idempotent write (see the module docs): a retry of a
/// finished request with the same `request_id` and payload answers the
/// stored response without running `work`; otherwise `work` runs in a new
/// transaction and returns the response and the events to append, which
/// commit together (the response stored under the key).
pub async fn write<Q, R>(
    rt: &crate::Runtime,
    scope: &'static str,
    request_id: Option<String>,
    request: &Q,
    now: chrono::DateTime<chrono::Utc>,
    work: impl AsyncFnOnce(&DatabaseTransaction) -> Result<(R, Vec<crate::outbox::NewEvent>), Error>,
) -> Result<R, Error>
where
    Q: prost::Message,
    R: prost::Message + Default,
{
    match begin::<R, Q>(&rt.db, scope, request_id.clone(), request, now).await? {
        Begun::Replay(previous) => Ok(previous),
        Begun::New(write) => {
            let (response, events) =
                crate::call::with_request_id(request_id, work(write.txn())).await?;
            write.finish(&rt.outbox, &events, &response, now).await?;
            Ok(response)
        }
    }
}

/// A keyed write on PostgreSQL whose claim and stored response ride inside
/// the caller's own statements as data-modifying CTEs, so a write of a few
/// statements pays no round trip for its key (RedeemReward):
///
/// 1. [`begin_inline`] opens the transaction (nothing else);
/// 2. the first statement carries [`Inline::claim_sql`] (its values
///    [`Inline::claim_values`]) and answers whether it inserted a row; if
///    not, [`Inline::replay`] answers as [`claim`] does (the stored response,
///    `ALREADY_EXISTS` or `ABORTED`): a concurrent duplicate blocked on the
///    insert until the first transaction ended, and the replay's statement,
///    a new snapshot, sees what it stored;
/// 3. the last statement carries [`Inline::complete_sql`] and the outbox
///    rows ([`crate::outbox::PG_INSERT`]);
/// 4. [`Inline::commit`].
///
/// The work runs inside [`crate::call::with_request_id`], as in [`write`].
#[derive(Debug)]
pub struct Inline {
    txn: DatabaseTransaction,
    scope: &'static str,
    request_id: String,
    hash: String,
    now_us: i64,
}

/// Begins an [`Inline`] write of `request` in `scope` keyed by `request_id`.
pub async fn begin_inline<Q: prost::Message>(
    db: &sea_orm::DatabaseConnection,
    scope: &'static str,
    request_id: String,
    request: &Q,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Inline, Error> {
    Ok(Inline {
        txn: sea_orm::TransactionTrait::begin(db).await?,
        scope,
        request_id,
        hash: hash(request),
        now_us: to_micros(now),
    })
}

impl Inline {
    /// The transaction to do the work in.
    pub fn txn(&self) -> &DatabaseTransaction {
        &self.txn
    }

    /// The claim, for a CTE: `INSERT … ON CONFLICT DO NOTHING RETURNING 1`
    /// (a row when the key is new), binding [`Self::claim_values`] as
    /// `$first` to `$first + 3`.
    pub fn claim_sql(first: usize) -> String {
        format!(
            "INSERT INTO idempotency_keys (scope, request_id, request_hash, create_us) \
             VALUES (${}, ${}, ${}, ${}) ON CONFLICT (scope, request_id) DO NOTHING RETURNING 1",
            first,
            first + 1,
            first + 2,
            first + 3
        )
    }

    /// The values of [`Self::claim_sql`].
    pub fn claim_values(&self) -> [sea_orm::Value; 4] {
        [
            self.scope.into(),
            self.request_id.as_str().into(),
            self.hash.as_str().into(),
            self.now_us.into(),
        ]
    }

    /// The answer when the claim inserted no row (a retry): the stored
    /// response, or `ALREADY_EXISTS` / `ABORTED` as [`claim`] answers. The
    /// transaction rolls back.
    pub async fn replay<R: prost::Message + Default>(self) -> Result<R, Error> {
        stored(&self.txn, self.scope, &self.request_id, &self.hash).await
    }

    /// Stores the response, for a CTE: an `UPDATE` of the key binding
    /// [`Self::complete_values`] as `$first` to `$first + 2`.
    pub fn complete_sql(first: usize) -> String {
        format!(
            "UPDATE idempotency_keys SET response = ${} WHERE scope = ${} AND request_id = ${}",
            first,
            first + 1,
            first + 2
        )
    }

    /// The values of [`Self::complete_sql`] for `response`.
    pub fn complete_values<R: prost::Message>(&self, response: &R) -> [sea_orm::Value; 3] {
        [
            response.encode_to_vec().into(),
            self.scope.into(),
            self.request_id.as_str().into(),
        ]
    }

    /// Commits (the response and the events were written by the work).
    pub async fn commit(self, outbox: &crate::outbox::Outbox) -> Result<(), Error> {
        outbox.commit(self.txn).await?;
        Ok(())
    }
}
