//! The transactional outbox: domain events written in the same transaction
//! as the change they describe, numbered in commit order.
//!
//! **Commit order without a global lock.** A number taken inside a
//! transaction can commit after a higher one, and a reader that has passed
//! 11 would never see 10. So writers do not number their events: each row
//! is inserted with a NULL `position`, and writers commit concurrently
//! (commits group as PostgreSQL likes). After a commit, the writer's
//! process wakes its *relay*, which in one short transaction, under an
//! advisory lock named after the service, stamps every committed unstamped
//! *transaction*, sends one `NOTIFY` for the whole batch and commits.
//!
//! **A stamp per transaction, not per event** (PostgreSQL). A statement
//! trigger on `outbox` records each writing transaction once in
//! `outbox_txns` (its id, `pg_current_xact_id()`, which every event row
//! also carries in `txn`). The relay gives each committed unstamped
//! transaction the next range of positions, as wide as the span of its
//! events' sequences: `base` for its lowest sequence `lo`, `last` for its
//! highest. An event's position is `base + (sequence - lo)`. So a stamp
//! writes one small row per transaction and never rewrites an event (the
//! ingest appends a thousand events a transaction). Positions are strictly
//! increasing in commit order, with gaps where other transactions' sequence
//! numbers fell inside a transaction's span; readers never rely on them
//! being dense. Transactions are placed in the order of their highest
//! sequence, which keeps every transaction after those it waited for; it
//! needs sequence numbers taken in time order, so `outbox`'s sequence is
//! never cached per session (PostgreSQL's default, `CACHE 1`).
//! Stamping is serialised and only sees committed rows, so a
//! reader that has passed position p never finds a smaller one later. A
//! writer that crashes between its commit and the wake-up is covered by
//! every replica's relay polling for unstamped transactions.
//!
//! SQLite has a single writer, so the writer stamps its own rows in the
//! same transaction (`position = sequence`, a column of `outbox`). The view
//! `outbox_events` shows every event with its position on both backends.
//!
//! **Waking watchers.** A stamp wakes this process's watchers at once;
//! other replicas hear the relay's coalesced `NOTIFY clm_outbox_<service>`
//! and wake theirs ([`Outbox::spawn`]). Watchers also poll, as a safety net.
//!
//! **Retention.** [`Outbox::purge`] deletes events older than the retention
//! (never the newest one) and records the last purged position, so a
//! consumer asking to resume before it gets `OUT_OF_RANGE` naming the oldest
//! kept event instead of a silent skip.

use crate::db::{from_micros, is_postgres, to_micros};
use clm_proto::common::ChangeEvent;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Order, Query};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, Statement,
    TransactionTrait,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// Most transactions one relay transaction stamps.
const STAMP_BATCH: i64 = 2_000;

/// The relay's stamp (PostgreSQL; `$1` = [`STAMP_BATCH`]): the next
/// unstamped transactions, their events' sequence span (two index probes
/// each, however many events they hold), each placed after the head in
/// order of its *highest* sequence: an event written after another
/// transaction committed (it waited for that one's lock) takes a higher
/// sequence than all of that one's events, so a transaction never goes
/// before one it followed, whatever their lowest sequences. A transaction
/// whose events were all rolled back (a savepoint) leaves no events and
/// its row goes.
/// Answers how many transactions it stamped and the positions they took.
const PG_STAMP: &str = "WITH next AS ( \
       SELECT txn FROM outbox_txns WHERE last IS NULL ORDER BY txn LIMIT $1), \
     span AS ( \
       SELECT n.txn, (SELECT min(sequence) FROM outbox e WHERE e.txn = n.txn) AS lo, \
         (SELECT max(sequence) FROM outbox e WHERE e.txn = n.txn) AS hi FROM next n), \
     head AS (SELECT COALESCE(MAX(last), 0) AS m FROM outbox_txns), \
     placed AS ( \
       SELECT s.txn, s.lo, s.hi - s.lo AS width, \
         head.m + (sum(s.hi - s.lo + 1) OVER (ORDER BY s.hi ROWS UNBOUNDED PRECEDING))::int8 AS last \
       FROM span s, head WHERE s.lo IS NOT NULL), \
     gone AS (DELETE FROM outbox_txns o USING span s WHERE o.txn = s.txn AND s.lo IS NULL), \
     stamped AS ( \
       UPDATE outbox_txns o SET lo = p.lo, base = p.last - p.width, last = p.last \
       FROM placed p WHERE o.txn = p.txn RETURNING p.width + 1 AS width) \
     SELECT COUNT(*) AS txns, COALESCE(SUM(width), 0)::int8 AS positions FROM stamped";

