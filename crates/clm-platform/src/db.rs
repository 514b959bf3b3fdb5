//! Database connections: PostgreSQL in production, an SQLite file as the
//! embedded default.
//!
//! A service holds two handles (see `Runtime::db` and `Runtime::read`):
//!
//! * the **writer** ([`connect`]): every transaction and every write. On
//!   SQLite it is one connection in WAL mode: SQLite has a single writer
//!   anyway, and one connection means no `database is locked` errors under
//!   concurrent rpcs.
//! * the **readers** ([`connect_readers`]): reads outside a transaction
//!   (Get, List). On SQLite a pool of read-only connections to the same
//!   file, so a read never waits behind a write (WAL lets readers run
//!   beside the writer and see every committed write). On PostgreSQL, and
//!   for an in-memory SQLite database, it is the writer pool itself.
//!
//! Both skip sqlx's ping on every pool checkout (a second round trip per
//! statement): a connection is pinged only after it sat idle for
//! [`PING_IF_IDLE_FOR`]. Statements are prepared once per connection and
//! reused (sqlx caches them by SQL text), so queries must keep their SQL
//! text stable: bind values, never format them into the SQL.

use crate::config::DatabaseConfig;
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr};
use std::time::Duration;

/// Most bind parameters one statement may carry on every backend: SQLite
/// allows 32,766, PostgreSQL 65,535. Batch inserts split at this.
pub const MAX_BIND_PARAMS: usize = 32_000;

/// A pooled connection idle for this long is pinged before it is handed
/// out (a server, proxy or firewall may have dropped it meanwhile).
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(30);

/// Most SQLite reader connections: reads are CPU-bound, so more readers
/// than cores only add contention.
const MAX_SQLITE_READERS: u32 = 8;

/// Rows of `columns` values that fit in one statement.
pub fn rows_per_statement(columns: usize) -> usize {
    (MAX_BIND_PARAMS / columns.max(1)).max(1)
}

/// `config.url` with the SQLite file's directory created and `mode=rwc`
/// added; `None` for PostgreSQL.
fn sqlite_url(config: &DatabaseConfig) -> Result<Option<String>, DbErr> {
    let mut url = config.url.clone();
    if !url.starts_with("sqlite:") {
        return Ok(None);
    }
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = path.split('?').next().unwrap_or_default();
    if let Some(dir) = std::path::Path::new(path).parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| DbErr::Custom(format!("creating {}: {e}", dir.display())))?;
    }
    if !url.contains('?') {
        url.push_str("?mode=rwc");
    }
    Ok(Some(url))
}

fn is_in_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

fn options(url: String, config: &DatabaseConfig) -> ConnectOptions {
    let mut opts = ConnectOptions::new(url);
    opts.acquire_timeout(Duration::from_secs(config.acquire_timeout_secs))
        .connect_timeout(Duration::from_secs(config.acquire_timeout_secs))
        .test_before_acquire_if_idle_for(PING_IF_IDLE_FOR)
        .sqlx_logging(false);
    opts
}

/// Opens the writer pool to `config.url`, creating the SQLite file (and its
/// directory) if needed.
pub async fn connect(config: &DatabaseConfig) -> Result<DatabaseConnection, DbErr> {
    match sqlite_url(config)? {
        Some(url) => {
            let mut opts = options(url, config);
            opts.max_connections(1)
                .min_connections(1)
                .map_sqlx_sqlite_opts(|o| {
                    o.journal_mode(SqliteJournalMode::Wal)
                        .synchronous(SqliteSynchronous::Normal)
                        .busy_timeout(Duration::from_secs(10))
                        .foreign_keys(true)
                });
            Database::connect(opts).await
        }
        None => {
            let mut opts = options(config.url.clone(), config);
            opts.max_connections(config.max_connections)
                .min_connections(config.min_connections.min(config.max_connections));
            Database::connect(opts).await
        }
    }
}

/// Opens the reader pool of `config.url` beside `writer` (which must be
/// connected first: it puts a new SQLite file in WAL mode). On PostgreSQL,
/// and for an in-memory SQLite database, this is `writer` itself.
pub async fn connect_readers(
    config: &DatabaseConfig,
    writer: &DatabaseConnection,
) -> Result<DatabaseConnection, DbErr> {
    let Some(url) = sqlite_url(config)? else {
        return Ok(writer.clone());
    };
    if is_in_memory(&url) {
        return Ok(writer.clone());
    }
    let readers = config.max_connections.clamp(1, MAX_SQLITE_READERS);
    let mut opts = options(url, config);
    opts.max_connections(readers)
        .min_connections(1)
        .map_sqlx_sqlite_opts(|o| {
            o.read_only(true)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
        });
    Database::connect(opts).await
}

