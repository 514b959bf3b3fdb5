//! The timer queue every service uses for work due at an instant (score
//! thresholds crossed by decay, time windows closing, points and
//! invitations expiring): one row per (kind, key) in `timer_queue` with its
//! due instant, a version and an optional payload, kept across restarts
//! and fired by the service [`Clock`](clm_domain::Clock) at that instant.
//!
//! # Convention
//!
//! * **Arm in the writer's transaction.** The write that changes what a
//!   timer depends on calls [`arm`] (or [`disarm`]) in its own transaction
//!   and, after the commit, [`Timers::wake`]. Arming bumps the version, so
//!   a firing that raced with the write never deletes the new due instant.
//! * **Fire in the handler's transaction.** A service registers a
//!   [`OnDue`] per kind in its descriptor (`Parts::timer`). The queue's task
//!   reads due timers, opens a transaction, lets the handler take the locks
//!   its writers take first ([`OnDue::lock`]: one lock order everywhere),
//!   then claims the timers that are still due (`FOR UPDATE SKIP LOCKED` on
//!   PostgreSQL; SQLite has one writer), so each fires once however many
//!   replicas run. The handler works in that transaction
//!   ([`crate::changes::Apply`]: its events go to the outbox with it) and
//!   may re-arm timers; the ones it did not re-arm are deleted before the
//!   commit.
//! * **Deliver outside any transaction.** Work that calls another service
//!   (a stage move) is a [`Deliver`] kind: its timers carry the call as a
//!   payload, are claimed by pushing their due instant forward by the
//!   retry delay (so a replica that dies mid-call leaves them to be retried),
//!   called with no transaction open, and deleted once delivered. The call
//!   must be idempotent (a request id): a retry may repeat it.
//! * **Failing rounds back off** (doubling to [`MAX_BACKOFF`]) with one log
//!   line per failing streak; `clm.timer.lag` (seconds between the oldest
//!   due instant and now, per kind) is recorded each round.

use crate::changes::Apply;
use crate::db::to_micros;
use crate::error::Error;
use sea_orm::sea_query::{
    Alias, Expr, ExprTrait, LockBehavior, LockType, OnConflict, Order, Query,
};
use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseTransaction, DbErr, FromQueryResult, TransactionTrait,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::Duration;
use tokio::sync::Notify;

/// How often the queue looks at the clock when nothing wakes it (a test
/// clock moved forward is noticed within this).
pub const TICK: Duration = Duration::from_millis(50);
/// On SQLite, the longest an idle queue trusts its last answer to "when is
/// the next timer due?" before asking the database again (see [`run`]).
pub const IDLE_RECHECK: Duration = Duration::from_secs(1);
/// Longest pause between rounds while they keep failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Timers fired per transaction.
pub const BATCH: u64 = 1000;
/// How long a claimed [`Deliver`] timer waits before it is tried again.
pub const RETRY_DELAY: Duration = Duration::from_secs(2);

const TABLE: &str = "timer_queue";

/// Bumped by every write of this process that may arm a timer or bring
/// one forward ([`arm`], [`pg_rows`], [`rearm_prefix`]), before its
/// transaction commits. An idle queue on SQLite (one process writes the
/// database) skips its look at the table while this has not moved since
/// its last two looks and its last answer is not yet due.
static ARMED: AtomicU64 = AtomicU64::new(0);

fn armed() {
    ARMED.fetch_add(1, AtomicOrdering::Relaxed);
}

fn a(s: &str) -> Alias {
    Alias::new(s)
}

/// A due timer.
#[derive(Debug, Clone, PartialEq, Eq, FromQueryResult)]
pub struct Timer {
    /// Its kind (`scoring.threshold`).
    pub kind: String,
    /// Its key within the kind.
    pub key: String,
    /// Whose it is (a customer): erasure and merges find timers by it.
    pub subject: String,
    /// When it is due (µs, service clock).
    pub due_us: i64,
    /// Bumped by every [`arm`].
    pub version: i64,
    /// What the kind's handler needs, if anything.
    pub payload: Option<Vec<u8>>,
}

/// A timer to arm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arm {
    /// Key within the kind.
    pub key: String,
    /// Whose it is.
    pub subject: String,
    /// When it is due (µs).
    pub due_us: i64,
    /// What the handler needs.
    pub payload: Option<Vec<u8>>,
}

