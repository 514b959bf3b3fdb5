//! A downstream service following the customer change stream with the
//! platform's reconnecting subscriber, the way scoring and segmentation
//! will: every event is applied exactly once even when the source restarts
//! and when the consumer itself crashes and restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::changes::{EventHandler, Subscriber, load_cursor};
use clm_platform::testing::{TestBackend, spawn};
use clm_proto::common::ChangeEvent;
use clm_proto::customer as pb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use sea_orm::sea_query::{Alias, Query};
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use sea_orm_migration::prelude::*;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The consumer's own schema: platform tables plus what it applied.
struct ConsumerMigrator;

impl MigratorTrait for ConsumerMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut m = clm_platform::migration::platform_migrations();
        m.push(Box::new(Applied));
        m
    }
}

struct Applied;

impl MigrationName for Applied {
    fn name(&self) -> &str {
        "m0100_applied"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Applied {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Alias::new("applied"))
                .col(
                    ColumnDef::new(Alias::new("event_id"))
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(
                    ColumnDef::new(Alias::new("sequence"))
                        .big_integer()
                        .not_null(),
                )
                .to_owned(),
        )
        .await
    }
}

/// Records each event; a second application would violate the primary key.
struct Recorder;

#[async_trait::async_trait]
impl EventHandler for Recorder {
    async fn handle(
        &self,
        txn: &DatabaseTransaction,
        event: &ChangeEvent,
    ) -> Result<(), clm_platform::Error> {
        let mut insert = Query::insert();
        insert
            .into_table(Alias::new("applied"))
            .columns([Alias::new("event_id"), Alias::new("sequence")])
            .values_panic([event.event_id.clone().into(), event.sequence.into()]);
        txn.execute(&insert).await?;
        Ok(())
    }
}

async fn applied_count(db: &impl ConnectionTrait) -> i64 {
    let row = db
        .query_one(
            Query::select()
                .expr(Expr::col(Alias::new("event_id")).count())
                .from(Alias::new("applied")),
        )
        .await
        .unwrap()
        .unwrap();
    row.try_get_by_index(0).unwrap()
}