/// The events after a position (PostgreSQL; `$1` = the position, `$2` =
/// the limit), in the next `$2` transactions (each stamped transaction
/// holds an event, so they hold `$2` events if there are): transactions in
/// position order, each one's events in sequence order. The shape keeps
/// the plan one whatever the statistics say (a new service's tables have
/// none): the next transactions by their index, then each one's events by
/// `outbox_txn` (`LATERAL … LIMIT`), never a scan of the whole outbox.
/// `{types}` is empty or ` AND e.event_type IN (…)`.
const PG_READ_AFTER: &str = "SELECT t.base + (e.sequence - t.lo) AS position, e.event_id, \
     e.event_type, e.subject, e.payload, e.occurred_us, e.traceparent \
     FROM (SELECT txn, lo, base, last FROM outbox_txns WHERE last > $1 ORDER BY last LIMIT $2) t \
     CROSS JOIN LATERAL (SELECT sequence, event_id, event_type, subject, payload, occurred_us, \
       traceparent FROM outbox e WHERE e.txn = t.txn AND e.sequence > t.lo + ($1 - t.base){types} \
       ORDER BY e.sequence LIMIT $2) e \
     ORDER BY t.last, e.sequence LIMIT $2";

/// The last position of the `$2`-th transaction after position `$1`
/// (PostgreSQL): where a filtered read goes on when those transactions
/// held no event of its types.
const PG_SKIP: &str =
    "SELECT last FROM outbox_txns WHERE last > $1 ORDER BY last LIMIT 1 OFFSET $2 - 1";

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Fully qualified proto name of the payload.
    pub event_type: String,
    /// Resource the event is about.
    pub subject: String,
    /// Encoded payload message.
    pub payload: Vec<u8>,
}

impl NewEvent {
    /// An event carrying `message`, about `subject`.
    pub fn new<M: prost::Name>(subject: impl Into<String>, message: &M) -> Self {
        Self {
            event_type: M::full_name(),
            subject: subject.into(),
            payload: prost::Message::encode_to_vec(message),
        }
    }
}

/// The oldest and newest positions a stream can resume from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Events up to and including this position were purged (0 = none).
    pub purged_through: i64,
    /// The newest stamped position (0 = no event yet).
    pub head: i64,
}

/// The outbox of one service.
#[derive(Clone, Debug)]
pub struct Outbox {
    source: &'static str,
    /// Bumped whenever events become visible to readers in this process.
    visible: Arc<watch::Sender<u64>>,
    /// Wakes the relay after a local commit (PostgreSQL).
    relay: Arc<Notify>,
}

impl Outbox {
    /// The outbox of service `source` (e.g. `customer`).
    pub fn new(source: &'static str) -> Self {
        Self {
            source,
            visible: Arc::new(watch::channel(0).0),
            relay: Arc::new(Notify::new()),
        }
    }

    /// Name of the service that owns this outbox.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// PostgreSQL channel on which this service's relay announces new events.
    pub fn channel(&self) -> String {
        format!("clm_outbox_{}", self.source)
    }

    /// Advisory-lock key that serialises this service's relays: a stable
    /// hash of the service name, so services may share a database.
    fn lock_key(&self) -> i64 {
        let mut h: i64 = 0x434c_4d5f_4f42; // "CLM_OB"
        for b in self.source.bytes() {
            h = h.wrapping_mul(31).wrapping_add(i64::from(b));
        }
        h
    }

