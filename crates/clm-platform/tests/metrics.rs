//! RPC metrics: every call through the server layer lands in
//! `rpc.server.call.duration` (seconds) with the OpenTelemetry RPC
//! attributes; a stream records its final status (from its trailers) and
//! its whole duration; a made-up path is `_OTHER`; health probes are left
//! out unless `telemetry.trace_health_checks` is set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::client::channel;
use clm_platform::config::Config;
use futures::StreamExt;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, SdkMeterProvider};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A test service: `Echo` (unary, OK), `Fail` (unary, NOT_FOUND) and
/// `Stream` (one message, then DATA_LOSS after [`STREAM_LIFE`]).
#[derive(Clone)]
struct Probe;

const STREAM_LIFE: Duration = Duration::from_millis(300);

impl tonic::server::NamedService for Probe {
    const NAME: &'static str = "test.v1.Probe";
}

struct Unary(bool);

impl tonic::server::UnaryService<()> for Unary {
    type Response = String;
    type Future =
        futures::future::BoxFuture<'static, Result<tonic::Response<String>, tonic::Status>>;
    fn call(&mut self, _: tonic::Request<()>) -> Self::Future {
        let ok = self.0;
        Box::pin(async move {
            if ok {
                Ok(tonic::Response::new("echo".into()))
            } else {
                Err(tonic::Status::not_found("nothing here"))
            }
        })
    }
}

struct Streaming;

