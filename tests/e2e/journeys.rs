//! The end-to-end journeys of CLM as one system: all five services running
//! side by side (each on its own fresh backend: SQLite, or PostgreSQL +
//! Redis when `CLM_TEST_DATABASE_URL` is set), wired as `clm up` wires
//! them, driven through gRPC only.
//!
//! 1. Lead to loyal: touchpoints raise engagement → ACQUISITION → a
//!    purchase → CONVERSION → points → a tier → LOYALTY.
//! 2. The closed feedback loop: a loyal customer's NPS 3 → the score falls
//!    → an at-risk segment → a recovery reward limited to it → redeemed;
//!    NPS 10 → out of the segment, the reward no longer eligible. The
//!    Customer 360 view shows every part, and a part whose peer is down.
//! 3. Erasure: data in all five services → five receipts → no table of any
//!    service's database holds the customer's personal data.
//! 4. Merge: two profiles with points, scores and responses → one, every
//!    total the sum, nothing counted twice.
//!
//! Journey 5 (a consumer killed with SIGKILL mid-stream) runs the real
//! binary: `crates/clm/tests/journeys_process.rs`; journey 6 (journey 2
//! from Python) is `tests/clients/python/test_journey.py`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod suite;

use clm_platform::testing::eventually;
use clm_proto::customer as cpb;
use clm_proto::loyalty as lpb;
use clm_proto::scoring as spb;
use std::time::{Duration, Instant};
use suite::Suite;
use tonic_types::StatusExt;

const WAIT: Duration = Duration::from_secs(30);

/// Engagement: +10 a feature use, +50 a purchase, -30 an NPS detractor,
/// +30 an NPS promoter; 30 → ACQUISITION, 70 → CONVERSION.
async fn engagement_model(s: &Suite) {
    s.scoring()
        .create_scoring_model(clm_tests::journey::engagement_model())
        .await
        .unwrap();
}

/// Program `stars`: auto-enrolment, 1 point per euro of purchases, tiers
/// member (0) and gold (`gold` points, the loyalty tier); gold only when
/// `gold` is 0.
async fn stars_program(s: &Suite, gold: i64) {
    let tier = |id: &str, threshold: i64| lpb::Tier {
        id: id.into(),
        threshold,
        ..Default::default()
    };
    let tiers = if gold == 0 {
        vec![tier("gold", 0)]
    } else {
        vec![tier("member", 0), tier("gold", gold)]
    };
    s.loyalty()
        .create_program(lpb::CreateProgramRequest {
            program: Some(lpb::Program {
                display_name: "Stars".into(),
                points_currency: "stars".into(),
                earning_rules: vec![lpb::EarningRule {
                    id: "buy".into(),
                    trigger: lpb::EarningTrigger::Purchase as i32,
                    currency_code: "EUR".into(),
                    points_per_unit: 1,
                    unit_minor: 100,
                    ..Default::default()
                }],
                tiers,
                loyalty_tier: "gold".into(),
                auto_enroll: true,
                ..Default::default()
            }),
            program_id: "stars".into(),
            request_id: "program-stars".into(),
        })
        .await
        .unwrap();
}

async fn wait_stage(s: &Suite, customer: &str, stage: cpb::Stage) {
    eventually(WAIT, || async { s.stage(customer).await == stage }).await;
}

