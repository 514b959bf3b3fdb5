//! The timer queue: 1,000 timers due at one instant fire exactly once each
//! with two replicas on one database, at the instant the service clock
//! reaches; re-armed timers survive their firing; deliveries that fail are
//! retried after the retry delay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_domain::{Clock, ManualClock};
use clm_platform::Runtime;
use clm_platform::changes::Apply;
use clm_platform::service::{Parts, ServiceDescriptor, migrate_with};
use clm_platform::testing::{TestBackend, eventually, scalar, start_with_clock};
use clm_platform::timers::{self, Arm, Deliver, OnDue, Timer};
use sea_orm::{ConnectionTrait, Database};
use sea_orm_migration::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct PlatformOnly;

impl MigratorTrait for PlatformOnly {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut m = clm_platform::migration::platform_migrations();
        m.push(Box::new(FiredLog));
        m
    }
}

/// `fired`: one row per firing (no key: a double firing shows as two rows).
struct FiredLog;

impl MigrationName for FiredLog {
    fn name(&self) -> &str {
        "m9999_test_fired_log"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for FiredLog {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.get_connection()
            .execute_unprepared(
                "CREATE TABLE fired (timer_key VARCHAR(64) NOT NULL, at_us BIGINT NOT NULL, replica VARCHAR(64) NOT NULL)",
            )
            .await?;
        Ok(())
    }
}

struct Log;

#[async_trait::async_trait]
impl OnDue for Log {
    async fn fire(&self, cx: &mut Apply, due: Vec<Timer>) -> Result<(), clm_platform::Error> {
        let replica = cx.runtime().operations.replica.to_string();
        for t in &due {
            cx.txn()
                .execute_unprepared(&format!(
                    "INSERT INTO fired (timer_key, at_us, replica) VALUES ('{}', {}, '{replica}')",
                    t.key, t.due_us
                ))
                .await?;
            // `again-*` timers re-arm themselves one hour later, once.
            if t.key.starts_with("again-") && !t.key.ends_with("-2") {
                timers::arm(
                    cx.txn(),
                    "test.log",
                    &[Arm::new(
                        format!("{}-2", t.key),
                        "s",
                        t.due_us + 3_600_000_000,
                    )],
                )
                .await?;
            }
        }
        Ok(())
    }
}

static CALLS: AtomicUsize = AtomicUsize::new(0);
static FAIL: Mutex<bool> = Mutex::new(true);

struct Call;

#[async_trait::async_trait]
impl Deliver for Call {
    async fn deliver(&self, t: &Timer) -> Result<(), clm_platform::Error> {
        CALLS.fetch_add(1, Ordering::SeqCst);
        assert_eq!(t.payload.as_deref(), Some(&b"hello"[..]));
        if *FAIL.lock().unwrap() {
            Err(clm_platform::Error::Unavailable("peer down".into()))
        } else {
            Ok(())
        }
    }
}

static QUEUE: ServiceDescriptor = ServiceDescriptor {
    name: "timertest",
    about: "fires test timers",
    migrate: migrate_with::<PlatformOnly>,
    policy: &clm_platform::auth::Policy::PLATFORM_ONLY,
    build,
};

fn build(_: &Runtime) -> anyhow::Result<Parts> {
    Ok(Parts::new()
        .timer("test.log", Arc::new(Log))
        .delivery("test.call", Arc::new(Call)))
}

#[tokio::test]
async fn a_thousand_timers_due_at_one_instant_fire_once_each_across_two_replicas() {
    let backend = TestBackend::new().await;
    let t = chrono::Utc::now();
    let clock = ManualClock::new(t);
    let first =
        start_with_clock(&QUEUE, backend.config("timertest"), Arc::new(clock.clone())).await;
    let second =
        start_with_clock(&QUEUE, backend.config("timertest"), Arc::new(clock.clone())).await;
    let db = Database::connect(&backend.database_url).await.unwrap();
    let due_us = clm_platform::db::to_micros(clm_domain::clock::micros(t)) + 1_000_000;
    let mut arms: Vec<Arm> = (0..1000)
        .map(|i| Arm::new(format!("k{i:04}"), "s", due_us))
        .collect();
    arms.push(Arm::new("again-1", "s", due_us));
    timers::arm(&db, "test.log", &arms).await.unwrap();
    // Re-arming bumps the version and moves the instant (last write wins).
    timers::arm(&db, "test.log", &[Arm::new("k0000", "s", due_us)])
        .await
        .unwrap();
    // Not due yet: nothing fires.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM fired").await, 0);
    clock.set(clm_platform::db::from_micros(due_us));
    eventually(Duration::from_secs(30), || async {
        (scalar(&db, "SELECT COUNT(*) FROM fired").await >= 1001).then_some(())
    })
    .await;
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM fired").await, 1001);
    assert_eq!(
        scalar(&db, "SELECT COUNT(DISTINCT timer_key) FROM fired").await,
        1001,
        "no timer fired twice"
    );
    assert_eq!(
        scalar(
            &db,
            &format!("SELECT COUNT(*) FROM fired WHERE at_us = {due_us}")
        )
        .await,
        1001,
        "each at its instant"
    );
    // The re-armed one waits for its own instant.
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM timer_queue").await, 1);
    clock.advance(chrono::Duration::hours(1));
    eventually(Duration::from_secs(10), || async {
        (scalar(&db, "SELECT COUNT(*) FROM timer_queue").await == 0).then_some(())
    })
    .await;
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM fired").await, 1002);

    // Deliveries: a failing call is retried after the retry delay, then deleted.
    let now_us = clm_platform::db::to_micros(clm_domain::clock::micros(clock.now()));
    let mut call = Arm::new("c1", "s", now_us);
    call.payload = Some(b"hello".to_vec());
    timers::arm(&db, "test.call", &[call]).await.unwrap();
    eventually(Duration::from_secs(10), || async {
        (CALLS.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        CALLS.load(Ordering::SeqCst),
        1,
        "not retried before the delay"
    );
    *FAIL.lock().unwrap() = false;
    clock.advance(chrono::Duration::from_std(timers::RETRY_DELAY).unwrap());
    eventually(Duration::from_secs(10), || async {
        (scalar(&db, "SELECT COUNT(*) FROM timer_queue").await == 0).then_some(())
    })
    .await;
    assert_eq!(CALLS.load(Ordering::SeqCst), 2);
    first.stop().await;
    second.stop().await;
}
