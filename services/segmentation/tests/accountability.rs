//! Segment accountability through gRPC (both backends): objectives on a
//! hand-worked data set, status transitions over daily snapshots with at
//! risk by projection and alerts on the stream, change requests with
//! approval, membership history, ownership transfer, the audit trail, and
//! the role matrix on every mutating rpc.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::{DateTime, Duration, Utc};
use clm_platform::auth::{Role, mint_hs256_in_teams};
use clm_platform::testing::eventually;
use clm_proto::customer as cpb;
use clm_proto::segmentation as pb;
use clm_proto::segmentation::segmentation_service_client::SegmentationServiceClient;
use common::*;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const SECRET: &str = "segmentation-test-secret-of-enough-length-0123";

#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

type Client = SegmentationServiceClient<InterceptedService<Channel, Bearer>>;

fn client(h: &Harness, subject: &str, roles: &[Role], teams: &[&str]) -> Client {
    let token = mint_hs256_in_teams(
        SECRET,
        subject,
        roles,
        teams,
        std::time::Duration::from_secs(3600),
    )
    .unwrap();
    SegmentationServiceClient::with_interceptor(
        h.segmentation.as_ref().unwrap().channel(),
        Bearer(format!("Bearer {token}").parse().unwrap()),
    )
}

async fn start_with_auth() -> Harness {
    start_with(|c| {
        c.auth.hs256_secret = Some(SECRET.into());
        c.segmentation.snapshot_hour_utc = 12;
    })
    .await
}

fn at(t: DateTime<Utc>) -> Option<prost_types::Timestamp> {
    Some(ts(t))
}

fn objective(
    id: &str,
    metric: pb::ObjectiveMetric,
    target: f64,
    direction: pb::ObjectiveDirection,
    deadline: DateTime<Utc>,
) -> pb::Objective {
    pb::Objective {
        id: id.into(),
        metric: metric as i32,
        target,
        direction: direction as i32,
        deadline: at(deadline),
        ..Default::default()
    }
}

async fn purchase(
    c: &mut Customers,
    customer: &str,
    when: DateTime<Utc>,
    currency: &str,
    minor: i64,
) {
    c.record_touchpoints(cpb::RecordTouchpointsRequest {
        touchpoints: vec![cpb::Touchpoint {
            customer: customer.into(),
            event_id: uuid::Uuid::new_v4().to_string(),
            r#type: cpb::TouchpointType::Purchase as i32,
            occurred_time: at(when),
            product: "pro".into(),
            revenue: Some(clm_proto::common::Money {
                currency_code: currency.into(),
                amount_minor: minor,
            }),
            ..Default::default()
        }],
    })
    .await
    .unwrap();
}

fn find<'a>(s: &'a pb::Segment, id: &str) -> &'a pb::Objective {
    s.objectives.iter().find(|o| o.id == id).unwrap()
}

fn status(o: &pb::Objective) -> pb::ObjectiveStatus {
    pb::ObjectiveStatus::try_from(o.status).unwrap()
}