/// Whether the error means the database could not be reached (retryable).
pub fn is_unavailable(e: &DbErr) -> bool {
    matches!(e, DbErr::ConnectionAcquire(_) | DbErr::Conn(_))
}

/// Whether the database refused the statement with an error of its own (a
/// SQLSTATE: a constraint, a division by zero, a serialization failure):
/// the statement, and a transaction it ran as alone, did not commit. Any
/// other failure (a lost connection, a timeout) leaves the outcome
/// unknown: the statement may have committed before its answer was lost.
pub fn is_refused_by_database(e: &DbErr) -> bool {
    matches!(
        e,
        DbErr::Exec(sea_orm::RuntimeErr::SqlxError(x)) | DbErr::Query(sea_orm::RuntimeErr::SqlxError(x))
            if matches!(**x, sea_orm::sqlx::Error::Database(_))
    )
}

/// Whether the error is a unique-constraint violation.
pub fn is_unique_violation(e: &DbErr) -> bool {
    matches!(
        e.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    )
}

/// The unique-violation message (it names the constraint or columns), if any.
pub fn unique_violation_detail(e: &DbErr) -> Option<String> {
    match e.sql_err() {
        Some(sea_orm::SqlErr::UniqueConstraintViolation(m)) => Some(m),
        _ => None,
    }
}

/// How many times [`retry_conflicts`] runs a transaction at most.
pub const CONFLICT_ATTEMPTS: usize = 4;

/// Runs `work`, one whole transaction, again when it lost to a concurrent
/// transaction ([`crate::Error::is_transaction_conflict`]: a deadlock the
/// database broke, a serialization failure), up to [`CONFLICT_ATTEMPTS`]
/// times in all with a short random backoff; any other answer is returned
/// as it is. For write paths whose locks cannot always be taken in one
/// order, so that the caller never sees an ABORTED it did not cause.
pub async fn retry_conflicts<T, F, Fut>(work: F) -> crate::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::Result<T>>,
{
    use backon::{ExponentialBuilder, Retryable};
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(2))
        .with_max_delay(Duration::from_millis(50))
        .with_max_times(CONFLICT_ATTEMPTS - 1)
        .with_jitter();
    work.retry(backoff)
        .sleep(tokio::time::sleep)
        .when(crate::Error::is_transaction_conflict)
        .notify(|e, after| tracing::debug!(error = %e, ?after, "transaction conflict; running it again"))
        .await
}

/// Whether `db` is PostgreSQL.
pub fn is_postgres(db: &impl ConnectionTrait) -> bool {
    db.get_database_backend() == DbBackend::Postgres
}

/// Microseconds since the epoch: how every CLM table stores time (portable,
/// sortable, exact on both backends).
pub fn to_micros(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_micros()
}

