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
    /// A position outside what can be served (e.g. a change-stream cursor
    /// older than retention or beyond the newest event).
    #[error("{0}")]
    OutOfRange(String),
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

impl From<sea_orm::DbErr> for Error {
    fn from(e: sea_orm::DbErr) -> Self {
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
            Error::OutOfRange(m) => with_info(Code::OutOfRange, "OUT_OF_RANGE", m),
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

    #[test]
    fn internal_hides_the_cause() {
        let status: Status = Error::internal("syntax error at or near SELECT").into();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("SELECT"));
    }
}
