//! `clm` as a process when its surroundings are not as configured: an
//! unreachable Redis, and tokens minted for another audience.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::testing::wait_serving;
use clm_proto::customer as pb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use std::process::{Child, Command, Stdio};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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
