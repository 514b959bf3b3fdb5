//! The one error type every service maps its failures into, and its single
//! mapping to `tonic::Status` with `google.rpc` details.
//!
//! Users never see SQL, panics or stack traces: [`Error::Internal`] is
//! logged with its cause and reported as a bare `INTERNAL`.
//!
//! Every status is bounded: it travels in HTTP/2 headers, and C-core
//! clients (Python, Node's native stack) refuse more than 16 KB of them, so
//! an unbounded error turns into a local `RESOURCE_EXHAUSTED` and the caller
//! never sees what was wrong. The mapping keeps at most [`MAX_VIOLATIONS`]
//! field violations within [`MAX_VIOLATION_BYTES`] (then one entry saying
//! how many more), cuts fields, descriptions and messages to a few hundred
//! bytes, and so keeps the whole status (`grpc-message` plus
//! `grpc-status-details-bin`) under [`MAX_STATUS_BYTES`].

use clm_domain::{Violation, Violations};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `ErrorInfo.domain` of every CLM error.
pub const ERROR_DOMAIN: &str = "clm.dev";

/// Most field violations reported in one `BadRequest`; the rest are counted
/// in one last entry (`"... and N more violations"`).
pub const MAX_VIOLATIONS: usize = 20;
/// Most bytes of field paths and descriptions reported in one `BadRequest`.
pub const MAX_VIOLATION_BYTES: usize = 2048;
/// Longest field path reported, in bytes (keys inside paths are the caller's).
pub const MAX_FIELD_BYTES: usize = 128;
/// Longest violation description reported, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 256;
/// Longest status message, in bytes (before percent-encoding).
pub const MAX_MESSAGE_BYTES: usize = 256;
/// Upper bound of a status on the wire (`grpc-status`, the percent-encoded
/// `grpc-message` and the base64 `grpc-status-details-bin`), far below the
/// 8 KB that every gRPC client accepts.
pub const MAX_STATUS_BYTES: usize = 5 * 1024;

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
    /// The call's deadline (the caller's `grpc-timeout`, or a limit the
    /// service sets on a bounded piece of work) passed before the work ended.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A limit was reached (a fatigue cap, a per-member limit, a quota):
    /// answered with a `QuotaFailure` naming `subject` and an `ErrorInfo`
    /// whose metadata carries the resource and the limit.
    #[error("{message}")]
    ResourceExhausted {
        /// Machine-readable reason (`ErrorInfo.reason`), e.g. `FATIGUE_CAP_REACHED`.
        reason: &'static str,
        /// What the limit applies to (`QuotaFailure.violations[].subject`),
        /// e.g. `customers/123` or `rewards/9:customers/123`.
        subject: String,
        /// The limit, as a caller would read it (`3 per 7d`).
        limit: String,
        /// Human-readable message.
        message: String,
    },
    /// The work was cancelled (the caller went away, an operation was
    /// cancelled, the service is stopping).
    #[error("{0}")]
    Cancelled(String),
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

/// The message of [`Error::Aborted`] for a transaction that lost to a
/// concurrent one ([`RETRYABLE_SQLSTATES`]).
const CONFLICT: &str = "the transaction conflicted with a concurrent one; retry";

impl Error {
    /// Whether a transaction lost a race with a concurrent one (PostgreSQL's
    /// serialization failure or deadlock): nothing of it committed, and
    /// running the whole transaction again can succeed
    /// ([`crate::db::retry_conflicts`]). A stale etag or a unique key taken
    /// first is not one: running it again gives the same answer.
    pub fn is_transaction_conflict(&self) -> bool {
        matches!(self, Error::Aborted(m) if m == CONFLICT)
    }
}

/// A unique key taken by a concurrent writer (PostgreSQL `23505`, SQLite
/// `SQLITE_CONSTRAINT_UNIQUE` 2067 and `SQLITE_CONSTRAINT_PRIMARYKEY` 1555).
/// Write paths check for existing keys inside their transaction; reaching
/// the index means another transaction committed the same key first (two
/// updates under one etag, two creates of one id), so the loser is ABORTED:
/// re-read and retry, which then answers the real state.
const UNIQUE_SQLSTATES: [&str; 3] = ["23505", "2067", "1555"];

/// Whether `e` is a unique-key violation.
pub fn is_unique_violation(e: &sea_orm::DbErr) -> bool {
    sqlstate(e).is_some_and(|c| UNIQUE_SQLSTATES.contains(&c.as_str()))
}

