//! A backfill takes its diff without the membership lock: while it does,
//! the subscribers go on deciding memberships (here one enters another
//! segment), and when the backfill applies its diff under the lock it
//! leaves alone every customer an evaluation decided since the diff
//! started. Before, the backfill held the lock for its whole transaction
//! (the subscriber here waited for it); without the record of whom the
//! evaluations decided, the stale diff would put back a customer who no
//! longer matches. One test per binary: the pause point is process-wide.
//! Runs on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use clm_segmentation::engine::backfill_pause;
use common::*;
use std::time::Duration;

#[tokio::test]
async fn writers_go_on_while_a_backfill_diffs_and_their_decisions_stand() {
    let h = start().await;
    let mut cust = h.customers();
    let mut seg = h.segments();
    let moving = create_customer(&mut cust, "moving@example.com", |c| {
        c.attributes = plan("pro")
    })
    .await;
    let staying = create_customer(&mut cust, "staying@example.com", |c| {
        c.attributes = plan("pro")
    })
    .await;
    let free = create_segment(&mut seg, r#"attributes.plan = "free""#).await;
    wait_ready(&mut seg, &free.name).await;
    let everyone = create_segment(
        &mut seg,
        r#"email starts_with "m" or email starts_with "s""#,
    )
    .await;
    wait_count(&mut seg, &everyone.name, 2).await;

    let gate = backfill_pause::install(backfill_pause::At::Diffed);
    let pro = create_segment(&mut seg, r#"attributes.plan = "pro""#).await;
    // The diff (both customers enter) is taken; the backfill waits.
    tokio::time::timeout(Duration::from_secs(30), gate.reached.notified())
        .await
        .expect("the backfill reaches its pause point");
    set_plan(&mut cust, &moving, "free").await;
    // The subscriber applies the change while the backfill is between its
    // diff and its lock: nothing waits for the backfill.
    wait_member(&mut seg, &free.name, &moving, true).await;
    backfill_pause::remove();
    gate.release.notify_one();

    let pro = wait_ready(&mut seg, &pro.name).await;
    assert_eq!(
        pro.state,
        clm_proto::segmentation::SegmentState::Ready as i32
    );
    // The diff said both enter; the newer decision for `moving` stands.
    wait_member(&mut seg, &pro.name, &staying, true).await;
    assert!(!is_member(&mut seg, &pro.name, &moving).await);
    let pro = wait_count(&mut seg, &pro.name, 1).await;
    assert_eq!(pro.member_count, 1);
    // A later edit's backfill diffs from scratch and agrees.
    let mut edited = pro.clone();
    edited.rule_text = r#"attributes.plan = "pro" or attributes.plan = "free""#.into();
    edited.rule = None;
    seg.update_segment(clm_proto::segmentation::UpdateSegmentRequest {
        segment: Some(edited),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["rule_text".into()],
        }),
        request_id: String::new(),
    })
    .await
    .unwrap();
    wait_count(&mut seg, &pro.name, 2).await;
    assert!(is_member(&mut seg, &pro.name, &moving).await);
}
