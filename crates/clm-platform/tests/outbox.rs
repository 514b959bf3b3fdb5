//! The outbox as a stream: commit order without a global lock, retention
//! with OUT_OF_RANGE instead of a silent skip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::Runtime;
use clm_platform::outbox::{NewEvent, Outbox};
use clm_platform::service::{Parts, ServiceDescriptor, migrate_with};
use clm_platform::testing::{TestBackend, scalar, start};
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

    // The relay stamped the two transactions, not their events (m0006):
    // each event row is still the version its writer inserted (its xmin
    // is the writing transaction), and each transaction has its range.
    assert_eq!(
        scalar(
            &db,
            "SELECT COUNT(*) FROM outbox WHERE xmin::text::int8 <> txn % 4294967296"
        )
        .await,
        0,
        "an event row was rewritten after its insert"
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT COUNT(*) FROM outbox_txns WHERE last IS NOT NULL"
        )
        .await,
        2
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

/// A connection to `backend`'s database with the platform's tables, and
/// no service (so no relay) running.
async fn migrated(backend: &TestBackend) -> sea_orm::DatabaseConnection {
    let db = clm_platform::db::connect(&backend.config("streamtest").database)
        .await
        .unwrap();
    <PlatformOnly as MigratorTrait>::up(&db, None)
        .await
        .unwrap();
    db
}

/// An event of another type than `event`'s, to filter on.
fn other(id: &str) -> NewEvent {
    NewEvent::new(id, &clm_proto::common::Money::default())
}