async fn wait_for(db: &impl ConnectionTrait, n: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while applied_count(db).await < n {
        assert!(
            std::time::Instant::now() < deadline,
            "consumer stuck at {} of {n}",
            applied_count(db).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn consumer_applies_every_event_once_across_restarts_of_both_sides() {
    let source_backend = TestBackend::new().await;
    let mut source_config = source_backend.config("customer");
    let source = spawn(source_config.clone(), clm_customer::run).await;
    source_config.listen = source.addr;
    let url = source.url();

    let consumer_backend = TestBackend::new().await;
    let db = clm_platform::db::connect(&consumer_backend.config("consumer").database)
        .await
        .unwrap();
    ConsumerMigrator::up(&db, None).await.unwrap();

    let start_consumer = |db: sea_orm::DatabaseConnection| {
        let token = CancellationToken::new();
        let mut s = Subscriber::new("customer", url.clone(), db, Recorder);
        s.min_backoff = Duration::from_millis(20);
        s.max_backoff = Duration::from_millis(200);
        let handle = tokio::spawn(s.run(token.clone()));
        (token, handle)
    };
    let (stop_consumer, consumer) = start_consumer(db.clone());

    let mut client = CustomerServiceClient::new(source.channel());
    let customer = client
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(pb::Customer {
                email: "c@example.com".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .name;
    let batch = |from: usize, to: usize| pb::RecordTouchpointsRequest {
        touchpoints: (from..to)
            .map(|i| pb::Touchpoint {
                customer: customer.clone(),
                event_id: format!("t{i}"),
                r#type: pb::TouchpointType::SupportContact as i32,
                occurred_time: Some(prost_types::Timestamp {
                    seconds: 1_760_000_000,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .collect(),
    };
    client.record_touchpoints(batch(0, 200)).await.unwrap();
    wait_for(&db, 201).await;

    // The consumer crashes (its task is dropped mid-flight) and restarts from its stored cursor.
    stop_consumer.cancel();
    consumer.await.unwrap();
    client.record_touchpoints(batch(200, 400)).await.unwrap();
    let (stop_consumer, consumer) = start_consumer(db.clone());
    wait_for(&db, 401).await;

    // The source restarts on the same port; the subscriber reconnects and resumes.
    source.stop().await;
    let source = spawn(source_config.clone(), clm_customer::run).await;
    let mut client = CustomerServiceClient::new(source.channel());
    client.record_touchpoints(batch(400, 600)).await.unwrap();
    wait_for(&db, 601).await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(applied_count(&db).await, 601, "nothing applied twice");
    let cursor = load_cursor(&db, "customer").await.unwrap();
    let max: i64 = db
        .query_one(
            Query::select()
                .expr(Expr::col(Alias::new("sequence")).max())
                .from(Alias::new("applied")),
        )
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index(0)
        .unwrap();
    assert_eq!(cursor, max, "the cursor is the last applied sequence");
    stop_consumer.cancel();
    consumer.await.unwrap();
    source.stop().await;
}

/// Fails one event always and another one twice.
struct Flaky {
    poison: i64,
    flaky: i64,
    attempts: std::sync::Mutex<std::collections::HashMap<i64, u32>>,
}

#[async_trait::async_trait]
impl EventHandler for Flaky {
    async fn handle(
        &self,
        txn: &DatabaseTransaction,
        event: &ChangeEvent,
    ) -> Result<(), clm_platform::Error> {
        let n = {
            let mut a = self.attempts.lock().unwrap();
            let n = a.entry(event.sequence).or_default();
            *n += 1;
            *n
        };
        if event.sequence == self.poison || (event.sequence == self.flaky && n <= 2) {
            return Err(clm_platform::Error::internal(format!(
                "cannot apply {}",
                event.sequence
            )));
        }
        Recorder.handle(txn, event).await
    }
}

#[tokio::test]
async fn a_poison_event_is_parked_and_the_stream_moves_on() {
    let source_backend = TestBackend::new().await;
    let source = spawn(source_backend.config("customer"), clm_customer::run).await;
    let consumer_backend = TestBackend::new().await;
    let db = clm_platform::db::connect(&consumer_backend.config("consumer").database)
        .await
        .unwrap();
    ConsumerMigrator::up(&db, None).await.unwrap();

    let mut client = CustomerServiceClient::new(source.channel());
    let customer = client
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(pb::Customer {
                email: "poison@example.com".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .name;
    client
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: (0..10)
                .map(|i| pb::Touchpoint {
                    customer: customer.clone(),
                    event_id: format!("p{i}"),
                    r#type: pb::TouchpointType::SupportContact as i32,
                    occurred_time: Some(prost_types::Timestamp {
                        seconds: 1_760_000_000,
                        nanos: 0,
                    }),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .unwrap();

    let handler = Flaky {
        poison: 5,
        flaky: 7,
        attempts: Default::default(),
    };
    let token = CancellationToken::new();
    let mut s = Subscriber::new("customer", source.url(), db.clone(), handler);
    s.min_backoff = Duration::from_millis(5);
    s.max_attempts = 3;
    let run = tokio::spawn(s.run(token.clone()));
    wait_for(&db, 10).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while load_cursor(&db, "customer").await.unwrap() < 11 {
        assert!(
            std::time::Instant::now() < deadline,
            "cursor did not reach the last event"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    token.cancel();
    run.await.unwrap();

    assert_eq!(
        applied_count(&db).await,
        10,
        "every event but the poison one, the flaky one once"
    );
    let parked = db
        .query_all(
            Query::select()
                .columns([
                    Alias::new("sequence"),
                    Alias::new("attempts"),
                    Alias::new("error"),
                ])
                .from(Alias::new("dead_letters")),
        )
        .await
        .unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].try_get::<i64>("", "sequence").unwrap(), 5);
    assert_eq!(parked[0].try_get::<i64>("", "attempts").unwrap(), 3);
    assert!(
        parked[0]
            .try_get::<String>("", "error")
            .unwrap()
            .contains("cannot apply 5")
    );
    source.stop().await;
}
