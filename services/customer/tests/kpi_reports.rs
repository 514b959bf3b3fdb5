//! Campaigns and KPI reports through the real gRPC API, on SQLite +
//! in-process cache, or PostgreSQL + Redis when `CLM_TEST_DATABASE_URL` /
//! `CLM_TEST_REDIS_URL` are set. One small data set (4 campaigns, 10
//! customers) whose every figure is worked out by hand below.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Duration, Utc};
use clm_platform::auth::{Role, mint_hs256};
use clm_platform::client::ClientInterceptor;
use clm_platform::testing::assert_bad_field;
use clm_proto::common::Money;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::customer::{
    self as pb, AttributeValue, AttributionModel, CampaignChannel, Stage, TouchpointType,
    attribute_value::Value,
};
use std::collections::BTreeMap;
use tonic::Code;

mod common;
use common::*;

fn eur(amount_minor: i64) -> Money {
    Money {
        currency_code: "EUR".into(),
        amount_minor,
    }
}

fn usd(amount_minor: i64) -> Money {
    Money {
        currency_code: "USD".into(),
        amount_minor,
    }
}

fn hours(h: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: h * 3600,
        nanos: 0,
    }
}

async fn campaign(c: &mut Client, name: &str, ch: CampaignChannel, currency: &str) -> String {
    c.create_campaign(pb::CreateCampaignRequest {
        campaign: Some(pb::Campaign {
            display_name: name.into(),
            channel: ch as i32,
            start_time: Some(ts(at("2026-11-01T00:00:00Z"))),
            currency_code: currency.into(),
            ..Default::default()
        }),
        request_id: format!("create-{name}"),
    })
    .await
    .unwrap()
    .into_inner()
    .name
}

async fn spend(c: &mut Client, campaign: &str, m: Money, when: &str, rid: &str) {
    c.add_campaign_spend(pb::AddCampaignSpendRequest {
        campaign: campaign.into(),
        amount: Some(m),
        book_time: Some(ts(at(when))),
        description: "media".into(),
        request_id: rid.into(),
    })
    .await
    .unwrap();
}

fn feature(customer: &str, id: &str, when: DateTime<Utc>) -> pb::Touchpoint {
    pb::Touchpoint {
        feature: "reports".into(),
        ..tp(customer, id, TouchpointType::FeatureUse, when)
    }
}

fn purchase(customer: &str, id: &str, amount: i64, when: DateTime<Utc>) -> pb::Touchpoint {
    pb::Touchpoint {
        revenue: Some(eur(amount)),
        ..tp(customer, id, TouchpointType::Purchase, when)
    }
}

async fn record(c: &mut Client, touchpoints: Vec<pb::Touchpoint>) {
    c.record_touchpoints(pb::RecordTouchpointsRequest { touchpoints })
        .await
        .unwrap();
}

/// The data set. t0 = 2026-11-24T10:00Z (the harness clock).
///
/// * Campaigns: A (e-mail, EUR), B (social, EUR), C (paid search, USD),
///   D (e-mail, USD). Spend in the period: A 90,000, B 60,000 (+10,000
///   booked in October, outside), C 30,000 USD, D 5,000 USD.
/// * Ten customers c0..c9 created at t0 (APPROACH); c3 with the explicit
///   acquisition campaign C; c0 and c1 with `plan = "pro"`.
/// * Touches (t0 + hours): c0 A@1 B@2; c1 B@1 A@2 B@3; c2 C@1 FEATURE@3;
///   c4 A@1 FEATURE@3; c5 A@1; c6 FEATURE@3; c7 SUPPORT@2.
/// * c_i (i = 0..7) → ACQUISITION at t0 + 24 h + i h.
/// * T2 = t0 + 72 h: c0 c1 c2 c3 c4 c6 → CONVERSION; c7 → APPROACH (back).
/// * Purchases (EUR): c0 10,000 @T2+1h and 25,000 @2026-12-02T10:00;
///   c1 30,000 @2026-11-29T10:00 and 4,000 @2027-01-05T10:00;
///   c4 6,000 @2026-11-28T10:00; c4 SUPPORT @2026-11-29T10:00.
/// * T3 = t0 + 10 days (2026-12-04T10:00): c4 → CHURNED, c0 → RETENTION.
/// * The clock ends at 2027-01-06T10:00.
struct Data {
    h: Harness,
    campaigns: [String; 4],
    customers: Vec<String>,
}