impl Arm {
    /// `key` of `subject`, due at `due_us`, without payload.
    pub fn new(key: impl Into<String>, subject: impl Into<String>, due_us: i64) -> Self {
        Self {
            key: key.into(),
            subject: subject.into(),
            due_us,
            payload: None,
        }
    }
}

/// Arms (creates or moves) `timers` of `kind` in the caller's transaction.
pub async fn arm(db: &impl ConnectionTrait, kind: &str, timers: &[Arm]) -> Result<(), DbErr> {
    armed();
    let mut timers = std::borrow::Cow::Borrowed(timers);
    if crate::db::is_postgres(db) {
        // Timers without payload (most) as one array per column: one
        // statement text whatever their number, prepared once per
        // connection (a multi-row VALUES is parsed and planned anew).
        let (bare, with): (Vec<&Arm>, Vec<&Arm>) = timers.iter().partition(|t| t.payload.is_none());
        if !bare.is_empty() {
            arm_bare_postgres(db, kind, &bare).await?;
        }
        timers = std::borrow::Cow::Owned(with.into_iter().cloned().collect());
    }
    // 6 columns a row; stay far below any bind-parameter limit.
    for part in timers.chunks(1000) {
        let mut insert = Query::insert();
        insert
            .into_table(a(TABLE))
            .columns(["kind", "key", "subject", "due_us", "version", "payload"].map(a));
        for t in part {
            insert.values_panic([
                kind.into(),
                t.key.clone().into(),
                t.subject.clone().into(),
                t.due_us.into(),
                1i64.into(),
                t.payload.clone().into(),
            ]);
        }
        insert.on_conflict(
            OnConflict::columns([a("kind"), a("key")])
                .update_columns([a("subject"), a("due_us"), a("payload")])
                .value(a("version"), Expr::col((a(TABLE), a("version"))).add(1))
                .to_owned(),
        );
        db.execute(&insert).await?;
    }
    Ok(())
}

/// [`arm`] on PostgreSQL of timers without payload: keys, subjects and
/// instants as three array parameters.
async fn arm_bare_postgres(
    db: &impl ConnectionTrait,
    kind: &str,
    timers: &[&Arm],
) -> Result<(), DbErr> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "INSERT INTO {TABLE} (kind, key, subject, due_us, version, payload) \
             SELECT $1, k, s, d, 1, NULL FROM {} AS x(k, s, d) \
             ON CONFLICT (kind, key) DO UPDATE SET subject = excluded.subject, due_us = excluded.due_us, \
             payload = excluded.payload, version = {TABLE}.version + 1",
            crate::bulk::unnest(2, ["text", "text", "int8"])
        )
    });
    db.execute_raw(sea_orm::Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        SQL.as_str(),
        [
            kind.into(),
            crate::bulk::column(timers, |t| t.key.clone()),
            crate::bulk::column(timers, |t| t.subject.clone()),
            crate::bulk::column(timers, |t| t.due_us),
        ],
    ))
    .await?;
    Ok(())
}

/// [`arm`] on PostgreSQL for a data-modifying CTE of a larger statement:
/// the timers are the JSON rows of [`pg_rows`] bound as `$param`; same
/// upsert (a timer armed again moves and its version bumps).
pub fn pg_arm_sql(param: usize) -> String {
    format!(
        "INSERT INTO {TABLE} (kind, key, subject, due_us, version, payload) \
         SELECT kind, key, subject, due_us, 1, decode(payload, 'base64') \
         FROM json_to_recordset(${param}::json) AS x(kind text, key text, subject text, due_us int8, payload text) \
         ON CONFLICT (kind, key) DO UPDATE SET subject = excluded.subject, due_us = excluded.due_us, \
         payload = excluded.payload, version = {TABLE}.version + 1"
    )
}

/// The parameter of [`pg_arm_sql`] for `timers` of `kind`.
pub fn pg_rows(kind: &str, timers: &[Arm]) -> Result<sea_orm::Value, DbErr> {
    armed();
    use base64::Engine;
    #[derive(serde::Serialize)]
    struct Row<'a> {
        kind: &'a str,
        key: &'a str,
        subject: &'a str,
        due_us: i64,
        payload: Option<String>,
    }
    let rows: Vec<Row<'_>> = timers
        .iter()
        .map(|t| Row {
            kind,
            key: &t.key,
            subject: &t.subject,
            due_us: t.due_us,
            payload: t
                .payload
                .as_ref()
                .map(|p| base64::engine::general_purpose::STANDARD.encode(p)),
        })
        .collect();
    serde_json::to_string(&rows)
        .map(Into::into)
        .map_err(|e| DbErr::Custom(format!("timer rows as JSON: {e}")))
}