#[tokio::test]
async fn journey_1_lead_to_loyal() {
    let s = Suite::start().await;
    engagement_model(&s).await;
    stars_program(&s, 100).await;
    let lead = s.customer("lead@journey.io").await;
    assert_eq!(s.stage(&lead).await, cpb::Stage::Approach);

    // Three feature uses: engagement 30 → ACQUISITION.
    for i in 0..3 {
        s.touch(
            &lead,
            &format!("use-{i}"),
            cpb::TouchpointType::FeatureUse,
            0,
        )
        .await;
    }
    wait_stage(&s, &lead, cpb::Stage::Acquisition).await;
    // A purchase of EUR 50: engagement 80 → CONVERSION; 50 points (member).
    s.purchase(&lead, "order-1", 5000).await;
    wait_stage(&s, &lead, cpb::Stage::Conversion).await;
    let m = eventually(WAIT, || async {
        s.member("stars", &lead).await.filter(|m| m.balance == 50)
    })
    .await;
    assert_eq!(m.tier, "member");
    // EUR 60 more: 110 points earned → gold, the loyalty tier → LOYALTY.
    s.purchase(&lead, "order-2", 6000).await;
    wait_stage(&s, &lead, cpb::Stage::Loyalty).await;
    let m = s.member("stars", &lead).await.unwrap();
    assert_eq!(
        (m.tier.as_str(), m.balance, m.lifetime_earned),
        ("gold", 110, 110)
    );
    // LOYALTY came from the loyalty tier; scoring follows the same purchase
    // on its own stream.
    eventually(WAIT, || async {
        (s.score(&lead, "journey", "engagement").await == 130.0).then_some(())
    })
    .await;

    let history = s
        .customers()
        .list_stage_history(cpb::ListStageHistoryRequest {
            parent: lead.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .changes;
    let moves: Vec<(i32, &str)> = history
        .iter()
        .map(|c| (c.to_stage, c.reason.as_str()))
        .collect();
    assert_eq!(
        moves[1..],
        [
            (cpb::Stage::Acquisition as i32, "score threshold: acquired"),
            (cpb::Stage::Conversion as i32, "score threshold: converted"),
            (
                cpb::Stage::Loyalty as i32,
                "reached loyalty tier gold of programs/stars"
            ),
        ],
        "{history:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn journey_2_closed_feedback_loop_and_the_customer_view() {
    let mut s = Suite::start().await;
    engagement_model(&s).await;
    // Gold from the first point: enrolment makes a loyal customer.
    stars_program(&s, 0).await;
    let at_risk = s.segment("at-risk", "score.engagement < 50").await;
    let engaged = s.segment("engaged", "score.engagement >= 70").await;
    s.loyalty()
        .create_reward(lpb::CreateRewardRequest {
            parent: "programs/stars".into(),
            reward: Some(lpb::Reward {
                display_name: "We are sorry: a free month".into(),
                cost: 10,
                eligible_segment: at_risk.clone(),
                ..Default::default()
            }),
            reward_id: "recovery".into(),
            request_id: "reward-recovery".into(),
        })
        .await
        .unwrap();
    let c = s.customer("loyal@journey.io").await;
    let member = format!(
        "programs/stars/members/{}",
        c.trim_start_matches("customers/")
    );
    // Two feature uses (engagement 20) and a purchase of EUR 20 (20
    // points, enrolled in gold: LOYALTY; engagement 70).
    for i in 0..2 {
        s.touch(&c, &format!("use-{i}"), cpb::TouchpointType::FeatureUse, 0)
            .await;
    }
    s.purchase(&c, "order-1", 2000).await;
    wait_stage(&s, &c, cpb::Stage::Loyalty).await;
    eventually(WAIT, || async {
        s.score(&c, "journey", "engagement").await == 70.0
    })
    .await;
    let eligible = || {
        let mut loyalty = s.loyalty();
        let member = member.clone();
        async move {
            loyalty
                .list_eligible_rewards(lpb::ListEligibleRewardsRequest { member })
                .await
                .unwrap()
                .into_inner()
                .rewards
                .into_iter()
                .any(|r| r.name == "programs/stars/rewards/recovery")
        }
    };
    // Engagement 70: segmentation has it once the customer is in
    // "engaged". Out of at-risk alone is not enough: before segmentation
    // has seen the customer at all they are in neither segment, and at 0
    // or 20 (before the purchase was scored) they were in at-risk.
    eventually(WAIT, || async { s.is_member(&engaged, &c).await }).await;
    assert!(!s.is_member(&at_risk, &c).await, "70 is not at risk");
    assert!(!eligible().await, "not at risk yet");

    // NPS 3, a detractor: 70 - 30 = 40 < 50, at risk.
    let survey = s.nps_survey("nps").await;
    let answered = Instant::now();
    s.answer(&survey, &c, "r1", 3, None).await;
    eventually(WAIT, || async { s.is_member(&at_risk, &c).await }).await;
    let freshness = answered.elapsed();

    println!("journey 2: NPS answer → in the at-risk segment in {freshness:?}");
    assert_eq!(s.score(&c, "journey", "engagement").await, 40.0);
    assert!(eligible().await, "the recovery reward is eligible at risk");
    s.loyalty()
        .redeem_reward(lpb::RedeemRewardRequest {
            member: member.clone(),
            reward: "programs/stars/rewards/recovery".into(),
            request_id: "redeem-1".into(),
        })
        .await
        .unwrap();

    // Customer 360: every part, in one call.
    let view = s
        .customers()
        .get_customer_view(cpb::GetCustomerViewRequest { name: c.clone() })
        .await
        .unwrap()
        .into_inner();
    let available = Some(cpb::ViewPart {
        state: cpb::ViewPartState::Available as i32,
        reason: String::new(),
    });
    assert_eq!(
        view.customer.as_ref().unwrap().stage,
        cpb::Stage::Loyalty as i32
    );
    assert_eq!(
        view.stage_history[0].to_stage,
        cpb::Stage::Loyalty as i32,
        "newest first"
    );
    let scores = view.scores.unwrap();
    assert_eq!(scores.part, available);
    assert_eq!(scores.models[0].scoring_model, "scoringModels/journey");
    assert_eq!(
        scores.models[0].scores["engagement"], 40.0,
        "{:?}",
        scores.models
    );
    let segments = view.segments.unwrap();
    assert_eq!(segments.part, available);
    assert!(segments.segments.contains(&at_risk));
    let f = view.feedback.unwrap();
    assert_eq!(f.part, available);
    assert_eq!(
        (
            f.last_nps,
            f.last_nps_category.as_str(),
            f.completed_responses
        ),
        (Some(3), "DETRACTOR", 1)
    );
    let loyalty = view.loyalty.unwrap();
    assert_eq!(loyalty.part, available);
    assert_eq!(
        (
            loyalty.memberships[0].tier.as_str(),
            loyalty.memberships[0].balance
        ),
        ("gold", 10)
    );
    assert!(view.consent.is_some());

    // NPS 10 (a promoter, +30): 70 >= 50, out of the segment; the reward
    // is no longer eligible.
    s.answer(&survey, &c, "r2", 10, None).await;
    eventually(WAIT, || async { !s.is_member(&at_risk, &c).await }).await;
    assert!(!eligible().await);
    let err = s
        .loyalty()
        .redeem_reward(lpb::RedeemRewardRequest {
            member: member.clone(),
            reward: "programs/stars/rewards/recovery".into(),
            request_id: "redeem-2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        err.get_error_details().error_info().unwrap().reason,
        "NOT_ELIGIBLE"
    );

    // A peer down: its part is UNAVAILABLE, the call still answers.
    s.stop_service("loyalty").await;
    let view = s
        .customers()
        .get_customer_view(cpb::GetCustomerViewRequest { name: c.clone() })
        .await
        .unwrap()
        .into_inner();
    let part = view.loyalty.unwrap().part.unwrap();
    assert_eq!(
        part.state,
        cpb::ViewPartState::Unavailable as i32,
        "{part:?}"
    );
    assert_eq!(view.scores.unwrap().part, available);
    s.stop().await;
}

/// The tables of `db` with a row whose text or bytes hold `needle` (rows
/// that record the erasure itself, EraseCustomer's stored answer, aside).
/// Tables (not views, which show what tables hold) are listed from the
/// database's own catalog, not kept by hand.
async fn tables_holding(db: &sea_orm::DatabaseConnection, needle: &str) -> Vec<String> {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    let backend = db.get_database_backend();
    let columns_sql = match backend {
        DbBackend::Postgres => {
            "SELECT table_name::text AS t, column_name::text AS c, data_type::text AS ty \
             FROM information_schema.columns WHERE table_schema = current_schema() \
             AND table_name IN (SELECT table_name FROM information_schema.tables \
               WHERE table_schema = current_schema() AND table_type = 'BASE TABLE') \
             ORDER BY table_name, ordinal_position"
        }
        _ => {
            "SELECT m.name AS t, p.name AS c, p.type AS ty FROM sqlite_master m, \
             pragma_table_info(m.name) p WHERE m.type = 'table' ORDER BY m.name, p.cid"
        }
    };
    let rows = db
        .query_all_raw(Statement::from_string(backend, columns_sql))
        .await
        .unwrap();
    let mut by_table: std::collections::BTreeMap<String, Vec<(String, String)>> =
        Default::default();
    for r in rows {
        let t: String = r.try_get("", "t").unwrap();
        by_table
            .entry(t)
            .or_default()
            .push((r.try_get("", "c").unwrap(), r.try_get("", "ty").unwrap()));
    }
    let mut found = Vec::new();
    for (table, cols) in by_table {
        let tests: Vec<String> = cols
            .iter()
            .map(|(c, ty)| match backend {
                DbBackend::Postgres if ty == "bytea" => {
                    format!("position(convert_to($1, 'UTF8') in \"{c}\") > 0")
                }
                DbBackend::Postgres => format!("strpos(\"{c}\"::text, $1) > 0"),
                _ => format!("instr(CAST(\"{c}\" AS BLOB), CAST(?1 AS BLOB)) > 0"),
            })
            .collect();
        let erasure_answer = if table == "idempotency_keys" {
            " AND scope <> 'EraseCustomer'"
        } else {
            ""
        };
        let sql = format!(
            "SELECT COUNT(*) AS n FROM \"{table}\" WHERE ({}){erasure_answer}",
            tests.join(" OR ")
        );
        let n: i64 = db
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                sql,
                [needle.into()],
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get("", "n")
            .unwrap();
        if n > 0 {
            found.push(table);
        }
    }
    found
}

#[tokio::test]
async fn journey_3_erasure_leaves_nothing_but_receipts_and_hashes() {
    let s = Suite::start().await;
    engagement_model(&s).await;
    stars_program(&s, 100).await;
    let seg = s.segment("buyers", "count(purchase, 30d) >= 1").await;
    let email = "forget.me@journey.io";
    let c = s.customer(email).await;
    let id = c.trim_start_matches("customers/").to_owned();
    let comment = "call me on +4930123456, Forgetful Fred";
    s.purchase(&c, "order-1", 4200).await;
    let survey = s.nps_survey("nps").await;
    s.answer(&survey, &c, "r1", 9, Some(comment)).await;
    // Every service holds something of them.
    eventually(WAIT, || async {
        let score = s.score(&c, "journey", "engagement").await;
        let member = s.is_member(&seg, &c).await;
        let balance = s.member("stars", &c).await.map(|m| m.balance);
        score == 80.0 && member && balance == Some(42)
    })
    .await;

    let request = s
        .customers()
        .erase_customer(cpb::EraseCustomerRequest {
            name: c.clone(),
            request_id: "erase-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let done = eventually(WAIT, || {
        let mut customers = s.customers();
        let name = request.name.clone();
        async move {
            let r = customers
                .get_erasure_request(cpb::GetErasureRequestRequest { name })
                .await
                .unwrap()
                .into_inner();
            (r.state == cpb::ErasureState::Completed as i32).then_some(r)
        }
    })
    .await;
    let mut receipts: Vec<&str> = done.receipts.iter().map(|r| r.service.as_str()).collect();
    receipts.sort_unstable();
    assert_eq!(
        receipts,
        ["customer", "feedback", "loyalty", "scoring", "segmentation"]
    );

    // No table of any service holds their personal data; their id stays
    // only where the erasure itself is recorded and in scrubbed events.
    for service in suite::SERVICES {
        let db = &sea_orm::Database::connect(&s.backend(service).database_url)
            .await
            .unwrap();
        for needle in [email, "Forgetful Fred", "+4930123456"] {
            assert_eq!(
                tables_holding(db, needle).await,
                Vec::<String>::new(),
                "{service} still holds {needle:?}"
            );
        }
        let mut holding = tables_holding(db, &id).await;
        holding.retain(|t| {
            !matches!(
                t.as_str(),
                "erasure_requests" | "erasure_receipts" | "outbox" | "audit_entries"
            )
        });
        assert_eq!(
            holding,
            Vec::<String>::new(),
            "{service} still holds the customer id"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn journey_4_merge_sums_everything_once() {
    let s = Suite::start().await;
    engagement_model(&s).await;
    stars_program(&s, 1000).await;
    let survey = s.nps_survey("nps").await;
    let rich = s.segment("rich", "loyalty.balance >= 40").await;
    let a = s.customer("anna@journey.io").await;
    let b = s.customer("anna.work@journey.io").await;
    // a: EUR 30 (30 points, +50) and NPS 10 (+30); b: EUR 12 (12 points,
    // +50), a feature use (+10) and NPS 2 (-30).
    s.purchase(&a, "a-1", 3000).await;
    s.answer(&survey, &a, "ra", 10, None).await;
    s.purchase(&b, "b-1", 1200).await;
    s.touch(&b, "b-use", cpb::TouchpointType::FeatureUse, 0)
        .await;
    s.answer(&survey, &b, "rb", 2, None).await;
    eventually(WAIT, || async {
        s.score(&a, "journey", "engagement").await == 80.0
            && s.score(&b, "journey", "engagement").await == 30.0
            && s.member("stars", &a).await.is_some_and(|m| m.balance == 30)
            && s.member("stars", &b).await.is_some_and(|m| m.balance == 12)
    })
    .await;

    s.customers()
        .merge_customers(cpb::MergeCustomersRequest {
            survivor: a.clone(),
            duplicates: vec![b.clone()],
            request_id: "merge-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Points, scores and responses of both, on the survivor, once.
    eventually(WAIT, || async {
        s.member("stars", &a).await.is_some_and(|m| m.balance == 42)
            && s.score(&a, "journey", "engagement").await == 110.0
    })
    .await;
    let m = s.member("stars", &a).await.unwrap();
    assert_eq!((m.balance, m.lifetime_earned), (42, 42));
    // Neither had 40 points; the survivor's 42 put it in the segment.
    eventually(WAIT, || async { s.is_member(&rich, &a).await }).await;
    let view = eventually(WAIT, || {
        let mut customers = s.customers();
        let a = a.clone();
        async move {
            let v = customers
                .get_customer_view(cpb::GetCustomerViewRequest { name: a })
                .await
                .unwrap()
                .into_inner();
            let f = v.feedback.clone()?;
            (f.completed_responses == 2).then_some(v)
        }
    })
    .await;
    let loyalty = view.loyalty.unwrap();
    assert_eq!(loyalty.memberships.len(), 1, "one membership, not two");
    assert_eq!(loyalty.memberships[0].balance, 42);
    // The merged id reads as the survivor.
    let merged = s
        .customers()
        .get_customer(cpb::GetCustomerRequest { name: b.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(merged.name, a);
    // Settled: a later look sees the same totals (nothing applied twice).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.member("stars", &a).await.unwrap().balance, 42);
    assert_eq!(s.score(&a, "journey", "engagement").await, 110.0);
    s.stop().await;
}

#[tokio::test]
async fn a_segment_may_name_any_score_a_scoring_model_defines() {
    let s = Suite::start().await;
    let model = |score: &str| spb::CreateScoringModelRequest {
        scoring_model: Some(spb::ScoringModel {
            display_name: score.into(),
            scores: vec![spb::ScoreDefinition {
                name: score.into(),
                ..Default::default()
            }],
            rules: vec![spb::ScoringRule {
                id: "uses".into(),
                score: score.into(),
                points: 1,
                trigger: Some(spb::scoring_rule::Trigger::Touchpoint("feature_use".into())),
                ..Default::default()
            }],
            ..Default::default()
        }),
        scoring_model_id: score.into(),
        request_id: format!("model-{score}"),
    };
    s.scoring()
        .create_scoring_model(model("karma"))
        .await
        .unwrap();
    // No customer has a karma score yet: the model defines it.
    s.segment("karmic", "score.karma >= 10").await;
    let err = s
        .segments()
        .create_segment(clm_proto::segmentation::CreateSegmentRequest {
            segment: Some(clm_proto::segmentation::Segment {
                display_name: "nope".into(),
                rule_text: "score.nope >= 1".into(),
                ..Default::default()
            }),
            request_id: "segment-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("unknown score score.nope"),
        "{err:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn an_erasure_a_service_does_not_answer_is_overdue_until_it_does() {
    let mut s = Suite::start_with(|service, c| {
        if service == "customer" {
            c.customer.erasure_overdue_secs = 1;
        }
    })
    .await;
    let c = s.customer("late@journey.io").await;
    s.stop_service("loyalty").await;
    let request = s
        .customers()
        .erase_customer(cpb::EraseCustomerRequest {
            name: c.clone(),
            request_id: "erase-late".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let customers = s.customers();
    let get = || {
        let mut customers = customers.clone();
        let name = request.name.clone();
        async move {
            customers
                .get_erasure_request(cpb::GetErasureRequestRequest { name })
                .await
                .unwrap()
                .into_inner()
        }
    };
    // The four running services answer; loyalty's receipt is missing past
    // the second allowed: OVERDUE, naming it.
    let overdue = eventually(WAIT, || async {
        let r = get().await;
        (r.state == cpb::ErasureState::Overdue as i32 && r.receipts.len() == 4).then_some(r)
    })
    .await;
    assert_eq!(overdue.overdue_services, ["loyalty"]);
    assert_eq!(overdue.receipts.len(), 4, "{overdue:?}");
    // Back up, loyalty erases and sends its receipt: COMPLETED.
    s.start_service("loyalty").await;
    eventually(WAIT, || async {
        get().await.state == cpb::ErasureState::Completed as i32
    })
    .await;
    s.stop().await;
}

/// Journey 7: decay alone moves a customer into a segment. A model awards
/// 40 engagement for an export, halving every 30 days; with no new event
/// the score falls below 20 about 30 days later, and the customer enters
/// the `score.engagement < 20` segment (and leaves `score.engagement >= 20`)
/// at the exact microsecond GetScore first answers below 20, driven by the
/// service clock the test holds.
#[tokio::test]
async fn journey_7_a_decaying_score_enters_a_segment_at_the_exact_crossing() {
    use chrono::{DateTime, TimeDelta, Utc};
    let t0: DateTime<Utc> = "2026-11-24T10:00:00Z".parse().unwrap();
    let clock = clm_domain::ManualClock::new(t0);
    let s = Suite::start_with_clock(std::sync::Arc::new(clock.clone())).await;
    let half_life = TimeDelta::days(30);
    s.scoring()
        .create_scoring_model(spb::CreateScoringModelRequest {
            scoring_model: Some(spb::ScoringModel {
                display_name: "fading".into(),
                rules: vec![spb::ScoringRule {
                    id: "exports".into(),
                    score: "engagement".into(),
                    points: 40,
                    trigger: Some(spb::scoring_rule::Trigger::Touchpoint(
                        r#"feature_use where feature = "export""#.into(),
                    )),
                    decay: Some(spb::Decay {
                        kind: Some(spb::decay::Kind::HalfLife(prost_types::Duration {
                            seconds: half_life.num_seconds(),
                            nanos: 0,
                        })),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scoring_model_id: "fading".into(),
            request_id: "model-fading".into(),
        })
        .await
        .unwrap();
    let lapsing = s.segment("lapsing", "score.engagement < 20").await;
    let engaged = s.segment("engaged", "score.engagement >= 20").await;
    let ada = s.customer("ada.fading@example.com").await;
    s.customers()
        .record_touchpoints(cpb::RecordTouchpointsRequest {
            touchpoints: vec![cpb::Touchpoint {
                customer: ada.clone(),
                event_id: "ada-export".into(),
                r#type: cpb::TouchpointType::FeatureUse as i32,
                feature: "export".into(),
                occurred_time: Some(clm_platform::convert::timestamp(t0)),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    // Segmentation has the score (40 at t0): engaged, not lapsing.
    eventually(WAIT, || async {
        s.is_member(&engaged, &ada).await.then_some(())
    })
    .await;
    assert!(!s.is_member(&lapsing, &ada).await);

    // The crossing: 40 × 2^(−a/h) rounds below 20 once it is below
    // 19.99995, i.e. a > h × log2(40 / 19.99995); GetScore (which reads
    // the ledger) says which microsecond exactly.
    let h = half_life.num_microseconds().unwrap() as f64;
    let solved = t0 + TimeDelta::microseconds((h * (40.0f64 / 19.99995).log2()).ceil() as i64);
    let score_at = |at: DateTime<Utc>| {
        let mut scoring = s.scoring();
        let customer = ada.clone();
        async move {
            scoring
                .get_score(spb::GetScoreRequest {
                    customer,
                    scoring_model: "scoringModels/fading".into(),
                    read_time: Some(clm_platform::convert::timestamp(at)),
                })
                .await
                .unwrap()
                .into_inner()
                .scores
                .iter()
                .find(|v| v.score == "engagement")
                .unwrap()
                .value
        }
    };
    let mut crossing = solved - TimeDelta::microseconds(3);
    while score_at(crossing).await >= 20.0 {
        crossing += TimeDelta::microseconds(1);
        assert!(
            crossing <= solved + TimeDelta::microseconds(3),
            "no crossing near {solved}"
        );
    }
    let before = crossing - TimeDelta::microseconds(1);
    assert!(score_at(before).await >= 20.0);

    // One microsecond before: nothing moves, with no event in between.
    clock.set(before);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!s.is_member(&lapsing, &ada).await);
    assert!(s.is_member(&engaged, &ada).await);
    // At the crossing: in, and out of the other, at that very instant.
    clock.set(crossing);
    eventually(WAIT, || async {
        s.is_member(&lapsing, &ada).await.then_some(())
    })
    .await;
    assert!(!s.is_member(&engaged, &ada).await);
    let members = s
        .segments()
        .list_segment_members(clm_proto::segmentation::ListSegmentMembersRequest {
            parent: lapsing.clone(),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].customer, ada);
    assert_eq!(
        members[0].enter_time,
        Some(clm_platform::convert::timestamp(crossing))
    );
    s.stop().await;
}

/// Two models define `engagement`: the plain form is ambiguous and refused
/// naming the field; `score("<model>").engagement` reads each model's own.
#[tokio::test]
async fn two_models_defining_engagement_are_named_by_model() {
    let s = Suite::start().await;
    for (id, points) in [("leads", 40), ("product", 10)] {
        s.scoring()
            .create_scoring_model(spb::CreateScoringModelRequest {
                scoring_model: Some(spb::ScoringModel {
                    display_name: id.into(),
                    rules: vec![spb::ScoringRule {
                        id: "uses".into(),
                        score: "engagement".into(),
                        points,
                        trigger: Some(spb::scoring_rule::Trigger::Touchpoint("feature_use".into())),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                scoring_model_id: id.into(),
                request_id: format!("model-{id}"),
            })
            .await
            .unwrap();
    }
    let err = s
        .segments()
        .create_segment(clm_proto::segmentation::CreateSegmentRequest {
            segment: Some(clm_proto::segmentation::Segment {
                display_name: "ambiguous".into(),
                rule_text: "score.engagement >= 30".into(),
                ..Default::default()
            }),
            request_id: "segment-ambiguous".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("ambiguous"), "{err:?}");
    let bad = err.get_details_bad_request().expect("a BadRequest");
    assert_eq!(bad.field_violations[0].field, "segment.rule_text");
    assert!(
        bad.field_violations[0]
            .description
            .contains("score.engagement is ambiguous"),
        "{bad:?}"
    );
    let leads = s
        .segment("leads-engaged", r#"score("leads").engagement >= 30"#)
        .await;
    let product = s
        .segment("product-engaged", r#"score("product").engagement >= 30"#)
        .await;
    let ada = s.customer("ada.models@example.com").await;
    s.touch(&ada, "ada-use", cpb::TouchpointType::FeatureUse, 0)
        .await;
    // Polled by hand so that a timeout says what each service holds.
    let started = std::time::Instant::now();
    while !s.is_member(&leads, &ada).await {
        if started.elapsed() > WAIT {
            let mine = s
                .segments()
                .get_customer_segments(clm_proto::segmentation::GetCustomerSegmentsRequest {
                    customer: ada.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            panic!(
                "ada is not in leads-engaged after {WAIT:?}: scores leads {} product {}, her segments {:?}",
                s.score(&ada, "leads", "engagement").await,
                s.score(&ada, "product", "engagement").await,
                mine.segments
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.score(&ada, "leads", "engagement").await, 40.0);
    assert_eq!(s.score(&ada, "product", "engagement").await, 10.0);
    assert!(!s.is_member(&product, &ada).await);
    s.stop().await;
}
