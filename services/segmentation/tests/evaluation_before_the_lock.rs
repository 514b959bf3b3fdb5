//! A stream batch reads its customers' facts and evaluates the rules
//! before it takes the membership lock (PostgreSQL: the subscriber's
//! partitions and the other streams' batches overlap that work and queue
//! only for the membership writes). Held between its decision and the
//! lock, it holds no lock another writer needs: a segment is created and
//! backfilled meanwhile. That segment's backfill cannot see the batch's
//! uncommitted facts, so the batch's decision, made without the segment,
//! must not stand: under the lock it sees the registry changed and
//! evaluates again, and the customer enters both segments. (SQLite has one
//! writer: the batch evaluates under the lock, and the outcome is the
//! same.) One test per binary: the pause point is process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use clm_segmentation::engine::backfill_pause;
use common::*;
use std::time::Duration;

#[tokio::test]
async fn a_decision_made_before_a_new_segment_is_taken_again_under_the_lock() {
    let h = start().await;
    let postgres = h.seg_backend.is_postgres();
    let mut cust = h.customers();
    let mut seg = h.segments();
    let pro = create_segment(&mut seg, r#"attributes.plan = "pro""#).await;
    wait_ready(&mut seg, &pro.name).await;
    let c = create_customer(&mut cust, "late@example.com", |c| {
        c.attributes = plan("free")
    })
    .await;
    let anyone = create_segment(&mut seg, r#"email contains "@example.com""#).await;
    wait_member(&mut seg, &anyone.name, &c, true).await;

    let gate = postgres.then(|| backfill_pause::install(backfill_pause::At::Decided));
    set_plan(&mut cust, &c, "pro").await;
    if let Some(gate) = &gate {
        // The batch wrote the new plan and decided (the customer enters
        // "pro"), uncommitted, and waits before the membership lock.
        tokio::time::timeout(Duration::from_secs(30), gate.reached.notified())
            .await
            .expect("the batch reaches its decision");
    }
    // Meanwhile a segment reading the plan is created and backfilled: the
    // membership lock is free (a batch holding it would block this), and
    // the backfill does not see the uncommitted plan.
    let also = create_segment(
        &mut seg,
        r#"attributes.plan = "pro" or attributes.plan = "max""#,
    )
    .await;
    let also = tokio::time::timeout(Duration::from_secs(30), wait_ready(&mut seg, &also.name))
        .await
        .expect("the backfill runs while the batch is held before the lock");
    if postgres {
        assert_eq!(
            also.member_count, 0,
            "the backfill saw no committed pro plan"
        );
        assert!(
            !is_member(&mut seg, &pro.name, &c).await,
            "nothing committed yet"
        );
    }
    backfill_pause::remove();
    if let Some(gate) = &gate {
        gate.release.notify_one();
    }
    // Taken again under the lock with the new registry: both segments.
    wait_member(&mut seg, &pro.name, &c, true).await;
    wait_member(&mut seg, &also.name, &c, true).await;
    wait_count(&mut seg, &also.name, 1).await;
}
