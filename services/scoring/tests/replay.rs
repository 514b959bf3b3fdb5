//! Exactly-once scoring of the customer stream: a crash between the
//! effect and the cursor, and a full replay from sequence 0 (cursor lost),
//! both leave one award per touchpoint and rule, also when (on PostgreSQL)
//! the batches are applied in partitions by customer that commit before
//! the cursor.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Utc};
use clm_domain::ManualClock;
use clm_platform::changes::{Subscriber, SubscriptionError};
use clm_platform::testing::{TestBackend, eventually, scalar, start_with_clock};
use clm_proto::customer as cpb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::scoring as pb;
use clm_proto::scoring::scoring_service_server::ScoringService;
use sea_orm::ConnectionTrait;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn local<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.extensions_mut()
        .insert(clm_platform::auth::Principal::local());
    r
}

#[tokio::test]
async fn a_crash_and_a_full_replay_score_each_touchpoint_once() {
    let clock = ManualClock::new(t0());
    let cb = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let customer = start_with_clock(
        &clm_customer::DESCRIPTOR,
        cb.config("customer"),
        Arc::new(clock.clone()),
    )
    .await;
    let mut c = CustomerServiceClient::new(customer.channel());
    // Three customers, their touchpoints interleaved: on PostgreSQL the
    // batches are applied in partitions by customer.
    let mut who = Vec::new();
    for i in 0..3 {
        who.push(
            c.create_customer(cpb::CreateCustomerRequest {
                customer: Some(cpb::Customer {
                    email: format!("r{i}@example.com"),
                    display_name: "R".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner(),
        );
    }
    let touchpoints: Vec<cpb::Touchpoint> = (0..300)
        .map(|i| cpb::Touchpoint {
            customer: who[i % 3].name.clone(),
            event_id: format!("e{i}"),
            r#type: cpb::TouchpointType::FeatureUse as i32,
            feature: "x".into(),
            occurred_time: Some(clm_platform::convert::timestamp(t0())),
            ..Default::default()
        })
        .collect();
    c.record_touchpoints(cpb::RecordTouchpointsRequest { touchpoints })
        .await
        .unwrap();

    // Scoring's runtime and a model, without its own subscriber.
    let sb = TestBackend::migrated::<clm_scoring::store::Migrator>().await;
    let config = sb.config("scoring");
    let stop = CancellationToken::new();
    let rt = clm_platform::open(
        &clm_scoring::DESCRIPTOR,
        &config,
        Arc::new(clock.clone()),
        stop.clone(),
    )
    .await
    .unwrap();
    let models = Arc::new(clm_scoring::scorer::Models::default());
    let api = clm_scoring::api::ScoringApi::new(rt.clone(), models.clone());
    api.create_scoring_model(local(pb::CreateScoringModelRequest {
        scoring_model: Some(pb::ScoringModel {
            rules: vec![pb::ScoringRule {
                id: "use".into(),
                score: "engagement".into(),
                points: 1,
                trigger: Some(pb::scoring_rule::Trigger::Touchpoint("feature_use".into())),
                ..Default::default()
            }],
            ..Default::default()
        }),
        scoring_model_id: "leads".into(),
        request_id: String::new(),
    }))
    .await
    .unwrap();
    let mut sub_config = config.subscriber.clone();
    sub_config.batch_size = 50;
    let subscriber = |fail: Arc<dyn Fn(&str) -> bool + Send + Sync>| {
        Subscriber::new(
            rt.clone(),
            "customer",
            customer.url(),
            clm_scoring::events::customer_handlers(models.clone()),
        )
        .with_config(&sub_config)
        .with_fail_point(fail)
    };
    // The third transaction crashes after scoring, before its cursor.
    let n = Arc::new(Mutex::new(0));
    let seen = n.clone();
    let crashed = subscriber(Arc::new(move |_| {
        let mut n = seen.lock().unwrap();
        *n += 1;
        *n == 3
    }))
    .run(CancellationToken::new())
    .await;
    assert!(matches!(crashed, Err(SubscriptionError::FailPoint(_))));
    let partial = scalar(&rt.db, "SELECT COUNT(*) FROM score_ledger").await;
    assert!(partial > 0 && partial < 300, "{partial}");

    // Restarted, it resumes from its cursor: 300 awards, not one more, and
    // its cursor reaches the end of the stream (the customer service's
    // newest position: every event is out, the last touchpoint's too).
    let source = sea_orm::Database::connect(&cb.database_url).await.unwrap();
    let cursor = || async {
        clm_platform::changes::load_cursor(&rt.db, "customer")
            .await
            .unwrap()
    };
    let token = CancellationToken::new();
    let run = tokio::spawn(subscriber(Arc::new(|_| false)).run(token.clone()));
    let end = eventually(std::time::Duration::from_secs(30), || async {
        let end = scalar(
            &source,
            "SELECT COALESCE(MAX(position), 0) FROM outbox_events",
        )
        .await;
        (scalar(&rt.db, "SELECT COUNT(*) FROM score_ledger").await == 300 && cursor().await == end)
            .then_some(end)
    })
    .await;
    token.cancel();
    run.await.unwrap().unwrap();

    // The cursor lost: the whole stream again from 0 scores nothing twice.
    rt.db
        .execute_unprepared("DELETE FROM consumer_cursors")
        .await
        .unwrap();
    let token = CancellationToken::new();
    let run = tokio::spawn(subscriber(Arc::new(|_| false)).run(token.clone()));
    // Done once the cursor is back at the end: every event applied again.
    eventually(std::time::Duration::from_secs(30), || async {
        cursor().await == end
    })
    .await;
    token.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(
        scalar(&rt.db, "SELECT COUNT(*) FROM score_ledger").await,
        300
    );
    for w in &who {
        let score = api
            .get_score(local(pb::GetScoreRequest {
                customer: w.name.clone(),
                scoring_model: "scoringModels/leads".into(),
                read_time: None,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            score
                .scores
                .iter()
                .find(|s| s.score == "engagement")
                .unwrap()
                .value,
            100.0
        );
    }
    stop.cancel();
    customer.stop().await;
}
