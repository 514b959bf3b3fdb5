//! The report projection (KPI rollups and journey rows kept by a consumer
//! of the customer service's own change stream, off the write path),
//! through real gRPC: concurrent ingest into shared customers without a
//! writer waiting on another, erasure and merge racing ingest, and the
//! reports' freshness and `min_position`.
//! On SQLite, or PostgreSQL + Redis when `CLM_TEST_DATABASE_URL` /
//! `CLM_TEST_REDIS_URL` are set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::Duration;
use clm_proto::common::Money;
use clm_proto::customer::{self as pb, Stage, TouchpointType};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tonic::Code;

mod common;
use common::*;

fn buy(
    customer: &str,
    id: &str,
    amount: i64,
    when: chrono::DateTime<chrono::Utc>,
) -> pb::Touchpoint {
    pb::Touchpoint {
        revenue: Some(Money {
            currency_code: "EUR".into(),
            amount_minor: amount,
        }),
        ..tp(customer, id, TouchpointType::Purchase, when)
    }
}

async fn strings(db: &DatabaseConnection, sql: &str) -> Vec<String> {
    db.query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<String>("", "r").unwrap())
        .collect()
}

async fn number(db: &DatabaseConnection, sql: &str) -> i64 {
    db.query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap()
}

/// Every projected row as text, sorted: the touchpoint rollups, the
/// journey rows and the first conversions.
async fn projected(db: &DatabaseConnection) -> Vec<String> {
    let mut out = Vec::new();
    for sql in [
        "SELECT 'm|' || customer_id || '|' || CAST(month AS TEXT) || '|' || CAST(kinds AS TEXT) || '|' \
         || COALESCE(CAST(conv_us AS TEXT), '-') AS r FROM touch_months",
        "SELECT 'p|' || customer_id || '|' || CAST(month AS TEXT) || '|' || currency || '|' || \
         CAST(orders AS TEXT) || '|' || CAST(revenue_minor AS TEXT) || '|' || COALESCE(CAST(conv_us AS TEXT), '-') \
         AS r FROM purchase_months",
        "SELECT 'a|' || customer_id || '|' || event_id AS r FROM attribution_touches",
        "SELECT 'j|' || CAST(history_id AS TEXT) || '|' || customer_id || '|' || COALESCE(s1, '-') \
         || COALESCE(CAST(u1 AS TEXT), '-') || '|' || COALESCE(s10, '-') AS r FROM move_paths",
        "SELECT 'c|' || id || '|' || COALESCE(CAST(first_conversion_us AS TEXT), '-') AS r FROM customers",
    ] {
        out.extend(strings(db, sql).await);
    }
    out.sort();
    out
}

/// The projected rows equal a rebuild from the raw tables.
async fn assert_equal_to_rebuild(db: &DatabaseConnection, step: &str) {
    let kept = projected(db).await;
    rebuild_projection(db).await;
    assert_eq!(kept, projected(db).await, "projection after {step}");
}

/// Statements of the ingest path (the customers' lock, the insert, the outbox).
fn ingest_statement(q: &str) -> bool {
    let q = q.to_lowercase();
    q.contains("customers") || q.contains("into touchpoints") || q.contains("outbox")
}

