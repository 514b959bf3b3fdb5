//! Database connections: PostgreSQL in production, an SQLite file as the
//! embedded default. SQLite runs in WAL mode with one pooled connection:
//! SQLite has a single writer anyway, and one connection means no
//! `database is locked` errors under concurrent rpcs.

use crate::config::DatabaseConfig;
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr};
use std::time::Duration;

/// Most bind parameters one statement may carry on every backend: SQLite
/// allows 32,766, PostgreSQL 65,535. Batch inserts split at this.
pub const MAX_BIND_PARAMS: usize = 32_000;

/// Rows of `columns` values that fit in one statement.
pub fn rows_per_statement(columns: usize) -> usize {
    (MAX_BIND_PARAMS / columns.max(1)).max(1)
}

/// Opens a pool to `config.url`, creating the SQLite file (and its directory) if needed.
pub async fn connect(config: &DatabaseConfig) -> Result<DatabaseConnection, DbErr> {
    let mut url = config.url.clone();
    let sqlite = url.starts_with("sqlite:");
    if sqlite {
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
    }
    let mut opts = ConnectOptions::new(url);
    opts.acquire_timeout(Duration::from_secs(config.acquire_timeout_secs))
        .connect_timeout(Duration::from_secs(config.acquire_timeout_secs))
        .sqlx_logging(false);
    if sqlite {
        opts.max_connections(1)
            .min_connections(1)
            .map_sqlx_sqlite_opts(|o| {
                o.journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10))
                    .foreign_keys(true)
            });
    } else {
        opts.max_connections(config.max_connections)
            .min_connections(config.min_connections.min(config.max_connections));
    }
    Database::connect(opts).await
}

/// Whether the error means the database could not be reached (retryable).
pub fn is_unavailable(e: &DbErr) -> bool {
    matches!(e, DbErr::ConnectionAcquire(_) | DbErr::Conn(_))
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
