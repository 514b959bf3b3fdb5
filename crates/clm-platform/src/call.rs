//! What the platform knows about the rpc a piece of work serves: who
//! called, which rpc, the trace and (inside an idempotent write) the
//! caller's `request_id`. [`crate::error::respond`] sets it around every
//! unary rpc body and [`crate::idempotency::write`] adds the request id, so
//! code deep in a write path (the [`crate::audit`] trail) can name the
//! caller without every function taking it as a parameter. Work not started
//! by a call (timers, stream handlers) has no call: [`current`] is `None`
//! and the audit trail names the service itself.

use crate::auth::{Principal, RpcName};

/// One rpc being served.
#[derive(Debug, Clone)]
pub struct Call {
    /// The authorized caller.
    pub principal: Principal,
    /// The rpc (`clm.scoring.v1.ScoringService`, `UpdateScoringModel`).
    pub rpc: Option<RpcName>,
}

impl Call {
    /// The rpc as `package.Service/Method`, or empty.
    pub fn rpc_path(&self) -> String {
        self.rpc
            .as_ref()
            .map(|r| format!("{}/{}", r.service, r.method))
            .unwrap_or_default()
    }
}

tokio::task_local! {
    static CALL: Call;
    static REQUEST_ID: Option<String>;
}

/// The call the current task serves, if any.
pub fn current() -> Option<Call> {
    CALL.try_with(Clone::clone).ok()
}

/// The `request_id` of the idempotent write the current task is inside.
pub fn request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok().flatten()
}

/// Runs `work` as serving `call`.
pub async fn scope<F: Future>(call: Call, work: F) -> F::Output {
    CALL.scope(call, work).await
}

/// Runs `work` inside a write keyed by `request_id`.
pub async fn with_request_id<F: Future>(request_id: Option<String>, work: F) -> F::Output {
    REQUEST_ID.scope(request_id, work).await
}

/// The trace id of the current span, when OpenTelemetry records it (read
/// where it is written down, not on every call: it costs a context lookup).
pub fn trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