#[tokio::test]
async fn four_clients_ingest_into_shared_customers_without_waiting_and_exact_totals() {
    let h = start().await;
    let url = h._backend.database_url.clone();
    let db = Database::connect(&url).await.unwrap();
    let mut c = h.client();
    let mut customers = Vec::new();
    for i in 0..8 {
        customers.push(create(&mut c, &format!("shared{i}@example.com")).await.name);
    }
    let customers = Arc::new(customers);
    let waits = clm_platform::testing::LockWaits::sample(&url);
    // 4 clients x 6 batches; every batch holds a purchase and a feature use
    // of every shared customer, so all writers share all customers.
    let when = t0() - Duration::hours(2);
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut c = h.client();
        let customers = customers.clone();
        writers.push(tokio::spawn(async move {
            for b in 0..6 {
                let mut batch = Vec::new();
                for (i, k) in customers.iter().enumerate() {
                    let id = format!("w{w}-b{b}-c{i}");
                    batch.push(buy(k, &format!("{id}-p"), 100 + i as i64, when));
                    batch.push(pb::Touchpoint {
                        feature: "export".into(),
                        ..tp(k, &format!("{id}-f"), TouchpointType::FeatureUse, when)
                    });
                }
                let r = c
                    .record_touchpoints(pb::RecordTouchpointsRequest { touchpoints: batch })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(r.recorded_count, 16);
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let waited: Vec<String> = waits
        .stop()
        .await
        .into_iter()
        .filter(|q| ingest_statement(q))
        .collect();
    assert!(
        waited.is_empty(),
        "ingest statements waited for a lock: {waited:?}"
    );

    settle(&mut c).await;
    assert_eq!(
        number(&db, "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM touchpoints").await,
        4 * 6 * 16
    );
    // Exact totals: each customer has 24 purchases of 100 + i.
    let totals = strings(
        &db,
        "SELECT customer_id || '|' || CAST(orders AS TEXT) || '|' || CAST(revenue_minor AS TEXT) AS r \
         FROM purchase_months ORDER BY customer_id",
    )
    .await;
    let mut expected: Vec<String> = customers
        .iter()
        .enumerate()
        .map(|(i, k)| {
            format!(
                "{}|24|{}",
                k.trim_start_matches("customers/"),
                24 * (100 + i as i64)
            )
        })
        .collect();
    expected.sort();
    assert_eq!(totals, expected);
    assert_equal_to_rebuild(&db, "concurrent ingest").await;

    // The projection applies each event once: a restart resumes from its
    // stored position and changes nothing.
    let before = projected(&db).await;
    let head = settle(&mut c).await;
    assert_eq!(
        number(
            &db,
            "SELECT sequence AS n FROM consumer_cursors WHERE source = 'customer'"
        )
        .await,
        head
    );
    assert_eq!(before, projected(&db).await);
    h.server.stop().await;
}

#[tokio::test]
async fn erasure_and_merge_racing_ingest_leave_nothing_behind() {
    let h = start().await;
    let db = Database::connect(&h._backend.database_url).await.unwrap();
    let mut c = h.client();
    let mut k = Vec::new();
    for i in 0..9 {
        k.push(create(&mut c, &format!("race{i}@example.com")).await.name);
    }
    // k0..k2 are erased, k3..k5 merged into k6..k8, while 4 clients ingest
    // into all of them (one customer per batch: a batch naming a customer
    // gone is refused whole).
    let k = Arc::new(k);
    let stop = Arc::new(AtomicBool::new(false));
    let when = t0() - Duration::hours(3);
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut c = h.client();
        let (k, stop) = (k.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                for (i, name) in k.iter().enumerate() {
                    n += 1;
                    let id = format!("w{w}-{n}-c{i}");
                    let batch = vec![
                        buy(name, &format!("{id}-p"), 50, when),
                        tp(
                            name,
                            &format!("{id}-s"),
                            TouchpointType::SupportContact,
                            when,
                        ),
                    ];
                    match c
                        .record_touchpoints(pb::RecordTouchpointsRequest { touchpoints: batch })
                        .await
                    {
                        Ok(_) => {}
                        Err(e) if matches!(e.code(), Code::NotFound | Code::FailedPrecondition) => {
                        }
                        Err(e) => panic!("ingest failed: {e:?}"),
                    }
                }
            }
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for i in 0..3 {
        move_to(&mut c, &k[i + 3], Stage::Acquisition).await;
        let mut e = h.client();
        let (erased, dup, survivor) = (k[i].clone(), k[i + 3].clone(), k[i + 6].clone());
        let mut m = h.client();
        // Racing the ingest, either may be ABORTED ("retry"): a client
        // retries, as the contract says.
        let (erase_done, merge_done) = tokio::join!(
            async move {
                loop {
                    match e.erase_customer(erase_req(erased.clone())).await {
                        Err(s) if s.code() == Code::Aborted => continue,
                        other => break other,
                    }
                }
            },
            async move {
                loop {
                    let r = m
                        .merge_customers(pb::MergeCustomersRequest {
                            survivor: survivor.clone(),
                            duplicates: vec![dup.clone()],
                            policy: None,
                            request_id: String::new(),
                        })
                        .await;
                    match r {
                        Err(s) if s.code() == Code::Aborted => continue,
                        other => break other,
                    }
                }
            }
        );
        erase_done.unwrap();
        merge_done.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    settle(&mut c).await;

    let gone: Vec<String> = k[..6]
        .iter()
        .map(|n| format!("'{}'", n.trim_start_matches("customers/")))
        .collect();
    let gone = gone.join(", ");
    for (table, col) in [
        ("touchpoints", "customer_id"),
        ("stage_history", "customer_id"),
        ("touch_months", "customer_id"),
        ("purchase_months", "customer_id"),
        ("attribution_touches", "customer_id"),
        ("move_paths", "customer_id"),
        ("projection_marks", "customer_id"),
        ("customers", "id"),
    ] {
        let left = number(
            &db,
            &format!("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM {table} WHERE {col} IN ({gone})"),
        )
        .await;
        assert_eq!(
            left, 0,
            "{table} still holds rows of erased or merged customers"
        );
    }
    // The survivors hold their own and their duplicates' touchpoints, and
    // their rollups count each once (folded once, nothing doubled).
    for s in &k[6..] {
        let id = s.trim_start_matches("customers/");
        let stored = number(
            &db,
            &format!(
                "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM touchpoints WHERE customer_id = '{id}' AND kind = 4"
            ),
        )
        .await;
        let counted = number(
            &db,
            &format!(
                "SELECT CAST(COALESCE(SUM(orders), 0) AS BIGINT) AS n FROM purchase_months WHERE customer_id = '{id}'"
            ),
        )
        .await;
        assert!(stored > 0);
        assert_eq!(stored, counted, "{s}: purchases stored vs counted");
    }
    assert_equal_to_rebuild(&db, "erasure and merge racing ingest").await;
    h.server.stop().await;
}

#[tokio::test]
async fn reports_state_their_freshness_and_wait_for_min_position() {
    let h = start().await;
    let mut c = h.client();
    let k = create(&mut c, "fresh@example.com").await.name;
    let f = freshness(&mut c, 0).await;
    assert!(f.head_position > 0, "the creation is on the stream: {f:?}");
    assert!(f.fresh_position <= f.head_position);

    // Read-your-writes: a move, then the funnel asked to wait for the head
    // answered after it counts it.
    h.clock.set(t0() + Duration::hours(1));
    move_to(&mut c, &k, Stage::Acquisition).await;
    let head = freshness(&mut c, 0).await.head_position;
    assert!(head > f.head_position);
    let scope = pb::ReportScope {
        start_time: Some(ts(t0())),
        end_time: Some(ts(t0() + Duration::days(1))),
        ..Default::default()
    };
    let r = c
        .get_funnel_report(pb::GetFunnelReportRequest {
            scope: Some(scope.clone()),
            min_position: head,
        })
        .await
        .unwrap()
        .into_inner();
    let fresh = r.freshness.unwrap();
    assert!(
        fresh.fresh_position >= head && fresh.head_position >= head,
        "{fresh:?}"
    );
    let acquisition = r
        .stages
        .iter()
        .find(|s| s.stage == Stage::Acquisition as i32)
        .unwrap();
    assert_eq!(acquisition.entered_count, 1);
    // Every report states it.
    let clv = c
        .get_clv_report(pb::GetClvReportRequest {
            scope: Some(scope.clone()),
            min_position: head,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(clv.freshness.unwrap().fresh_position >= head);
    let journey = c
        .get_journey_report(pb::GetJourneyReportRequest {
            scope: Some(scope.clone()),
            to_stage: Stage::Acquisition as i32,
            min_position: head,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(journey.entered_customers, 1);
    assert!(journey.freshness.unwrap().fresh_position >= head);

    // A position the stream never reaches: a clear error within the
    // call's deadline, naming both positions.
    let mut req = tonic::Request::new(pb::GetFunnelReportRequest {
        scope: Some(scope.clone()),
        min_position: head + 1_000,
    });
    req.set_timeout(std::time::Duration::from_secs(2));
    let started = std::time::Instant::now();
    let e = c.get_funnel_report(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("min_position"), "{}", e.message());
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let e = c
        .get_funnel_report(pb::GetFunnelReportRequest {
            scope: Some(scope),
            min_position: -1,
        })
        .await
        .unwrap_err();
    clm_platform::testing::assert_bad_field(&e, "min_position");
    h.server.stop().await;
}
