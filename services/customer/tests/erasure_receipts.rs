//! Erasure receipts through real change streams: the customer service
//! follows a peer's stream (here a stand-in "scoring" service built on the
//! platform, which answers each `CustomerErased` with
//! `clm.common.v1.CustomerDataErased` in its outbox, as every real peer
//! does) and completes the erasure request when every expected receipt is
//! in. SQLite + in-process cache, or PostgreSQL + Redis when
//! `CLM_TEST_DATABASE_URL` / `CLM_TEST_REDIS_URL` are set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_domain::ManualClock;
use clm_platform::changes::{Apply, Handlers, On};
use clm_platform::outbox::NewEvent;
use clm_platform::service::{Parts, ServiceDescriptor, migrate_with, run, run_with_clock};
use clm_platform::testing::{TestBackend, eventually, wait_serving};
use clm_platform::{Error, Runtime};
use clm_proto::common::change_stream_service_client::ChangeStreamServiceClient;
use clm_proto::common::dead_letter_service_client::DeadLetterServiceClient;
use clm_proto::common::{
    ChangeEvent, CustomerDataErased, ListDeadLettersRequest, WatchChangesRequest,
};
use clm_proto::customer as pb;
use sea_orm_migration::{MigrationTrait, MigratorTrait};
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

mod common;
use common::*;

/// The stand-in peer's schema: the platform tables only.
struct PeerMigrator;

impl MigratorTrait for PeerMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        clm_platform::migration::platform_migrations()
    }
}

/// A "scoring" service that holds nothing and only sends erasure receipts.
static RECEIPT_PEER: ServiceDescriptor = ServiceDescriptor {
    name: "scoring",
    about: "stand-in peer that answers CustomerErased with a receipt",
    migrate: migrate_with::<PeerMigrator>,
    policy: &clm_platform::auth::Policy::PLATFORM_ONLY,
    build: build_peer,
};

fn build_peer(_rt: &Runtime) -> anyhow::Result<Parts> {
    Ok(Parts::new().follow(
        "customer",
        Handlers::new().on::<pb::CustomerErased, _>(Arc::new(SendReceipt)),
    ))
}

struct SendReceipt;

#[async_trait::async_trait]
impl On<pb::CustomerErased> for SendReceipt {
    async fn on(
        &self,
        cx: &mut Apply,
        _event: &ChangeEvent,
        m: pb::CustomerErased,
    ) -> Result<(), Error> {
        let now = cx.now();
        let receipt = |request: &str, at: chrono::DateTime<chrono::Utc>| {
            NewEvent::new(
                m.customer.clone(),
                &CustomerDataErased {
                    customer: m.customer.clone(),
                    erasure_request: request.to_owned(),
                    service: "scoring".into(),
                    erase_time: Some(clm_platform::convert::timestamp(at)),
                },
            )
        };
        // A receipt for a request this customer service never made (it
        // must be skipped, not parked), the real one, and the real one
        // again later (a redelivery must change nothing).
        cx.emit(receipt(
            "erasureRequests/0190a000-0000-7000-8000-000000000000",
            now,
        ));
        cx.emit(receipt(&m.erasure_request, now));
        cx.emit(receipt(
            &m.erasure_request,
            now + chrono::Duration::hours(1),
        ));
        Ok(())
    }
}

#[tokio::test]
async fn peer_receipts_arrive_on_its_stream_and_complete_the_request() {
    let customer_backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let peer_backend = TestBackend::migrated::<PeerMigrator>().await;
    // Both listeners first: each service names the other as its peer.
    let customer_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let customer_url = format!("http://{}", customer_listener.local_addr().unwrap());
    let peer_url = format!("http://{}", peer_listener.local_addr().unwrap());
    let mut customer_config = customer_backend.config("customer");
    customer_config
        .peers
        .insert("scoring".into(), peer_url.clone());
    let mut peer_config = peer_backend.config("scoring");
    peer_config
        .peers
        .insert("customer".into(), customer_url.clone());
    let stop = CancellationToken::new();
    let clock = ManualClock::new(t0());
    let customer = tokio::spawn(run_with_clock(
        &clm_customer::DESCRIPTOR,
        customer_config,
        customer_listener,
        stop.clone(),
        Arc::new(clock.clone()),
    ));
    let peer = tokio::spawn(run(&RECEIPT_PEER, peer_config, peer_listener, stop.clone()));
    wait_serving(&customer_url).await;
    wait_serving(&peer_url).await;
    let mut c = pb::customer_service_client::CustomerServiceClient::new(
        clm_platform::client::channel(&customer_url).unwrap(),
    );

    let ada = create(&mut c, "ada@example.com").await;
    let bob = create(&mut c, "bob@example.com").await;
    clock.advance(chrono::Duration::minutes(1));
    let asked = erase(&mut c, &ada.name).await;
    assert_eq!(
        asked.expected_services,
        vec!["customer".to_owned(), "scoring".to_owned()],
        "the customer service and the peer it follows"
    );
    assert_eq!(asked.state, pb::ErasureState::InProgress as i32);
    assert_eq!(asked.complete_time, None);

    clock.advance(chrono::Duration::minutes(1));
    let done = eventually(Duration::from_secs(30), || {
        let mut c = c.clone();
        let name = asked.name.clone();
        async move {
            let r = erasure(&mut c, &name).await;
            (r.state == pb::ErasureState::Completed as i32).then_some(r)
        }
    })
    .await;
    let services: Vec<&str> = done.receipts.iter().map(|r| r.service.as_str()).collect();
    assert_eq!(services, vec!["customer", "scoring"]);
    assert_eq!(
        done.complete_time,
        Some(clm_platform::convert::timestamp(
            t0() + chrono::Duration::minutes(2)
        )),
        "completed when the last receipt arrived, by the service's clock"
    );

    // A second erasure: once it completes, every event the peer sent
    // about the first (the duplicate and the unknown request) is applied.
    let second = erase(&mut c, &bob.name).await;
    eventually(Duration::from_secs(30), || {
        let mut c = c.clone();
        let name = second.name.clone();
        async move { erasure(&mut c, &name).await.state == pb::ErasureState::Completed as i32 }
    })
    .await;
    assert_eq!(
        erasure(&mut c, &asked.name).await,
        done,
        "the redelivered receipt changed nothing"
    );
    let parked =
        DeadLetterServiceClient::new(clm_platform::client::channel(&customer_url).unwrap())
            .list_dead_letters(ListDeadLettersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .dead_letters;
    assert!(parked.is_empty(), "nothing parked: {parked:?}");

    // The receipts really travelled on the peer's own change stream.
    let mut watch =
        ChangeStreamServiceClient::new(clm_platform::client::channel(&peer_url).unwrap())
            .watch_changes(WatchChangesRequest {
                after_sequence: 0,
                event_types: vec!["clm.common.v1.CustomerDataErased".into()],
            })
            .await
            .unwrap()
            .into_inner();
    let mut requests = Vec::new();
    for _ in 0..6 {
        let event = watch.next().await.unwrap().unwrap().event.unwrap();
        let m =
            <CustomerDataErased as prost::Message>::decode(event.payload.unwrap().value.as_slice())
                .unwrap();
        requests.push(m.erasure_request);
    }
    assert_eq!(requests[1], asked.name);
    assert_eq!(requests[4], second.name);

    stop.cancel();
    customer.await.unwrap().unwrap();
    peer.await.unwrap().unwrap();
}
