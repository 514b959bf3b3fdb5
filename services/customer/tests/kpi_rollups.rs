//! The rollups the KPI reports read (`touch_months`, `purchase_months`,
//! `attribution_touches`, `move_paths`, `customers.first_conversion_month`,
//! kept by the report projection from the stream of ingest, stage moves,
//! merge and erasure) always equal a rebuild, once the projection reached
//! the stream head,
//! from the raw tables, and so do
//! the reports that read them: after out-of-order touchpoints, a replayed
//! batch, touches before and after a conversion, a merge and an erasure.
//! On SQLite, or PostgreSQL + Redis when `CLM_TEST_DATABASE_URL` /
//! `CLM_TEST_REDIS_URL` are set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Duration, Utc};
use clm_proto::common::Money;
use clm_proto::customer::{self as pb, AttributionModel, CampaignChannel, Stage, TouchpointType};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};

mod common;
use common::*;

fn feat(customer: &str, id: &str, when: DateTime<Utc>) -> pb::Touchpoint {
    pb::Touchpoint {
        feature: "reports".into(),
        ..tp(customer, id, TouchpointType::FeatureUse, when)
    }
}

fn buy(
    customer: &str,
    id: &str,
    currency: &str,
    amount: i64,
    when: DateTime<Utc>,
) -> pb::Touchpoint {
    pb::Touchpoint {
        revenue: Some(Money {
            currency_code: currency.into(),
            amount_minor: amount,
        }),
        ..tp(customer, id, TouchpointType::Purchase, when)
    }
}

async fn record(c: &mut Client, touchpoints: Vec<pb::Touchpoint>) -> pb::RecordTouchpointsResponse {
    c.record_touchpoints(pb::RecordTouchpointsRequest { touchpoints })
        .await
        .unwrap()
        .into_inner()
}

/// Every row of the three rollups, as text, sorted.
async fn rollup_rows(db: &DatabaseConnection) -> Vec<String> {
    let mut out = Vec::new();
    for sql in [
        "SELECT 'm|' || customer_id || '|' || CAST(month AS TEXT) || '|' || CAST(kinds AS TEXT) AS r \
         FROM touch_months",
        "SELECT 'p|' || customer_id || '|' || CAST(month AS TEXT) || '|' || currency || '|' || \
         CAST(orders AS TEXT) || '|' || CAST(revenue_minor AS TEXT) AS r FROM purchase_months",
        "SELECT 'a|' || customer_id || '|' || CAST(occurred_us AS TEXT) || '|' || event_id || '|' || \
         campaign AS r FROM attribution_touches",
        "SELECT 'j|' || CAST(history_id AS TEXT) || '|' || customer_id || '|' || CAST(to_stage AS TEXT) \
         || '|' || CAST(change_us AS TEXT) || '|' || COALESCE(CAST(prev_same_us AS TEXT), '-') \
         || '|' || COALESCE(s1, '-') || COALESCE(CAST(u1 AS TEXT), '-') \
         || '|' || COALESCE(s2, '-') || COALESCE(CAST(u2 AS TEXT), '-') \
         || '|' || COALESCE(s3, '-') || COALESCE(CAST(u3 AS TEXT), '-') \
         || '|' || COALESCE(s4, '-') || COALESCE(CAST(u4 AS TEXT), '-') \
         || '|' || COALESCE(s10, '-') || COALESCE(CAST(u10 AS TEXT), '-') AS r FROM move_paths",
        "SELECT 'c|' || id || '|' || COALESCE(CAST(first_conversion_us AS TEXT), '-') || '|' || \
         COALESCE(CAST(first_conversion_month AS TEXT), '-') AS r FROM customers",
    ] {
        for row in db
            .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
            .await
            .unwrap()
        {
            out.push(row.try_get::<String>("", "r").unwrap());
        }
    }
    out.sort();
    out
}

