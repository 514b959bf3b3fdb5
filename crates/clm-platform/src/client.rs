//! Outgoing gRPC calls: a lazily connecting channel and an interceptor that
//! adds the bearer token and the W3C trace context of the current span, so
//! one trace follows a request across services.

use opentelemetry::propagation::Injector;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A channel to `url` (`http://host:port`), connecting on first use and
/// reconnecting as needed.
pub fn channel(url: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .connect_lazy())
}

/// Adds `authorization` and `traceparent` to every outgoing request.
#[derive(Clone, Debug, Default)]
pub struct ClientInterceptor {
    bearer: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl ClientInterceptor {
    /// With an optional bearer token.
    pub fn new(token: Option<&str>) -> Self {
        Self {
            bearer: token.and_then(bearer),
        }
    }
}

/// Writes the W3C trace context of `span` (`traceparent`, `tracestate`)
/// into `metadata`, so the callee's span joins the caller's trace.
pub fn inject_trace_context(span: &tracing::Span, metadata: &mut MetadataMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(metadata))
    });
}

/// The W3C `traceparent` of the current span, when it is traced (an
/// exporter is configured and the span is sampled); `None` otherwise.
pub fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent")
}

/// The context `traceparent` continues (an invalid one when it is empty or
/// malformed: the span then starts a trace of its own).
pub fn remote_context(traceparent: &str) -> opentelemetry::Context {
    let carrier =
        std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier))
}

/// The `authorization` value carrying `token` (`Bearer <token>`), if it is
/// a valid header value.
pub fn bearer(token: &str) -> Option<MetadataValue<tonic::metadata::Ascii>> {
    format!("Bearer {token}").parse().ok()
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (MetadataKey::from_bytes(key.as_bytes()), value.parse()) {
            self.0.insert(k, v);
        }
    }
}

impl tonic::service::Interceptor for ClientInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(b) = &self.bearer {
            request.metadata_mut().insert("authorization", b.clone());
        }
        inject_trace_context(&tracing::Span::current(), request.metadata_mut());
        Ok(request)
    }
}