/// Removes `keys` of `kind`.
pub async fn disarm(db: &impl ConnectionTrait, kind: &str, keys: &[String]) -> Result<(), DbErr> {
    for part in keys.chunks(1000) {
        let delete = Query::delete()
            .from_table(a(TABLE))
            .and_where(Expr::col(a("kind")).eq(kind))
            .and_where(Expr::col(a("key")).is_in(part.iter().cloned()))
            .to_owned();
        db.execute(&delete).await?;
    }
    Ok(())
}

/// Removes every timer of `kind` whose key starts with `prefix`.
pub async fn disarm_prefix(
    db: &impl ConnectionTrait,
    kind: &str,
    prefix: &str,
) -> Result<(), DbErr> {
    let delete = Query::delete()
        .from_table(a(TABLE))
        .and_where(Expr::col(a("kind")).eq(kind))
        .and_where(Expr::col(a("key")).like(crate::db::like_literal("", prefix, "%")))
        .to_owned();
    db.execute(&delete).await?;
    Ok(())
}

/// Moves every armed timer of `kind` whose key starts with `prefix` to
/// `due_us` (re-armed: their versions bump).
pub async fn rearm_prefix(
    db: &impl ConnectionTrait,
    kind: &str,
    prefix: &str,
    due_us: i64,
) -> Result<(), DbErr> {
    armed();
    let update = Query::update()
        .table(a(TABLE))
        .value(a("due_us"), due_us)
        .value(a("version"), Expr::col(a("version")).add(1))
        .and_where(Expr::col(a("kind")).eq(kind))
        .and_where(Expr::col(a("key")).like(crate::db::like_literal("", prefix, "%")))
        .to_owned();
    db.execute(&update).await?;
    Ok(())
}

/// Removes every timer of `kind` (or of every kind) whose subject is one of
/// `subjects` (an erasure, the duplicates of a merge).
pub async fn disarm_subjects(
    db: &impl ConnectionTrait,
    kind: Option<&str>,
    subjects: &[String],
) -> Result<(), DbErr> {
    for part in subjects.chunks(1000) {
        let mut delete = Query::delete();
        delete
            .from_table(a(TABLE))
            .and_where(Expr::col(a("subject")).is_in(part.iter().cloned()));
        if let Some(k) = kind {
            delete.and_where(Expr::col(a("kind")).eq(k));
        }
        db.execute(&delete).await?;
    }
    Ok(())
}

/// Gives the timers of `from` subjects (of every kind) to `to`: a merge
/// moves a duplicate's pending work to the survivor, due as before.
pub async fn move_subjects(
    db: &impl ConnectionTrait,
    from: &[String],
    to: &str,
) -> Result<(), DbErr> {
    for part in from.chunks(1000) {
        let update = Query::update()
            .table(a(TABLE))
            .value(a("subject"), to.to_owned())
            .and_where(Expr::col(a("subject")).is_in(part.iter().cloned()))
            .to_owned();
        db.execute(&update).await?;
    }
    Ok(())
}

/// The timers of `kind` whose subject is one of `subjects`: key to due
/// instant.
pub async fn of_subjects(
    db: &impl ConnectionTrait,
    kind: &str,
    subjects: &[String],
) -> Result<HashMap<String, i64>, DbErr> {
    Ok(listed(db, kind, subjects)
        .await?
        .into_iter()
        .map(|(key, _, due)| (key, due))
        .collect())
}

/// The (subject, due instant) of every timer of `kind` whose subject is
/// one of `subjects` (a subject may have several).
pub async fn due_of_subjects(
    db: &impl ConnectionTrait,
    kind: &str,
    subjects: &[String],
) -> Result<Vec<(String, i64)>, DbErr> {
    Ok(listed(db, kind, subjects)
        .await?
        .into_iter()
        .map(|(_, subject, due)| (subject, due))
        .collect())
}

