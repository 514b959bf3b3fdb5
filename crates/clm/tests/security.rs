//! Security as an operator meets it: the customer service's role table
//! (data stewards do data-quality work only) through the real server, and a
//! refused token's warn line in the real binary's JSON log (reason, rpc,
//! peer, the caller's trace id; never the token).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::auth::{Role, mint};
use clm_platform::testing::{TestBackend, start};
use clm_proto::customer as pb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use tonic::transport::Channel;

const SECRET: &str = "security-test-secret-security-test!!";

type Client = CustomerServiceClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>,
    >,
>;

fn client(channel: Channel, auth: &clm_platform::config::AuthConfig, role: Role) -> Client {
    let token = mint(
        auth,
        &format!("{role:?}"),
        &[role],
        Duration::from_secs(600),
    )
    .unwrap();
    let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    CustomerServiceClient::with_interceptor(
        channel,
        Box::new(move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", header.clone());
            Ok(r)
        }),
    )
}

#[tokio::test]
async fn data_stewards_curate_but_do_not_create_engage_or_move_stages() {
    let backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let mut config = backend.config("customer");
    config.auth.hs256_secret = Some(SECRET.into());
    let auth = config.auth.clone();
    let server = start(&clm_customer::DESCRIPTOR, config).await;
    let mut marketer = client(server.channel(), &auth, Role::Marketer);
    let mut steward = client(server.channel(), &auth, Role::DataSteward);
    let mut analyst = client(server.channel(), &auth, Role::Analyst);

    let new = |email: &str| pb::CreateCustomerRequest {
        customer: Some(pb::Customer {
            email: email.into(),
            display_name: "Grace".into(),
            ..Default::default()
        }),
        request_id: String::new(),
    };

    fn denied<T>(r: Result<T, tonic::Status>) -> tonic::Code {
        r.map(|_| ()).unwrap_err().code()
    }
    // Not a data steward's work.
    assert_eq!(
        denied(steward.create_customer(new("g@example.com")).await),
        tonic::Code::PermissionDenied
    );
    let grace = marketer
        .create_customer(new("g@example.com"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        denied(
            steward
                .record_touchpoints(pb::RecordTouchpointsRequest::default())
                .await
        ),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        denied(
            steward
                .transition_stage(pb::TransitionStageRequest {
                    name: grace.name.clone(),
                    ..Default::default()
                })
                .await
        ),
        tonic::Code::PermissionDenied
    );
    // Data-quality work: a steward gets past the role check (the update
    // itself may then be judged on its content).
    let update = steward
        .update_customer(pb::UpdateCustomerRequest {
            customer: Some(pb::Customer {
                name: grace.name.clone(),
                display_name: "Grace Hopper".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(update.unwrap().into_inner().display_name, "Grace Hopper");
    // Reads: everyone with a role; erasure requests: stewards, not analysts.
    steward
        .get_customer(pb::GetCustomerRequest {
            name: grace.name.clone(),
        })
        .await
        .unwrap();
    analyst
        .get_customer(pb::GetCustomerRequest {
            name: grace.name.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        denied(
            analyst
                .list_erasure_requests(pb::ListErasureRequestsRequest::default())
                .await
        ),
        tonic::Code::PermissionDenied
    );
    steward
        .list_erasure_requests(pb::ListErasureRequestsRequest::default())
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_refused_token_is_logged_at_warn_with_reason_rpc_peer_and_trace() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_clm"))
        .args([
            "serve",
            "customer",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("CLM_AUTH__HS256_SECRET", SECRET)
        .env("CLM_LOG__FILTER", "warn")
        .env_remove("RUST_LOG")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });

    clm_platform::testing::wait_serving(&url).await;
    let forged = clm_platform::auth::mint_hs256(
        &"f".repeat(40),
        "mallory",
        &[Role::Admin],
        Duration::from_secs(60),
    )
    .unwrap();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(pb::GetCustomerRequest {
        name: "customers/00000000-0000-7000-8000-000000000000".into(),
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {forged}").parse().unwrap());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    let status = CustomerServiceClient::new(clm_platform::client::channel(&url).unwrap())
        .get_customer(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let line = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("a 'token refused' line");
        if line.contains("token refused") {
            break line;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(json["level"], "WARN", "{line}");
    assert_eq!(
        json["fields"]["reason"], "invalid token: bad signature",
        "{line}"
    );
    assert_eq!(
        json["fields"]["rpc"], "clm.customer.v1.CustomerService/GetCustomer",
        "{line}"
    );
    assert!(
        json["fields"]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{line}"
    );
    assert_eq!(
        json["span"]["trace_id"], trace,
        "the caller's trace: {line}"
    );
    assert!(!line.contains(&forged), "never the token: {line}");
    assert!(!line.contains("eyJ"), "never the token: {line}");
}