impl From<sea_orm::DbErr> for Error {
    fn from(e: sea_orm::DbErr) -> Self {
        if let Some(code) = sqlstate(&e)
            && RETRYABLE_SQLSTATES.contains(&code.as_str())
        {
            tracing::debug!(sqlstate = %code, error = %e, "transaction conflict");
            return Self::Aborted(CONFLICT.into());
        }
        if is_unique_violation(&e) {
            tracing::debug!(error = %e, "unique key taken by a concurrent write");
            return Self::Aborted(
                "a concurrent request changed the same resource first; re-read and retry".into(),
            );
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
            Error::InvalidArgument(violations) => invalid_argument(&violations),
            Error::NotFound(what) => {
                let what = cut(&what, MAX_FIELD_BYTES);
                Status::with_error_details(
                    Code::NotFound,
                    format!("{what} not found"),
                    ErrorDetails::with_resource_info(resource_type(&what), what.clone(), "", ""),
                )
            }
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
                cut(&m, MAX_MESSAGE_BYTES),
                ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(1))),
            ),
            Error::DeadlineExceeded(m) => with_info(Code::DeadlineExceeded, "DEADLINE_EXCEEDED", m),
            Error::ResourceExhausted {
                reason,
                subject,
                limit,
                message,
            } => {
                let subject = cut(&subject, MAX_FIELD_BYTES);
                let limit = cut(&limit, MAX_FIELD_BYTES);
                let mut details = ErrorDetails::with_quota_failure_violation(
                    subject.clone(),
                    cut(&message, MAX_DESCRIPTION_BYTES),
                );
                details.set_error_info(
                    reason,
                    ERROR_DOMAIN,
                    std::collections::HashMap::from([
                        ("resource".to_owned(), subject),
                        ("limit".to_owned(), limit),
                    ]),
                );
                Status::with_error_details(
                    Code::ResourceExhausted,
                    cut(&message, MAX_MESSAGE_BYTES),
                    details,
                )
            }
            Error::Cancelled(m) => with_info(Code::Cancelled, "CANCELLED", m),
            Error::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Status::internal("internal error; it has been logged")
            }
        }
    }
}

/// `INVALID_ARGUMENT` with a bounded `BadRequest` (see the module docs).
fn invalid_argument(violations: &Violations) -> Status {
    let all = &violations.0;
    let mut details = ErrorDetails::new();
    let mut bytes = 0;
    let mut shown = 0;
    for v in all.iter().take(MAX_VIOLATIONS) {
        let field = cut(&v.field, MAX_FIELD_BYTES);
        let description = cut(&v.description, MAX_DESCRIPTION_BYTES);
        bytes += field.len() + description.len();
        if bytes > MAX_VIOLATION_BYTES && shown > 0 {
            break;
        }
        details.add_bad_request_violation(field, description);
        shown += 1;
    }
    let more = all.len() - shown;
    if more > 0 {
        details.add_bad_request_violation(
            "",
            format!(
                "... and {more} more violation{}",
                if more == 1 { "" } else { "s" }
            ),
        );
    }
    let first = all
        .first()
        .map_or_else(|| "invalid argument".to_owned(), ToString::to_string);
    let message = if all.len() > 1 {
        let tail = format!(" (and {} more violations)", all.len() - 1);
        format!("{}{tail}", cut(&first, MAX_MESSAGE_BYTES - tail.len()))
    } else {
        cut(&first, MAX_MESSAGE_BYTES)
    };
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// `s` cut to at most `max` bytes on a character boundary, ending with `…` if cut.
fn cut(s: &str, max: usize) -> String {
    const ELLIPSIS: &str = "…";
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max.saturating_sub(ELLIPSIS.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ELLIPSIS}", &s[..end])
}

fn with_info(code: Code, reason: &str, message: String) -> Status {
    Status::with_error_details(
        code,
        cut(&message, MAX_MESSAGE_BYTES),
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

/// Whether `headers` carry tonic's status for a request message over the
/// server's `max_decoding_message_size` (`OUT_OF_RANGE`, "Error, decoded
/// message length too large", from tonic's decoder), and if so rewrites the
/// code to `RESOURCE_EXHAUSTED`, which the gRPC spec prescribes for a
/// message larger than the receiver accepts. tonic answers that error
/// trailers-only (in the response headers) for unary and server-streaming
/// rpcs, before any handler runs, so no service code can map it.
pub fn request_too_large_is_resource_exhausted(headers: &mut http::HeaderMap) {
    const TONIC_MESSAGE: &str = "Error, decoded message length too large";
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11");
    let too_large = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .is_some_and(|m| m.replace("%20", " ").starts_with(TONIC_MESSAGE));
    if out_of_range && too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
}

/// A tower layer applying [`request_too_large_is_resource_exhausted`] to
/// every response, for `tonic::transport::Server::builder().layer(..)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestTooLargeLayer;

impl<S> tower::Layer<S> for RequestTooLargeLayer {
    type Service = RequestTooLarge<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestTooLarge(inner)
    }
}

/// See [`RequestTooLargeLayer`].
#[derive(Debug, Clone)]
pub struct RequestTooLarge<S>(S);

impl<S, Req, B> tower::Service<Req> for RequestTooLarge<S>
where
    S: tower::Service<Req, Response = http::Response<B>>,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = futures::future::MapOk<S::Future, fn(http::Response<B>) -> http::Response<B>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        use futures::TryFutureExt;
        fn fix<B>(mut response: http::Response<B>) -> http::Response<B> {
            request_too_large_is_resource_exhausted(response.headers_mut());
            response
        }
        self.0.call(request).map_ok(fix::<B> as fn(_) -> _)
    }
}

