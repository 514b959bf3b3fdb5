//! The real binary exports to an OTLP collector: `clm serve customer` with
//! `CLM_TELEMETRY__OTLP_ENDPOINT` sends its call spans under its own
//! resource, continuing the caller's `traceparent`, and flushes them when
//! stopped with SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_proto::customer as pb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

#[derive(Default, Clone)]
struct Received(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test]
async fn the_binary_exports_its_call_spans_and_flushes_on_sigterm() {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_clm"))
        .args(["serve", "customer", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("CLM_TELEMETRY__OTLP_ENDPOINT", &endpoint)
        .env_remove("CLM_AUTH__HS256_SECRET")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut addr = None;
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(a) = line.strip_prefix("customer listening on ") {
            addr = Some(a.trim().to_owned());
            break;
        }
    }
    let url = format!("http://{}", addr.expect("the server's address"));
    clm_platform::testing::wait_serving(&url).await;

    let trace = "0af7651916cd43dd8448eb211c80319c";
    let mut request = tonic::Request::new(pb::ListCustomersRequest::default());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-b7ad6b7169203331-01").parse().unwrap(),
    );
    CustomerServiceClient::new(clm_platform::client::channel(&url).unwrap())
        .list_customers(request)
        .await
        .unwrap();

    // SIGTERM: a graceful stop, which flushes the exporters.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exited.success(), "{exited:?}");

    // Nothing waits for the batch interval: the exporter's flush waited for
    // the collector's answer, given after it stored the request, so the
    // spans are already here once the process has exited.
    let requests = received.0.lock().unwrap().clone();
    let mut found = false;
    for req in &requests {
        for rs in &req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| v.value.clone());
            for s in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
                if s.name == "clm.customer.v1.CustomerService/ListCustomers" {
                    assert_eq!(
                        service,
                        Some(any_value::Value::StringValue("clm-customer".into()))
                    );
                    let hex: String = s.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                    assert_eq!(hex, trace, "the caller's trace continues");
                    found = true;
                }
            }
        }
    }
    assert!(found, "the call's span was exported before exit");
}