#[tokio::test]
async fn transactions_of_many_events_read_in_commit_order_from_any_position() {
    use sea_orm::ConnectionTrait;
    let backend = TestBackend::new().await;
    let mut config = backend.config("streamtest");
    config.change_poll_interval_ms = 50;
    let server = start(&STREAM, config.clone()).await;
    let db = clm_platform::db::connect(&config.database).await.unwrap();
    let outbox = Outbox::new("streamtest");
    let now = chrono::Utc::now();
    let postgres = backend.is_postgres();

    // A appends twice around B's events; B commits first (on SQLite, one
    // writer: A first, then B).
    let a = db.begin().await.unwrap();
    outbox
        .append(&a, &[event("a1"), other("a2"), event("a3")], now)
        .await
        .unwrap();
    if postgres {
        let b = db.begin().await.unwrap();
        outbox
            .append(&b, &[event("b1"), other("b2")], now)
            .await
            .unwrap();
        outbox.commit(b).await.unwrap();
        // Stamped before A commits (a relay stamping both at once may
        // put either first: both had committed).
        outbox.stamp(&db).await.unwrap();
    }
    // Events appended inside a savepoint that rolls back leave nothing.
    a.execute_unprepared("SAVEPOINT gone").await.unwrap();
    outbox.append(&a, &[event("gone")], now).await.unwrap();
    a.execute_unprepared("ROLLBACK TO SAVEPOINT gone")
        .await
        .unwrap();
    outbox.append(&a, &[event("a4")], now).await.unwrap();
    outbox.commit(a).await.unwrap();
    if !postgres {
        let b = db.begin().await.unwrap();
        outbox
            .append(&b, &[event("b1"), other("b2")], now)
            .await
            .unwrap();
        outbox.commit(b).await.unwrap();
    }
    // A transaction whose only events rolled back is stamped as nothing.
    let c = db.begin().await.unwrap();
    c.execute_unprepared("SAVEPOINT gone").await.unwrap();
    outbox.append(&c, &[event("gone")], now).await.unwrap();
    c.execute_unprepared("ROLLBACK TO SAVEPOINT gone")
        .await
        .unwrap();
    outbox.commit(c).await.unwrap();
    outbox.stamp(&db).await.unwrap();

    let all = outbox.read_after(&db, 0, &[], 100).await.unwrap();
    let subjects: Vec<&str> = all.iter().map(|e| e.subject.as_str()).collect();
    let expected = if postgres {
        ["b1", "b2", "a1", "a2", "a3", "a4"]
    } else {
        ["a1", "a2", "a3", "a4", "b1", "b2"]
    };
    assert_eq!(subjects, expected);
    assert!(
        all.windows(2).all(|w| w[0].sequence < w[1].sequence),
        "positions strictly increase: {:?}",
        all.iter().map(|e| e.sequence).collect::<Vec<_>>()
    );
    let head = outbox.bounds(&db).await.unwrap().head;
    assert_eq!(head, all.last().unwrap().sequence);
    // From any position, in the middle of a transaction or between two,
    // the rest of the stream and nothing else; a limit cuts it anywhere.
    for (i, e) in all.iter().enumerate() {
        let rest = outbox.read_after(&db, e.sequence, &[], 100).await.unwrap();
        assert_eq!(
            rest.iter().map(|e| &e.event_id).collect::<Vec<_>>(),
            all[i + 1..].iter().map(|e| &e.event_id).collect::<Vec<_>>(),
            "after {}",
            e.sequence
        );
        let two = outbox.read_after(&db, e.sequence, &[], 2).await.unwrap();
        assert_eq!(two.len(), (all.len() - i - 1).min(2));
    }
    // A type filter keeps the order.
    let others = outbox
        .read_after(&db, 0, &[other("").event_type], 100)
        .await
        .unwrap();
    let subjects: Vec<&str> = others.iter().map(|e| e.subject.as_str()).collect();
    assert_eq!(subjects, if postgres { ["b2", "a2"] } else { ["a2", "b2"] });
    // The view shows every event with its position.
    let counts = (
        scalar(&db, "SELECT COUNT(*) FROM outbox_events").await,
        scalar(&db, "SELECT COUNT(position) FROM outbox_events").await,
        scalar(&db, "SELECT MAX(position) FROM outbox_events").await,
    );
    assert_eq!(counts, (6, 6, head));
    if postgres {
        // No transaction is left to stamp, the empty one included.
        assert_eq!(
            scalar(&db, "SELECT COUNT(*) FROM outbox_txns WHERE last IS NULL").await,
            0
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn events_stamped_before_per_transaction_stamps_keep_their_positions() {
    use sea_orm::ConnectionTrait;
    let backend = TestBackend::new().await;
    if !backend.is_postgres() {
        // SQLite stamps in the writing transaction, as before.
        return;
    }
    let config = backend.config("streamtest");
    let db = clm_platform::db::connect(&config.database).await.unwrap();
    // Every migration before m0006, then events as the per-event relay
    // left them: two stamped (positions 1 and 2, the second with the
    // lower sequence), one committed but not stamped yet.
    let before = <PlatformOnly as MigratorTrait>::migrations().len() - 1;
    <PlatformOnly as MigratorTrait>::up(
        &db,
        Some(<u32 as TryFrom<usize>>::try_from(before).unwrap()),
    )
    .await
    .unwrap();
    db.execute_unprepared(
        "INSERT INTO outbox (sequence, event_id, event_type, subject, payload, occurred_us, position) VALUES \
         (11, 'e11', 'clm.common.v1.Date', 'second', '\\x00', 0, 2), \
         (10, 'e10', 'clm.common.v1.Date', 'first', '\\x00', 0, 1), \
         (12, 'e12', 'clm.common.v1.Date', 'third', '\\x00', 0, NULL)",
    )
    .await
    .unwrap();
    <PlatformOnly as MigratorTrait>::up(&db, None)
        .await
        .unwrap();
    let outbox = Outbox::new("streamtest");
    assert_eq!(outbox.bounds(&db).await.unwrap().head, 2);
    outbox.stamp(&db).await.unwrap();
    let txn = db.begin().await.unwrap();
    outbox
        .append(&txn, &[event("fourth")], chrono::Utc::now())
        .await
        .unwrap();
    outbox.commit(txn).await.unwrap();
    outbox.stamp(&db).await.unwrap();
    let all = outbox.read_after(&db, 0, &[], 100).await.unwrap();
    let read: Vec<(&str, i64)> = all
        .iter()
        .map(|e| (e.subject.as_str(), e.sequence))
        .collect();
    assert_eq!(
        read,
        [("first", 1), ("second", 2), ("third", 3), ("fourth", 4)]
    );
    let rest = outbox.read_after(&db, 1, &[], 100).await.unwrap();
    assert_eq!(rest.len(), 3);
}

#[tokio::test]
async fn a_transaction_that_wrote_after_another_committed_follows_it() {
    let backend = TestBackend::new().await;
    if !backend.is_postgres() {
        return;
    }
    let db = migrated(&backend).await;
    let outbox = Outbox::new("streamtest");
    let now = chrono::Utc::now();
    // A writes, B writes and commits, A writes again (as after waiting for
    // a lock B held) and commits; one stamp sees both. A began first, but
    // its second event follows B's commit, so A goes after B.
    let a = db.begin().await.unwrap();
    outbox.append(&a, &[event("a1")], now).await.unwrap();
    let b = db.begin().await.unwrap();
    outbox.append(&b, &[event("b1")], now).await.unwrap();
    outbox.commit(b).await.unwrap();
    outbox.append(&a, &[event("a2")], now).await.unwrap();
    outbox.commit(a).await.unwrap();
    outbox.stamp(&db).await.unwrap();
    let all = outbox.read_after(&db, 0, &[], 100).await.unwrap();
    let subjects: Vec<&str> = all.iter().map(|e| e.subject.as_str()).collect();
    assert_eq!(subjects, ["b1", "a1", "a2"]);
}

#[tokio::test]
async fn a_filtered_read_goes_past_transactions_without_its_types() {
    let backend = TestBackend::new().await;
    let db = migrated(&backend).await;
    let outbox = Outbox::new("streamtest");
    let now = chrono::Utc::now();
    // Seven transactions of another type, then one of the type read.
    for i in 0..7 {
        let txn = db.begin().await.unwrap();
        outbox
            .append(
                &txn,
                &[other(&format!("o{i}")), other(&format!("p{i}"))],
                now,
            )
            .await
            .unwrap();
        outbox.commit(txn).await.unwrap();
        outbox.stamp(&db).await.unwrap();
    }
    let txn = db.begin().await.unwrap();
    outbox.append(&txn, &[event("wanted")], now).await.unwrap();
    outbox.commit(txn).await.unwrap();
    outbox.stamp(&db).await.unwrap();
    let types = [event("").event_type];
    // However small the limit, the read reaches it, and then nothing.
    for limit in [1, 2, 3, 100] {
        let read = outbox.read_after(&db, 0, &types, limit).await.unwrap();
        let subjects: Vec<&str> = read.iter().map(|e| e.subject.as_str()).collect();
        assert_eq!(subjects, ["wanted"], "limit {limit}");
        let after = outbox
            .read_after(&db, read[0].sequence, &types, limit)
            .await
            .unwrap();
        assert!(after.is_empty(), "limit {limit}");
    }
}
