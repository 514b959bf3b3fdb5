//! The outbox as a stream: commit order without a global lock, retention
//! with OUT_OF_RANGE instead of a silent skip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::Runtime;
use clm_platform::outbox::{NewEvent, Outbox};
use clm_platform::service::{Parts, ServiceDescriptor, migrate_with};
use clm_platform::testing::{TestBackend, start};
use clm_proto::common::change_stream_service_client::ChangeStreamServiceClient;
use clm_proto::common::{ChangeEvent, WatchChangesRequest};
use sea_orm::TransactionTrait;
use sea_orm_migration::prelude::*;
use std::time::Duration;

struct PlatformOnly;

impl MigratorTrait for PlatformOnly {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        clm_platform::migration::platform_migrations()
    }
}

static STREAM: ServiceDescriptor = ServiceDescriptor {
    name: "streamtest",
    about: "serves only its change stream",
    migrate: migrate_with::<PlatformOnly>,
    policy: &clm_platform::auth::Policy::PLATFORM_ONLY,
    build,
};

fn build(_: &Runtime) -> anyhow::Result<Parts> {
    Ok(Parts::new())
}

fn event(id: &str) -> NewEvent {
    NewEvent::new(
        id,
        &clm_proto::common::Date {
            year: 2026,
            month: 1,
            day: 1,
        },
    )
}

async fn next(
    stream: &mut tonic::Streaming<clm_proto::common::WatchChangesResponse>,
) -> ChangeEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .unwrap()
        .event
        .unwrap()
}

#[tokio::test]
async fn an_open_writer_never_blocks_another_and_the_stream_keeps_commit_order() {
    let backend = TestBackend::new().await;
    if !backend.is_postgres() {
        // SQLite has one writer: a second writer waits for the first by
        // design, and insertion order is commit order.
        return;
    }
    let mut config = backend.config("streamtest");
    config.change_poll_interval_ms = 50;
    let server = start(&STREAM, config.clone()).await;
    let db = clm_platform::db::connect(&config.database).await.unwrap();
    let outbox = Outbox::new("streamtest");
    let now = chrono::Utc::now();

    let mut watch = ChangeStreamServiceClient::new(server.channel())
        .watch_changes(WatchChangesRequest {
            after_sequence: 0,
            event_types: vec![],
        })
        .await
        .unwrap()
        .into_inner();

    // A writes first and stays open.
    let a = db.begin().await.unwrap();
    outbox.append(&a, &[event("a")], now).await.unwrap();
    // B writes after A and commits: with a global lock held through commit
    // B would wait for A here.
    let b = db.begin().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        outbox.append(&b, &[event("b")], now).await.unwrap();
        outbox.commit(b).await.unwrap();
    })
    .await
    .expect("B commits while A is still open");

    // The watcher sees B (committed) at position 1, and nothing of A.
    let first = next(&mut watch).await;
    assert_eq!((first.subject.as_str(), first.sequence), ("b", 1));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), watch.message())
            .await
            .is_err(),
        "nothing of the open transaction A is visible"
    );

    // A commits: it follows B, with no gap, no reorder.
    outbox.commit(a).await.unwrap();
    let second = next(&mut watch).await;
    assert_eq!((second.subject.as_str(), second.sequence), ("a", 2));

    // A reader starting over sees exactly the same stream.
    let mut again = ChangeStreamServiceClient::new(server.channel())
        .watch_changes(WatchChangesRequest {
            after_sequence: 0,
            event_types: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut again).await.event_id, first.event_id);
    assert_eq!(next(&mut again).await.event_id, second.event_id);

    // Positions stay unique, and unstamped events take no entry in their
    // index (m0005): it holds the two stamped events only.
    use sea_orm::ConnectionTrait;
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'outbox_position'",
        ))
        .await
        .unwrap()
        .expect("the outbox_position index");
    let def: String = row.try_get("", "indexdef").unwrap();
    assert!(
        def.starts_with("CREATE UNIQUE INDEX") && def.ends_with("WHERE (\"position\" IS NOT NULL)"),
        "{def}"
    );
    server.stop().await;
}

#[tokio::test]
async fn events_past_retention_are_out_of_range_never_silently_skipped() {
    let backend = TestBackend::new().await;
    let mut config = backend.config("streamtest");
    config.change_poll_interval_ms = 50;
    // The service's own purge (at start, then hourly) must not race the
    // test's: under load it ran after the old events were written.
    config.outbox_retention_days = 36_500;
    let server = start(&STREAM, config.clone()).await;
    let db = clm_platform::db::connect(&config.database).await.unwrap();
    let outbox = Outbox::new("streamtest");
    let now = chrono::Utc::now();
    let old = now - chrono::Duration::days(40);

    let txn = db.begin().await.unwrap();
    outbox
        .append(&txn, &[event("o1"), event("o2"), event("o3")], old)
        .await
        .unwrap();
    outbox.commit(txn).await.unwrap();
    let txn = db.begin().await.unwrap();
    outbox.append(&txn, &[event("new")], now).await.unwrap();
    outbox.commit(txn).await.unwrap();
    outbox.stamp(&db).await.unwrap();
    assert_eq!(outbox.bounds(&db).await.unwrap().head, 4);

    let purged = outbox
        .purge(&db, now - chrono::Duration::days(30))
        .await
        .unwrap();
    assert_eq!(purged, 3);
    let bounds = outbox.bounds(&db).await.unwrap();
    assert_eq!((bounds.purged_through, bounds.head), (3, 4));
    // Purging again changes nothing, and the newest event is always kept.
    assert_eq!(
        outbox
            .purge(&db, now + chrono::Duration::days(1))
            .await
            .unwrap(),
        0
    );

    let mut client = ChangeStreamServiceClient::new(server.channel());
    let watch = |after| WatchChangesRequest {
        after_sequence: after,
        event_types: vec![],
    };
    let too_old = client.watch_changes(watch(1)).await.unwrap_err();
    assert_eq!(too_old.code(), tonic::Code::OutOfRange);
    assert!(
        too_old.message().contains("oldest kept event 4"),
        "{}",
        too_old.message()
    );
    let ahead = client.watch_changes(watch(9)).await.unwrap_err();
    assert_eq!(ahead.code(), tonic::Code::OutOfRange);
    assert!(ahead.message().contains("beyond the newest event 4"));

    let mut stream = client.watch_changes(watch(3)).await.unwrap().into_inner();
    let e = next(&mut stream).await;
    assert_eq!((e.subject.as_str(), e.sequence), ("new", 4));
    server.stop().await;
}

#[tokio::test]
async fn unknown_event_types_are_refused_instead_of_streaming_nothing() {
    let backend = TestBackend::new().await;
    let server = start(&STREAM, backend.config("streamtest")).await;
    let mut client = ChangeStreamServiceClient::new(server.channel());
    let status = client
        .watch_changes(WatchChangesRequest {
            after_sequence: 0,
            event_types: vec![
                "clm.customer.v1.StageChanged".into(),
                "clm.customer.v1.Nope".into(),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let details = tonic_types::StatusExt::get_error_details(&status);
    let fields: Vec<&str> = details
        .bad_request()
        .expect("a BadRequest detail")
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, ["event_types[1]"]);
    server.stop().await;
}