async fn data() -> Data {
    let h = start().await;
    let mut c = h.client();
    let t0 = t0();
    let a = campaign(&mut c, "A", CampaignChannel::Email, "EUR").await;
    let b = campaign(&mut c, "B", CampaignChannel::Social, "EUR").await;
    let cc = campaign(&mut c, "C", CampaignChannel::PaidSearch, "USD").await;
    let d = campaign(&mut c, "D", CampaignChannel::Email, "USD").await;
    spend(&mut c, &a, eur(90_000), "2026-11-25T00:00:00Z", "s-a").await;
    spend(&mut c, &b, eur(60_000), "2026-11-25T00:00:00Z", "s-b").await;
    spend(&mut c, &b, eur(10_000), "2026-10-01T00:00:00Z", "s-b-oct").await;
    spend(&mut c, &cc, usd(30_000), "2026-11-25T00:00:00Z", "s-c").await;
    spend(&mut c, &d, usd(5_000), "2026-11-25T00:00:00Z", "s-d").await;

    let mut customers = Vec::new();
    for i in 0..10 {
        let mut cust = customer(&format!("c{i}@example.com"));
        if i == 3 {
            cust.acquisition_campaign = cc.clone();
        }
        if i < 2 {
            cust.attributes.insert(
                "plan".into(),
                AttributeValue {
                    value: Some(Value::StringValue("pro".into())),
                },
            );
        }
        let made = c
            .create_customer(pb::CreateCustomerRequest {
                customer: Some(cust),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        customers.push(made.name);
    }
    let k = |i: usize| customers[i].clone();
    let hr = |n: i64| t0 + Duration::hours(n);
    h.clock.set(hr(4));
    record(
        &mut c,
        vec![
            touch(&k(0), "t0a", &a, hr(1)),
            touch(&k(0), "t0b", &b, hr(2)),
            touch(&k(1), "t1b", &b, hr(1)),
            touch(&k(1), "t1a", &a, hr(2)),
            touch(&k(1), "t1b2", &b, hr(3)),
            touch(&k(2), "t2c", &cc, hr(1)),
            feature(&k(2), "f2", hr(3)),
            touch(&k(4), "t4a", &a, hr(1)),
            feature(&k(4), "f4", hr(3)),
            touch(&k(5), "t5a", &a, hr(1)),
            feature(&k(6), "f6", hr(3)),
            tp(&k(7), "s7", TouchpointType::SupportContact, hr(2)),
        ],
    )
    .await;
    for i in 0..8 {
        h.clock.set(hr(24 + i as i64));
        move_to(&mut c, &k(i), Stage::Acquisition).await;
    }
    let t2 = hr(72);
    h.clock.set(t2);
    for i in [0, 1, 2, 3, 4, 6] {
        move_to(&mut c, &k(i), Stage::Conversion).await;
    }
    move_to(&mut c, &k(7), Stage::Approach).await;
    let t3 = t0 + Duration::days(10);
    h.clock.set(t3);
    move_to(&mut c, &k(4), Stage::Churned).await;
    move_to(&mut c, &k(0), Stage::Retention).await;
    h.clock.set(at("2027-01-06T10:00:00Z"));
    record(
        &mut c,
        vec![
            purchase(&k(0), "p0a", 10_000, t2 + Duration::hours(1)),
            purchase(&k(0), "p0b", 25_000, at("2026-12-02T10:00:00Z")),
            purchase(&k(1), "p1a", 30_000, at("2026-11-29T10:00:00Z")),
            purchase(&k(1), "p1b", 4_000, at("2027-01-05T10:00:00Z")),
            purchase(&k(4), "p4", 6_000, at("2026-11-28T10:00:00Z")),
            tp(
                &k(4),
                "s4",
                TouchpointType::SupportContact,
                at("2026-11-29T10:00:00Z"),
            ),
        ],
    )
    .await;
    // The reports read what the projection has applied: wait for the head.
    settle(&mut c).await;
    Data {
        h,
        campaigns: [a, b, cc, d],
        customers,
    }
}

/// The period of every report: [2026-11-24T00:00Z, 2026-12-27T10:00Z).
fn scope() -> pb::ReportScope {
    pb::ReportScope {
        start_time: Some(ts(at("2026-11-24T00:00:00Z"))),
        end_time: Some(ts(at("2026-12-27T10:00:00Z"))),
        ..Default::default()
    }
}

fn stage_row(r: &pb::FunnelReport, s: Stage) -> pb::FunnelStage {
    r.stages
        .iter()
        .find(|x| x.stage == s as i32)
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn funnel_counts_rates_percentiles_and_moves() {
    let d = data().await;
    let mut c = d.h.client();
    let r = c
        .get_funnel_report(pb::GetFunnelReportRequest {
            scope: Some(scope()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.stages.len(), 6);
    // APPROACH: 11 entries (10 creations, c7 falling back); c0..c7's first
    // stays ended by a move forward (8/11). Completed stays: those eight,
    // 24..31 h: median = 4th of 8 = 27 h, p90 = 8th of 8 (ceil 7.2) = 31 h.
    let ap = stage_row(&r, Stage::Approach);
    assert_eq!(
        (ap.entered_count, ap.advanced_count, ap.completed_stays),
        (11, 8, 8)
    );
    assert!((ap.conversion_rate - 8.0 / 11.0).abs() < 1e-12);
    assert_eq!(ap.median_time_in_stage, Some(hours(27)));
    assert_eq!(ap.p90_time_in_stage, Some(hours(31)));
    assert_eq!((ap.backward_moves, ap.churned_count), (0, 0));
    // ACQUISITION: 8 entered, 6 converted (0.75); c7 fell back. Stays of
    // 48 − i h for i in {0,1,2,3,4,6,7}: 41 42 44 45 46 47 48 → median =
    // 4th = 45 h, p90 = 7th (ceil 6.3) = 48 h.
    let aq = stage_row(&r, Stage::Acquisition);
    assert_eq!(
        (aq.entered_count, aq.advanced_count, aq.completed_stays),
        (8, 6, 7)
    );
    assert!((aq.conversion_rate - 0.75).abs() < 1e-12);
    assert_eq!(aq.median_time_in_stage, Some(hours(45)));
    assert_eq!(aq.p90_time_in_stage, Some(hours(48)));
    assert_eq!((aq.backward_moves, aq.churned_count), (1, 0));
    // CONVERSION: 6 entered, c0 went on to RETENTION (1/6), c4 churned;
    // both stays 7 days.
    let cv = stage_row(&r, Stage::Conversion);
    assert_eq!((cv.entered_count, cv.advanced_count), (6, 1));
    assert!((cv.conversion_rate - 1.0 / 6.0).abs() < 1e-12);
    assert_eq!(cv.completed_stays, 2);
    assert_eq!(cv.median_time_in_stage, Some(hours(7 * 24)));
    assert_eq!(cv.p90_time_in_stage, Some(hours(7 * 24)));
    assert_eq!((cv.backward_moves, cv.churned_count), (0, 1));
    let rt = stage_row(&r, Stage::Retention);
    assert_eq!(
        (rt.entered_count, rt.advanced_count, rt.completed_stays),
        (1, 0, 0)
    );
    assert_eq!(rt.median_time_in_stage, None);
    assert_eq!(stage_row(&r, Stage::Churned).entered_count, 1);

    // Scoped: campaign C's customers are c2 (touch) and c3 (explicit);
    // plan = pro is c0 and c1; cohort 2026-11 is the six converted.
    let scoped = |f: fn(&mut pb::ReportScope, &Data)| {
        let mut s = scope();
        f(&mut s, &d);
        s
    };
    for (s, approach, conversion) in [
        (scoped(|s, d| s.campaign = d.campaigns[2].clone()), 2, 2),
        (
            scoped(|s, _| {
                s.attribute_key = "plan".into();
                s.attribute_value = "pro".into();
            }),
            2,
            2,
        ),
        (scoped(|s, _| s.cohort_month = "2026-11".into()), 6, 6),
        (
            scoped(|s, _| s.channel = CampaignChannel::Social as i32),
            2,
            2,
        ),
        (scoped(|s, _| s.cohort_month = "2026-10".into()), 0, 0),
    ] {
        let r = c
            .get_funnel_report(pb::GetFunnelReportRequest {
                scope: Some(s.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (
                stage_row(&r, Stage::Approach).entered_count,
                stage_row(&r, Stage::Conversion).entered_count
            ),
            (approach, conversion),
            "{s:?}"
        );
    }
    d.h.server.stop().await;
}

async fn acquisition(c: &mut Client, model: AttributionModel) -> pb::AcquisitionReport {
    c.get_acquisition_report(pb::GetAcquisitionReportRequest {
        scope: Some(scope()),
        model: model as i32,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test]
async fn cac_under_each_attribution_model() {
    let d = data().await;
    let mut c = d.h.client();
    let [a, b, cc, dd] = d.campaigns.clone();
    // Acquired in the period: c0 c1 c2 c3 c4 c6; c6 has no campaign.
    // First touch: c0→A c1→B c2→C c3→C(explicit) c4→A.
    // Last touch:  c0→B c1→B c2→C c3→C c4→A.
    // Linear: A = 1/2 + 1/3 + 1 = 11/6, B = 1/2 + 2/3 = 7/6, C = 2.
    let expected: [(AttributionModel, [f64; 3], [i64; 3]); 3] = [
        (
            AttributionModel::FirstTouch,
            [2.0, 1.0, 2.0],
            [45_000, 60_000, 15_000],
        ),
        (
            AttributionModel::LastTouch,
            [1.0, 2.0, 2.0],
            [90_000, 30_000, 15_000],
        ),
        // 90,000 / (11/6) = 49,090.9 → 49,091; 60,000 / (7/6) = 51,428.6 → 51,429.
        (
            AttributionModel::Linear,
            [11.0 / 6.0, 7.0 / 6.0, 2.0],
            [49_091, 51_429, 15_000],
        ),
    ];
    for (model, credit, cac) in expected {
        let r = acquisition(&mut c, model).await;
        assert_eq!((r.acquired_customers, r.unattributed_customers), (6, 1));
        let line = |name: &str| {
            r.campaigns
                .iter()
                .find(|l| l.campaign == name)
                .cloned()
                .unwrap_or_else(|| panic!("{name} in {r:?}"))
        };
        for (i, name) in [&a, &b, &cc].into_iter().enumerate() {
            let l = line(name);
            assert!(
                (l.acquired_customers - credit[i]).abs() < 1e-9,
                "{model:?} {i} {l:?}"
            );
            assert_eq!(
                l.cac.as_ref().unwrap().amount_minor,
                cac[i],
                "{model:?} {i}"
            );
        }
        assert_eq!(line(&a).spend, Some(eur(90_000)));
        // October's 10,000 is outside the period.
        assert_eq!(line(&b).spend, Some(eur(60_000)));
        assert_eq!(line(&cc).cac.as_ref().unwrap().currency_code, "USD");
        // D: spend, nobody credited, no CAC.
        let ld = line(&dd);
        assert_eq!(
            (ld.spend.clone(), ld.acquired_customers, ld.cac),
            (Some(usd(5_000)), 0.0, None)
        );
        // E-mail has a EUR line (A) and a USD line (D), never summed.
        let email: Vec<_> = r
            .channels
            .iter()
            .filter(|x| x.channel == CampaignChannel::Email as i32)
            .collect();
        assert_eq!(email.len(), 2);
        assert_eq!(email[0].spend, Some(eur(90_000)));
        assert_eq!(email[0].cac.as_ref().unwrap().amount_minor, cac[0]);
        assert_eq!(email[1].spend, Some(usd(5_000)));
        assert_eq!(email[1].cac, None);
    }
    // Scoped to social customers (c0, c1) under first touch: only B's
    // line, crediting c1.
    let r = c
        .get_acquisition_report(pb::GetAcquisitionReportRequest {
            scope: Some(pb::ReportScope {
                channel: CampaignChannel::Social as i32,
                ..scope()
            }),
            model: AttributionModel::FirstTouch as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.acquired_customers, 2);
    assert_eq!(r.campaigns.len(), 1);
    assert_eq!(r.campaigns[0].campaign, b);
    assert_eq!(r.campaigns[0].acquired_customers, 1.0);
    d.h.server.stop().await;
}

#[tokio::test]
async fn clv_historical_and_predictive() {
    let d = data().await;
    let mut c = d.h.client();
    let r = c
        .get_clv_report(pb::GetClvReportRequest {
            scope: Some(scope()),
            gross_margin_bps: 5_000,
            top_customers: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.cohorts.len(), 1);
    let k = &r.cohorts[0];
    // Cohort 2026-11: six customers; purchases before the end: 10,000 +
    // 25,000 + 30,000 + 6,000 = 71,000 in 4 orders (c1's January one is
    // after the end).
    assert_eq!(k.cohort_month, "2026-11");
    assert_eq!(k.customers, 6);
    assert_eq!(k.revenue, Some(eur(71_000)));
    assert_eq!(k.orders, 4);
    // 71,000 / 6 = 11,833.3 → 11,833.
    assert_eq!(k.average_revenue_per_customer, Some(eur(11_833)));
    // Exposure: five customers × 30 days + c4's 7 days until churn = 157
    // days = 157 / 30.436875 months.
    let months = 157.0 / 30.436_875;
    assert!((k.customer_months - months).abs() < 1e-9, "{k:?}");
    assert_eq!(k.churned_customers, 1);
    assert!((k.average_order_value_minor - 17_750.0).abs() < 1e-9);
    assert!((k.purchase_frequency - 4.0 / months).abs() < 1e-9);
    assert!((k.monthly_churn_rate - 1.0 / months).abs() < 1e-9);
    assert!((k.expected_lifetime_months - months).abs() < 1e-9);
    // 17,750 × (4 / m) × 0.5 × m = 71,000 × 0.5 / 1 = 35,500.
    assert_eq!(k.predicted_clv, Some(eur(35_500)));
    assert_eq!(k.gross_margin_bps, 5_000);
    let top: Vec<(String, i64, i64)> = r
        .top_customers
        .iter()
        .map(|t| {
            (
                t.customer.clone(),
                t.revenue.as_ref().unwrap().amount_minor,
                t.orders,
            )
        })
        .collect();
    assert_eq!(
        top,
        vec![
            (d.customers[0].clone(), 35_000, 2),
            (d.customers[1].clone(), 30_000, 1)
        ]
    );
    d.h.server.stop().await;
}

#[tokio::test]
async fn retention_cohort_row() {
    let d = data().await;
    let mut c = d.h.client();
    let r = c
        .get_retention_report(pb::GetRetentionReportRequest {
            scope: Some(scope()),
            active_types: vec![TouchpointType::Purchase as i32],
            months: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.cohorts.len(), 1);
    let k = &r.cohorts[0];
    assert_eq!((k.cohort_month.as_str(), k.customers), ("2026-11", 6));
    // Month 1 (2026-12): c0 bought, c4 churned (1 of 6 at risk).
    // Month 2 (2027-01): c1 bought; nobody churned (of 5). Month 3
    // (2027-02) is after the clock's month, so left out.
    assert_eq!(k.months.len(), 2);
    let m1 = &k.months[0];
    assert_eq!(
        (m1.month_offset, m1.active_customers, m1.churned_customers),
        (1, 1, 1)
    );
    assert!((m1.active_share - 1.0 / 6.0).abs() < 1e-12);
    assert!((m1.churn_rate - 1.0 / 6.0).abs() < 1e-12);
    let m2 = &k.months[1];
    assert_eq!(
        (m2.month_offset, m2.active_customers, m2.churned_customers),
        (2, 1, 0)
    );
    assert_eq!(m2.churn_rate, 0.0);
    d.h.server.stop().await;
}

#[tokio::test]
async fn journey_paths_and_pain_points() {
    let d = data().await;
    let mut c = d.h.client();
    let r = c
        .get_journey_report(pb::GetJourneyReportRequest {
            scope: Some(scope()),
            to_stage: Stage::Conversion as i32,
            window_days: 30,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.entered_customers, 6);
    let paths: Vec<(Vec<String>, i64, prost_types::Duration)> = r
        .paths
        .iter()
        .map(|p| {
            (
                p.steps.clone(),
                p.customers,
                p.median_time_to_stage.unwrap(),
            )
        })
        .collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    // c2, c4: touch@1h, feature@3h, converted @72h → 71 h from the first
    // step; c6: feature@3h → 69 h; c0: two touches; c1: three.
    assert_eq!(
        paths,
        vec![
            (s(&["CAMPAIGN_TOUCH", "FEATURE_USE"]), 2, hours(71)),
            (s(&["FEATURE_USE"]), 1, hours(69)),
            (s(&["CAMPAIGN_TOUCH", "CAMPAIGN_TOUCH"]), 1, hours(71)),
            (
                s(&["CAMPAIGN_TOUCH", "CAMPAIGN_TOUCH", "CAMPAIGN_TOUCH"]),
                1,
                hours(71)
            ),
        ]
    );
    // Leaving: c7 (back to APPROACH) and c4 (churned). Staying: the eight
    // others not churned. Support contact: 2 of 2 leavers, 0 of 8 stayers
    // (smoothed to 1/9) → lift 9; touch and feature: 1/2 ÷ 1/9 = 4.5;
    // purchase: 1/2 ÷ 2/8 = 2.
    assert_eq!((r.leaving_customers, r.staying_customers), (2, 8));
    let pains: Vec<(String, i64, i64, f64)> = r
        .pain_points
        .iter()
        .map(|p| {
            (
                p.touchpoint_type.clone(),
                p.leaving_with_type,
                p.staying_with_type,
                (p.lift * 1e9).round() / 1e9,
            )
        })
        .collect();
    assert_eq!(
        pains,
        vec![
            ("SUPPORT_CONTACT".to_string(), 2, 0, 9.0),
            ("CAMPAIGN_TOUCH".to_string(), 1, 0, 4.5),
            ("FEATURE_USE".to_string(), 1, 0, 4.5),
            ("PURCHASE".to_string(), 1, 2, 2.0),
        ]
    );
    d.h.server.stop().await;
}

#[tokio::test]
async fn campaigns_crud_spend_idempotency_and_list_filters() {
    let h = start().await;
    let mut c = h.client();
    let a = campaign(&mut c, "A", CampaignChannel::Email, "eur").await;
    // The same request id and payload answers the first campaign.
    assert_eq!(
        campaign(&mut c, "A", CampaignChannel::Email, "eur").await,
        a
    );
    let got = c
        .get_campaign(pb::GetCampaignRequest { name: a.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.currency_code, "EUR");
    assert_eq!(got.total_spend, Some(eur(0)));
    let booked = |rid: &str, amount: i64| pb::AddCampaignSpendRequest {
        campaign: a.clone(),
        amount: Some(eur(amount)),
        book_time: Some(ts(at("2026-11-02T00:00:00Z"))),
        description: String::new(),
        request_id: rid.into(),
    };
    for _ in 0..2 {
        let r = c
            .add_campaign_spend(booked("b1", 1_000))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.campaign.unwrap().total_spend, Some(eur(1_000)));
    }
    let e = c.add_campaign_spend(booked("b1", 2_000)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let r = c
        .add_campaign_spend(booked("b2", 2_000))
        .await
        .unwrap()
        .into_inner();
    let after = r.campaign.unwrap();
    assert_eq!(after.total_spend, Some(eur(3_000)));

    // Update with the current etag, then with the stale one.
    let updated = c
        .update_campaign(pb::UpdateCampaignRequest {
            campaign: Some(pb::Campaign {
                name: a.clone(),
                display_name: "A2".into(),
                end_time: Some(ts(at("2026-11-30T00:00:00Z"))),
                etag: after.etag.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into(), "end_time".into()],
            }),
            request_id: "u1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.display_name, "A2");
    let e = c
        .update_campaign(pb::UpdateCampaignRequest {
            campaign: Some(pb::Campaign {
                name: a.clone(),
                display_name: "A3".into(),
                etag: after.etag.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
            request_id: "u2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);

    let b = campaign(&mut c, "B", CampaignChannel::Social, "EUR").await;
    let list = |ch: CampaignChannel, period: Option<(&str, &str)>| pb::ListCampaignsRequest {
        channel: ch as i32,
        start_time: period.map(|p| ts(at(p.0))),
        end_time: period.map(|p| ts(at(p.1))),
        ..Default::default()
    };
    let names =
        |r: pb::ListCampaignsResponse| r.campaigns.into_iter().map(|x| x.name).collect::<Vec<_>>();
    let all = c
        .list_campaigns(list(CampaignChannel::Unspecified, None))
        .await
        .unwrap();
    assert_eq!(names(all.into_inner()).len(), 2);
    let social = c
        .list_campaigns(list(CampaignChannel::Social, None))
        .await
        .unwrap();
    assert_eq!(names(social.into_inner()), vec![b.clone()]);
    // A ended on 2026-11-30; B is open-ended.
    let december = c
        .list_campaigns(list(
            CampaignChannel::Unspecified,
            Some(("2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z")),
        ))
        .await
        .unwrap();
    assert_eq!(names(december.into_inner()), vec![b.clone()]);
    // Paging: one at a time.
    let p1 = c
        .list_campaigns(pb::ListCampaignsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p1.campaigns.len(), 1);
    let p2 = c
        .list_campaigns(pb::ListCampaignsRequest {
            page_size: 1,
            page_token: p1.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.campaigns.len(), 1);
    assert_ne!(p1.campaigns[0].name, p2.campaigns[0].name);
    assert!(p2.next_page_token.is_empty());
    let e = c
        .get_campaign(pb::GetCampaignRequest {
            name: format!("campaigns/{}", uuid::Uuid::now_v7()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    h.server.stop().await;
}

#[tokio::test]
async fn bad_input_names_the_field() {
    let h = start().await;
    let mut c = h.client();
    let a = campaign(&mut c, "A", CampaignChannel::Email, "EUR").await;
    let unknown = format!("campaigns/{}", uuid::Uuid::now_v7());
    let cust = create(&mut c, "x@example.com").await;

    // Period reversed, in every report.
    let reversed = pb::ReportScope {
        start_time: Some(ts(at("2026-12-01T00:00:00Z"))),
        end_time: Some(ts(at("2026-11-01T00:00:00Z"))),
        ..Default::default()
    };
    let e = c
        .get_funnel_report(pb::GetFunnelReportRequest {
            scope: Some(reversed.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "scope.end_time");
    let e = c
        .get_clv_report(pb::GetClvReportRequest {
            scope: Some(reversed.clone()),
            gross_margin_bps: 100,
            top_customers: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "scope.end_time");
    let e = c
        .get_retention_report(pb::GetRetentionReportRequest {
            scope: Some(reversed.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "scope.end_time");
    let e = c
        .get_journey_report(pb::GetJourneyReportRequest {
            scope: Some(reversed.clone()),
            to_stage: Stage::Conversion as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "scope.end_time");
    let e = c
        .get_campaign(pb::GetCampaignRequest {
            name: "campaigns/nope".into(),
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "name");
    // Unknown or missing attribution model.
    for m in [0, 99] {
        let e = c
            .get_acquisition_report(pb::GetAcquisitionReportRequest {
                scope: Some(scope()),
                model: m,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_bad_field(&e, "model");
    }
    // Unknown campaign: in a report scope, a touchpoint, a new customer.
    let e = c
        .get_acquisition_report(pb::GetAcquisitionReportRequest {
            scope: Some(pb::ReportScope {
                campaign: unknown.clone(),
                ..scope()
            }),
            model: AttributionModel::Linear as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "scope.campaign");
    let e = c
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: vec![
                touch(&cust.name, "ok", &a, t0()),
                touch(&cust.name, "bad", &unknown, t0()),
            ],
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "touchpoints[1].campaign");
    let e = c
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: vec![touch(&cust.name, "free", "spring-sale", t0())],
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "touchpoints[0].campaign");
    let e = c
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(pb::Customer {
                acquisition_campaign: unknown.clone(),
                ..customer("y@example.com")
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "customer.acquisition_campaign");
    // Spend: negative, another currency, no request id, unknown campaign.
    let spend_req = |m: Money, rid: &str, campaign: &str| pb::AddCampaignSpendRequest {
        campaign: campaign.into(),
        amount: Some(m),
        book_time: Some(ts(t0())),
        description: String::new(),
        request_id: rid.into(),
    };
    let e = c
        .add_campaign_spend(spend_req(eur(-1), "n1", &a))
        .await
        .unwrap_err();
    assert_bad_field(&e, "amount.amount_minor");
    let e = c
        .add_campaign_spend(spend_req(usd(100), "n2", &a))
        .await
        .unwrap_err();
    assert_bad_field(&e, "amount.currency_code");
    let e = c
        .add_campaign_spend(spend_req(eur(100), "", &a))
        .await
        .unwrap_err();
    assert_bad_field(&e, "request_id");
    let e = c
        .add_campaign_spend(spend_req(eur(100), "n3", &unknown))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Campaign fields.
    let e = c
        .create_campaign(pb::CreateCampaignRequest {
            campaign: Some(pb::Campaign {
                display_name: "X".into(),
                channel: 0,
                start_time: Some(ts(t0())),
                currency_code: "EUR".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "campaign.channel");
    let e = c
        .create_campaign(pb::CreateCampaignRequest {
            campaign: Some(pb::Campaign {
                display_name: "X".into(),
                channel: CampaignChannel::Events as i32,
                start_time: Some(ts(t0())),
                end_time: Some(ts(t0() - Duration::days(1))),
                currency_code: "EURO".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "campaign.end_time");
    assert_bad_field(&e, "campaign.currency_code");
    // Scope fields.
    let e = c
        .get_funnel_report(pb::GetFunnelReportRequest {
            scope: Some(pb::ReportScope {
                cohort_month: "2026-13".into(),
                attribute_key: "plan".into(),
                ..scope()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "scope.cohort_month");
    assert_bad_field(&e, "scope.attribute_value");
    let e = c
        .get_funnel_report(pb::GetFunnelReportRequest {
            scope: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "scope");
    let e = c
        .get_clv_report(pb::GetClvReportRequest {
            scope: Some(scope()),
            gross_margin_bps: 10_001,
            top_customers: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "gross_margin_bps");
    h.server.stop().await;
}

#[tokio::test]
async fn reports_need_analyst_or_above_and_campaigns_a_marketer() {
    const SECRET: &str = "test-secret-test-secret-test-secret!";
    let h = start_with(|c| c.auth.hs256_secret = Some(SECRET.into())).await;
    let client = |roles: &[Role]| {
        let t = mint_hs256(
            SECRET,
            "someone",
            roles,
            std::time::Duration::from_secs(300),
        )
        .unwrap();
        CustomerServiceClient::with_interceptor(
            h.server.channel(),
            ClientInterceptor::new(Some(t.as_str())),
        )
    };
    let funnel = pb::GetFunnelReportRequest {
        scope: Some(scope()),
        ..Default::default()
    };
    let new_campaign = pb::CreateCampaignRequest {
        campaign: Some(pb::Campaign {
            display_name: "X".into(),
            channel: CampaignChannel::Events as i32,
            start_time: Some(ts(t0())),
            currency_code: "EUR".into(),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    for role in [
        Role::Analyst,
        Role::SegmentOwner,
        Role::Marketer,
        Role::Admin,
    ] {
        client(&[role])
            .get_funnel_report(funnel.clone())
            .await
            .unwrap();
    }
    for role in [Role::DataSteward, Role::Service] {
        let e = client(&[role])
            .get_funnel_report(funnel.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{role:?}");
    }
    let e = client(&[Role::Analyst])
        .create_campaign(new_campaign.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let made = client(&[Role::Marketer])
        .create_campaign(new_campaign)
        .await
        .unwrap()
        .into_inner();
    client(&[Role::Analyst])
        .get_campaign(pb::GetCampaignRequest { name: made.name })
        .await
        .unwrap();
    h.server.stop().await;
}

#[allow(dead_code)]
fn _types(_: BTreeMap<(), ()>) {}