/// (key, subject, due) of the timers of `kind` of `subjects`.
async fn listed(
    db: &impl ConnectionTrait,
    kind: &str,
    subjects: &[String],
) -> Result<Vec<(String, String, i64)>, DbErr> {
    let mut out = Vec::new();
    for part in subjects.chunks(1000) {
        let q = Query::select()
            .columns([a("key"), a("subject"), a("due_us")])
            .from(a(TABLE))
            .and_where(Expr::col(a("kind")).eq(kind))
            .and_where(Expr::col(a("subject")).is_in(part.iter().cloned()))
            .to_owned();
        for r in db.query_all(&q).await? {
            out.push((
                r.try_get("", "key")?,
                r.try_get("", "subject")?,
                r.try_get("", "due_us")?,
            ));
        }
    }
    Ok(out)
}

const COLUMNS: [&str; 6] = ["kind", "key", "subject", "due_us", "version", "payload"];

/// Timers of `kind` due at `now_us`, soonest first; claimed (`FOR UPDATE
/// SKIP LOCKED`) on PostgreSQL when `lock`.
async fn due(
    db: &impl ConnectionTrait,
    kind: &str,
    now_us: i64,
    keys: Option<&[String]>,
    lock: bool,
) -> Result<Vec<Timer>, DbErr> {
    let mut q = Query::select();
    q.columns(COLUMNS.map(a))
        .from(a(TABLE))
        .and_where(Expr::col(a("kind")).eq(kind))
        .and_where(Expr::col(a("due_us")).lte(now_us))
        .order_by(a("due_us"), Order::Asc)
        .order_by(a("key"), Order::Asc)
        .limit(BATCH);
    if let Some(keys) = keys {
        q.and_where(Expr::col(a("key")).is_in(keys.iter().cloned()));
    }
    if lock && db.get_database_backend() == DatabaseBackend::Postgres {
        q.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
    }
    Timer::find_by_statement(db.get_database_backend().build(&q))
        .all(db)
        .await
}

/// Deletes fired timers that were not re-armed meanwhile (same version):
/// one statement per kind and 500 timers.
async fn delete_fired(db: &impl ConnectionTrait, fired: &[Timer]) -> Result<(), DbErr> {
    let mut by_kind: BTreeMap<&str, Vec<&Timer>> = BTreeMap::new();
    for t in fired {
        by_kind.entry(t.kind.as_str()).or_default().push(t);
    }
    for (kind, timers) in by_kind {
        for part in timers.chunks(500) {
            let delete = Query::delete()
                .from_table(a(TABLE))
                .and_where(Expr::col(a("kind")).eq(kind))
                .and_where(
                    Expr::tuple([Expr::col(a("key")), Expr::col(a("version"))]).is_in(
                        part.iter().map(|t| {
                            Expr::tuple([Expr::val(t.key.as_str()), Expr::val(t.version)])
                        }),
                    ),
                )
                .to_owned();
            db.execute(&delete).await?;
        }
    }
    Ok(())
}

/// The soonest due instant of `kinds`, in one statement: for each kind the
/// first entry of the `(kind, due_us)` index (a scalar subquery per kind),
/// then the least of those. One `MIN` over `kind IN (...)` read every
/// armed timer of those kinds (a bitmap scan, ~9 ms for 20,000 timers on
/// PostgreSQL), every [`TICK`]; a statement per kind cost a round trip
/// each. Its text depends only on how many kinds the queue serves, so each
/// connection prepares it once.
async fn next_due(db: &impl ConnectionTrait, kinds: &[String]) -> Result<Option<i64>, DbErr> {
    if kinds.is_empty() {
        return Ok(None);
    }
    let backend = db.get_database_backend();
    let firsts: Vec<String> = (1..=kinds.len())
        .map(|i| {
            let kind = if backend == DatabaseBackend::Postgres {
                format!("${i}")
            } else {
                "?".to_owned()
            };
            format!(
                "SELECT (SELECT due_us FROM {TABLE} WHERE kind = {kind} ORDER BY due_us LIMIT 1) AS due"
            )
        })
        .collect();
    let sql = format!(
        "SELECT MIN(due) AS due FROM ({}) AS firsts",
        firsts.join(" UNION ALL ")
    );
    let values = kinds.iter().map(|k| sea_orm::Value::from(k.as_str()));
    match db
        .query_one_raw(sea_orm::Statement::from_sql_and_values(
            backend, sql, values,
        ))
        .await?
    {
        Some(r) => r.try_get("", "due"),
        None => Ok(None),
    }
}

/// Fires timers of one kind inside a transaction (see the module docs).
#[async_trait::async_trait]
pub trait OnDue: Send + Sync {
    /// Takes, in `txn`, the locks this kind's writers take before they arm
    /// timers (customers, a membership version), for the timers about to
    /// be claimed, so the queue and the writers lock in one order.
    async fn lock(&self, _txn: &DatabaseTransaction, _due: &[Timer]) -> Result<(), Error> {
        Ok(())
    }

