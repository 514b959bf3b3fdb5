//! Telemetry as an operator sees it: two services in one process (as
//! under `clm up`) export over OTLP/gRPC to a real OTLP receiver in this
//! test, and what arrives is checked: span names and RPC attributes,
//! ERROR on a failed call, SQL child spans without values, one resource per
//! service, `_OTHER` for an unknown method, no health-check spans or series,
//! and the `rpc.server.call.duration` histogram per service.
//!
//! One test per binary: telemetry is process-global.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::Runtime;
use clm_platform::service::{Parts, ServiceDescriptor, migrate_with};
use clm_platform::testing::{Running, TestBackend, eventually, start};
use clm_proto::common::ListDeadLettersRequest;
use clm_proto::common::dead_letter_service_client::DeadLetterServiceClient;
use clm_proto::customer as pb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the receiver got.
#[derive(Default, Clone)]
struct Received {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.traces.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn value(kvs: &[KeyValue], key: &str) -> Option<String> {
    kvs.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
        .map(|v| match v {
            any_value::Value::StringValue(s) => s.clone(),
            any_value::Value::IntValue(i) => i.to_string(),
            any_value::Value::BoolValue(b) => b.to_string(),
            other => format!("{other:?}"),
        })
}

fn service_name(resource: Option<&Resource>) -> String {
    resource
        .and_then(|r| value(&r.attributes, "service.name"))
        .unwrap_or_default()
}

/// Every span received, with its resource's `service.name`.
fn spans(received: &Received) -> Vec<(String, Span)> {
    let mut out = Vec::new();
    for req in received.traces.lock().unwrap().iter() {
        for rs in &req.resource_spans {
            let service = service_name(rs.resource.as_ref());
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    out.push((service.clone(), s.clone()));
                }
            }
        }
    }
    out
}

/// Every `rpc.server.call.duration` point: (service.name, attributes, count).
fn call_points(received: &Received) -> Vec<(String, Vec<KeyValue>, u64)> {
    let mut out = Vec::new();
    for req in received.metrics.lock().unwrap().iter() {
        for rm in &req.resource_metrics {
            let service = service_name(rm.resource.as_ref());
            for sm in &rm.scope_metrics {
                for m in &sm.metrics {
                    if m.name != "rpc.server.call.duration" {
                        continue;
                    }
                    assert_eq!(m.unit, "s", "durations are in seconds");
                    if let Some(metric::Data::Histogram(h)) = &m.data {
                        for p in &h.data_points {
                            out.push((service.clone(), p.attributes.clone(), p.count));
                        }
                    }
                }
            }
        }
    }
    out
}

/// A second service in the same process, as under `clm up`: it serves
/// only the platform's services (change stream, dead letters).
static OTHER_SERVICE: ServiceDescriptor = ServiceDescriptor {
    name: "loyalty",
    about: "a second service for the telemetry test",
    migrate: migrate_with::<clm_customer::store::Migrator>,
    policy: &clm_platform::auth::Policy::PLATFORM_ONLY,
    build: build_other,
};

fn build_other(_: &Runtime) -> anyhow::Result<Parts> {
    Ok(Parts::new())
}

