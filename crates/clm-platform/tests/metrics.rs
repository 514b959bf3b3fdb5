//! RED metrics: every rpc through the server layer is counted, errors are
//! counted by code, and latency is recorded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::client::channel;
use clm_platform::config::Config;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, SdkMeterProvider};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn requests_errors_and_latency_are_recorded_per_rpc() {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_meter_provider(provider.clone());

    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::defaults("metricstest", dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let routes = tonic::service::RoutesBuilder::default().routes();
            clm_platform::server::serve(
                &config,
                "metricstest",
                listener,
                routes,
                &[],
                tonic_health::server::HealthReporter::new(),
                shutdown,
            )
            .await
        })
    };
    let mut client = HealthClient::new(channel(&url).unwrap());
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    let missing = client
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    shutdown.cancel();
    server.await.unwrap().unwrap();
    provider.force_flush().unwrap();

    let method = "/grpc.health.v1.Health/Check";
    let mut requests = 0;
    let mut not_found_errors = 0;
    let mut latencies = 0;
    for rm in exporter.get_finished_metrics().unwrap() {
        for scope in rm.scope_metrics() {
            for metric in scope.metrics() {
                let has = |attrs: &mut dyn Iterator<Item = &opentelemetry::KeyValue>,
                           code: Option<i64>| {
                    let attrs: Vec<_> = attrs.collect();
                    attrs
                        .iter()
                        .any(|kv| kv.key.as_str() == "rpc.method" && kv.value.as_str() == method)
                        && code.is_none_or(|c| {
                            attrs.iter().any(|kv| {
                                kv.key.as_str() == "rpc.grpc.status_code" && kv.value == c.into()
                            })
                        })
                };
                match (metric.name(), metric.data()) {
                    ("rpc.server.requests", AggregatedMetrics::U64(MetricData::Sum(sum))) => {
                        requests = sum
                            .data_points()
                            .filter(|p| has(&mut p.attributes(), None))
                            .map(|p| p.value())
                            .sum();
                    }
                    ("rpc.server.errors", AggregatedMetrics::U64(MetricData::Sum(sum))) => {
                        not_found_errors = sum
                            .data_points()
                            .filter(|p| has(&mut p.attributes(), Some(5)))
                            .map(|p| p.value())
                            .sum();
                    }
                    ("rpc.server.duration", AggregatedMetrics::F64(MetricData::Histogram(h))) => {
                        latencies = h
                            .data_points()
                            .filter(|p| has(&mut p.attributes(), None))
                            .map(|p| p.count())
                            .sum();
                    }
                    _ => {}
                }
            }
        }
    }
    assert_eq!(requests, 3);
    assert_eq!(not_found_errors, 1);
    assert_eq!(latencies, 3);
}
