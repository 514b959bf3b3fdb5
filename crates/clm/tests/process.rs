//! The `clm` binary as a real process: `clm up`, bad config, SIGKILL
//! in the middle of an ingest, and change streams resumed across restarts.
//! Runs on SQLite, or PostgreSQL when `CLM_TEST_DATABASE_URL` is set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use clm_platform::testing::{TestBackend, eventually, wait_serving};
use clm_proto::common::WatchChangesRequest;
use clm_proto::common::change_stream_service_client::ChangeStreamServiceClient;
use clm_proto::customer as pb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use std::collections::HashSet;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{Server, spawn_and_read_address};
use tokio_stream::StreamExt;

fn touchpoint(customer: &str, id: &str) -> pb::Touchpoint {
    pb::Touchpoint {
        customer: customer.into(),
        event_id: id.into(),
        r#type: pb::TouchpointType::ProductAccess as i32,
        product: "app".into(),
        occurred_time: Some(prost_types::Timestamp {
            seconds: 1_760_000_000,
            nanos: 0,
        }),
        ..Default::default()
    }
}

async fn create_customer(server: &Server) -> String {
    server
        .client()
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(pb::Customer {
                email: "p@example.com".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .name
}

async fn all_event_ids(server: &Server, customer: &str) -> Vec<String> {
    let mut c = server.client();
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_touchpoints(pb::ListTouchpointsRequest {
                parent: customer.into(),
                page_size: 1000,
                page_token: token,
                filter: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(page.touchpoints.into_iter().map(|t| t.event_id));
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn sigkill_mid_ingest_loses_no_acknowledged_event() {
    let backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let mut server = Server::start(&backend).await;
    let customer = create_customer(&server).await;

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let sent_batches: Arc<Mutex<Vec<Vec<pb::Touchpoint>>>> = Arc::default();
    let ingest = {
        let (acked, sent, mut client, customer) = (
            acked.clone(),
            sent_batches.clone(),
            server.client(),
            customer.clone(),
        );
        tokio::spawn(async move {
            for b in 0.. {
                let batch: Vec<_> = (0..200)
                    .map(|i| touchpoint(&customer, &format!("b{b}-{i}")))
                    .collect();
                sent.lock().unwrap().push(batch.clone());
                match client
                    .record_touchpoints(pb::RecordTouchpointsRequest {
                        touchpoints: batch.clone(),
                    })
                    .await
                {
                    Ok(_) => acked
                        .lock()
                        .unwrap()
                        .extend(batch.into_iter().map(|t| t.event_id)),
                    Err(_) => return,
                }
            }
        })
    };
    let (acked_so_far, running) = (&acked, &ingest);
    eventually(Duration::from_secs(60), || async move {
        assert!(!running.is_finished(), "ingest stopped before the kill");
        acked_so_far.lock().unwrap().len() >= 4000
    })
    .await;
    server.kill();
    ingest.await.unwrap();
    let acked: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    assert!(acked.len() >= 4000);

    server.restart().await;
    let stored: Vec<String> = all_event_ids(&server, &customer).await;
    let stored_set: HashSet<String> = stored.iter().cloned().collect();
    assert_eq!(stored.len(), stored_set.len(), "no event stored twice");
    assert!(
        acked.is_subset(&stored_set),
        "{} acknowledged events lost",
        acked.difference(&stored_set).count()
    );

    // The client retries everything it sent: only the unacknowledged rest is new.
    let mut c = server.client();
    let batches = sent_batches.lock().unwrap().clone();
    let mut recorded = 0;
    for batch in &batches {
        recorded += c
            .record_touchpoints(pb::RecordTouchpointsRequest {
                touchpoints: batch.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .recorded_count;
    }
    let total = batches.iter().map(Vec::len).sum::<usize>();
    assert_eq!(recorded as usize, total - stored.len());
    assert_eq!(all_event_ids(&server, &customer).await.len(), total);
}

#[tokio::test]
async fn a_watcher_resumes_across_server_restarts_and_sees_every_event_once() {
    let backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let mut server = Server::start(&backend).await;
    let customer = create_customer(&server).await;
    let mut c = server.client();
    let record =
        |c: &mut CustomerServiceClient<tonic::transport::Channel>, from: usize, to: usize| {
            let batch: Vec<_> = (from..to)
                .map(|i| touchpoint(&customer, &format!("e{i}")))
                .collect();
            let mut c = c.clone();
            async move {
                c.record_touchpoints(pb::RecordTouchpointsRequest { touchpoints: batch })
                    .await
                    .unwrap()
            }
        };
    record(&mut c, 0, 300).await;

    let mut seen: Vec<(i64, String)> = Vec::new();
    let mut last = 0;
    // Read part of the stream, then drop the connection.
    {
        let mut w =
            ChangeStreamServiceClient::new(clm_platform::client::channel(&server.url()).unwrap())
                .watch_changes(WatchChangesRequest {
                    after_sequence: last,
                    event_types: vec![],
                })
                .await
                .unwrap()
                .into_inner();
        while seen.len() < 120 {
            let e = w.next().await.unwrap().unwrap().event.unwrap();
            last = e.sequence;
            seen.push((e.sequence, e.event_id));
        }
    }
    // Graceful restart, more events, hard kill, more events.
    server.terminate();
    server.restart().await;
    record(&mut server.client(), 300, 500).await;
    server.kill();
    server.restart().await;
    record(&mut server.client(), 500, 700).await;

    let mut w =
        ChangeStreamServiceClient::new(clm_platform::client::channel(&server.url()).unwrap())
            .watch_changes(WatchChangesRequest {
                after_sequence: last,
                event_types: vec![],
            })
            .await
            .unwrap()
            .into_inner();
    let total = 1 + 700;
    while seen.len() < total {
        let e = tokio::time::timeout(Duration::from_secs(20), w.next())
            .await
            .expect("stream stalled")
            .unwrap()
            .unwrap()
            .event
            .unwrap();
        seen.push((e.sequence, e.event_id));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), w.next())
            .await
            .is_err(),
        "nothing beyond the events written"
    );
    assert!(
        seen.windows(2).all(|p| p[0].0 < p[1].0),
        "strictly increasing sequences"
    );
    let ids: HashSet<&String> = seen.iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), total, "every event exactly once");
}

#[tokio::test]
async fn clm_up_serves_health_and_reflection_and_survives_restart() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let up = || {
        spawn_and_read_address(
            Command::new(env!("CARGO_BIN_EXE_clm"))
                .args(["up", "--base-port", "0"])
                .arg("--data-dir")
                .arg(dir.path())
                .env("RUST_LOG", "warn"),
            "customer",
        )
    };
    let (mut child, addr) = up();
    let url = format!("http://{addr}");
    wait_serving(&url).await;

    let channel = clm_platform::client::channel(&url).unwrap();
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    drop(responses);
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"clm.customer.v1.CustomerService".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"clm.common.v1.ChangeStreamService".to_owned()),
        "{names:?}"
    );

    let name = CustomerServiceClient::new(channel)
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(pb::Customer {
                email: "up@example.com".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .name;
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "Ctrl-C stops clm up cleanly"
    );

    let (mut child, addr) = up();
    let url = format!("http://{addr}");
    wait_serving(&url).await;
    let got = CustomerServiceClient::new(clm_platform::client::channel(&url).unwrap())
        .get_customer(pb::GetCustomerRequest { name })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.email, "up@example.com", "data survive a restart");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn bad_config_exits_64_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_clm"))
        .args(["serve", "customer", "--listen", "0.0.0.0:0"])
        .env_remove("CLM_AUTH__HS256_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listen") && err.contains("--insecure"),
        "{err}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_clm"))
        .args(["serve", "customer", "--database-url", "mysql://nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("database.url"));

    let out = Command::new(env!("CARGO_BIN_EXE_clm"))
        .args(["serve", "customer", "--print-config"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("[database]"));
}

#[tokio::test]
async fn a_minted_token_opens_an_authenticated_server() {
    let secret = "process-test-secret-process-test-secret";
    let token = Command::new(env!("CARGO_BIN_EXE_clm"))
        .args(["token", "--subject", "ops-olga", "--role", "marketer"])
        .env("CLM_AUTH__HS256_SECRET", secret)
        .output()
        .unwrap();
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();

    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_and_read_address(
        Command::new(env!("CARGO_BIN_EXE_clm"))
            .args(["serve", "customer", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path())
            .env("CLM_AUTH__HS256_SECRET", secret)
            .env("RUST_LOG", "warn"),
        "customer",
    );
    let url = format!("http://{addr}");
    wait_serving(&url).await;
    let channel = clm_platform::client::channel(&url).unwrap();
    let anonymous = CustomerServiceClient::new(channel.clone())
        .list_customers(pb::ListCustomersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    let mut authed = CustomerServiceClient::with_interceptor(
        channel,
        clm_platform::client::ClientInterceptor::new(Some(&token)),
    );
    authed
        .list_customers(pb::ListCustomersRequest::default())
        .await
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();

    let bad = Command::new(env!("CARGO_BIN_EXE_clm"))
        .args(["token", "--subject", "x", "--role", "wizard"])
        .env("CLM_AUTH__HS256_SECRET", secret)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
}

/// `clm serve customer` with the given extra arguments on `backend`;
/// answers the child and its URL once it serves.
async fn serve_customer(backend: &TestBackend, extra: &[&str]) -> (Child, String) {
    let (child, addr) = spawn_and_read_address(
        Command::new(env!("CARGO_BIN_EXE_clm"))
            .args([
                "serve",
                "customer",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                &backend.database_url,
            ])
            .args(extra)
            .arg("--data-dir")
            .arg(backend.dir())
            .env("RUST_LOG", "warn")
            .env_remove("CLM_PEERS__SCORING"),
        "customer",
    );
    let url = format!("http://{addr}");
    wait_serving(&url).await;
    (child, url)
}

async fn erase_one(url: &str) -> pb::ErasureRequest {
    let mut c = CustomerServiceClient::new(clm_platform::client::channel(url).unwrap());
    let name = c
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(pb::Customer {
                email: "erase-me@example.com".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .name;
    c.erase_customer(pb::EraseCustomerRequest {
        name,
        request_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test]
async fn serve_customer_starts_without_peers_and_with_an_absent_one() {
    // No peer configured: no receipt stream is followed, and an erasure
    // expects the customer service's own receipt only.
    let backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let (mut child, url) = serve_customer(&backend, &[]).await;
    let erased = erase_one(&url).await;
    assert_eq!(erased.expected_services, vec!["customer".to_owned()]);
    assert_eq!(erased.state, pb::ErasureState::Completed as i32);
    child.kill().unwrap();
    child.wait().unwrap();

    // A configured peer that is not up yet: the service still serves and
    // waits for that peer's receipt.
    let backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let (mut child, url) =
        serve_customer(&backend, &["--peer", "scoring=http://127.0.0.1:9"]).await;
    let erased = erase_one(&url).await;
    assert_eq!(
        erased.expected_services,
        vec!["customer".to_owned(), "scoring".to_owned()]
    );
    assert_eq!(erased.state, pb::ErasureState::InProgress as i32);
    child.kill().unwrap();
    child.wait().unwrap();
}
