//! Score conditions fed by the scoring service's stream: customer, scoring
//! and segmentation run together (each on its own fresh backend: SQLite +
//! in-process cache, or PostgreSQL + Redis when `CLM_TEST_DATABASE_URL` /
//! `CLM_TEST_REDIS_URL` are set), and a touchpoint the scoring model awards
//! points for moves the customer into a `score.engagement` segment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use clm_domain::ManualClock;
use clm_platform::testing::{TestBackend, start_with_clock};
use clm_proto::scoring::scoring_service_client::ScoringServiceClient;
use clm_proto::scoring::{self as spb};
use common::*;
use std::sync::Arc;

#[tokio::test]
async fn a_score_award_moves_the_customer_into_a_score_segment() {
    let cb = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let sb = TestBackend::migrated::<clm_scoring::store::Migrator>().await;
    let gb = TestBackend::migrated::<clm_segmentation::store::Migrator>().await;
    let clock = ManualClock::new(t0());
    let customer = start_with_clock(
        &clm_customer::DESCRIPTOR,
        cb.config("customer"),
        Arc::new(clock.clone()),
    )
    .await;
    let mut sc = sb.config("scoring");
    sc.peers.insert("customer".into(), customer.url());
    let scoring = start_with_clock(&clm_scoring::DESCRIPTOR, sc, Arc::new(clock.clone())).await;
    let mut gc = seg_config(&gb, &customer.url());
    gc.peers.insert("scoring".into(), scoring.url());
    let segmentation =
        start_with_clock(&clm_segmentation::DESCRIPTOR, gc, Arc::new(clock.clone())).await;

    let mut s = ScoringServiceClient::connect(scoring.url()).await.unwrap();
    s.create_scoring_model(spb::CreateScoringModelRequest {
        scoring_model: Some(spb::ScoringModel {
            display_name: "Leads".into(),
            rules: vec![spb::ScoringRule {
                id: "exports".into(),
                score: "engagement".into(),
                points: 10,
                trigger: Some(spb::scoring_rule::Trigger::Touchpoint(
                    r#"feature_use where feature = "export""#.into(),
                )),
                ..Default::default()
            }],
            ..Default::default()
        }),
        scoring_model_id: "leads".into(),
        request_id: String::new(),
    })
    .await
    .unwrap();
    let mut seg =
        clm_proto::segmentation::segmentation_service_client::SegmentationServiceClient::connect(
            segmentation.url(),
        )
        .await
        .unwrap();
    let engaged = create_segment(&mut seg, "score.engagement >= 15").await;
    wait_ready(&mut seg, &engaged.name).await;

    let mut c = clm_proto::customer::customer_service_client::CustomerServiceClient::connect(
        customer.url(),
    )
    .await
    .unwrap();
    let ada = create_customer(&mut c, "ada@example.com", |_| {}).await;
    feature_use(&mut c, &ada, "export", t0()).await;
    // 10 points: not yet.
    feature_use(&mut c, &ada, "import", t0()).await;
    wait_count(&mut seg, &engaged.name, 0).await;
    assert!(!is_member(&mut seg, &engaged.name, &ada).await);
    // 20 points: in.
    feature_use(&mut c, &ada, "export", t0()).await;
    wait_member(&mut seg, &engaged.name, &ada, true).await;

    segmentation.stop().await;
    scoring.stop().await;
    customer.stop().await;
}

