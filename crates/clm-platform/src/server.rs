//! The gRPC server every service runs: health (SERVING, then NOT_SERVING
//! while draining), reflection, and one layer that gives every call a
//! request id, a tracing span continuing the caller's W3C trace, bearer
//! token authentication and RED metrics.
//!
//! Telemetry follows the OpenTelemetry RPC conventions: the span is named
//! `package.Service/Method` and carries `rpc.system`, `rpc.service`,
//! `rpc.method` and `rpc.grpc.status_code`; a call that ends with any code
//! but OK has status ERROR. One histogram, `rpc.server.call.duration` (in
//! seconds, attributes as on the span), counts calls, errors (by code) and
//! latency. Both end when the response body does, so a stream records its
//! final status and whole duration. A path no CLM proto declares and no
//! served service answers is named `_OTHER` (callers cannot mint series).
//! Health probes are neither traced nor measured unless
//! `telemetry.trace_health_checks` is set. A refused token is logged at
//! warn (reason, rpc, peer; never the token), rate-limited.
//!
//! A call that arrives with a `grpc-timeout` runs its handler with that
//! deadline in [`crate::peer::DEADLINE`] (a little earlier, so the handler
//! can still answer), so the peer calls it makes give their peers no more
//! time than the caller left.
//!
//! Every call that reaches a handler carries a [`Principal`]: the verified
//! token's, or [`Principal::local`] when auth is off (the server then
//! refuses to serve on a non-loopback listener unless `insecure`). A panic
//! in a handler answers that call INTERNAL (`grpc-status: 13`, "internal
//! error") and is logged; the connection and the server live on.

use crate::auth::{Authenticator, Principal, RefusalLog, RpcName};
use crate::config::Config;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use opentelemetry::KeyValue;
use opentelemetry::metrics::Histogram;
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TraceContextExt;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The request id of the current call (`x-request-id`, generated if absent).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
const CHANGE_STREAM_PREFIX: &str = "/clm.common.v1.ChangeStreamService/";

/// What metrics and spans call a method path that no served service has:
/// a caller must not be able to create new series by calling made-up paths.
pub const OTHER: &str = "_OTHER";

/// Bucket boundaries of `rpc.server.call.duration`, in seconds.
const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

#[derive(Debug)]
struct Metrics {
    duration: Histogram<f64>,
}

impl Metrics {
    fn new(service: &str) -> Self {
        let meter = crate::telemetry::meter(service);
        Self {
            duration: meter
                .f64_histogram("rpc.server.call.duration")
                .with_unit("s")
                .with_description(
                    "Duration of each call, from its arrival to the end of its response (the last message of a stream), by service, method and status code",
                )
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
        }
    }
}

/// Every method path of the gRPC services CLM knows (its own protos,
/// health, reflection), split into service and method.
fn known_methods() -> &'static HashMap<String, (String, String)> {
    static KNOWN: OnceLock<HashMap<String, (String, String)>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        use prost::Message as _;
        let mut known = HashMap::new();
        for set in [
            clm_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let name = service.name.unwrap_or_default();
                    let full = if package.is_empty() {
                        name
                    } else {
                        format!("{package}.{name}")
                    };
                    for m in service.method {
                        let method = m.name.unwrap_or_default();
                        known.insert(format!("/{full}/{method}"), (full.clone(), method));
                    }
                }
            }
        }
        for service in [
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            known.insert(
                format!("/{service}/ServerReflectionInfo"),
                (service.to_owned(), "ServerReflectionInfo".to_owned()),
            );
        }
        known
    })
}

/// `/pkg.Service/Method` split, if it has that shape.
fn split_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// How spans and metrics name a call: borrowed from [`known_methods`] for
/// every path CLM knows, so naming a call allocates nothing.
#[derive(Debug, Clone)]
struct Label {
    service: Cow<'static, str>,
    method: Cow<'static, str>,
    /// The span name: `package.Service/Method`, or `_OTHER`.
    name: Cow<'static, str>,
}

impl Label {
    fn other() -> Self {
        Self {
            service: Cow::Borrowed(OTHER),
            method: Cow::Borrowed(OTHER),
            name: Cow::Borrowed(OTHER),
        }
    }

    /// The label of a path CLM knows (`/package.Service/Method`): borrowed
    /// from [`known_methods`], its name the path without the slash.
    fn known(path: &'static str, (service, method): &'static (String, String)) -> Self {
        Self {
            service: Cow::Borrowed(service),
            method: Cow::Borrowed(method),
            name: Cow::Borrowed(path.strip_prefix('/').unwrap_or(path)),
        }
    }

