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