    /// Fires `due` (claimed, still due, soonest first: each at its own
    /// `due_us`) in `cx`'s transaction. Timers it re-arms with [`arm`]
    /// stay; the others are deleted with the commit.
    async fn fire(&self, cx: &mut Apply, due: Vec<Timer>) -> Result<(), Error>;
}

/// Delivers timers of one kind with no transaction open (a call to
/// another service; see the module docs).
#[async_trait::async_trait]
pub trait Deliver: Send + Sync {
    /// Delivers one timer. `Ok` deletes it; an error leaves it to be tried
    /// again after [`RETRY_DELAY`] (the round backs off while they fail).
    async fn deliver(&self, timer: &Timer) -> Result<(), Error>;
}

/// How a kind is handled.
#[derive(Clone)]
pub enum Handler {
    /// In a transaction.
    Fire(Arc<dyn OnDue>),
    /// Outside any transaction.
    Deliver(Arc<dyn Deliver>),
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fire(_) => "Fire",
            Self::Deliver(_) => "Deliver",
        })
    }
}

/// The queue's wake-up, shared by a service's writers and its task.
#[derive(Debug, Clone, Default)]
pub struct Timers {
    wake: Arc<Notify>,
}

impl Timers {
    /// Asks the queue to look now (after a commit that armed timers).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// [`Self::wake`] for a commit that armed a timer due at `due_us`, when
    /// `now_us` is the writer's clock: only when it is due within a
    /// [`TICK`]. The queue looks at least every tick, so a later timer
    /// fires on time without a wake, and a write path that arms far-off
    /// timers at a high rate (a coupon's expiry on every redemption) does
    /// not keep the queue reading every kind's due timers after each commit.
    pub fn wake_for(&self, due_us: i64, now_us: i64) {
        let tick_us = i64::try_from(TICK.as_micros()).unwrap_or(i64::MAX);
        if due_us.saturating_sub(now_us) <= tick_us {
            self.wake();
        }
    }
}

/// Fires due timers of `kind` once; returns how many were due.
async fn fire_round(
    rt: &crate::Runtime,
    kind: &str,
    handler: &Arc<dyn OnDue>,
) -> Result<usize, Error> {
    let now_us = to_micros(clm_domain::clock::micros(rt.clock.now()));
    let seen = due(&rt.read, kind, now_us, None, false).await?;
    if seen.is_empty() {
        return Ok(0);
    }
    let count = seen.len();
    let mut cx = Apply::begin(rt).await?;
    handler.lock(cx.txn(), &seen).await?;
    // Claimed under the locks: still due (a writer may have moved them) and
    // not taken by another replica.
    let keys: Vec<String> = seen.iter().map(|t| t.key.clone()).collect();
    let claimed = due(cx.txn(), kind, now_us, Some(&keys), true).await?;
    if claimed.is_empty() {
        return Ok(count);
    }
    handler.fire(&mut cx, claimed.clone()).await?;
    delete_fired(cx.txn(), &claimed).await?;
    cx.commit().await?;
    Ok(count)
}

/// Delivers due timers of `kind` once; returns how many were due.
async fn deliver_round(
    rt: &crate::Runtime,
    kind: &str,
    handler: &Arc<dyn Deliver>,
) -> Result<usize, Error> {
    let now_us = to_micros(clm_domain::clock::micros(rt.clock.now()));
    let retry_us = now_us.saturating_add(i64::try_from(RETRY_DELAY.as_micros()).unwrap_or(0));
    // Claim: push them forward, so no other replica delivers them meanwhile
    // and a replica that dies mid-call leaves them to be retried.
    let txn = rt.db.begin().await?;
    let claimed = due(&txn, kind, now_us, None, true).await?;
    for part in claimed.chunks(1000) {
        let update = Query::update()
            .table(a(TABLE))
            .value(a("due_us"), retry_us)
            .and_where(Expr::col(a("kind")).eq(kind))
            .and_where(Expr::col(a("key")).is_in(part.iter().map(|t| t.key.clone())))
            .to_owned();
        txn.execute(&update).await?;
    }
    txn.commit().await?;
    let count = claimed.len();
    let mut delivered = Vec::with_capacity(count);
    let mut failure = None;
    for t in claimed {
        match handler.deliver(&t).await {
            Ok(()) => delivered.push(t),
            Err(e) => failure = Some(e),
        }
    }
    if !delivered.is_empty() {
        let txn = rt.db.begin().await?;
        delete_fired(&txn, &delivered).await?;
        txn.commit().await?;
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(count),
    }
}