/// The reports that read the rollups, over a period covering everything.
async fn reports(c: &mut Client) -> Vec<String> {
    let scope = pb::ReportScope {
        start_time: Some(ts(at("2026-01-01T00:00:00Z"))),
        end_time: Some(ts(at("2027-01-06T12:00:00Z"))),
        ..Default::default()
    };
    let mut out = Vec::new();
    for model in [
        AttributionModel::FirstTouch,
        AttributionModel::LastTouch,
        AttributionModel::Linear,
    ] {
        let mut r = c
            .get_acquisition_report(pb::GetAcquisitionReportRequest {
                scope: Some(scope.clone()),
                model: model as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // Positions differ between otherwise equal answers.
        r.freshness = None;
        out.push(format!("{r:?}"));
    }
    let mut r = c
        .get_clv_report(pb::GetClvReportRequest {
            scope: Some(scope.clone()),
            gross_margin_bps: 3_000,
            top_customers: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Positions differ between otherwise equal answers.
    r.freshness = None;
    out.push(format!("{r:?}"));
    let mut r = c
        .get_retention_report(pb::GetRetentionReportRequest {
            scope: Some(scope.clone()),
            active_types: vec![
                TouchpointType::Purchase as i32,
                TouchpointType::FeatureUse as i32,
            ],
            months: 6,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Positions differ between otherwise equal answers.
    r.freshness = None;
    out.push(format!("{r:?}"));
    for to in [Stage::Conversion, Stage::Acquisition] {
        let mut r = c
            .get_journey_report(pb::GetJourneyReportRequest {
                scope: Some(scope.clone()),
                to_stage: to as i32,
                window_days: 30,
                max_path_length: 3,
                top: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // Positions differ between otherwise equal answers.
        r.freshness = None;
        out.push(format!("{r:?}"));
    }
    out
}

/// Asserts that the rollups equal a rebuild from the raw tables and that
/// the reports do not change when the rollups are rebuilt; returns the
/// reports.
async fn check(db: &DatabaseConnection, c: &mut Client, step: &str) -> Vec<String> {
    settle(c).await;
    let kept = rollup_rows(db).await;
    let reported = reports(c).await;
    rebuild_projection(db).await;
    assert_eq!(kept, rollup_rows(db).await, "rollups after {step}");
    let wrong = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!(
                "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM customers WHERE \
                 (first_conversion_us IS NULL AND first_conversion_month IS NOT NULL) \
                 OR (first_conversion_us IS NOT NULL AND (first_conversion_month IS NULL \
                 OR first_conversion_month <> {}))",
                clm_customer::store::reports::month_sql("first_conversion_us")
            ),
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap();
    assert_eq!(wrong, 0, "first_conversion_month after {step}");
    assert_eq!(reported, reports(c).await, "reports after {step}");
    reported
}

async fn campaign(c: &mut Client, name: &str) -> String {
    c.create_campaign(pb::CreateCampaignRequest {
        campaign: Some(pb::Campaign {
            display_name: name.into(),
            channel: CampaignChannel::Email as i32,
            start_time: Some(ts(at("2026-01-01T00:00:00Z"))),
            currency_code: "EUR".into(),
            ..Default::default()
        }),
        request_id: format!("create-{name}"),
    })
    .await
    .unwrap()
    .into_inner()
    .name
}

#[tokio::test]
async fn rollups_equal_a_rebuild_through_replays_late_touches_merge_and_erasure() {
    let h = start().await;
    let db = Database::connect(&h._backend.database_url).await.unwrap();
    let mut c = h.client();
    let a = campaign(&mut c, "A").await;
    let b = campaign(&mut c, "B").await;
    let mut k = Vec::new();
    for i in 0..4 {
        k.push(create(&mut c, &format!("r{i}@example.com")).await.name);
    }
    let t0 = t0();
    let hr = |n: i64| t0 + Duration::hours(n);

    // In order, then older ones (out of order: earlier months, earlier
    // touches), with two purchases of one customer in one month.
    h.clock.set(hr(10));
    let first = vec![
        touch(&k[0], "a0", &a, hr(4)),
        feat(&k[0], "f0", hr(5)),
        buy(&k[0], "p0", "EUR", 1_000, hr(6)),
        buy(&k[0], "p0b", "EUR", 500, hr(7)),
        touch(&k[1], "b1", &b, hr(3)),
        buy(&k[1], "p1", "USD", 2_000, hr(8)),
    ];
    assert_eq!(record(&mut c, first.clone()).await.recorded_count, 6);
    check(&db, &mut c, "a first batch").await;
    let older = vec![
        buy(&k[0], "p0-old", "EUR", 700, at("2026-10-15T09:00:00Z")),
        touch(&k[0], "b0-old", &b, at("2026-10-20T09:00:00Z")),
        feat(&k[2], "f2", hr(2)),
    ];
    record(&mut c, older).await;
    check(&db, &mut c, "out-of-order touchpoints").await;

    // Conversions; then touches before them (late) and after them.
    h.clock.set(hr(24));
    move_to(&mut c, &k[0], Stage::Conversion).await;
    move_to(&mut c, &k[1], Stage::Conversion).await;
    check(&db, &mut c, "conversions").await;
    h.clock.set(at("2026-12-10T10:00:00Z"));
    let late = vec![
        touch(&k[0], "a0-late", &a, hr(20)),
        touch(&k[0], "b0-after", &b, hr(30)),
        touch(&k[1], "a1-after", &a, hr(40)),
        buy(&k[1], "p1-dec", "USD", 3_000, at("2026-12-05T10:00:00Z")),
        feat(&k[1], "f1-dec", at("2026-12-06T10:00:00Z")),
    ];
    assert_eq!(record(&mut c, late.clone()).await.recorded_count, 5);
    let before_replay = check(&db, &mut c, "late touches").await;
    // Linear credit by hand: r0's touches up to its conversion (hour 24)
    // are A@4, B@Oct 20 and the late A@20 (B@30 is after it): A 2/3,
    // B 1/3; r1's are B@3 (A@40 is after): B 1.
    let lin = c
        .get_acquisition_report(pb::GetAcquisitionReportRequest {
            scope: Some(pb::ReportScope {
                start_time: Some(ts(at("2026-01-01T00:00:00Z"))),
                end_time: Some(ts(at("2027-01-01T00:00:00Z"))),
                ..Default::default()
            }),
            model: AttributionModel::Linear as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let credit = |name: &str| {
        lin.campaigns
            .iter()
            .find(|l| l.campaign == name)
            .map_or(0.0, |l| l.acquired_customers)
    };
    assert_eq!(lin.acquired_customers, 2);
    assert!((credit(&a) - 2.0 / 3.0).abs() < 1e-9, "{lin:?}");
    assert!((credit(&b) - 4.0 / 3.0).abs() < 1e-9, "{lin:?}");

    // A replay (same event ids, same payloads) changes nothing.
    let mut again = first.clone();
    again.extend(late.clone());
    let r = record(&mut c, again).await;
    assert_eq!((r.recorded_count, r.duplicate_count), (0, 11));
    assert_eq!(
        check(&db, &mut c, "a replayed batch").await,
        before_replay,
        "a replay must not change any report"
    );

    // A full journey row (12 touchpoints before a move, 10 kept), then late
    // ones: older than all kept (no change), between kept ones, and at the
    // 10th kept time with a greater event id (ranks above it).
    let many: Vec<pb::Touchpoint> = (1..=12)
        .map(|i| feat(&k[3], &format!("t3-{i:02}"), hr(i)))
        .collect();
    record(&mut c, many).await;
    move_to(&mut c, &k[3], Stage::Acquisition).await;
    check(&db, &mut c, "a full journey row").await;
    record(
        &mut c,
        vec![
            feat(&k[3], "t3-old", hr(0)),
            tp(
                &k[3],
                "t3-mid",
                TouchpointType::SupportContact,
                hr(6) + Duration::minutes(30),
            ),
            tp(&k[3], "t3-tie", TouchpointType::SupportContact, hr(3)),
        ],
    )
    .await;
    check(&db, &mut c, "late touchpoints into a full journey row").await;

    // Merge: r1 (converted, with touches and purchases) into r2 (not
    // converted): r2 takes r1's first conversion and rollups.
    c.merge_customers(pb::MergeCustomersRequest {
        survivor: k[2].clone(),
        duplicates: vec![k[1].clone()],
        policy: None,
        request_id: String::new(),
    })
    .await
    .unwrap();
    let merged = check(&db, &mut c, "a merge").await;
    assert_ne!(merged, before_replay, "the merge moved r1's figures to r2");
    let rows = rollup_rows(&db).await;
    let r1 = k[1].trim_start_matches("customers/");
    let r2 = k[2].trim_start_matches("customers/");
    assert!(rows.iter().all(|r| !r.contains(r1)), "{rows:?}");
    assert!(rows.iter().any(|r| r.starts_with(&format!("p|{r2}|"))));

    // Erasure: r0's rows go.
    erase(&mut c, k[0].clone()).await;
    check(&db, &mut c, "an erasure").await;
    let r0 = k[0].trim_start_matches("customers/");
    assert!(rollup_rows(&db).await.iter().all(|r| !r.contains(r0)));
    h.server.stop().await;
}