    /// Appends events inside `txn`; then [`Outbox::commit`] it.
    pub async fn append(
        &self,
        txn: &DatabaseTransaction,
        events: &[NewEvent],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), DbErr> {
        if events.is_empty() {
            return Ok(());
        }
        if is_postgres(txn) {
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                PG_INSERT,
                [pg_rows(events, now)?],
            ))
            .await?;
            return Ok(());
        }
        let occurred = to_micros(now);
        // Every event of one transaction continues the same trace.
        let traceparent = crate::client::current_traceparent();
        for chunk in events.chunks(crate::db::rows_per_statement(6)) {
            let mut insert = Query::insert();
            insert.into_table(Alias::new("outbox")).columns(
                [
                    "event_id",
                    "event_type",
                    "subject",
                    "payload",
                    "occurred_us",
                    "traceparent",
                ]
                .map(Alias::new),
            );
            for e in chunk {
                insert.values_panic([
                    uuid::Uuid::now_v7().to_string().into(),
                    e.event_type.clone().into(),
                    e.subject.clone().into(),
                    e.payload.clone().into(),
                    occurred.into(),
                    traceparent.clone().into(),
                ]);
            }
            txn.execute(&insert).await?;
        }
        // SQLite has one writer: insertion order is commit order.
        txn.execute_unprepared("UPDATE outbox SET position = sequence WHERE position IS NULL")
            .await?;
        Ok(())
    }

    /// Commits `txn`, then makes its events visible: wakes the relay on
    /// PostgreSQL, this process's watchers on SQLite.
    pub async fn commit(&self, txn: DatabaseTransaction) -> Result<(), DbErr> {
        let postgres = is_postgres(&txn);
        txn.commit().await?;
        self.committed(postgres);
        Ok(())
    }

    /// Announces events committed outside [`Outbox::commit`] (a single
    /// statement that appended them in its own implicit transaction):
    /// wakes the relay on PostgreSQL, readers of this process otherwise.
    pub fn committed(&self, postgres: bool) {
        if postgres {
            self.relay.notify_one();
        } else {
            self.wake_watchers();
        }
    }

    fn wake_watchers(&self) {
        self.visible.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Stamps positions on committed, unstamped events (PostgreSQL);
    /// returns how many positions the stamped transactions took.
    pub async fn stamp(&self, db: &DatabaseConnection) -> Result<u64, DbErr> {
        Ok(self.stamp_batch(db).await?.1)
    }

    /// [`Outbox::stamp`]: whether the batch was full (more may be left),
    /// and the positions taken.
    async fn stamp_batch(&self, db: &DatabaseConnection) -> Result<(bool, u64), DbErr> {
        if !is_postgres(db) {
            return Ok((false, 0));
        }
        let txn = db.begin().await?;
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock($1)",
            [self.lock_key().into()],
        ))
        .await?;
        // Runs after the lock, so its snapshot sees every earlier stamp.
        let row = txn
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                PG_STAMP,
                [STAMP_BATCH.into()],
            ))
            .await?
            .ok_or_else(|| DbErr::Custom("the outbox stamp answered no row".into()))?;
        let txns: i64 = row.try_get("", "txns")?;
        let stamped = u64::try_from(row.try_get::<i64>("", "positions")?).unwrap_or(0);
        if stamped > 0 {
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_notify($1, '')",
                [self.channel().into()],
            ))
            .await?;
        }
        txn.commit().await?;
        if stamped > 0 {
            self.wake_watchers();
        }
        Ok((txns >= STAMP_BATCH, stamped))
    }

    /// On PostgreSQL, runs the relay (stamping after local commits and every
    /// `poll`) and a listener that wakes this process's watchers when another
    /// replica's relay stamps, until `shutdown`. A no-op on SQLite.
    pub fn spawn(&self, db: &DatabaseConnection, poll: Duration, shutdown: CancellationToken) {
        if !is_postgres(db) {
            return;
        }
        self.spawn_relay(db.clone(), poll, shutdown.clone());
        self.spawn_listener(db, shutdown);
    }

    fn spawn_relay(&self, db: DatabaseConnection, poll: Duration, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                match this.stamp_batch(&db).await {
                    // A full batch may leave more: go again at once.
                    Ok((true, _)) => continue,
                    Ok(_) => backoff = Duration::from_millis(50),
                    Err(e) => {
                        tracing::warn!(source = this.source, error = %e, "outbox relay failed; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = shutdown.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
                tokio::select! {
                    () = this.relay.notified() => {}
                    () = tokio::time::sleep(poll) => {}
                    () = shutdown.cancelled() => {
                        // Stamp what the last writers committed before leaving.
                        let _ = this.stamp(&db).await;
                        return;
                    }
                }
            }
        });
    }

    fn spawn_listener(&self, db: &DatabaseConnection, shutdown: CancellationToken) {
        let pool = db.get_postgres_connection_pool().clone();
        let this = self.clone();
        let channel = self.channel();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let listened = async {
                    let mut listener =
                        sea_orm::sqlx::postgres::PgListener::connect_with(&pool).await?;
                    listener.listen(&channel).await?;
                    loop {
                        listener.recv().await?;
                        this.wake_watchers();
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), sea_orm::sqlx::Error>(())
                };
                tokio::select! {
                    r = listened => {
                        if let Err(e) = r {
                            tracing::warn!(source = this.source, error = %e, ?backoff, "outbox listener failed; reconnecting");
                        }
                    }
                    () = shutdown.cancelled() => return,
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        });
    }

    /// A receiver that changes whenever events become visible in this process.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.visible.subscribe()
    }

    /// The positions a consumer may resume from.
    pub async fn bounds(&self, db: &impl ConnectionTrait) -> Result<Bounds, DbErr> {
        let head = if is_postgres(db) {
            "SELECT MAX(last) FROM outbox_txns"
        } else {
            "SELECT MAX(position) FROM outbox"
        };
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                format!(
                    "SELECT COALESCE(({head}), 0) AS head, \
                     COALESCE((SELECT purged_through FROM outbox_retention WHERE id = 1), 0) AS purged"
                ),
            ))
            .await?;
        Ok(match row {
            Some(r) => Bounds {
                head: r.try_get("", "head")?,
                purged_through: r.try_get("", "purged")?,
            },
            None => Bounds {
                head: 0,
                purged_through: 0,
            },
        })
    }

    /// Deletes events that occurred before `cutoff`, always keeping the
    /// newest, and records the last purged position; returns how many.
    pub async fn purge(
        &self,
        db: &DatabaseConnection,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, DbErr> {
        let backend = db.get_database_backend();
        let txn = db.begin().await?;
        // Write first: it takes SQLite's write lock (waiting its busy
        // timeout) before anything is read. A transaction that reads and
        // then writes fails at once with SQLITE_BUSY when another
        // connection wrote in between; on PostgreSQL it orders purges.
        txn.execute_raw(Statement::from_string(
            backend,
            "UPDATE outbox_retention SET purged_through = purged_through WHERE id = 1",
        ))
        .await?;
        let postgres = backend == DbBackend::Postgres;
        // The newest event is always kept: on PostgreSQL, its whole
        // transaction.
        let last = if postgres {
            "SELECT MAX(t.base + (e.sequence - t.lo)) AS p FROM outbox e \
             JOIN outbox_txns t ON t.txn = e.txn WHERE e.occurred_us < $1 \
             AND t.last < (SELECT MAX(last) FROM outbox_txns)"
        } else {
            "SELECT MAX(position) AS p FROM outbox WHERE occurred_us < $1 \
             AND position < (SELECT MAX(position) FROM outbox)"
        };
        let row = txn
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                last,
                [to_micros(cutoff).into()],
            ))
            .await?;
        let through: Option<i64> = match row {
            Some(r) => r.try_get("", "p")?,
            None => None,
        };
        let Some(through) = through else {
            return Ok(0);
        };
        let delete = if postgres {
            "DELETE FROM outbox e USING outbox_txns t WHERE e.txn = t.txn \
             AND t.last IS NOT NULL AND t.base + (e.sequence - t.lo) <= $1"
        } else {
            "DELETE FROM outbox WHERE position <= $1"
        };
        let deleted = txn
            .execute_raw(Statement::from_sql_and_values(
                backend,
                delete,
                [through.into()],
            ))
            .await?
            .rows_affected();
        if postgres {
            txn.execute_raw(Statement::from_sql_and_values(
                backend,
                "DELETE FROM outbox_txns WHERE last <= $1",
                [through.into()],
            ))
            .await?;
        }
        txn.execute_raw(Statement::from_sql_and_values(
            backend,
            "UPDATE outbox_retention SET purged_through = $1 WHERE id = 1 AND purged_through < $1",
            [through.into()],
        ))
        .await?;
        txn.commit().await?;
        Ok(deleted)
    }

    /// Reads up to `limit` events after position `after`, oldest first,
    /// optionally of `types` only.
    pub async fn read_after(
        &self,
        db: &impl ConnectionTrait,
        after: i64,
        types: &[String],
        limit: u64,
    ) -> Result<Vec<ChangeEvent>, DbErr> {
        let rows = if is_postgres(db) {
            self.pg_read_after(db, after, types, limit).await?
        } else {
            self.sqlite_read_after(db, after, types, limit).await?
        };
        rows.into_iter()
            .map(|r| {
                let event_type: String = r.try_get("", "event_type")?;
                let payload: Vec<u8> = r.try_get("", "payload")?;
                let occurred: i64 = r.try_get("", "occurred_us")?;
                Ok(ChangeEvent {
                    sequence: r.try_get("", "position")?,
                    event_id: r.try_get("", "event_id")?,
                    subject: r.try_get("", "subject")?,
                    occurred_time: Some(crate::convert::timestamp(from_micros(occurred))),
                    payload: Some(prost_types::Any {
                        type_url: format!("{}{event_type}", clm_proto::TYPE_URL_PREFIX),
                        value: payload,
                    }),
                    event_type,
                    source: self.source.to_owned(),
                    traceparent: r
                        .try_get::<Option<String>>("", "traceparent")?
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// [`Outbox::read_after`] on PostgreSQL ([`PG_READ_AFTER`]). A filtered
    /// read whose next transactions hold no event of its types goes on
    /// after them ([`PG_SKIP`]) until it finds some or reaches the head, so
    /// an empty answer always means "nothing more yet".
    async fn pg_read_after(
        &self,
        db: &impl ConnectionTrait,
        after: i64,
        types: &[String],
        limit: u64,
    ) -> Result<Vec<sea_orm::QueryResult>, DbErr> {
        let limit = i64::try_from(std::cmp::max(limit, 1)).unwrap_or(i64::MAX);
        let filter = if types.is_empty() {
            String::new()
        } else {
            let marks: Vec<String> = (0..types.len()).map(|i| format!("${}", i + 3)).collect();
            format!(" AND e.event_type IN ({})", marks.join(", "))
        };
        let sql = PG_READ_AFTER.replace("{types}", &filter);
        let mut from = after;
        loop {
            let mut values: Vec<sea_orm::Value> = vec![from.into(), limit.into()];
            values.extend(types.iter().map(|t| t.as_str().into()));
            let rows = db
                .query_all_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    sql.as_str(),
                    values,
                ))
                .await?;
            if !rows.is_empty() || types.is_empty() {
                return Ok(rows);
            }
            let next = db
                .query_one_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    PG_SKIP,
                    [from.into(), limit.into()],
                ))
                .await?;
            match next {
                Some(r) => from = r.try_get("", "last")?,
                None => return Ok(rows),
            }
        }
    }

    /// [`Outbox::read_after`] on SQLite: by the `position` column.
    async fn sqlite_read_after(
        &self,
        db: &impl ConnectionTrait,
        after: i64,
        types: &[String],
        limit: u64,
    ) -> Result<Vec<sea_orm::QueryResult>, DbErr> {
        let mut q = Query::select();
        q.columns(
            [
                "position",
                "event_id",
                "event_type",
                "subject",
                "payload",
                "occurred_us",
                "traceparent",
            ]
            .map(Alias::new),
        )
        .from(Alias::new("outbox"))
        .and_where(Expr::col(Alias::new("position")).gt(after))
        .order_by(Alias::new("position"), Order::Asc)
        .limit(limit);
        if !types.is_empty() {
            q.and_where(Expr::col(Alias::new("event_type")).is_in(types.iter().cloned()));
        }
        db.query_all(&q).await
    }
}