/// The queue's task: fires the timers of `handlers`' kinds as the service
/// clock reaches them, until the service stops.
pub async fn run(rt: crate::Runtime, handlers: BTreeMap<String, Handler>) {
    if handlers.is_empty() {
        return;
    }
    let kinds: Vec<String> = handlers.keys().cloned().collect();
    let meter = crate::telemetry::meter(rt.service);
    let lag = meter
        .f64_gauge("clm.timer.lag")
        .with_description("Seconds between the oldest due timer and now, per kind")
        .with_unit("s")
        .build();
    let mut failures: u32 = 0;
    // Whether this round looks at every kind: after a wake, a full batch or
    // a failure. A plain tick first asks one question of all kinds (the
    // soonest due time) and looks only when something is due, so an idle
    // queue costs one query a tick instead of a transaction or two per kind.
    let mut look = true;
    // SQLite: one process writes the database, so nothing is armed that
    // this process's `ARMED` did not see. The answer of the last look at
    // the table stands while `ARMED` has not moved since the look before it
    // (a bump precedes its commit, so a look between the two may miss the
    // row: the next look covers it) and for at most `IDLE_RECHECK`: an idle
    // `clm up` does not query every service's queue every tick.
    let single_writer = !crate::db::is_postgres(&rt.db);
    let mut known: Option<(Option<i64>, tokio::time::Instant)> = None;
    let mut seen = [u64::MAX; 2];
    loop {
        let mut full = false;
        let mut failed = None;
        let mut next = None;
        let mut next_known = false;
        if !look {
            let epoch = ARMED.load(AtomicOrdering::Relaxed);
            let trusted = known.filter(|(_, at)| {
                single_writer && seen == [epoch, epoch] && at.elapsed() < IDLE_RECHECK
            });
            let n = match trusted {
                Some((n, _)) => Ok(n),
                None => next_due(&rt.read, &kinds).await.inspect(|n| {
                    seen = [seen[1], epoch];
                    known = Some((*n, tokio::time::Instant::now()));
                }),
            };
            match n {
                Ok(n) => {
                    look = n.is_some_and(|d| d <= to_micros(rt.clock.now()));
                    next = n;
                    next_known = !look;
                }
                Err(_) => look = true,
            }
        }
        if look {
            known = None;
            for (kind, handler) in &handlers {
                let outcome = match handler {
                    Handler::Fire(h) => fire_round(&rt, kind, h).await,
                    Handler::Deliver(h) => deliver_round(&rt, kind, h).await,
                };
                match outcome {
                    Ok(n) => full |= n as u64 == BATCH,
                    Err(e) => failed = Some((kind.clone(), e)),
                }
            }
        }
        let now = rt.clock.now();
        if !next_known {
            next = next_due(&rt.read, &kinds).await.ok().flatten();
        }
        let behind = next.map_or(0.0, |d| ((to_micros(now) - d) as f64 / 1e6).max(0.0));
        lag.record(
            behind,
            &[opentelemetry::KeyValue::new("service", rt.service)],
        );
        let pause = match failed {
            Some((kind, e)) => {
                failures = failures.saturating_add(1);
                if failures == 1 {
                    tracing::warn!(service = rt.service, kind, error = %e, "timer queue: a round failed; retrying with backoff");
                }
                TICK.saturating_mul(2u32.saturating_pow(Ord::min(failures, 10)))
                    .min(MAX_BACKOFF)
            }
            None => {
                if failures > 0 {
                    tracing::info!(
                        service = rt.service,
                        failed_rounds = failures,
                        "timer queue: rounds succeed again"
                    );
                }
                failures = 0;
                if full {
                    continue;
                }
                match next {
                    Some(d) => Duration::from_micros(
                        u64::try_from(Ord::max(d.saturating_sub(to_micros(now)), 0)).unwrap_or(0),
                    )
                    .min(TICK),
                    None => TICK,
                }
            }
        };
        tokio::select! {
            () = rt.timers.wake.notified(), if failures == 0 => look = true,
            () = tokio::time::sleep(pause) => look = failures > 0,
            () = rt.background.cancelled() => return,
        }
    }
}