    /// The label of a path no CLM proto declares, served all the same.
    fn routed(service: &str, method: &str) -> Self {
        let service: String = service.chars().take(256).collect();
        let method: String = method.chars().take(256).collect();
        Self {
            name: Cow::Owned(format!("{service}/{method}")),
            service: Cow::Owned(service),
            method: Cow::Owned(method),
        }
    }
}

#[derive(Debug)]
struct Shared {
    service: &'static str,
    auth: Option<Authenticator>,
    refusals: RefusalLog,
    metrics: Metrics,
    /// Whether health probes get spans and metrics.
    trace_health: AtomicBool,
    /// Calls whose response has not been fully sent yet.
    in_flight: AtomicUsize,
    /// Above this many calls in flight, new unary calls are shed with
    /// UNAVAILABLE + RetryInfo instead of queueing without bound.
    max_in_flight: usize,
}

/// Counts a call as in flight until dropped (with the response body).
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: Arc<Shared>) -> Self {
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One call until its response is fully sent (or abandoned): then its
/// status and duration go to the span and the metrics. A stream's status
/// is the one in its trailers, however long after the headers it comes.
struct CallEnd {
    in_flight: InFlight,
    span: tracing::Span,
    label: Label,
    start: Instant,
    /// The grpc-status, once seen (headers of a trailers-only answer, or trailers).
    code: Option<i32>,
    observed: bool,
}

impl CallEnd {
    fn see(&mut self, headers: &http::HeaderMap) {
        if let Some(code) = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
        {
            self.code = Some(code);
        }
    }
}

impl Drop for CallEnd {
    fn drop(&mut self) {
        if !self.observed {
            return;
        }
        // A body that ends without a status was abandoned (the client went away).
        let code = self.code.unwrap_or(tonic::Code::Cancelled as i32);
        self.span.record("rpc.grpc.status_code", code);
        if code != 0 {
            self.span.record("otel.status_code", "ERROR");
            self.span.record(
                "otel.status_description",
                tonic::Code::from_i32(code).description(),
            );
        }
        let shared = &self.in_flight.0;
        let attrs = [
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", self.label.service.clone()),
            KeyValue::new("rpc.method", self.label.method.clone()),
            KeyValue::new("rpc.grpc.status_code", i64::from(code)),
        ];
        shared
            .metrics
            .duration
            .record(self.start.elapsed().as_secs_f64(), &attrs);
    }
}

/// The longest a call may take to answer (its response headers; a stream
/// then flows as long as it likes): past it, or past the caller's own
/// `grpc-timeout`, the call ends with DEADLINE_EXCEEDED instead of hanging.
pub const MAX_CALL: Duration = Duration::from_secs(60);

/// The per-call layer (request id, tracing, auth, metrics).
#[derive(Clone, Debug)]
pub struct RpcLayer(Arc<Shared>);

impl RpcLayer {
    /// For `service`, checking tokens with `auth` when set and shedding
    /// calls beyond `max_in_flight`. Health probes are not traced or
    /// measured (see [`RpcLayer::trace_health_checks`]).
    pub fn new(service: &'static str, auth: Option<Authenticator>, max_in_flight: usize) -> Self {
        Self(Arc::new(Shared {
            service,
            auth,
            refusals: RefusalLog::default(),
            metrics: Metrics::new(service),
            trace_health: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            max_in_flight,
        }))
    }

    /// Traces and measures health probes too.
    #[must_use]
    pub fn trace_health_checks(self, yes: bool) -> Self {
        self.0.trace_health.store(yes, Ordering::Relaxed);
        self
    }

    /// Calls whose response is not fully sent yet.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::SeqCst)
    }

    /// Waits until no call is in flight, or `timeout`; returns whether it drained.
    pub async fn drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.in_flight() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            shared: self.0.clone(),
        }
    }
}

/// See [`RpcLayer`].
#[derive(Clone, Debug)]
pub struct RpcService<S> {
    inner: S,
    shared: Arc<Shared>,
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The caller's address, from the connection tonic accepted.
fn peer<B>(req: &http::Request<B>) -> Option<std::net::SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|t| t.get_ref().remote_addr())
        })
}

