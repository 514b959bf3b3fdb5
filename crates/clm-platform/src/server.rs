//! The gRPC server every service runs: health (SERVING, then NOT_SERVING
//! while draining), reflection, and one layer that gives every call a
//! request id, a tracing span continuing the caller's W3C trace, bearer
//! token authentication and RED metrics (requests, errors, latency).
//!
//! Every call that reaches a handler carries a [`Principal`]: the verified
//! token's, or [`Principal::local`] when auth is off (the server then
//! refuses to serve on a non-loopback listener unless `insecure`). A panic
//! in a handler answers that call INTERNAL (`grpc-status: 13`, "internal
//! error") and is logged; the connection and the server live on.

use crate::auth::{Authenticator, Principal};
use crate::config::Config;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use opentelemetry::propagation::Extractor;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

#[derive(Debug)]
struct Metrics {
    requests: Counter<u64>,
    errors: Counter<u64>,
    duration: Histogram<f64>,
}

impl Metrics {
    fn new() -> Self {
        let meter = opentelemetry::global::meter("clm");
        Self {
            requests: meter
                .u64_counter("rpc.server.requests")
                .with_description("Calls received, by method and code")
                .build(),
            errors: meter
                .u64_counter("rpc.server.errors")
                .with_description("Calls that ended with a non-OK code")
                .build(),
            duration: meter
                .f64_histogram("rpc.server.duration")
                .with_unit("s")
                .with_description("Time to the response headers")
                .build(),
        }
    }
}

#[derive(Debug)]
struct Shared {
    service: &'static str,
    auth: Option<Authenticator>,
    metrics: Metrics,
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

/// The per-call layer (request id, tracing, auth, metrics).
#[derive(Clone, Debug)]
pub struct RpcLayer(Arc<Shared>);

impl RpcLayer {
    /// For `service`, checking tokens with `auth` when set and shedding
    /// calls beyond `max_in_flight`.
    pub fn new(service: &'static str, auth: Option<Authenticator>, max_in_flight: usize) -> Self {
        Self(Arc::new(Shared {
            service,
            auth,
            metrics: Metrics::new(),
            in_flight: AtomicUsize::new(0),
            max_in_flight,
        }))
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
        let method = req.uri().path().to_owned();
        let request_id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(req.headers()))
        });
        let span = tracing::info_span!(
            "rpc",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = %method,
            service = shared.service,
            request_id = %request_id,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let _ = span.set_parent(parent);

        let exempt = method.starts_with(HEALTH_PREFIX);
        // Long-lived change streams are not load: they are never shed.
        let sheddable = !exempt && !method.starts_with(CHANGE_STREAM_PREFIX);
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
                        auth.authenticate(header).map(Some)
                    }
                    // Health checks need no caller.
                    (Some(_), true) => Ok(None),
                    // Auth off: the caller is the local admin, said explicitly
                    // (authorize refuses a call without a principal).
                    (None, _) => Ok(Some(Principal::local())),
                }
            };
        req.extensions_mut().insert(RequestId(request_id.clone()));
        let in_flight = InFlight::new(shared.clone());
        Box::pin(
            async move {
                let start = Instant::now();
                let mut response = match admission {
                    Ok(principal) => {
                        if let Some(p) = principal {
                            req.extensions_mut().insert::<Principal>(p);
                        }
                        inner.call(req).await?
                    }
                    Err(e) => tonic::Status::from(e).into_http::<Body>(),
                };
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(0);
                tracing::Span::current().record("rpc.grpc.status_code", code);
                let attrs = [
                    KeyValue::new("rpc.method", method),
                    KeyValue::new("rpc.grpc.status_code", i64::from(code)),
                ];
                shared.metrics.requests.add(1, &attrs);
                if code != 0 {
                    shared.metrics.errors.add(1, &attrs);
                }
                shared
                    .metrics
                    .duration
                    .record(start.elapsed().as_secs_f64(), &attrs);
                if let Ok(v) = request_id.parse() {
                    response.headers_mut().insert("x-request-id", v);
                }
                // The call stays in flight until its body is sent (or the client goes away).
                let response = response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _ = &in_flight;
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

    let layer = RpcLayer::new(service, auth, config.max_in_flight);
    let mut builder = Server::builder();
    if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) {
        let identity = Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?);
        builder = builder.tls_config(ServerTlsConfig::new().identity(identity))?;
    }
    let router = builder
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // A unary call that cannot finish in time fails with CANCELLED instead of
        // hanging; clients can ask for less with the grpc-timeout header.
        .timeout(Duration::from_secs(60))
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
