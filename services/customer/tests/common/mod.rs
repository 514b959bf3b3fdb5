//! The harness both customer test suites share: a customer service on a
//! fresh backend with a controlled clock, and a client to it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Utc};
use clm_domain::ManualClock;
use clm_platform::testing::{Running, TestBackend, start_with_clock};
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::customer::{self as pb, Customer};
use std::sync::Arc;
use tonic::transport::Channel;

pub type Client = CustomerServiceClient<Channel>;

pub struct Harness {
    pub server: Running,
    pub clock: ManualClock,
    pub _backend: TestBackend,
}

pub fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

pub async fn start_with(edit: impl FnOnce(&mut clm_platform::config::Config)) -> Harness {
    let backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let mut config = backend.config("customer");
    edit(&mut config);
    let clock = ManualClock::new(t0());
    let c = clock.clone();
    let server = start_with_clock(&clm_customer::DESCRIPTOR, config, Arc::new(c)).await;
    Harness {
        server,
        clock,
        _backend: backend,
    }
}

pub async fn start() -> Harness {
    start_with(|_| {}).await
}

impl Harness {
    pub fn client(&self) -> Client {
        CustomerServiceClient::new(self.server.channel())
    }
}

pub fn customer(email: &str) -> Customer {
    Customer {
        email: email.into(),
        display_name: format!("Customer {email}"),
        ..Default::default()
    }
}

pub async fn create(c: &mut Client, email: &str) -> Customer {
    c.create_customer(pb::CreateCustomerRequest {
        customer: Some(customer(email)),
        request_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}