/// The call's span: `package.Service/Method` with the OpenTelemetry RPC
/// attributes, continuing the caller's W3C trace; its ids are span fields
/// so every log line inside the call names its trace.
///
/// When no OpenTelemetry layer records spans
/// ([`crate::telemetry::call_spans_exported`]), the span is for the log
/// only: it names the rpc, the request id and the caller's trace (from a
/// `traceparent` header, if any) and nothing else, so a call does not pay
/// for formatting attributes nobody exports.
fn call_span(
    shared: &Shared,
    label: &Label,
    request_id: &str,
    headers: &http::HeaderMap,
) -> tracing::Span {
    if !crate::telemetry::call_spans_exported() {
        let span = tracing::info_span!(
            target: crate::telemetry::CALL_TARGET,
            "rpc",
            rpc = %label.name,
            request_id = %request_id,
            trace_id = tracing::field::Empty,
        );
        if headers.contains_key(TRACEPARENT) {
            let parent = opentelemetry::global::get_text_map_propagator(|p| {
                p.extract(&HeaderExtractor(headers))
            });
            let remote = parent.span().span_context().clone();
            if remote.is_valid() {
                span.record("trace_id", remote.trace_id().to_string());
            }
        }
        return span;
    }
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let span = tracing::info_span!(
        target: crate::telemetry::CALL_TARGET,
        "rpc",
        otel.name = %label.name,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = %label.service,
        rpc.method = %label.method,
        rpc.grpc.status_code = tracing::field::Empty,
        clm.service = shared.service,
        request_id = %request_id,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    let remote = parent.span().span_context().clone();
    let _ = span.set_parent(parent);
    let own = span.context().span().span_context().clone();
    if own.is_valid() {
        span.record("trace_id", own.trace_id().to_string());
        span.record("span_id", own.span_id().to_string());
    } else if remote.is_valid() {
        // No exporter: the log still names the caller's trace.
        span.record("trace_id", remote.trace_id().to_string());
    }
    span
}

/// The W3C trace context header.
const TRACEPARENT: &str = "traceparent";

impl<S> Service<http::Request<Body>> for RpcService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let path = req.uri().path();
        let exempt = path.starts_with(HEALTH_PREFIX);
        // Long-lived change streams are not load: they are never shed.
        let sheddable = !exempt && !path.starts_with(CHANGE_STREAM_PREFIX);
        let observed = !exempt || shared.trace_health.load(Ordering::Relaxed);
        // A path no CLM proto declares is `_OTHER` unless a served service
        // answers it (a made-up path gets UNIMPLEMENTED from the router).
        let (known, label, routed) = match known_methods().get_key_value(path) {
            Some((path, names)) => {
                let l = Label::known(path, names);
                (true, l.clone(), Some(l))
            }
            None => (
                false,
                Label::other(),
                split_path(path).map(|(s, m)| Label::routed(s, m)),
            ),
        };
        // Health probes need no caller, so no rpc name for authorization.
        if let Some(l) = routed.as_ref().filter(|_| !exempt) {
            req.extensions_mut().insert(RpcName {
                service: l.service.clone(),
                method: l.method.clone(),
            });
        }
        let request_id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
        let span = if observed {
            call_span(&shared, &label, &request_id, req.headers())
        } else {
            tracing::Span::none()
        };

        let admission =
            if sheddable && shared.in_flight.load(Ordering::SeqCst) >= shared.max_in_flight {
                Err(crate::Error::Unavailable(
                    "the server is overloaded; retry after the advised delay".into(),
                ))
            } else {
                match (&shared.auth, exempt) {
                    (Some(auth), false) => {
                        let header = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok());
                        let verdict = auth.authenticate(header);
                        if let Err(crate::Error::Unauthenticated(reason)) = &verdict {
                            let _entered = span.enter();
                            shared.refusals.refused(
                                shared.service,
                                reason,
                                &routed.as_ref().map_or_else(
                                    || OTHER.to_owned(),
                                    |l| format!("{}/{}", l.service, l.method),
                                ),
                                peer(&req),
                            );
                        }
                        verdict.map(Some)
                    }
                    // Health checks need no caller.
                    (Some(_), true) => Ok(None),
                    // Auth off: the caller is the local admin, said explicitly
                    // (authorize refuses a call without a principal).
                    (None, _) => Ok(Some(Principal::local())),
                }
            };
        req.extensions_mut().insert(RequestId(request_id.clone()));
        // The caller's deadline, for the peer calls the handler makes.
        let deadline = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::peer::parse_grpc_timeout)
            .map(|t| crate::peer::handler_deadline(tokio::time::Instant::now(), t));
        let max_call = tokio::time::Instant::now() + MAX_CALL;
        let mut end = CallEnd {
            in_flight: InFlight::new(shared.clone()),
            span: span.clone(),
            label,
            start: Instant::now(),
            code: None,
            observed,
        };
        Box::pin(
            async move {
                let mut response = match admission {
                    Ok(principal) => {
                        if let Some(p) = principal {
                            req.extensions_mut().insert::<Principal>(p);
                        }
                        let handled = inner.call(req);
                        // The caller's deadline, or the server's own limit:
                        // past it the call ends with DEADLINE_EXCEEDED (before
                        // tonic's own timer, which would say CANCELLED).
                        let limit = deadline.map_or(max_call, |d| d.min(max_call));
                        let bounded = async {
                            match deadline {
                                Some(d) => crate::peer::DEADLINE.scope(d, handled).await,
                                None => handled.await,
                            }
                        };
                        match tokio::time::timeout_at(limit, bounded).await {
                            Ok(response) => response?,
                            Err(_) => tonic::Status::from(crate::Error::DeadlineExceeded(
                                "the call did not finish within its deadline".into(),
                            ))
                            .into_http::<Body>(),
                        }
                    }
                    Err(e) => tonic::Status::from(e).into_http::<Body>(),
                };
                end.see(response.headers());
                if !known
                    && let Some(l) = routed
                    && end.code != Some(tonic::Code::Unimplemented as i32)
                {
                    // A served service outside CLM's protos: its own name.
                    // The span has started (its ids are in the log fields):
                    // rename it through OpenTelemetry.
                    end.span.context().span().update_name(l.name.to_string());
                    end.span.record("rpc.service", l.service.as_ref());
                    end.span.record("rpc.method", l.method.as_ref());
                    end.label = l;
                }
                if let Ok(v) = request_id.parse() {
                    response.headers_mut().insert("x-request-id", v);
                }
                // The call ends (status, duration, in flight) when its body
                // is sent or the client goes away.
                let response = response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        if let Some(trailers) = frame.trailers_ref() {
                            end.see(trailers);
                        }
                        frame
                    }))
                });
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// Serves `routes` (the service's own gRPC services) plus health and
/// reflection on `listener` until `shutdown` is cancelled, then reports
/// NOT_SERVING, stops accepting and lets in-flight calls finish for up to
/// `config.drain_timeout_secs`.
///
/// `health_names` are the fully qualified service names reported SERVING
/// through `reporter` (which others, e.g. subscribers, may also report on).
pub async fn serve(
    config: &Config,
    service: &'static str,
    listener: TcpListener,
    routes: Routes,
    health_names: &[&str],
    reporter: HealthReporter,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let auth = Authenticator::from_config(&config.auth)?;
    let local = listener.local_addr()?;
    if auth.is_none() {
        if !local.ip().is_loopback() && !config.insecure {
            anyhow::bail!(
                "clm {service}: refusing to serve on {local} without authentication: it is not a loopback address; configure auth.hs256_secret or auth.rs256_public_key_file, or pass --insecure"
            );
        }
        tracing::warn!(service, listen = %local, "authentication is OFF: every caller is admin; bind loopback only or configure auth");
    }
    let health = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
    for name in health_names {
        reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(clm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(clm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let layer = RpcLayer::new(service, auth, config.max_in_flight)
        .trace_health_checks(config.telemetry.trace_health_checks);
    let mut builder = Server::builder();
    if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) {
        let identity = Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?);
        builder = builder.tls_config(ServerTlsConfig::new().identity(identity))?;
    }
    let router = builder
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // Batches of 1,000 events are ~150 KB: a 64 KB default window would
        // stall each request on flow-control round trips.
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .layer(layer.clone())
        .layer(crate::error::RequestTooLargeLayer)
        // Inside the rpc layer, so a panic is counted and traced as INTERNAL.
        .layer(
            tower::ServiceBuilder::new()
                .map_response(|r: http::Response<_>| r.map(Body::new))
                .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                    panic_response,
                )),
        )
        .add_routes(routes)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let names: Vec<String> = health_names.iter().map(|s| (*s).to_owned()).collect();
    let draining = {
        let shutdown = shutdown.clone();
        let reporter = reporter.clone();
        async move {
            shutdown.cancelled().await;
            for name in &names {
                reporter
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
            tracing::info!(service, "shutting down: draining in-flight calls");
        }
    };
    let server = router.serve_with_incoming_shutdown(incoming, draining);
    tokio::pin!(server);
    let drain = Duration::from_secs(config.drain_timeout_secs);
    // Idle keep-alive connections would hold a graceful HTTP/2 shutdown open
    // until the client hangs up; stop once no call is in flight instead.
    tokio::select! {
        r = &mut server => r?,
        drained = async { shutdown.cancelled().await; layer.drained(drain).await } => {
            if drained {
                // Let the connection tasks flush the last responses.
                tokio::time::sleep(Duration::from_millis(50)).await;
            } else {
                tracing::warn!(service, ?drain, in_flight = layer.in_flight(), "drain timeout: closing remaining calls");
            }
        }
    }
    tracing::info!(service, "stopped");
    Ok(())
}

/// The answer to a call whose handler panicked: a proper gRPC status
/// (trailers-only, `grpc-status: 13`), never a dropped connection. The
/// panic message is logged, not returned.
fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> http::Response<Body> {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned());
    tracing::error!(panic = %message, "handler panicked; answered INTERNAL");
    tonic::Status::internal("internal error").into_http()
}

/// Resolves when SIGINT (Ctrl-C) or SIGTERM arrives.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
