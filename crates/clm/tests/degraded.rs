//! `clm` as a process when its surroundings are not as configured: an
//! unreachable Redis, and tokens minted for another audience.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::testing::wait_serving;
use clm_proto::customer as pb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use std::process::{Child, Command, Stdio};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use clm_platform::testing::free_port;

/// Kills the child on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn serve_starts_and_answers_with_redis_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Nothing listens there: the cache must not stop the service.
    let redis = format!("redis://127.0.0.1:{}", free_port());
    let _child = Killed(
        Command::new(env!("CARGO_BIN_EXE_clm"))
            .args([
                "serve",
                "customer",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["--redis-url", &redis])
            .arg("--data-dir")
            .arg(dir.path())
            .env_remove("CLM_AUTH__HS256_SECRET")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_serving(&url).await;
    let channel = clm_platform::client::channel(&url).unwrap();
    let health = HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "clm.customer.v1.CustomerService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);
    let created = CustomerServiceClient::new(channel)
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(pb::Customer {
                email: "no-redis@example.com".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.name.starts_with("customers/"), "{created:?}");
}

#[test]
fn both_signing_keys_are_a_config_error() {
    let key = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../clm-platform/testdata/rs256-test-public.pem");
    let out = Command::new(env!("CARGO_BIN_EXE_clm"))
        .args(["serve", "customer", "--print-config"])
        .env("CLM_AUTH__HS256_SECRET", "x".repeat(32))
        .env("CLM_AUTH__RS256_PUBLIC_KEY_FILE", &key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not both"), "{err}");
}

fn token(secret: &str, audience: Option<&str>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clm"));
    cmd.args(["token", "--subject", "ops-olga", "--role", "marketer"])
        .env("CLM_AUTH__HS256_SECRET", secret)
        .env_remove("CLM_AUTH__AUDIENCE");
    if let Some(a) = audience {
        cmd.env("CLM_AUTH__AUDIENCE", a);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn clm_token_follows_the_configured_audience() {
    let secret = "audience-test-secret-audience-test-secret";
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _child = Killed(
        Command::new(env!("CARGO_BIN_EXE_clm"))
            .args([
                "serve",
                "customer",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .env("CLM_AUTH__HS256_SECRET", secret)
            .env("CLM_AUTH__AUDIENCE", "crm-eu")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_serving(&url).await;
    let channel = clm_platform::client::channel(&url).unwrap();
    let list = |t: String| {
        let mut request = tonic::Request::new(pb::ListCustomersRequest::default());
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
        let mut client = CustomerServiceClient::new(channel.clone());
        async move { client.list_customers(request).await }
    };
    let other = list(token(secret, None)).await.unwrap_err();
    assert_eq!(other.code(), tonic::Code::Unauthenticated, "{other:?}");
    list(token(secret, Some("crm-eu"))).await.unwrap();
}
