//! A backfill takes its diff (the rule's query) outside the membership
//! lock: a subscriber batch commits while the backfill is held between its
//! diff and its lock, a timer fires and commits too, and afterwards
//! membership and cache are exact (the backfill evaluates again, under the
//! lock, the customers the batch changed). Before, the backfill took the
//! lock first and held it for its whole transaction: the batch waited. One test per binary: the pause
//! point is process-wide. Runs on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use clm_proto::customer as cpb;
use clm_proto::segmentation as pb;
use clm_segmentation::engine::backfill_pause;
use common::*;
use std::time::Duration;

fn born(year: i32) -> cpb::Demographics {
    cpb::Demographics {
        birth_date: Some(clm_proto::common::Date {
            year,
            month: 1,
            day: 1,
        }),
        ..Default::default()
    }
}

async fn set_birth_year(cust: &mut Customers, name: &str, year: i32) {
    let mut changed = cust
        .get_customer(cpb::GetCustomerRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner();
    changed.demographics = Some(born(year));
    cust.update_customer(cpb::UpdateCustomerRequest {
        customer: Some(changed),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["demographics".into()],
        }),
        request_id: String::new(),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_subscriber_batch_and_a_timer_commit_while_a_backfill_is_between_its_diff_and_its_lock() {
    let h = start().await;
    let mut cust = h.customers();
    let old = create_customer(&mut cust, "old@example.com", |c| {
        c.demographics = Some(born(1950))
    })
    .await;
    let young = create_customer(&mut cust, "young@example.com", |c| {
        c.demographics = Some(born(2000))
    })
    .await;
    let mut seg = h.segments();
    // Both customers are in the projection.
    let all = create_segment(&mut seg, "age >= 0").await;
    wait_count(&mut seg, &all.name, 2).await;
    // Warm cache: each customer's set loaded whole.
    assert!(is_member(&mut seg, &all.name, &old).await);
    assert!(is_member(&mut seg, &all.name, &young).await);

    // A customer whose last feature use leaves a 2-hour window at t0 + 1h.
    let ada = create_customer(&mut cust, "ada@example.com", |_| {}).await;
    feature_use(&mut cust, &ada, "export", t0() - chrono::Duration::hours(1)).await;
    let windowed = create_segment(&mut seg, "count(feature_use, 2h) > 0").await;
    wait_count(&mut seg, &windowed.name, 1).await;

    let gate = backfill_pause::install(backfill_pause::At::Diffed);
    let s = create_segment(&mut seg, "age >= 30 or count(feature_use, 2h) > 0").await;
    // The backfill has its diff at t0 (the old customer and ada enter) and
    // waits.
    tokio::time::timeout(Duration::from_secs(30), gate.reached.notified())
        .await
        .expect("the backfill reaches its pause point");
    // Meanwhile the two customers swap ages: the subscriber evaluates the
    // new segment for them and commits (the young one enters) while the
    // backfill is held.
    set_birth_year(&mut cust, &old, 2001).await;
    set_birth_year(&mut cust, &young, 1951).await;
    wait_member(&mut seg, &s.name, &young, true).await;
    // A timer fires and commits too: ada's window empties at t0 + 1h.
    h.clock.set(t0() + chrono::Duration::hours(1));
    wait_member(&mut seg, &windowed.name, &ada, false).await;
    let during = seg
        .get_segment(pb::GetSegmentRequest {
            name: s.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(during.state, pb::SegmentState::Backfilling as i32);
    backfill_pause::remove();
    gate.release.notify_one();
    // The backfill's stale diff would let the old customer and ada in: the
    // customers evaluated since are evaluated again under the lock, at its
    // instant (t0 + 1h, not the diff's t0: ada's window is empty by then),
    // and stay out.
    wait_count(&mut seg, &s.name, 1).await;
    assert!(!is_member(&mut seg, &s.name, &old).await);
    assert!(is_member(&mut seg, &s.name, &young).await);
    let mine = seg
        .get_customer_segments(pb::GetCustomerSegmentsRequest {
            customer: old.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.segments, vec![all.name.clone()]);
    assert!(!is_member(&mut seg, &s.name, &ada).await);
    // One change in the segment's history: the young customer's entry
    // (neither the old customer nor ada ever entered).
    let history = seg
        .list_membership_history(pb::ListMembershipHistoryRequest {
            segment: s.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let changes: Vec<(&str, i32)> = history
        .entries
        .iter()
        .map(|e| (e.customer.as_str(), e.change))
        .collect();
    assert_eq!(
        changes,
        vec![(young.as_str(), pb::MembershipChange::Entered as i32)]
    );
}