impl tonic::server::ServerStreamingService<()> for Streaming {
    type Response = String;
    type ResponseStream = futures::stream::BoxStream<'static, Result<String, tonic::Status>>;
    type Future = futures::future::BoxFuture<
        'static,
        Result<tonic::Response<Self::ResponseStream>, tonic::Status>,
    >;
    fn call(&mut self, _: tonic::Request<()>) -> Self::Future {
        Box::pin(async move {
            let stream = futures::stream::once(async { Ok("first".to_owned()) })
                .chain(futures::stream::once(async {
                    tokio::time::sleep(STREAM_LIFE).await;
                    Err(tonic::Status::data_loss("the stream broke later"))
                }))
                .boxed();
            Ok(tonic::Response::new(stream))
        })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Probe {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(tonic_prost::ProstCodec::<String, ()>::default());
            Ok(match req.uri().path() {
                "/test.v1.Probe/Echo" => grpc.unary(Unary(true), req).await,
                "/test.v1.Probe/Fail" => grpc.unary(Unary(false), req).await,
                "/test.v1.Probe/Stream" => grpc.server_streaming(Streaming, req).await,
                _ => tonic::Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

async fn unary(channel: tonic::transport::Channel, path: &'static str) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    match grpc
        .unary(
            tonic::Request::new(()),
            http::uri::PathAndQuery::from_static(path),
            tonic_prost::ProstCodec::<(), String>::default(),
        )
        .await
    {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

/// Starts the platform server with the probe; returns its URL and stopper.
async fn serve(
    name: &'static str,
    edit: impl FnOnce(&mut Config),
) -> (
    String,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::defaults(name, dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    edit(&mut config);
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(Probe);
    let server = tokio::spawn(async move {
        clm_platform::server::serve(
            &config,
            name,
            listener,
            routes.routes(),
            &[],
            tonic_health::server::HealthReporter::new(),
            token,
        )
        .await
    });
    (url, shutdown, server, dir)
}

/// (attributes, count, sum) of every `rpc.server.call.duration` point.
type Point = (Vec<(String, String)>, u64, f64);

fn read_points(exporter: &InMemoryMetricExporter) -> Vec<Point> {
    let mut out = Vec::new();
    let finished = exporter.get_finished_metrics().unwrap();
    // Cumulative: the last export holds everything.
    let Some(rm) = finished.last() else {
        return out;
    };
    for scope in rm.scope_metrics() {
        for metric in scope.metrics() {
            if metric.name() != "rpc.server.call.duration" {
                continue;
            }
            assert_eq!(metric.unit(), "s");
            if let AggregatedMetrics::F64(MetricData::Histogram(h)) = metric.data() {
                for p in h.data_points() {
                    let attrs = p
                        .attributes()
                        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
                        .collect();
                    out.push((attrs, p.count(), p.sum()));
                }
            }
        }
    }
    out
}

fn attr<'a>(p: &'a Point, key: &str) -> Option<&'a str> {
    p.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn calls_streams_unknown_paths_and_health_are_measured_as_documented() {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_meter_provider(provider.clone());

    let (url, shutdown, server, _dir) = serve("metricstest", |_| {}).await;
    let ch = channel(&url).unwrap();
    assert_eq!(
        unary(ch.clone(), "/test.v1.Probe/Echo").await,
        tonic::Code::Ok
    );
    assert_eq!(
        unary(ch.clone(), "/test.v1.Probe/Echo").await,
        tonic::Code::Ok
    );
    assert_eq!(
        unary(ch.clone(), "/test.v1.Probe/Fail").await,
        tonic::Code::NotFound
    );
    for path in ["/no.such.v1.Service/Method", "/another.made.up.Path/X"] {
        assert_eq!(unary(ch.clone(), path).await, tonic::Code::Unimplemented);
    }
    let mut client = HealthClient::new(ch.clone());
    for _ in 0..3 {
        client.check(HealthCheckRequest::default()).await.unwrap();
    }
    // The stream answers OK headers and a message, then fails later.
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(()),
            http::uri::PathAndQuery::from_static("/test.v1.Probe/Stream"),
            tonic_prost::ProstCodec::<(), String>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().as_deref(), Some("first"));
    assert_eq!(
        stream.message().await.unwrap_err().code(),
        tonic::Code::DataLoss
    );
    drop(stream);
    shutdown.cancel();
    server.await.unwrap().unwrap();
    provider.force_flush().unwrap();

    let points = read_points(&exporter);
    let method = |m: &str| {
        points
            .iter()
            .filter(|p| attr(p, "rpc.method") == Some(m))
            .collect::<Vec<_>>()
    };
    let echo = method("Echo");
    assert_eq!(echo.len(), 1);
    assert_eq!(echo[0].1, 2, "two calls");
    assert_eq!(attr(echo[0], "rpc.system"), Some("grpc"));
    assert_eq!(attr(echo[0], "rpc.service"), Some("test.v1.Probe"));
    assert_eq!(attr(echo[0], "rpc.grpc.status_code"), Some("0"));
    let fail = method("Fail");
    assert_eq!(fail.len(), 1);
    assert_eq!(attr(fail[0], "rpc.grpc.status_code"), Some("5"));

    let streamed = method("Stream");
    assert_eq!(streamed.len(), 1, "{points:?}");
    assert_eq!(
        attr(streamed[0], "rpc.grpc.status_code"),
        Some("15"),
        "the stream's final status, not its headers' OK"
    );
    assert!(
        streamed[0].2 >= STREAM_LIFE.as_secs_f64(),
        "the whole stream's duration: {}",
        streamed[0].2
    );

    let other = method("_OTHER");
    assert_eq!(other.len(), 1, "one series for every made-up path");
    assert_eq!(other[0].1, 2);
    assert_eq!(attr(other[0], "rpc.service"), Some("_OTHER"));
    assert!(
        points
            .iter()
            .all(|p| attr(p, "rpc.service") != Some("grpc.health.v1.Health")),
        "health probes are not measured by default"
    );

    // Asked for, health probes are measured.
    let (url, shutdown, server, _dir) =
        serve("healthtest", |c| c.telemetry.trace_health_checks = true).await;
    HealthClient::new(channel(&url).unwrap())
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    shutdown.cancel();
    server.await.unwrap().unwrap();
    provider.force_flush().unwrap();
    let points = read_points(&exporter);
    assert!(
        points
            .iter()
            .any(|p| attr(p, "rpc.service") == Some("grpc.health.v1.Health")
                && attr(p, "rpc.method") == Some("Check")),
        "{points:?}"
    );
}
