//! The one error type every service maps its failures into, and its single
//! mapping to `tonic::Status` with `google.rpc` details.
//!
//! Users never see SQL, panics or stack traces: [`Error::Internal`] is
//! logged with its cause and reported as a bare `INTERNAL`.

use clm_domain::{Violation, Violations};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `ErrorInfo.domain` of every CLM error.
pub const ERROR_DOMAIN: &str = "clm.dev";

/// A failure an rpc reports to its caller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input; each violation names a field.
    #[error("invalid argument: {0}")]
    InvalidArgument(Violations),
    /// The named resource does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A unique value is taken or an idempotency key was reused with another payload.
    #[error("{message}")]
    AlreadyExists {
        /// Machine-readable reason (`ErrorInfo.reason`), e.g. `EMAIL_TAKEN`.
        reason: &'static str,
        /// Human-readable message.
        message: String,
    },
    /// The system is not in a state that allows the operation.
    #[error("{message}")]
    FailedPrecondition {
        /// Machine-readable reason, e.g. `STAGE_TRANSITION_NOT_ALLOWED`.
        reason: &'static str,
        /// Human-readable message.
        message: String,
    },
    /// A concurrent change won (stale etag, conflicting retry): re-read and retry.
    #[error("{0}")]
    Aborted(String),
    /// No or bad credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's roles do not allow the rpc.
    #[error("{0}")]
    PermissionDenied(String),
    /// A dependency is down or overloaded; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected infrastructure failure. The message is logged, never returned.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Bad input in one field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(Violation::new(field, description).into())
    }

    /// Wraps any unexpected failure.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<Violation> for Error {
    fn from(v: Violation) -> Self {
        Self::InvalidArgument(v.into())
    }
}

impl From<Violations> for Error {
    fn from(v: Violations) -> Self {
        Self::InvalidArgument(v)
    }
}

/// The SQLSTATE of a database error, if the database reported one.
fn sqlstate(e: &sea_orm::DbErr) -> Option<String> {
    use sea_orm::{DbErr, RuntimeErr};
    match e {
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => match e.as_ref() {
            sea_orm::sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
            _ => None,
        },
        _ => None,
    }
}

/// Serialization failure and deadlock: the transaction lost a race and
/// succeeds when retried.
const RETRYABLE_SQLSTATES: [&str; 2] = ["40001", "40P01"];

impl From<sea_orm::DbErr> for Error {
    fn from(e: sea_orm::DbErr) -> Self {
        if let Some(code) = sqlstate(&e)
            && RETRYABLE_SQLSTATES.contains(&code.as_str())
        {
            tracing::debug!(sqlstate = %code, error = %e, "transaction conflict");
            return Self::Aborted("the transaction conflicted with a concurrent one; retry".into());
        }
        if crate::db::is_unavailable(&e) {
            return Self::Unavailable("the database is unavailable; retry later".into());
        }
        Self::Internal(format!("database: {e}"))
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::InvalidArgument(violations) => {
                let mut details = ErrorDetails::new();
                for v in &violations.0 {
                    details.add_bad_request_violation(v.field.clone(), v.description.clone());
                }
                Status::with_error_details(Code::InvalidArgument, violations.to_string(), details)
            }
            Error::NotFound(what) => Status::with_error_details(
                Code::NotFound,
                format!("{what} not found"),
                ErrorDetails::with_resource_info(resource_type(&what), what.clone(), "", ""),
            ),
            Error::AlreadyExists { reason, message } => {
                with_info(Code::AlreadyExists, reason, message)
            }
            Error::FailedPrecondition { reason, message } => {
                with_info(Code::FailedPrecondition, reason, message)
            }
            Error::Aborted(m) => with_info(Code::Aborted, "CONCURRENT_MODIFICATION", m),
            Error::Unauthenticated(m) => with_info(Code::Unauthenticated, "UNAUTHENTICATED", m),
            Error::PermissionDenied(m) => with_info(Code::PermissionDenied, "ROLE_NOT_ALLOWED", m),
            Error::Unavailable(m) => Status::with_error_details(
                Code::Unavailable,
                m,
                ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(1))),
            ),
            Error::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Status::internal("internal error; it has been logged")
            }
        }
    }
}

fn with_info(code: Code, reason: &str, message: String) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(
            reason,
            ERROR_DOMAIN,
            std::collections::HashMap::<String, String>::new(),
        ),
    )
}

fn resource_type(name: &str) -> String {
    name.split('/').next().unwrap_or_default().to_owned()
}

