//! An erasure that arrives while a backfill holds the membership lock, its
//! changes written but not committed, never leaves the erased customer in
//! the segment: the erasure ends the customer's memberships under the same
//! lock, so it waits for the backfill and then sees (and ends) the entry
//! the backfill made. Before, it read the customer's memberships before
//! taking the lock, found none, skipped the lock and committed; the
//! backfill's entry then outlived the customer. One test per binary: the
//! pause point is process-wide. Runs on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use clm_proto::customer as cpb;
use clm_segmentation::engine::backfill_pause;
use common::*;
use sea_orm::{ConnectionTrait, Database, Statement};
use std::time::Duration;

#[tokio::test]
async fn an_erasure_during_a_backfill_never_leaves_the_customer_a_member() {
    let h = start().await;
    let mut cust = h.customers();
    let gone = create_customer(&mut cust, "gone@example.com", |c| {
        c.demographics = Some(cpb::Demographics {
            birth_date: Some(clm_proto::common::Date {
                year: 1960,
                month: 1,
                day: 1,
            }),
            ..Default::default()
        })
    })
    .await;
    let mut seg = h.segments();
    // The customer is in the projection before the backfill starts.
    let all = create_segment(&mut seg, "age >= 0").await;
    wait_count(&mut seg, &all.name, 1).await;

    let gate = backfill_pause::install(backfill_pause::At::Written);
    let s = create_segment(&mut seg, "age >= 30").await;
    // The backfill has entered the customer and waits before its commit.
    tokio::time::timeout(Duration::from_secs(30), gate.reached.notified())
        .await
        .expect("the backfill reaches its pause point");
    cust.erase_customer(cpb::EraseCustomerRequest {
        name: gone.clone(),
        request_id: "erase-gone".into(),
    })
    .await
    .unwrap();
    let url = h.seg_backend.database_url.clone();
    if url.starts_with("postgres") {
        // Segmentation's erasure either committed meanwhile (the customer's
        // facts are gone) or waits for the backfill's lock: wait for one.
        let db = Database::connect(&url).await.unwrap();
        let id = gone.trim_start_matches("customers/").to_owned();
        clm_platform::testing::eventually(Duration::from_secs(30), || {
            let (db, id) = (db.clone(), id.clone());
            async move {
                let sql = format!(
                    "SELECT (SELECT COUNT(*) FROM fact_customers WHERE customer_id = '{id}') \
                     + (SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND wait_event_type = 'Lock') AS n"
                );
                let n: i64 = db
                    .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
                    .await
                    .unwrap()
                    .unwrap()
                    .try_get("", "n")
                    .unwrap();
                // 1: the fact row, nobody waiting; 0: erased; 2: it waits.
                n != 1
            }
        })
        .await;
    }
    backfill_pause::remove();
    gate.release.notify_one();
    // Both committed: the erased customer is in no segment.
    wait_count(&mut seg, &all.name, 0).await;
    wait_count(&mut seg, &s.name, 0).await;
    wait_member(&mut seg, &s.name, &gone, false).await;
}