/// Rows of `table` for bare customer `id` in segmentation's database.
async fn rows_of(db: &sea_orm::DatabaseConnection, table: &str, id: &str) -> i64 {
    use sea_orm::ConnectionTrait;
    db.query_one_raw(sea_orm::Statement::from_string(
        db.get_database_backend(),
        format!("SELECT COUNT(*) FROM {table} WHERE customer_id = '{id}'"),
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get_by_index::<i64>(0)
    .unwrap()
}

/// Whether `gone_customers` records customer `id`.
async fn gone(db: &sea_orm::DatabaseConnection, id: &str) -> bool {
    use sea_orm::ConnectionTrait;
    let hash = clm_segmentation::store::facts::gone_hash(id);
    db.query_one_raw(sea_orm::Statement::from_string(
        db.get_database_backend(),
        format!("SELECT COUNT(*) FROM gone_customers WHERE customer_hash = '{hash}'"),
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get_by_index::<i64>(0)
    .unwrap()
        == 1
}

/// The scoring stream runs ahead of the customer stream: segmentation
/// cannot reach the customer service, so a score arrives for a customer it
/// has never seen. The score is kept and applied when the customer
/// arrives; a customer erased meanwhile keeps nothing.
#[tokio::test]
async fn a_score_that_arrives_before_its_customer_is_applied_when_the_customer_arrives() {
    let cb = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let sb = TestBackend::migrated::<clm_scoring::store::Migrator>().await;
    let gb = TestBackend::migrated::<clm_segmentation::store::Migrator>().await;
    let clock = ManualClock::new(t0());
    let customer = start_with_clock(
        &clm_customer::DESCRIPTOR,
        cb.config("customer"),
        Arc::new(clock.clone()),
    )
    .await;
    let mut sc = sb.config("scoring");
    sc.peers.insert("customer".into(), customer.url());
    let scoring = start_with_clock(&clm_scoring::DESCRIPTOR, sc, Arc::new(clock.clone())).await;
    // No customer service where segmentation looks for it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut gc = seg_config(&gb, &format!("http://{}", dead.local_addr().unwrap()));
    drop(dead);
    gc.peers.insert("scoring".into(), scoring.url());
    let segmentation = start_with_clock(
        &clm_segmentation::DESCRIPTOR,
        gc.clone(),
        Arc::new(clock.clone()),
    )
    .await;
    let mut s = ScoringServiceClient::connect(scoring.url()).await.unwrap();
    s.create_scoring_model(spb::CreateScoringModelRequest {
        scoring_model: Some(spb::ScoringModel {
            display_name: "Leads".into(),
            rules: vec![spb::ScoringRule {
                id: "exports".into(),
                score: "engagement".into(),
                points: 10,
                trigger: Some(spb::scoring_rule::Trigger::Touchpoint(
                    r#"feature_use where feature = "export""#.into(),
                )),
                ..Default::default()
            }],
            ..Default::default()
        }),
        scoring_model_id: "leads".into(),
        request_id: String::new(),
    })
    .await
    .unwrap();
    let mut seg =
        clm_proto::segmentation::segmentation_service_client::SegmentationServiceClient::connect(
            segmentation.url(),
        )
        .await
        .unwrap();
    let engaged = create_segment(&mut seg, r#"score("leads").engagement >= 15"#).await;
    wait_ready(&mut seg, &engaged.name).await;
    let mut c = clm_proto::customer::customer_service_client::CustomerServiceClient::connect(
        customer.url(),
    )
    .await
    .unwrap();
    let ada = create_customer(&mut c, "ada.early@example.com", |_| {}).await;
    let bob = create_customer(&mut c, "bob.early@example.com", |_| {}).await;
    for who in [&ada, &bob] {
        feature_use(&mut c, who, "export", t0()).await;
        feature_use(&mut c, who, "export", t0()).await;
    }
    let db = sea_orm::Database::connect(&gb.database_url).await.unwrap();
    let bare = |n: &str| n.trim_start_matches("customers/").to_owned();
    // Both scores are kept, pending, though neither customer is known.
    clm_platform::testing::eventually(std::time::Duration::from_secs(30), || async {
        (rows_of(&db, "fact_score_curves", &bare(&ada)).await == 1
            && rows_of(&db, "fact_score_curves", &bare(&bob)).await == 1)
            .then_some(())
    })
    .await;
    assert_eq!(rows_of(&db, "fact_customers", &bare(&ada)).await, 0);
    assert!(!is_member(&mut seg, &engaged.name, &ada).await);
    // Bob is erased before segmentation ever hears of him.
    c.erase_customer(clm_proto::customer::EraseCustomerRequest {
        name: bob.clone(),
        request_id: String::new(),
    })
    .await
    .unwrap();

    // The customer stream is reachable again: Ada arrives with her score.
    segmentation.stop().await;
    gc.peers.insert("customer".into(), customer.url());
    let segmentation =
        start_with_clock(&clm_segmentation::DESCRIPTOR, gc, Arc::new(clock.clone())).await;
    let mut seg =
        clm_proto::segmentation::segmentation_service_client::SegmentationServiceClient::connect(
            segmentation.url(),
        )
        .await
        .unwrap();
    wait_member(&mut seg, &engaged.name, &ada, true).await;
    // Bob's erasure took his pending score with him, for good.
    clm_platform::testing::eventually(std::time::Duration::from_secs(30), || async {
        (gone(&db, &bare(&bob)).await).then_some(())
    })
    .await;
    assert_eq!(rows_of(&db, "fact_score_curves", &bare(&bob)).await, 0);
    assert_eq!(rows_of(&db, "fact_score_terms", &bare(&bob)).await, 0);
    assert!(!is_member(&mut seg, &engaged.name, &bob).await);
    // A score for him still in flight is dropped, not kept pending.
    let late = clm_segmentation::convert::score_row(&spb::ScoreChanged {
        customer: bob.clone(),
        scoring_model: "scoringModels/leads".into(),
        score: "engagement".into(),
        new_value: 20.0,
        change_time: Some(clm_platform::convert::timestamp(t0())),
        ..Default::default()
    })
    .unwrap();
    clm_segmentation::store::facts::set_scores(&db, &[late])
        .await
        .unwrap();
    assert_eq!(rows_of(&db, "fact_score_curves", &bare(&bob)).await, 0);

    segmentation.stop().await;
    scoring.stop().await;
    customer.stop().await;
}