/// The PostgreSQL statement appending events, for [`Outbox::append`] and for
/// callers that fold it into a statement of their own as a data-modifying
/// CTE. Its one parameter, `$1`, is the rows as JSON ([`pg_rows`]): far less
/// to parse and plan than bind parameters per row, and no bind-parameter
/// limit. It ends with its `FROM` clause, so a caller may append a `WHERE`
/// (say, to append only when the rest of its statement went ahead).
pub const PG_INSERT: &str = "INSERT INTO outbox (event_id, event_type, subject, payload, occurred_us, traceparent) \
     SELECT event_id, event_type, subject, decode(payload, 'base64'), occurred_us, traceparent \
     FROM json_to_recordset($1::json) \
     AS x(event_id text, event_type text, subject text, payload text, occurred_us int8, \
          traceparent text)";

/// [`PG_INSERT`]'s parameter for `events`: serialized straight from
/// borrowed rows, with no JSON tree built in between (the ingest appends
/// thousands of events a call). Every event continues the current trace.
pub fn pg_rows(
    events: &[NewEvent],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<sea_orm::Value, DbErr> {
    pg_rows_of(&[Traced::here(events, now)])
}

/// The events of one call, with the time they occurred and the trace they
/// continue: several calls' events written by one statement
/// ([`pg_rows_of`]) each keep their own.
#[derive(Debug, Clone)]
pub struct Traced<'a> {
    /// The events.
    pub events: &'a [NewEvent],
    /// When they occurred.
    pub now: chrono::DateTime<chrono::Utc>,
    /// The W3C trace context they continue.
    pub traceparent: Option<String>,
}