/// Shorthand for rpc results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_field_violations() {
        let status: Status = Error::invalid("customer.email", "bad").into();
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let br = details.bad_request().expect("bad request detail");
        assert_eq!(br.field_violations[0].field, "customer.email");
    }

    /// A database error as sqlx reports it, with a SQLSTATE.
    #[derive(Debug)]
    struct FakeDbError(&'static str);

    impl std::fmt::Display for FakeDbError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "ERROR: could not serialize access on table secret_table")
        }
    }

    impl std::error::Error for FakeDbError {}

    impl sea_orm::sqlx::error::DatabaseError for FakeDbError {
        fn message(&self) -> &str {
            "could not serialize access on table secret_table"
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sea_orm::sqlx::error::ErrorKind {
            sea_orm::sqlx::error::ErrorKind::Other
        }
    }

    fn db_err(code: &'static str) -> sea_orm::DbErr {
        let e = sea_orm::sqlx::Error::Database(Box::new(FakeDbError(code)));
        sea_orm::DbErr::Query(sea_orm::RuntimeErr::SqlxError(std::sync::Arc::new(e)))
    }

    #[test]
    fn serialization_failures_and_deadlocks_are_aborted() {
        for code in ["40001", "40P01"] {
            let status: Status = Error::from(db_err(code)).into();
            assert_eq!(status.code(), Code::Aborted, "{code}");
            assert!(!status.message().contains("secret_table"));
        }
        let status: Status = Error::from(db_err("42601")).into();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret_table"));
    }

    /// The real thing on PostgreSQL (when `CLM_TEST_DATABASE_URL` is set):
    /// a repeatable-read update of a row changed since the snapshot (40001),
    /// and two transactions locking two rows in opposite order (40P01).
    #[tokio::test]
    async fn postgres_conflicts_map_to_aborted() {
        use sea_orm::{ConnectionTrait, Database, TransactionTrait};
        let Some(url) = std::env::var("CLM_TEST_DATABASE_URL")
            .ok()
            .filter(|s| !s.is_empty())
        else {
            return;
        };
        let db = Database::connect(&url).await.expect("postgres");
        let table = format!("conflict_{}", uuid::Uuid::new_v4().simple());
        db.execute_unprepared(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, v int); INSERT INTO {table} VALUES (1, 0), (2, 0)"
        ))
        .await
        .expect("table");

        let t1 = db
            .begin_with_config(Some(sea_orm::IsolationLevel::RepeatableRead), None)
            .await
            .expect("begin");
        t1.execute_unprepared(&format!("SELECT v FROM {table} WHERE id = 1"))
            .await
            .expect("snapshot");
        db.execute_unprepared(&format!("UPDATE {table} SET v = 1 WHERE id = 1"))
            .await
            .expect("concurrent update");
        let e = t1
            .execute_unprepared(&format!("UPDATE {table} SET v = 2 WHERE id = 1"))
            .await
            .expect_err("serialization failure");
        assert!(matches!(Error::from(e), Error::Aborted(_)));
        let _ = t1.rollback().await;

        let a = db.begin().await.expect("begin");
        let b = db.begin().await.expect("begin");
        for t in [&a, &b] {
            t.execute_unprepared("SET LOCAL deadlock_timeout = '20ms'")
                .await
                .expect("set");
        }
        a.execute_unprepared(&format!("UPDATE {table} SET v = 3 WHERE id = 1"))
            .await
            .expect("a locks 1");
        b.execute_unprepared(&format!("UPDATE {table} SET v = 3 WHERE id = 2"))
            .await
            .expect("b locks 2");
        let sql_a = format!("UPDATE {table} SET v = 4 WHERE id = 2");
        let sql_b = format!("UPDATE {table} SET v = 4 WHERE id = 1");
        let (ra, rb) = tokio::join!(a.execute_unprepared(&sql_a), b.execute_unprepared(&sql_b));
        let deadlocked = [ra.err(), rb.err()].into_iter().flatten().next();
        assert!(matches!(
            deadlocked.map(Error::from),
            Some(Error::Aborted(_))
        ));
        let _ = a.rollback().await;
        let _ = b.rollback().await;
        db.execute_unprepared(&format!("DROP TABLE {table}"))
            .await
            .expect("drop");
    }

    #[test]
    fn internal_hides_the_cause() {
        let status: Status = Error::internal("syntax error at or near SELECT").into();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("SELECT"));
    }
}