#[tokio::test]
async fn objectives_are_computed_on_a_hand_worked_data_set() {
    let h = start().await;
    let mut cust = h.customers();
    let t = t0();
    // Four members (e-mail starting with "m") and one outsider whose big
    // purchase must count nowhere.
    let stage = |s: cpb::Stage| move |c: &mut cpb::Customer| c.stage = s as i32;
    let m1 = create_customer(&mut cust, "m1@example.com", stage(cpb::Stage::Conversion)).await;
    let m2 = create_customer(&mut cust, "m2@example.com", stage(cpb::Stage::Retention)).await;
    let _m3 = create_customer(&mut cust, "m3@example.com", stage(cpb::Stage::Churned)).await;
    let _m4 = create_customer(&mut cust, "m4@example.com", |_| {}).await;
    let x = create_customer(&mut cust, "x@example.com", |_| {}).await;
    purchase(&mut cust, &m1, t - Duration::days(40), "EUR", 10_000).await;
    purchase(&mut cust, &m1, t - Duration::days(2), "EUR", 5_000).await;
    purchase(&mut cust, &m2, t - Duration::days(1), "EUR", 3_000).await;
    purchase(&mut cust, &m2, t - Duration::days(1), "USD", 7_777).await;
    purchase(&mut cust, &x, t - Duration::days(1), "EUR", 99_999).await;

    let deadline = t + Duration::days(10);
    use pb::ObjectiveDirection::{AtLeast, AtMost};
    use pb::ObjectiveMetric as M;
    let mut conversion = objective("conversion", M::ConversionRate, 0.6, AtLeast, deadline);
    conversion.stage = cpb::Stage::Conversion as i32;
    let mut clv = objective("clv", M::AverageClv, 5_000.0, AtMost, deadline);
    clv.currency = "EUR".into();
    let mut revenue = objective("revenue", M::Revenue, 8_000.0, AtLeast, deadline);
    revenue.currency = "EUR".into();
    let mut seg = h.segments();
    let created = seg
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(pb::Segment {
                display_name: "M customers".into(),
                rule_text: r#"email starts_with "m""#.into(),
                objectives: vec![
                    objective("size", M::Size, 4.0, AtLeast, deadline),
                    conversion,
                    clv,
                    revenue,
                    objective("churn", M::ChurnRate, 0.2, AtMost, deadline),
                ],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.owner, "local", "the owner defaults to the caller");
    wait_count(&mut seg, &created.name, 4).await;
    // The purchases reach segmentation through the customer stream; wait
    // until the last one (m2's EUR 30.00) counts.
    let s = eventually(std::time::Duration::from_secs(30), || {
        let mut seg = seg.clone();
        let name = created.name.clone();
        async move {
            let s = seg
                .get_segment(pb::GetSegmentRequest { name })
                .await
                .unwrap()
                .into_inner();
            (find(&s, "revenue").current_value == 8_000.0).then_some(s)
        }
    })
    .await;
    // size: 4 members (m1..m4) >= 4: MET.
    assert_eq!(find(&s, "size").current_value, 4.0);
    assert_eq!(status(find(&s, "size")), pb::ObjectiveStatus::Met);
    // conversion into CONVERSION: m1 (CONVERSION) and m2 (RETENTION) are
    // at or past it, m3 is CHURNED, m4 APPROACH: 2 / 4 = 0.5 < 0.6; no
    // snapshot yet so the projection is the value: AT_RISK.
    assert_eq!(find(&s, "conversion").current_value, 0.5);
    assert_eq!(find(&s, "conversion").projected_value, 0.5);
    assert_eq!(status(find(&s, "conversion")), pb::ObjectiveStatus::AtRisk);
    // average CLV in EUR: (10000 + 5000 + 3000) / 4 = 4500 <= 5000: MET
    // (the USD purchase and the outsider's do not count).
    assert_eq!(find(&s, "clv").current_value, 4_500.0);
    assert_eq!(status(find(&s, "clv")), pb::ObjectiveStatus::Met);
    // revenue in EUR over the default 30 days: 5000 + 3000 = 8000 (the
    // 40-day-old purchase is outside) >= 8000: MET.
    assert_eq!(find(&s, "revenue").current_value, 8_000.0);
    assert_eq!(status(find(&s, "revenue")), pb::ObjectiveStatus::Met);
    // churn: 1 of 4 = 0.25 > 0.2: AT_RISK.
    assert_eq!(find(&s, "churn").current_value, 0.25);
    assert_eq!(status(find(&s, "churn")), pb::ObjectiveStatus::AtRisk);

    // The performance report's funnel and CLV read the same projections.
    let p = seg
        .get_segment_performance(pb::GetSegmentPerformanceRequest {
            name: s.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.member_count, 4);
    let count = |st: cpb::Stage| {
        p.funnel
            .iter()
            .find(|c| c.stage == st as i32)
            .unwrap()
            .count
    };
    assert_eq!(count(cpb::Stage::Approach), 1);
    assert_eq!(count(cpb::Stage::Conversion), 1);
    assert_eq!(count(cpb::Stage::Retention), 1);
    assert_eq!(count(cpb::Stage::Churned), 1);
    let eur = p.clv.iter().find(|c| c.currency == "EUR").unwrap();
    assert_eq!((eur.total_minor, eur.average_minor), (18_000, 4_500));
    let usd = p.clv.iter().find(|c| c.currency == "USD").unwrap();
    // 7777 / 4 members = 1944 (integer minor units).
    assert_eq!((usd.total_minor, usd.average_minor), (7_777, 1_944));
    assert_eq!(p.days.len(), 30, "the default period is 30 days");

    // Bad objectives name their field.
    let bad = seg
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(pb::Segment {
                display_name: "bad".into(),
                rule_text: "age > 1".into(),
                objectives: vec![objective("x", M::Revenue, 1.0, AtLeast, deadline)],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    clm_platform::testing::assert_bad_field(&bad, "segment.objectives[0].currency");
}

async fn next_alert(
    stream: &mut tonic::Streaming<pb::WatchObjectiveAlertsResponse>,
) -> pb::ObjectiveStatusChanged {
    tokio::time::timeout(std::time::Duration::from_secs(30), stream.next())
        .await
        .expect("an alert within 30 s")
        .unwrap()
        .unwrap()
        .alert
        .unwrap()
}

/// Waits until the snapshot of `day` was taken.
async fn wait_snapshot(seg: &Segments, name: &str, day: DateTime<Utc>) {
    eventually(std::time::Duration::from_secs(30), || {
        let mut seg = seg.clone();
        let name = name.to_owned();
        async move {
            let p = seg
                .get_segment_performance(pb::GetSegmentPerformanceRequest {
                    name,
                    start_time: at(day),
                    end_time: at(day),
                })
                .await
                .unwrap()
                .into_inner();
            p.days[0].snapshot_taken
        }
    })
    .await;
}

#[tokio::test]
async fn daily_snapshots_move_statuses_and_alert_at_risk_met_and_missed() {
    let h = start_with(|c| c.segmentation.snapshot_hour_utc = 12).await;
    let mut cust = h.customers();
    let mut seg = h.segments();
    // t0 is 10:00 on day 0; snapshots at 12:00.
    let day0 = t0() - Duration::hours(10);
    let noon = |d: i64| day0 + Duration::days(d) + Duration::hours(12);
    for i in 1..=2 {
        create_customer(&mut cust, &format!("g{i}@example.com"), |_| {}).await;
    }
    use pb::ObjectiveDirection::{AtLeast, AtMost};
    use pb::ObjectiveMetric as M;
    let s = seg
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(pb::Segment {
                display_name: "growth".into(),
                rule_text: r#"email starts_with "g""#.into(),
                objectives: vec![
                    objective("grow", M::Size, 6.0, AtLeast, noon(4)),
                    objective(
                        "cap",
                        M::Size,
                        3.0,
                        AtMost,
                        day0 + Duration::days(1) + Duration::hours(18),
                    ),
                ],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    wait_count(&mut seg, &s.name, 2).await;
    let mut alerts = seg
        .watch_objective_alerts(pb::WatchObjectiveAlertsRequest {
            segment: s.name.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();

    // Day 0, 12:00: grow = 2, no earlier snapshot, projected 2 < 6:
    // AT_RISK; cap = 2 <= 3: MET.
    h.clock.set(noon(0));
    let a = next_alert(&mut alerts).await;
    assert_eq!(
        (a.objective.as_str(), a.status, a.previous_status, a.value),
        ("grow", pb::ObjectiveStatus::AtRisk as i32, 0, 2.0)
    );
    assert_eq!(a.owner, "local");
    let a = next_alert(&mut alerts).await;
    assert_eq!(
        (a.objective.as_str(), a.status),
        ("cap", pb::ObjectiveStatus::Met as i32)
    );

    // Day 1: two more members at 06:00. 12:00: grow = 4, trend from day 0
    // (2) is +2/day, 3 days left: projected 4 + 6 = 10 >= 6: ON_TRACK (no
    // alert); cap = 4 > 3 and rising (projected 4 + 2 * 0.25 = 4.5):
    // AT_RISK.
    h.clock.set(day0 + Duration::days(1) + Duration::hours(6));
    for i in 3..=4 {
        create_customer(&mut cust, &format!("g{i}@example.com"), |_| {}).await;
    }
    wait_count(&mut seg, &s.name, 4).await;
    h.clock.set(noon(1));
    let a = next_alert(&mut alerts).await;
    assert_eq!(
        (a.objective.as_str(), a.status, a.value),
        ("cap", pb::ObjectiveStatus::AtRisk as i32, 4.0)
    );
    assert!((a.projected_value - 4.5).abs() < 1e-9, "{a:?}");
    let now = seg
        .get_segment(pb::GetSegmentRequest {
            name: s.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(find(&now, "grow")), pb::ObjectiveStatus::OnTrack);
    assert!((find(&now, "grow").projected_value - 10.0).abs() < 1e-9);

    // Day 1, 18:00: cap's deadline with 4 members: MISSED, for good.
    h.clock.set(day0 + Duration::days(1) + Duration::hours(18));
    let a = next_alert(&mut alerts).await;
    assert_eq!(
        (a.objective.as_str(), a.status, a.value),
        ("cap", pb::ObjectiveStatus::Missed as i32, 4.0)
    );

    // Day 2: one more (5). 12:00: trend from day 0: (5 - 2) / 2 days =
    // 1.5/day, 2 days left: projected 8: still ON_TRACK (no alert).
    h.clock.set(day0 + Duration::days(2) + Duration::hours(6));
    create_customer(&mut cust, "g5@example.com", |_| {}).await;
    wait_count(&mut seg, &s.name, 5).await;
    h.clock.set(noon(2));
    wait_snapshot(&seg, &s.name, noon(2)).await;
    // Day 3: the sixth: 6 >= 6: MET.
    h.clock.set(day0 + Duration::days(3) + Duration::hours(6));
    create_customer(&mut cust, "g6@example.com", |_| {}).await;
    wait_count(&mut seg, &s.name, 6).await;
    h.clock.set(noon(3));
    let a = next_alert(&mut alerts).await;
    assert_eq!(
        (a.objective.as_str(), a.status, a.previous_status, a.value),
        (
            "grow",
            pb::ObjectiveStatus::Met as i32,
            pb::ObjectiveStatus::OnTrack as i32,
            6.0
        )
    );
    let now = seg
        .get_segment(pb::GetSegmentRequest {
            name: s.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(find(&now, "cap")), pb::ObjectiveStatus::Missed);
    assert_eq!(
        find(&now, "cap").current_value,
        4.0,
        "frozen at the deadline"
    );

    // The report: sizes at the snapshots, entries per day, volatility.
    let p = seg
        .get_segment_performance(pb::GetSegmentPerformanceRequest {
            name: s.name.clone(),
            start_time: at(day0),
            end_time: at(noon(3)),
        })
        .await
        .unwrap()
        .into_inner();
    let days: Vec<(i64, i64, i64, bool)> = p
        .days
        .iter()
        .map(|d| (d.size, d.entries, d.exits, d.snapshot_taken))
        .collect();
    assert_eq!(
        days,
        vec![
            (2, 2, 0, true),
            (4, 2, 0, true),
            (5, 1, 0, true),
            (6, 1, 0, true)
        ]
    );
    // Volatility (entries + exits) / size: 2/2, 2/4, 1/5, 1/6.
    let vol: Vec<f64> = p.days.iter().map(|d| d.volatility).collect();
    assert_eq!(vol[..3], [1.0, 0.5, 0.2]);
    assert!((vol[3] - 1.0 / 6.0).abs() < 1e-12);
    let grow = p
        .objectives
        .iter()
        .find(|o| o.objective.as_ref().unwrap().id == "grow")
        .unwrap();
    let points: Vec<(f64, i32)> = grow.points.iter().map(|p| (p.value, p.status)).collect();
    use pb::ObjectiveStatus as S;
    assert_eq!(
        points,
        vec![
            (2.0, S::AtRisk as i32),
            (4.0, S::OnTrack as i32),
            (5.0, S::OnTrack as i32),
            (6.0, S::Met as i32)
        ]
    );

    // Resuming after the last alert's sequence beyond the head is refused.
    let e = seg
        .watch_objective_alerts(pb::WatchObjectiveAlertsRequest {
            segment: String::new(),
            after_sequence: i64::MAX / 2,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
}

/// Waits until segmentation holds the facts of the `n` customers whose
/// e-mail starts with `prefix` (so a segment created next enters them by
/// its backfill, not by a fact arriving later).
async fn wait_facts(c: &mut Client, prefix: &str, n: i64) {
    let probe = c
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(pb::Segment {
                display_name: "probe".into(),
                owner: "probe".into(),
                rule_text: format!(r#"email starts_with "{prefix}""#),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    eventually(std::time::Duration::from_secs(30), || {
        let mut c = c.clone();
        let name = probe.name.clone();
        async move {
            c.count_segment_members(pb::CountSegmentMembersRequest { segment: name })
                .await
                .unwrap()
                .into_inner()
                .count
                == n
        }
    })
    .await;
}

async fn audit_entries(c: &mut Client, name: &str) -> Vec<clm_proto::common::AuditEntry> {
    c.list_segment_audit_entries(pb::ListSegmentAuditEntriesRequest {
        parent: name.into(),
        page_size: 100,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .audit_entries
}

fn field<'a>(s: &'a Option<prost_types::Struct>, key: &str) -> Option<&'a prost_types::Value> {
    s.as_ref().and_then(|s| s.fields.get(key))
}

fn text(s: &Option<prost_types::Struct>, key: &str) -> String {
    match field(s, key).and_then(|v| v.kind.as_ref()) {
        Some(prost_types::value::Kind::StringValue(x)) => x.clone(),
        _ => String::new(),
    }
}

#[tokio::test]
async fn change_requests_are_approved_by_a_second_principal_and_audited() {
    let h = start_with_auth().await;
    let mut cust = h.customers();
    let e1 = create_customer(&mut cust, "e1@example.com", |_| {}).await;
    create_customer(&mut cust, "f1@example.com", |_| {}).await;
    let mut marketer = client(&h, "mia", &[Role::Marketer], &[]);
    let mut ada = client(&h, "ada", &[Role::SegmentOwner], &["growth"]);
    let mut bob = client(&h, "bob", &[Role::SegmentOwner], &["growth"]);
    let mut carol = client(&h, "carol", &[Role::SegmentOwner], &["retention"]);
    let mut steward = client(&h, "dan", &[Role::DataSteward], &[]);
    wait_facts(&mut marketer, "e", 1).await;
    let s = marketer
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(pb::Segment {
                display_name: "E".into(),
                owner: "ada".into(),
                team: "growth".into(),
                purpose: "win back e-customers".into(),
                playbook: "call them".into(),
                rule_text: r#"email starts_with "e""#.into(),
                approval_required: true,
                ..Default::default()
            }),
            request_id: "create-e".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.owner.as_str(), s.team.as_str()), ("ada", "growth"));
    assert!(s.approval_required);
    eventually(std::time::Duration::from_secs(30), || {
        let mut ada = ada.clone();
        let name = s.name.clone();
        async move {
            ada.count_segment_members(pb::CountSegmentMembersRequest { segment: name })
                .await
                .unwrap()
                .into_inner()
                .count
                == 1
        }
    })
    .await;

    // A direct edit of the rule is refused, naming the policy.
    let current = ada
        .get_segment(pb::GetSegmentRequest {
            name: s.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let e = ada
        .update_segment(pb::UpdateSegmentRequest {
            segment: Some(pb::Segment {
                name: s.name.clone(),
                etag: current.etag.clone(),
                rule_text: r#"email starts_with "e" or email starts_with "f""#.into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["rule_text".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("approval_required"), "{}", e.message());
    // The playbook is not guarded: a direct edit works.
    let edited = ada
        .update_segment(pb::UpdateSegmentRequest {
            segment: Some(pb::Segment {
                name: s.name.clone(),
                etag: current.etag.clone(),
                playbook: "call them, then e-mail".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["playbook".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .segment
        .unwrap();
    assert_eq!(edited.playbook, "call them, then e-mail");

    // Ada proposes the rule change and an objective.
    let deadline = t0() + Duration::days(30);
    let cr = ada
        .create_segment_change_request(pb::CreateSegmentChangeRequestRequest {
            parent: s.name.clone(),
            change_request: Some(pb::SegmentChangeRequest {
                segment: Some(pb::Segment {
                    rule_text: r#"email starts_with "e" or email starts_with "f""#.into(),
                    objectives: vec![objective(
                        "reach",
                        pb::ObjectiveMetric::Size,
                        2.0,
                        pb::ObjectiveDirection::AtLeast,
                        deadline,
                    )],
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["rule_text".into(), "objectives".into()],
                }),
                reason: "f-customers behave the same".into(),
                ..Default::default()
            }),
            request_id: "cr-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cr.state, pb::ChangeRequestState::Pending as i32);
    assert_eq!(cr.author, "ada");
    assert_eq!(cr.current_member_count, 1);
    assert_eq!(cr.preview_member_count, 2, "e1 and f1 match the new rule");
    let diff = cr.rule_diff.as_ref().unwrap();
    assert_eq!(diff.previous_version, 1);
    assert_eq!(diff.added_conditions.len(), 1, "{diff:?}");
    // Nothing changed yet.
    let unchanged = ada
        .get_segment(pb::GetSegmentRequest {
            name: s.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged.version, 1);
    assert!(unchanged.objectives.is_empty());

    // Its author cannot approve it; another team's owner cannot either.
    let approve = |name: &str, rid: &str| pb::ApproveSegmentChangeRequestRequest {
        name: name.into(),
        comment: "ok".into(),
        request_id: rid.into(),
    };
    let e = ada
        .approve_segment_change_request(approve(&cr.name, "a1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("segments.approveChange"),
        "{}",
        e.message()
    );
    let e = carol
        .approve_segment_change_request(approve(&cr.name, "a2"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("segments.approveChange"),
        "{}",
        e.message()
    );
    // Bob (same team) approves: one new version with the rule and the
    // objective.
    let done = bob
        .approve_segment_change_request(approve(&cr.name, "a3"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state, pb::ChangeRequestState::Approved as i32);
    assert_eq!((done.reviewer.as_str(), done.applied_version), ("bob", 2));
    // A retry answers the same; a second review is refused.
    let again = bob
        .approve_segment_change_request(approve(&cr.name, "a3"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, done);
    let e = bob
        .reject_segment_change_request(pb::RejectSegmentChangeRequestRequest {
            name: cr.name.clone(),
            comment: String::new(),
            request_id: "r1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let applied = eventually(std::time::Duration::from_secs(30), || {
        let mut ada = ada.clone();
        let name = s.name.clone();
        async move {
            let s = ada
                .get_segment(pb::GetSegmentRequest { name })
                .await
                .unwrap()
                .into_inner();
            (s.member_count == 2).then_some(s)
        }
    })
    .await;
    assert_eq!(applied.version, 2);
    assert_eq!(applied.objectives.len(), 1);
    assert_eq!(status(find(&applied, "reach")), pb::ObjectiveStatus::Met);
    let listed = ada
        .list_segment_change_requests(pb::ListSegmentChangeRequestsRequest {
            parent: s.name.clone(),
            state: pb::ChangeRequestState::Approved as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.change_requests.len(), 1);

    // The audit trail: every change with actor, before and after; the
    // playbook edit is an update (never a "created").
    let entries = audit_entries(&mut steward, &s.name).await;
    let rpcs: Vec<(String, String, bool, bool)> = entries
        .iter()
        .rev()
        .map(|e| {
            (
                e.rpc.rsplit('/').next().unwrap().to_owned(),
                e.actor.clone(),
                e.before.is_some(),
                e.after.is_some(),
            )
        })
        .collect();
    let row =
        |rpc: &str, actor: &str, before: bool| (rpc.to_owned(), actor.to_owned(), before, true);
    assert_eq!(
        rpcs,
        vec![
            row("CreateSegment", "mia", false),
            row("UpdateSegment", "ada", true),
            row("CreateSegmentChangeRequest", "ada", false),
            row("ApproveSegmentChangeRequest", "bob", true),
            row("ApproveSegmentChangeRequest", "bob", true),
        ]
    );
    let created = entries.last().unwrap();
    assert_eq!(created.request_id, "create-e");
    assert_eq!(text(&created.after, "owner"), "ada");
    let playbook = &entries[entries.len() - 2];
    assert_eq!(text(&playbook.before, "playbook"), "call them");
    assert_eq!(text(&playbook.after, "playbook"), "call them, then e-mail");
    let segment_change = entries
        .iter()
        .find(|e| e.resource == s.name && e.rpc.ends_with("ApproveSegmentChangeRequest"))
        .unwrap();
    assert_eq!(
        text(&segment_change.before, "rule_text"),
        r#"email starts_with "e""#
    );
    assert!(text(&segment_change.after, "rule_text").contains("\"f\""));
    let cr_review = entries
        .iter()
        .find(|e| e.resource == cr.name && e.rpc.ends_with("ApproveSegmentChangeRequest"))
        .unwrap();
    assert_eq!(
        text(&cr_review.before, "state"),
        "CHANGE_REQUEST_STATE_PENDING"
    );
    assert_eq!(
        text(&cr_review.after, "state"),
        "CHANGE_REQUEST_STATE_APPROVED"
    );

    // Bob proposes a purpose; ada (same team, not the author) rejects it:
    // the segment keeps its purpose, the audit shows the review.
    let cr2 = bob
        .create_segment_change_request(pb::CreateSegmentChangeRequestRequest {
            parent: s.name.clone(),
            change_request: Some(pb::SegmentChangeRequest {
                segment: Some(pb::Segment {
                    purpose: "something else".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["purpose".into()],
                }),
                reason: "rethink".into(),
                ..Default::default()
            }),
            request_id: "cr-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let rejected = ada
        .reject_segment_change_request(pb::RejectSegmentChangeRequestRequest {
            name: cr2.name.clone(),
            comment: "no".into(),
            request_id: "rej-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rejected.state, pb::ChangeRequestState::Rejected as i32);
    assert_eq!(rejected.applied_version, 0);
    let kept = ada
        .get_segment(pb::GetSegmentRequest {
            name: s.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.purpose, "win back e-customers");
    let entries = audit_entries(&mut steward, &s.name).await;
    let review = &entries[0];
    assert!(review.rpc.ends_with("/RejectSegmentChangeRequest"));
    assert_eq!(
        (review.resource.as_str(), review.actor.as_str()),
        (cr2.name.as_str(), "ada")
    );
    assert_eq!(
        text(&review.before, "state"),
        "CHANGE_REQUEST_STATE_PENDING"
    );
    assert_eq!(
        text(&review.after, "state"),
        "CHANGE_REQUEST_STATE_REJECTED"
    );

    // Two requests made against the same revision: once one is applied,
    // the other is stale.
    let propose = |rid: &'static str, text: &'static str| {
        let mut bob = bob.clone();
        let parent = s.name.clone();
        async move {
            bob.create_segment_change_request(pb::CreateSegmentChangeRequestRequest {
                parent,
                change_request: Some(pb::SegmentChangeRequest {
                    segment: Some(pb::Segment {
                        description: text.into(),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["description".into()],
                    }),
                    reason: "wording".into(),
                    ..Default::default()
                }),
                request_id: rid.into(),
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let first = propose("cr-3", "first").await;
    let second = propose("cr-4", "second").await;
    ada.approve_segment_change_request(approve(&first.name, "a4"))
        .await
        .unwrap();
    let e = ada
        .approve_segment_change_request(approve(&second.name, "a5"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("reject it and propose"),
        "{}",
        e.message()
    );

    // Membership history: e1 entered at creation (version 1, backfill);
    // f1 entered with version 2.
    let history = ada
        .list_membership_history(pb::ListMembershipHistoryRequest {
            segment: s.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let seen: Vec<(String, i64, i32)> = history
        .entries
        .iter()
        .map(|e| (e.customer.clone(), e.segment_version, e.reason))
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[0],
        (e1.clone(), 1, pb::MembershipReason::Backfill as i32)
    );
    assert_eq!(seen[1].1, 2);
}

#[tokio::test]
async fn ownership_transfer_is_recorded_and_lists_filter_by_owner_and_team() {
    let h = start_with_auth().await;
    let mut cust = h.customers();
    let c1 = create_customer(&mut cust, "h1@example.com", |_| {}).await;
    let mut marketer = client(&h, "mia", &[Role::Marketer], &[]);
    let mut ada = client(&h, "ada", &[Role::SegmentOwner], &[]);
    let mut admin = client(&h, "root", &[Role::Admin], &[]);
    let create = |owner: &str, team: &str, rule: &str| pb::CreateSegmentRequest {
        segment: Some(pb::Segment {
            display_name: format!("{owner}'s"),
            owner: owner.into(),
            team: team.into(),
            rule_text: rule.into(),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    wait_facts(&mut marketer, "h", 1).await;
    let a = marketer
        .create_segment(create("ada", "growth", r#"email starts_with "h""#))
        .await
        .unwrap()
        .into_inner();
    let b = marketer
        .create_segment(create("bob", "retention", "age > 200"))
        .await
        .unwrap()
        .into_inner();
    let list = |owner: &str, team: &str| pb::ListSegmentsRequest {
        owner: owner.into(),
        team: team.into(),
        ..Default::default()
    };
    let names = |r: pb::ListSegmentsResponse| -> Vec<String> {
        r.segments.into_iter().map(|s| s.name).collect()
    };
    assert_eq!(
        names(
            ada.list_segments(list("ada", ""))
                .await
                .unwrap()
                .into_inner()
        ),
        vec![a.name.clone()]
    );
    assert_eq!(
        names(
            ada.list_segments(list("", "retention"))
                .await
                .unwrap()
                .into_inner()
        ),
        vec![b.name.clone()]
    );

    // Ada hands her segment to bob's team; she may (she owns it).
    let moved = ada
        .transfer_segment_ownership(pb::TransferSegmentOwnershipRequest {
            name: a.name.clone(),
            new_owner: "bob".into(),
            new_team: "retention".into(),
            etag: a.etag.clone(),
            request_id: "t1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (moved.owner.as_str(), moved.team.as_str()),
        ("bob", "retention")
    );
    // Now she may not change it any more.
    let e = ada
        .transfer_segment_ownership(pb::TransferSegmentOwnershipRequest {
            name: a.name.clone(),
            new_owner: "ada".into(),
            request_id: "t2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("segments.transferOwnership"),
        "{}",
        e.message()
    );
    let mut both = names(
        ada.list_segments(list("bob", "retention"))
            .await
            .unwrap()
            .into_inner(),
    );
    both.sort();
    let mut want = vec![a.name.clone(), b.name.clone()];
    want.sort();
    assert_eq!(both, want);
    let entries = audit_entries(&mut admin, &a.name).await;
    let transfer = &entries[0];
    assert!(transfer.rpc.ends_with("/TransferSegmentOwnership"));
    assert_eq!(transfer.actor, "ada");
    assert_eq!(transfer.request_id, "t1");
    assert_eq!(
        (
            text(&transfer.before, "owner"),
            text(&transfer.after, "owner")
        ),
        ("ada".into(), "bob".into())
    );
    assert_eq!(
        (
            text(&transfer.before, "team"),
            text(&transfer.after, "team")
        ),
        ("growth".into(), "retention".into())
    );
    assert_eq!(
        transfer.update_mask.as_ref().unwrap().paths,
        vec!["owner", "team"]
    );

    // Membership history of the customer: entered h's segment, then left
    // it when the rule changed (by the admin: version 2, backfill).
    wait_history(&mut admin, &a.name, &c1, 1).await;
    let current = admin
        .get_segment(pb::GetSegmentRequest {
            name: a.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    h.advance(Duration::hours(1));
    admin
        .update_segment(pb::UpdateSegmentRequest {
            segment: Some(pb::Segment {
                name: a.name.clone(),
                etag: current.etag,
                rule_text: r#"email starts_with "zz""#.into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["rule_text".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let h2 = wait_history(&mut admin, &a.name, &c1, 2).await;
    let seen: Vec<(i32, i64, i32)> = h2
        .iter()
        .map(|e| (e.change, e.segment_version, e.reason))
        .collect();
    use pb::MembershipChange as C;
    use pb::MembershipReason as R;
    assert_eq!(
        seen,
        vec![
            (C::Entered as i32, 1, R::Backfill as i32),
            (C::Exited as i32, 2, R::Backfill as i32)
        ]
    );
    assert_eq!(h2[1].change_time, at(t0() + Duration::hours(1)));
    // Paged one by one, the same two entries; a period before the exit
    // holds only the entry.
    let first = admin
        .list_membership_history(pb::ListMembershipHistoryRequest {
            segment: a.name.clone(),
            customer: c1.clone(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.entries, h2[..1]);
    let second = admin
        .list_membership_history(pb::ListMembershipHistoryRequest {
            segment: a.name.clone(),
            customer: c1.clone(),
            page_size: 1,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.entries, h2[1..]);
    assert!(second.next_page_token.is_empty());
    let before_exit = admin
        .list_membership_history(pb::ListMembershipHistoryRequest {
            segment: a.name.clone(),
            customer: c1.clone(),
            end_time: at(t0() + Duration::minutes(30)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before_exit.entries, h2[..1]);
    let e = admin
        .list_membership_history(pb::ListMembershipHistoryRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

async fn wait_history(
    c: &mut Client,
    segment: &str,
    customer: &str,
    n: usize,
) -> Vec<pb::MembershipHistoryEntry> {
    eventually(std::time::Duration::from_secs(30), || {
        let mut c = c.clone();
        let segment = segment.to_owned();
        let customer = customer.to_owned();
        async move {
            let r = c
                .list_membership_history(pb::ListMembershipHistoryRequest {
                    segment,
                    customer,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            (r.entries.len() == n).then_some(r.entries)
        }
    })
    .await
}

/// What one principal gets from one mutating rpc on a segment owned by
/// "ada" of team "growth".
async fn attempt(h: &Harness, who: &Client, rpc: &str) -> Code {
    let mut admin = client(h, "root", &[Role::Admin], &[]);
    let mut c = who.clone();
    // A fresh segment (and change request) per attempt, made by the admin.
    let s = admin
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(pb::Segment {
                display_name: "matrix".into(),
                owner: "ada".into(),
                team: "growth".into(),
                rule_text: "age > 200".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let cr = admin
        .create_segment_change_request(pb::CreateSegmentChangeRequestRequest {
            parent: s.name.clone(),
            change_request: Some(pb::SegmentChangeRequest {
                segment: Some(pb::Segment {
                    display_name: "renamed".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["display_name".into()],
                }),
                reason: "clearer".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mask = |p: &str| {
        Some(prost_types::FieldMask {
            paths: vec![p.into()],
        })
    };
    let result = match rpc {
        "CreateSegment" => c
            .create_segment(pb::CreateSegmentRequest {
                segment: Some(pb::Segment {
                    display_name: "x".into(),
                    rule_text: "age > 200".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .map(|_| ()),
        "UpdateSegment" => c
            .update_segment(pb::UpdateSegmentRequest {
                segment: Some(pb::Segment {
                    name: s.name.clone(),
                    description: "d".into(),
                    ..Default::default()
                }),
                update_mask: mask("description"),
                request_id: String::new(),
            })
            .await
            .map(|_| ()),
        "DeleteSegment" => c
            .delete_segment(pb::DeleteSegmentRequest {
                name: s.name.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "RefreshSegment" => c
            .refresh_segment(pb::RefreshSegmentRequest {
                name: s.name.clone(),
                request_id: String::new(),
            })
            .await
            .map(|_| ()),
        "TransferSegmentOwnership" => c
            .transfer_segment_ownership(pb::TransferSegmentOwnershipRequest {
                name: s.name.clone(),
                new_owner: "zoe".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "CreateSegmentChangeRequest" => c
            .create_segment_change_request(pb::CreateSegmentChangeRequestRequest {
                parent: s.name.clone(),
                change_request: Some(pb::SegmentChangeRequest {
                    segment: Some(pb::Segment {
                        purpose: "p".into(),
                        ..Default::default()
                    }),
                    update_mask: mask("purpose"),
                    reason: "why not".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .map(|_| ()),
        "ApproveSegmentChangeRequest" => c
            .approve_segment_change_request(pb::ApproveSegmentChangeRequestRequest {
                name: cr.name.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "RejectSegmentChangeRequest" => c
            .reject_segment_change_request(pb::RejectSegmentChangeRequestRequest {
                name: cr.name.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        other => panic!("unknown rpc {other}"),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(e) => {
            if e.code() == Code::PermissionDenied {
                assert!(
                    e.message().contains("missing permission"),
                    "{rpc}: {}",
                    e.message()
                );
            }
            e.code()
        }
    }
}

#[tokio::test]
async fn the_role_matrix_holds_on_every_mutating_rpc() {
    let h = start_with_auth().await;
    let principals: Vec<(&str, Client)> = vec![
        ("admin", client(&h, "root", &[Role::Admin], &[])),
        ("marketer-owner", client(&h, "ada", &[Role::Marketer], &[])),
        ("marketer-other", client(&h, "mia", &[Role::Marketer], &[])),
        ("owner", client(&h, "ada", &[Role::SegmentOwner], &[])),
        (
            "team-member",
            client(&h, "bob", &[Role::SegmentOwner], &["growth"]),
        ),
        (
            "other-owner",
            client(&h, "carol", &[Role::SegmentOwner], &["retention"]),
        ),
        ("analyst", client(&h, "ann", &[Role::Analyst], &[])),
        ("data-steward", client(&h, "dan", &[Role::DataSteward], &[])),
        ("service", client(&h, "svc", &[Role::Service], &[])),
    ];
    const OK: Code = Code::Ok;
    const NO: Code = Code::PermissionDenied;
    // Columns: the principals above, in order.
    let matrix: [(&str, [Code; 9]); 8] = [
        ("CreateSegment", [OK, OK, OK, NO, NO, NO, NO, NO, NO]),
        ("UpdateSegment", [OK, OK, NO, OK, OK, NO, NO, NO, NO]),
        ("DeleteSegment", [OK, OK, NO, OK, OK, NO, NO, NO, NO]),
        ("RefreshSegment", [OK, OK, NO, OK, OK, NO, NO, NO, NO]),
        (
            "TransferSegmentOwnership",
            [OK, OK, NO, OK, OK, NO, NO, NO, NO],
        ),
        (
            "CreateSegmentChangeRequest",
            [OK, OK, NO, OK, OK, NO, NO, NO, NO],
        ),
        // The change request's author is the admin "root": the admin may
        // not review its own request (FAILED_PRECONDITION would be a
        // state problem; the author rule is PERMISSION_DENIED).
        (
            "ApproveSegmentChangeRequest",
            [NO, OK, NO, OK, OK, NO, NO, NO, NO],
        ),
        (
            "RejectSegmentChangeRequest",
            [NO, OK, NO, OK, OK, NO, NO, NO, NO],
        ),
    ];
    let mut got = Vec::new();
    let mut want = Vec::new();
    for (rpc, row) in matrix {
        for ((who, c), expected) in principals.iter().zip(row) {
            got.push((rpc, *who, attempt(&h, c, rpc).await));
            want.push((rpc, *who, expected));
        }
    }
    assert_eq!(got, want);
}

#[tokio::test]
async fn two_replicas_take_each_daily_snapshot_once() {
    let h = start_with(|c| c.segmentation.snapshot_hour_utc = 12).await;
    // A second replica on the same database and clock.
    let mut config = seg_config(&h.seg_backend, &h.customer.url());
    config.segmentation.snapshot_hour_utc = 12;
    let second = clm_platform::testing::start_with_clock(
        &clm_segmentation::DESCRIPTOR,
        config,
        std::sync::Arc::new(h.clock.clone()),
    )
    .await;
    let mut cust = h.customers();
    create_customer(&mut cust, "r1@example.com", |_| {}).await;
    let mut seg = h.segments();
    let day0 = t0() - Duration::hours(10);
    let s = seg
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(pb::Segment {
                display_name: "replicated".into(),
                rule_text: r#"email starts_with "r""#.into(),
                objectives: vec![
                    objective(
                        "big",
                        pb::ObjectiveMetric::Size,
                        5.0,
                        pb::ObjectiveDirection::AtLeast,
                        day0 + Duration::days(5),
                    ),
                    objective(
                        "small",
                        pb::ObjectiveMetric::Size,
                        3.0,
                        pb::ObjectiveDirection::AtMost,
                        day0 + Duration::days(5),
                    ),
                ],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    wait_count(&mut seg, &s.name, 1).await;
    let mut other = SegmentationServiceClient::new(second.channel());
    let mut alerts = other
        .watch_objective_alerts(pb::WatchObjectiveAlertsRequest {
            segment: s.name.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    for d in 0..2 {
        h.clock.set(day0 + Duration::days(d) + Duration::hours(12));
        wait_snapshot(&seg, &s.name, day0 + Duration::days(d)).await;
    }
    // Day 0: big AT_RISK (1 < 5, no trend), small MET (1 <= 3); day 1:
    // nothing changed. Exactly these two alerts, however many replicas.
    let a = next_alert(&mut alerts).await;
    assert_eq!(
        (a.objective.as_str(), a.status),
        ("big", pb::ObjectiveStatus::AtRisk as i32)
    );
    let a = next_alert(&mut alerts).await;
    assert_eq!(
        (a.objective.as_str(), a.status),
        ("small", pb::ObjectiveStatus::Met as i32)
    );
    let more = tokio::time::timeout(std::time::Duration::from_secs(1), alerts.next()).await;
    assert!(more.is_err(), "a third alert: {more:?}");
    let p = other
        .get_segment_performance(pb::GetSegmentPerformanceRequest {
            name: s.name.clone(),
            start_time: at(day0),
            end_time: at(day0 + Duration::days(1)),
        })
        .await
        .unwrap()
        .into_inner();
    let points: usize = p.objectives.iter().map(|o| o.points.len()).sum();
    assert_eq!(points, 4, "one point per objective and day");
    assert!(p.days.iter().all(|d| d.snapshot_taken && d.size == 1));
    second.stop().await;
}

#[tokio::test]
async fn membership_history_is_kept_for_the_configured_retention() {
    let keep_one_day = |c: &mut clm_platform::config::Config| {
        c.segmentation.membership_history_retention_days = 1;
    };
    let mut h = start_with(keep_one_day).await;
    let mut cust = h.customers();
    let k1 = create_customer(&mut cust, "k1@example.com", |_| {}).await;
    let mut seg = h.segments();
    let s = create_segment(&mut seg, r#"email starts_with "k""#).await;
    wait_count(&mut seg, &s.name, 1).await;
    let current = wait_ready(&mut seg, &s.name).await;
    seg.update_segment(pb::UpdateSegmentRequest {
        segment: Some(pb::Segment {
            name: s.name.clone(),
            etag: current.etag,
            rule_text: r#"email starts_with "zz""#.into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["rule_text".into()],
        }),
        request_id: String::new(),
    })
    .await
    .unwrap();
    wait_count(&mut seg, &s.name, 0).await;
    let history = |seg: Segments| {
        let (segment, customer) = (s.name.clone(), k1.clone());
        async move {
            let mut seg = seg;
            seg.list_membership_history(pb::ListMembershipHistoryRequest {
                segment,
                customer,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries
            .len()
        }
    };
    assert_eq!(history(seg.clone()).await, 2, "entered and exited");
    // Two days on, a restarted service purges the closed interval.
    h.advance(Duration::days(2));
    h.segmentation.take().unwrap().stop().await;
    let mut config = seg_config(&h.seg_backend, &h.customer.url());
    keep_one_day(&mut config);
    h.segmentation = Some(
        clm_platform::testing::start_with_clock(
            &clm_segmentation::DESCRIPTOR,
            config,
            std::sync::Arc::new(h.clock.clone()),
        )
        .await,
    );
    let seg = h.segments();
    eventually(std::time::Duration::from_secs(30), || {
        let seg = seg.clone();
        let history = &history;
        async move { history(seg).await == 0 }
    })
    .await;
}

#[tokio::test]
async fn history_pages_through_many_changes_at_one_instant() {
    let h = start().await;
    let mut cust = h.customers();
    let mut ids = Vec::new();
    for i in 1..=5 {
        ids.push(create_customer(&mut cust, &format!("p{i}@example.com"), |_| {}).await);
    }
    ids.sort();
    let mut seg = h.segments();
    // A probe first: the real segment's backfill then enters all five at
    // one instant.
    let probe = create_segment(&mut seg, r#"email starts_with "p""#).await;
    wait_count(&mut seg, &probe.name, 5).await;
    let s = create_segment(&mut seg, r#"email starts_with "p""#).await;
    let ready = wait_count(&mut seg, &s.name, 5).await;
    h.advance(Duration::hours(1));
    seg.update_segment(pb::UpdateSegmentRequest {
        segment: Some(pb::Segment {
            name: s.name.clone(),
            etag: ready.etag,
            rule_text: r#"email starts_with "zz""#.into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["rule_text".into()],
        }),
        request_id: String::new(),
    })
    .await
    .unwrap();
    wait_count(&mut seg, &s.name, 0).await;
    let mut all = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = seg
            .list_membership_history(pb::ListMembershipHistoryRequest {
                segment: s.name.clone(),
                page_size: 3,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        all.extend(page.entries);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 4, "10 changes, 3 a page");
    let seen: Vec<(i32, String)> = all.iter().map(|e| (e.change, e.customer.clone())).collect();
    let mut want: Vec<(i32, String)> = ids
        .iter()
        .map(|c| (pb::MembershipChange::Entered as i32, c.clone()))
        .collect();
    want.extend(
        ids.iter()
            .map(|c| (pb::MembershipChange::Exited as i32, c.clone())),
    );
    assert_eq!(seen, want, "each change once, by time then customer");
    assert!(all[..5].iter().all(|e| e.change_time == all[0].change_time));
    assert!(
        all[5..]
            .iter()
            .all(|e| e.change_time == at(t0() + Duration::hours(1)))
    );
}

#[tokio::test]
async fn reads_reuse_an_evaluation_until_the_segment_changes_or_it_ages() {
    let h = start_with(|c| c.segmentation.objective_cache_secs = 3600).await;
    let mut cust = h.customers();
    create_customer(&mut cust, "c1@example.com", |_| {}).await;
    let mut seg = h.segments();
    // Facts first (a probe), so the segment's backfill enters c1.
    let probe = create_segment(&mut seg, r#"email starts_with "c""#).await;
    wait_count(&mut seg, &probe.name, 1).await;
    let s = seg
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(pb::Segment {
                display_name: "cached".into(),
                rule_text: r#"email starts_with "c""#.into(),
                objectives: vec![objective(
                    "size",
                    pb::ObjectiveMetric::Size,
                    2.0,
                    pb::ObjectiveDirection::AtLeast,
                    t0() + Duration::days(3),
                )],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let one = wait_count(&mut seg, &s.name, 1).await;
    let first = find(&one, "size").clone();
    assert_eq!(first.current_value, 1.0);
    create_customer(&mut cust, "c2@example.com", |_| {}).await;
    let two = wait_count(&mut seg, &s.name, 2).await;
    // Membership is live; the objective is the evaluation already made.
    assert_eq!(find(&two, "size"), &first);
    // An edit is a new revision: evaluated afresh.
    let edited = seg
        .update_segment(pb::UpdateSegmentRequest {
            segment: Some(pb::Segment {
                name: s.name.clone(),
                etag: two.etag.clone(),
                description: "now with two".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["description".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .segment
        .unwrap();
    assert_eq!(find(&edited, "size").current_value, 2.0);
    assert_eq!(status(find(&edited, "size")), pb::ObjectiveStatus::Met);
}