impl<'a> Traced<'a> {
    /// `events` continuing the trace of the current span.
    pub fn here(events: &'a [NewEvent], now: chrono::DateTime<chrono::Utc>) -> Self {
        Self {
            events,
            now,
            traceparent: crate::client::current_traceparent(),
        }
    }
}

/// [`PG_INSERT`]'s parameter for the events of several calls.
pub fn pg_rows_of(calls: &[Traced<'_>]) -> Result<sea_orm::Value, DbErr> {
    use base64::Engine;
    #[derive(serde::Serialize)]
    struct Row<'a> {
        event_id: String,
        event_type: &'a str,
        subject: &'a str,
        payload: String,
        occurred_us: i64,
        traceparent: Option<&'a str>,
    }
    let rows: Vec<Row<'_>> = calls
        .iter()
        .flat_map(|call| {
            let occurred = to_micros(call.now);
            call.events.iter().map(move |e| Row {
                event_id: uuid::Uuid::now_v7().to_string(),
                event_type: &e.event_type,
                subject: &e.subject,
                payload: base64::engine::general_purpose::STANDARD.encode(&e.payload),
                occurred_us: occurred,
                traceparent: call.traceparent.as_deref(),
            })
        })
        .collect();
    serde_json::to_string(&rows)
        .map(Into::into)
        .map_err(|e| DbErr::Custom(format!("outbox rows as JSON: {e}")))
}