async fn call_unknown_method(channel: tonic::transport::Channel) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(()),
        http::uri::PathAndQuery::from_static("/made.up.v1.Nothing/Anything"),
        tonic_prost::ProstCodec::<(), ()>::default(),
    )
    .await
    .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_follow_the_conventions_per_service() {
    // The OTLP receiver.
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received.clone()))
            .add_service(MetricsServiceServer::new(received.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // Telemetry before anything else installs a subscriber.
    let scratch = tempfile::tempdir().unwrap();
    let mut process = clm_platform::config::Config::defaults("up", scratch.path());
    process.telemetry.otlp_endpoint = Some(endpoint);
    process.log.filter = "warn".into();
    let guard = clm_platform::telemetry::init(&process, "up");

    let customer_backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let other_backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let customer: Running = start(
        &clm_customer::DESCRIPTOR,
        customer_backend.config("customer"),
    )
    .await;
    let other: Running = start(&OTHER_SERVICE, other_backend.config("loyalty")).await;

    let mut client = CustomerServiceClient::new(customer.channel());
    let secret = "ada.secret@example.com";
    let created = client
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(pb::Customer {
                email: secret.into(),
                display_name: "Ada Secret".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!created.name.is_empty());
    // A second one, with the erasure salt already read: its statements
    // are counted below.
    client
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(pb::Customer {
                email: "grace@example.com".into(),
                external_id: "grace-1".into(),
                display_name: "Grace".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let missing = client
        .get_customer(pb::GetCustomerRequest {
            name: "customers/00000000-0000-7000-8000-000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let unknown = call_unknown_method(customer.channel()).await;
    assert_eq!(unknown.code(), tonic::Code::Unimplemented);
    DeadLetterServiceClient::new(other.channel())
        .list_dead_letters(ListDeadLettersRequest::default())
        .await
        .unwrap();
    // Health probes (the harness already made some while waiting).
    let mut health = tonic_health::pb::health_client::HealthClient::new(customer.channel());
    for _ in 0..3 {
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
    }

    let create_name = "clm.customer.v1.CustomerService/CreateCustomer";
    let dead_letters_name = "clm.common.v1.DeadLetterService/ListDeadLetters";
    eventually(Duration::from_secs(20), || {
        guard.flush();
        let received = received.clone();
        async move {
            let spans = spans(&received);
            let points = call_points(&received);
            let have = |n: &str| spans.iter().any(|(_, s)| s.name == n);
            let point = |m: &str| {
                points
                    .iter()
                    .any(|(_, a, _)| value(a, "rpc.method").as_deref() == Some(m))
            };
            (spans.iter().filter(|(_, s)| s.name == create_name).count() == 2
                && have(dead_letters_name)
                && have("_OTHER")
                && point("CreateCustomer")
                && point("ListDeadLetters")
                && point("_OTHER"))
            .then_some(())
        }
    })
    .await;
    guard.flush();

    let spans = spans(&received);
    let (resource, create) = spans
        .iter()
        .find(|(_, s)| s.name == create_name)
        .cloned()
        .unwrap();
    assert_eq!(resource, "clm-customer", "the customer's own resource");
    assert_eq!(
        value(&create.attributes, "rpc.system").as_deref(),
        Some("grpc")
    );
    assert_eq!(
        value(&create.attributes, "rpc.service").as_deref(),
        Some("clm.customer.v1.CustomerService")
    );
    assert_eq!(
        value(&create.attributes, "rpc.method").as_deref(),
        Some("CreateCustomer")
    );
    assert_eq!(
        value(&create.attributes, "rpc.grpc.status_code").as_deref(),
        Some("0")
    );
    assert_eq!(create.kind, 2, "a server span");
    assert_ne!(
        create.status.as_ref().map_or(0, |s| s.code),
        2,
        "OK is no error"
    );
    for (_, s) in &spans {
        for kv in &s.attributes {
            let k = kv.key.as_str();
            assert!(
                !(k == "busy_ns"
                    || k == "idle_ns"
                    || k.starts_with("thread.")
                    || k.starts_with("code.")
                    || k == "clm.service"
                    || k == "trace_id"),
                "span {} carries {k}",
                s.name
            );
        }
        assert!(
            !s.name.starts_with("grpc.health"),
            "health probes are not traced"
        );
    }

    // The failed call: ERROR status and its code.
    let (_, get) = spans
        .iter()
        .find(|(_, s)| s.name == "clm.customer.v1.CustomerService/GetCustomer")
        .cloned()
        .unwrap();
    assert_eq!(get.status.as_ref().map(|s| s.code), Some(2), "status ERROR");
    assert_eq!(
        value(&get.attributes, "rpc.grpc.status_code").as_deref(),
        Some("5")
    );

    // SQL statements are children of the call, with placeholders, no values.
    // (Other children continue the trace: the service's own stream
    // subscriber applying the call's events.)
    let statements: Vec<&Span> = spans
        .iter()
        .filter(|(_, s)| s.parent_span_id == create.span_id && s.trace_id == create.trace_id)
        .filter(|(_, s)| value(&s.attributes, "db.system").is_some())
        .map(|(_, s)| s)
        .collect();
    assert!(!statements.is_empty(), "CreateCustomer has SQL child spans");
    let mut placeholders = false;
    for s in &statements {
        let system = value(&s.attributes, "db.system").unwrap();
        assert!(system == "sqlite" || system == "postgresql", "{system}");
        let sql = value(&s.attributes, "db.statement").unwrap();
        assert!(!sql.contains("ada.secret"), "a value in {sql}");
        assert!(!sql.contains("Ada Secret"), "a value in {sql}");
        placeholders |= sql.contains("$1") || sql.contains('?');
    }
    assert!(placeholders, "statements carry placeholders");
    assert!(
        statements.iter().any(|s| {
            let sql = value(&s.attributes, "db.statement").unwrap();
            sql.contains("INSERT INTO customers") || sql.contains("INSERT INTO \"customers\"")
        }),
        "the insert is there: {:?}",
        statements.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    // On PostgreSQL a CreateCustomer is one statement (the identifier
    // check and every insert, its outbox event included, as one CTE),
    // plus the erasure salt's read on the first call only.
    let mut counts: Vec<usize> = spans
        .iter()
        .filter(|(_, c)| c.name == create_name)
        .map(|(_, c)| {
            spans
                .iter()
                .filter(|(_, s)| s.parent_span_id == c.span_id && s.trace_id == c.trace_id)
                .filter(|(_, s)| value(&s.attributes, "db.system").as_deref() == Some("postgresql"))
                .count()
        })
        .collect();
    counts.sort_unstable();
    if statements
        .iter()
        .any(|s| value(&s.attributes, "db.system").as_deref() == Some("postgresql"))
    {
        assert_eq!(
            counts,
            [1, 2],
            "statements per CreateCustomer on PostgreSQL"
        );
    }
    for (resource, s) in &spans {
        if s.trace_id == create.trace_id {
            assert_eq!(resource, "clm-customer", "children share the resource");
        }
    }

    // The unknown method is `_OTHER`, under the service that answered.
    let (resource, other_span) = spans.iter().find(|(_, s)| s.name == "_OTHER").unwrap();
    assert_eq!(resource, "clm-customer");
    assert_eq!(
        value(&other_span.attributes, "rpc.method").as_deref(),
        Some("_OTHER")
    );
    assert_eq!(
        value(&other_span.attributes, "rpc.grpc.status_code").as_deref(),
        Some("12")
    );

    // The second service's calls carry its own resource.
    let (resource, _) = spans
        .iter()
        .find(|(_, s)| s.name == dead_letters_name)
        .unwrap();
    assert_eq!(resource, "clm-loyalty");

    // Metrics: one histogram, per service, bounded method names, no health.
    let points = call_points(&received);
    let find = |m: &str| {
        points
            .iter()
            .filter(|(_, a, _)| value(a, "rpc.method").as_deref() == Some(m))
            .cloned()
            .collect::<Vec<_>>()
    };
    let created_points = find("CreateCustomer");
    assert!(
        created_points
            .iter()
            .all(|(svc, a, n)| svc == "clm-customer"
                && *n >= 1
                && value(a, "rpc.grpc.status_code").as_deref() == Some("0")
                && value(a, "rpc.system").as_deref() == Some("grpc")
                && value(a, "rpc.service").as_deref() == Some("clm.customer.v1.CustomerService"))
    );
    assert!(
        find("GetCustomer")
            .iter()
            .any(|(_, a, _)| value(a, "rpc.grpc.status_code").as_deref() == Some("5"))
    );
    assert!(
        find("ListDeadLetters")
            .iter()
            .all(|(svc, _, _)| svc == "clm-loyalty")
    );
    assert!(
        find("_OTHER")
            .iter()
            .all(|(_, a, _)| { value(a, "rpc.service").as_deref() == Some("_OTHER") })
    );
    assert!(
        points.iter().all(|(_, a, _)| {
            let s = value(a, "rpc.service").unwrap_or_default();
            !s.starts_with("grpc.health") && s != "made.up.v1.Nothing"
        }),
        "no health series, no series named by the caller"
    );
    assert!(
        points
            .iter()
            .all(|(svc, _, _)| svc == "clm-customer" || svc == "clm-loyalty"),
        "every series belongs to a service, never to the process"
    );

    customer.stop().await;
    other.stop().await;
    drop(guard);
}