/// The body of every unary rpc of a tonic service impl: authorizes the
/// caller against `access` (the service's [`crate::auth::Policy`], which
/// knows the rpc being served), hands the principal and the message to
/// `call`, and maps the outcome to a response or a status.
///
/// ```ignore
/// async fn get_thing(&self, request: Request<GetThingRequest>) -> Result<Response<Thing>, Status> {
///     respond(request, &POLICY, |_, req| self.get(req)).await
/// }
/// ```
/// Refuses a request with an enum field holding a number its enum does not
/// define (proto3 passes unknown numbers through as plain integers):
/// INVALID_ARGUMENT naming every such field by its proto path. [`respond`]
/// runs it on every request; streaming rpcs call it after `authorize`.
pub fn known_enums<M: clm_proto::KnownEnums + ?Sized>(request: &M) -> Result<()> {
    let unknown = clm_proto::unknown_enums(request);
    if unknown.is_empty() {
        return Ok(());
    }
    Err(Error::InvalidArgument(Violations(
        unknown
            .into_iter()
            .map(|u| {
                Violation::new(
                    u.field,
                    format!("{} is not a value of {}", u.value, u.enum_name),
                )
            })
            .collect(),
    )))
}

pub async fn respond<Q, R, F, Fut, A>(
    request: tonic::Request<Q>,
    access: &A,
    call: F,
) -> Result<tonic::Response<R>, Status>
where
    Q: clm_proto::KnownEnums,
    F: FnOnce(crate::auth::Principal, Q) -> Fut,
    Fut: std::future::Future<Output = Result<R>>,
    A: crate::auth::Access + ?Sized,
{
    let principal = crate::auth::authorize(&request, access)?;
    known_enums(request.get_ref())?;
    let context = crate::call::Call {
        principal: principal.clone(),
        rpc: request.extensions().get::<crate::auth::RpcName>().cloned(),
    };
    Ok(tonic::Response::new(
        crate::call::scope(context, call(principal, request.into_inner())).await?,
    ))
}

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

    /// Bytes the status takes in response headers.
    fn wire_bytes(status: &Status) -> usize {
        let mut headers = http::HeaderMap::new();
        status.add_header(&mut headers).expect("valid headers");
        headers
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("grpc-"))
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum()
    }

    #[test]
    fn resource_exhausted_names_the_resource_and_the_limit() {
        let status: Status = Error::ResourceExhausted {
            reason: "FATIGUE_CAP_REACHED",
            subject: "customers/1".into(),
            limit: "3 per 7d".into(),
            message: "the customer was asked 3 times in 7 days".into(),
        }
        .into();
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        let quota = details.quota_failure().expect("quota failure");
        assert_eq!(quota.violations[0].subject, "customers/1");
        let info = details.error_info().expect("error info");
        assert_eq!(info.reason, "FATIGUE_CAP_REACHED");
        assert_eq!(info.metadata["resource"], "customers/1");
        assert_eq!(info.metadata["limit"], "3 per 7d");
        let huge = Error::ResourceExhausted {
            reason: "X",
            subject: "s".repeat(100_000),
            limit: "l".repeat(100_000),
            message: "m".repeat(100_000),
        };
        assert!(wire_bytes(&Status::from(huge)) < MAX_STATUS_BYTES);
    }

    #[test]
    fn deadline_and_cancel_keep_their_codes() {
        let s: Status = Error::DeadlineExceeded("preview took too long".into()).into();
        assert_eq!(s.code(), Code::DeadlineExceeded);
        let s: Status = Error::Cancelled("stopping".into()).into();
        assert_eq!(s.code(), Code::Cancelled);
    }

    #[test]
    fn many_long_violations_stay_bounded() {
        let long = "é".repeat(10_000);
        let violations = Violations(
            (0..1000)
                .map(|i| Violation::new(format!("touchpoints[{i}].{long}"), long.clone()))
                .collect(),
        );
        let status: Status = Error::InvalidArgument(violations).into();
        assert!(
            wire_bytes(&status) < MAX_STATUS_BYTES,
            "{}",
            wire_bytes(&status)
        );
        assert!(status.message().len() <= MAX_MESSAGE_BYTES);
        assert!(status.message().ends_with("(and 999 more violations)"));
        let br = status
            .get_error_details()
            .bad_request()
            .cloned()
            .expect("detail");
        let last = br.field_violations.last().expect("an entry");
        assert!(br.field_violations.len() <= MAX_VIOLATIONS + 1);
        assert_eq!(
            last.description,
            format!(
                "... and {} more violations",
                1001 - br.field_violations.len()
            )
        );
        assert!(br.field_violations[0].field.starts_with("touchpoints[0]."));
    }

    #[test]
    fn a_few_short_violations_are_all_kept() {
        let violations = Violations(
            (0..MAX_VIOLATIONS)
                .map(|i| Violation::new(format!("f{i}"), "is required"))
                .collect(),
        );
        let status: Status = Error::InvalidArgument(violations).into();
        let br = status
            .get_error_details()
            .bad_request()
            .cloned()
            .expect("detail");
        assert_eq!(br.field_violations.len(), MAX_VIOLATIONS, "no 'more' entry");
        let one: Status = Error::invalid("a", "b").into();
        assert_eq!(one.message(), "a: b");
    }

    #[test]
    fn cut_respects_char_boundaries() {
        assert_eq!(cut("abc", 3), "abc");
        assert_eq!(cut("abcdef", 5), "ab…");
        let c = cut(&"é".repeat(10), 6);
        assert!(c.len() <= 6 && c.ends_with('…'), "{c}");
    }

    #[tokio::test]
    async fn a_request_over_the_size_limit_is_resource_exhausted() {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_client::HealthClient;
        let (_reporter, health) = tonic_health::server::health_reporter();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(RequestTooLargeLayer)
                .add_service(health.max_decoding_message_size(64))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut client =
            HealthClient::new(crate::client::channel(&format!("http://{addr}")).expect("channel"));
        let small = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("a small request is served");
        assert_eq!(small.get_ref().status, 1);
        let e = client
            .check(HealthCheckRequest {
                service: "x".repeat(100),
            })
            .await
            .expect_err("over the limit");
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        server.abort();
    }

    #[test]
    fn only_the_size_limit_status_is_rewritten() {
        let mut other = Status::out_of_range("page 7 of 3").into_http::<()>();
        request_too_large_is_resource_exhausted(other.headers_mut());
        assert_eq!(other.headers()["grpc-status"], "11");
        let mut too_large = Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 8 bytes",
        )
        .into_http::<()>();
        request_too_large_is_resource_exhausted(too_large.headers_mut());
        assert_eq!(too_large.headers()["grpc-status"], "8");
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

    #[tokio::test]
    async fn a_transaction_that_lost_a_race_runs_again_and_nothing_else_does() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // Two conflicts, then success: three runs, the answer of the third.
        let runs = AtomicUsize::new(0);
        let out = crate::db::retry_conflicts(|| async {
            match runs.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(Error::from(db_err("40P01"))),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!((out.ok(), runs.load(Ordering::SeqCst)), (Some(2), 3));
        // Always conflicting: CONFLICT_ATTEMPTS runs, then the conflict.
        let runs = AtomicUsize::new(0);
        let out: Result<(), _> = crate::db::retry_conflicts(|| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Err(Error::from(db_err("40001")))
        })
        .await;
        assert!(out.unwrap_err().is_transaction_conflict());
        assert_eq!(runs.load(Ordering::SeqCst), crate::db::CONFLICT_ATTEMPTS);
        // A stale etag or a unique key taken first runs once.
        let others: [fn() -> Error; 2] = [
            || Error::Aborted("the etag is stale".into()),
            || Error::from(db_err("23505")),
        ];
        for e in others {
            let runs = AtomicUsize::new(0);
            let out: Result<(), _> = crate::db::retry_conflicts(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Err(e())
            })
            .await;
            assert!(matches!(out, Err(Error::Aborted(_))));
            assert_eq!(runs.load(Ordering::SeqCst), 1);
        }
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
