//! Stream batches applied side by side (on PostgreSQL the subscriber splits
//! each batch by customer into partitions, and each evaluates before it
//! takes the membership lock), while profiles change on the same stream
//! and a segment is created, and backfilled, in the middle of it: once the
//! stream is applied, every segment's members are exactly the customers its
//! rule selects now (`PreviewSegment`, the rule's SQL over the facts).
//! A decision lost between partitions, or one kept although a backfill or
//! an edit moved what it read, leaves a member too many or too few. Runs on
//! SQLite (one writer) and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::Duration;
use clm_proto::customer as cpb;
use clm_proto::segmentation as pb;
use common::*;
use std::collections::BTreeSet;

const CUSTOMERS: usize = 40;
const BATCHES: usize = 30;
const PER_BATCH: usize = 60;

async fn members(seg: &mut Segments, name: &str) -> BTreeSet<String> {
    seg.list_segment_members(pb::ListSegmentMembersRequest {
        parent: name.to_owned(),
        page_size: 1000,
        page_token: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .members
    .into_iter()
    .map(|m| m.customer)
    .collect()
}

async fn selected(seg: &mut Segments, rule: &str) -> BTreeSet<String> {
    let got = seg
        .preview_segment(pb::PreviewSegmentRequest {
            rule_text: rule.to_owned(),
            sample_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.count as usize, got.sample.len(), "the sample holds all");
    got.sample.into_iter().collect()
}

#[tokio::test]
async fn members_equal_what_each_rule_selects_after_a_stream_applied_side_by_side() {
    let h = start().await;
    let mut cust = h.customers();
    let mut seg = h.segments();
    let mut rules = vec![
        r#"count(feature_use where feature = "a", 30d) >= 2"#.to_owned(),
        r#"attributes.plan = "pro""#.to_owned(),
        r#"count(feature_use, 30d) >= 5 and attributes.plan = "pro""#.to_owned(),
    ];
    let mut segments = Vec::new();
    for rule in &rules {
        let s = create_segment(&mut seg, rule).await;
        wait_ready(&mut seg, &s.name).await;
        segments.push(s.name);
    }
    let sentinel = create_segment(
        &mut seg,
        r#"count(feature_use where feature = "sentinel", 30d) >= 1"#,
    )
    .await;
    wait_ready(&mut seg, &sentinel.name).await;
    let mut people = Vec::new();
    for i in 0..CUSTOMERS {
        let pro = i.is_multiple_of(3);
        people.push(
            create_customer(&mut cust, &format!("p{i}@example.com"), |c| {
                c.attributes = plan(if pro { "pro" } else { "free" });
            })
            .await,
        );
    }

    let t = t0();
    let writer = {
        let mut cust = h.customers();
        let people = people.clone();
        tokio::spawn(async move {
            for b in 0..BATCHES {
                let touchpoints = (0..PER_BATCH)
                    .map(|j| {
                        let k = b * PER_BATCH + j;
                        let c = (k * 7) % CUSTOMERS;
                        // Every fifth customer's touchpoints are older than
                        // the windows; features by customer.
                        let ago = if c.is_multiple_of(5) {
                            Duration::days(40)
                        } else {
                            Duration::minutes((k % 600) as i64)
                        };
                        cpb::Touchpoint {
                            customer: people[c].clone(),
                            event_id: uuid::Uuid::new_v4().to_string(),
                            r#type: cpb::TouchpointType::FeatureUse as i32,
                            occurred_time: Some(ts(t - ago)),
                            feature: ["a", "b", "c", "c"][c % 4].into(),
                            ..Default::default()
                        }
                    })
                    .collect();
                cust.record_touchpoints(cpb::RecordTouchpointsRequest { touchpoints })
                    .await
                    .unwrap();
            }
        })
    };
    let updater = {
        let mut cust = h.customers();
        let people = people.clone();
        tokio::spawn(async move {
            for (n, name) in people.iter().enumerate().step_by(3) {
                set_plan(
                    &mut cust,
                    name,
                    if n.is_multiple_of(2) { "free" } else { "pro" },
                )
                .await;
            }
        })
    };
    // A segment created while the stream is being applied: its backfill
    // diffs and applies beside the batches.
    let late_rule =
        r#"count(feature_use where feature = "b", 30d) >= 3 or attributes.plan = "free""#;
    let late = create_segment(&mut seg, late_rule).await;
    rules.push(late_rule.to_owned());
    segments.push(late.name.clone());
    writer.await.unwrap();
    updater.await.unwrap();

    // The partitions of one batch commit one by one: the sentinel's
    // customer can be a member while another partition of its batch is
    // still being written. A second sentinel, sent once the first is seen,
    // is in a later batch, which starts only after every partition of the
    // first one committed: once it is seen, everything before the first
    // is applied.
    feature_use(&mut cust, &people[0], "sentinel", t).await;
    wait_member(&mut seg, &sentinel.name, &people[0], true).await;
    feature_use(&mut cust, &people[1], "sentinel", t).await;
    wait_member(&mut seg, &sentinel.name, &people[1], true).await;
    wait_ready(&mut seg, &late.name).await;

    for (rule, name) in rules.iter().zip(&segments) {
        let want = selected(&mut seg, rule).await;
        assert!(!want.is_empty(), "{rule}: the data selects someone");
        assert!(want.len() < CUSTOMERS, "{rule}: and not everyone");
        assert_eq!(members(&mut seg, name).await, want, "{rule}");
    }
}