/// Inverse of [`to_micros`].
pub fn from_micros(us: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// A LIKE pattern that matches `value` literally between the wildcards
/// `before` and `after` (`"%"` or `""`): `%`, `_` and `\` in `value` are
/// escaped, with `\` declared as the escape (SQLite has no default one).
pub fn like_literal(before: &str, value: &str, after: &str) -> sea_orm::sea_query::LikeExpr {
    let escaped = value
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    sea_orm::sea_query::LikeExpr::new(format!("{before}{escaped}{after}")).escape('\\')
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::TransactionTrait;

    fn config(dir: &std::path::Path) -> DatabaseConfig {
        crate::config::Config::defaults("db-test", dir).database
    }

    async fn count(db: &DatabaseConnection) -> i64 {
        let row = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT count(*) AS n FROM t",
            ))
            .await
            .expect("count")
            .expect("a row");
        row.try_get("", "n").expect("n")
    }

    #[tokio::test]
    async fn sqlite_readers_do_not_wait_behind_an_open_write() {
        let dir = tempfile::tempdir().expect("dir");
        let config = config(dir.path());
        let writer = connect(&config).await.expect("writer");
        writer
            .execute_unprepared("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .await
            .expect("table");
        let readers = connect_readers(&config, &writer).await.expect("readers");

        // The writer's only connection is inside an open transaction.
        let txn = writer.begin().await.expect("begin");
        txn.execute_unprepared("INSERT INTO t (id) VALUES (1)")
            .await
            .expect("insert");
        let during = tokio::time::timeout(Duration::from_secs(5), count(&readers))
            .await
            .expect("a read does not wait for the open write transaction");
        assert_eq!(during, 0, "readers see only committed rows");
        txn.commit().await.expect("commit");
        assert_eq!(count(&readers).await, 1, "and every committed one");

        let refused = readers
            .execute_unprepared("INSERT INTO t (id) VALUES (2)")
            .await;
        assert!(refused.is_err(), "reader connections are read-only");
    }

    #[tokio::test]
    async fn a_refusal_by_the_database_is_told_from_an_unknown_outcome() {
        let dir = tempfile::tempdir().expect("dir");
        let db = connect(&config(dir.path())).await.expect("db");
        db.execute_unprepared("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .await
            .expect("table");
        db.execute_unprepared("INSERT INTO t (id) VALUES (1)")
            .await
            .expect("insert");
        let refused = db
            .execute_unprepared("INSERT INTO t (id) VALUES (1)")
            .await
            .expect_err("a duplicate key");
        assert!(is_refused_by_database(&refused), "{refused:?}");
        let lost = DbErr::Conn(sea_orm::RuntimeErr::Internal("connection reset".into()));
        assert!(!is_refused_by_database(&lost));
        let timeout = DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::Timeout);
        assert!(!is_refused_by_database(&timeout));
    }

    #[tokio::test]
    async fn in_memory_sqlite_reads_through_the_writer() {
        let dir = tempfile::tempdir().expect("dir");
        let mut config = config(dir.path());
        config.url = "sqlite::memory:".into();
        let writer = connect(&config).await.expect("writer");
        writer
            .execute_unprepared("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .await
            .expect("table");
        let readers = connect_readers(&config, &writer).await.expect("readers");
        assert_eq!(count(&readers).await, 0, "the same database");
    }
}

/// Rows of one table as a single JSON parameter, for PostgreSQL bulk
/// inserts (`json_populate_recordset`): one small statement to parse and
/// plan however many rows, no bind parameter per value, and insertable as
/// a data-modifying CTE of a larger statement. Built from entity models,
/// so the column list is the entity's; the JSON text is written straight
/// from the models' values (no JSON tree, no key string per value).
#[derive(Debug, Clone)]
pub struct JsonRows {
    table: &'static str,
    columns: Vec<&'static str>,
    rows: String,
    len: usize,
}

impl JsonRows {
    /// The rows of `models`, every column of `E` but `skip` (say, a serial
    /// key the table numbers itself).
    pub fn of<E: sea_orm::EntityTrait>(models: &[E::Model], skip: &[E::Column]) -> Self {
        use sea_orm::{IdenStatic, Iterable, ModelTrait};
        let columns: Vec<E::Column> = E::Column::iter()
            .filter(|c| !skip.iter().any(|s| s.as_str() == c.as_str()))
            .collect();
        let mut rows = Vec::with_capacity(2 + models.len() * columns.len() * 16);
        rows.push(b'[');
        for (i, m) in models.iter().enumerate() {
            if i > 0 {
                rows.push(b',');
            }
            rows.push(b'{');
            for (j, c) in columns.iter().enumerate() {
                if j > 0 {
                    rows.push(b',');
                }
                write_json(&mut rows, c.as_str());
                rows.push(b':');
                write_json_value(&mut rows, &m.get(*c));
            }
            rows.push(b'}');
        }
        rows.push(b']');
        Self {
            table: E::default().table_name(),
            columns: columns.iter().map(|c| c.as_str()).collect(),
            // serde_json writes UTF-8 only.
            rows: String::from_utf8(rows).unwrap_or_default(),
            len: models.len(),
        }
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `INSERT INTO table (columns) SELECT columns FROM
    /// json_populate_recordset(NULL::table, $param::json)`: ends with its
    /// `FROM` clause, so a caller may append a `WHERE`.
    pub fn insert_sql(&self, param: usize) -> String {
        let columns = self
            .columns
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "INSERT INTO {t} ({columns}) SELECT {columns} FROM json_populate_recordset(NULL::{t}, ${param}::json)",
            t = self.table,
        )
    }

    /// The rows, the value to bind as the `param` of [`Self::insert_sql`].
    pub fn value(self) -> sea_orm::Value {
        self.rows.into()
    }
}

/// Appends `value` as JSON (a string, number or bool: what serde_json
/// writes for it; it cannot fail on those).
fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let _ = serde_json::to_writer(out, value);
}

/// Appends a column's value as JSON, as `sea_value_to_json_value` would
/// render it, without building the JSON value for the common types.
fn write_json_value(out: &mut Vec<u8>, value: &sea_orm::Value) {
    use sea_orm::Value as V;
    match value {
        V::String(Some(s)) => write_json(out, s.as_str()),
        V::Bool(Some(b)) => write_json(out, b),
        V::SmallInt(Some(n)) => write_json(out, n),
        V::Int(Some(n)) => write_json(out, n),
        V::BigInt(Some(n)) => write_json(out, n),
        V::Double(Some(n)) => write_json(out, n),
        other => write_json(out, &sea_orm::sea_query::sea_value_to_json_value(other)),
    }
}
