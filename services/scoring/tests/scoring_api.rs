//! The scoring service through gRPC, with the customer service beside it
//! (each on its own fresh backend: SQLite, or PostgreSQL + Redis when
//! `CLM_TEST_DATABASE_URL` is set), sharing one controlled clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Duration, Utc};
use clm_domain::ManualClock;
use clm_platform::testing::{
    Running, TestBackend, assert_bad_field, eventually, operation_done, start_with_clock,
};
use clm_proto::customer as cpb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::scoring as pb;
use clm_proto::scoring::scoring_service_client::ScoringServiceClient;
use std::sync::Arc;
use tonic::transport::Channel;
use tonic_types::StatusExt;

type Scoring = ScoringServiceClient<Channel>;
type Customers = CustomerServiceClient<Channel>;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

struct Env {
    secret: Option<String>,
    customer: Running,
    scoring: Option<Running>,
    clock: ManualClock,
    scoring_backend: TestBackend,
    customer_backend: TestBackend,
}

impl Env {
    async fn start() -> Env {
        Self::start_with(None).await
    }

    async fn start_with(secret: Option<&str>) -> Env {
        let cb = TestBackend::migrated::<clm_customer::store::Migrator>().await;
        let sb = TestBackend::migrated::<clm_scoring::store::Migrator>().await;
        let clock = ManualClock::new(t0());
        let mut cc = cb.config("customer");
        cc.change_poll_interval_ms = 50;
        cc.auth.hs256_secret = secret.map(str::to_owned);
        let customer =
            start_with_clock(&clm_customer::DESCRIPTOR, cc, Arc::new(clock.clone())).await;
        let mut env = Env {
            secret: secret.map(str::to_owned),
            customer,
            scoring: None,
            clock,
            scoring_backend: sb,
            customer_backend: cb,
        };
        env.start_scoring().await;
        env
    }

    async fn start_scoring(&mut self) {
        let mut sc = self.scoring_backend.config("scoring");
        sc.change_poll_interval_ms = 50;
        sc.peers.insert("customer".into(), self.customer.url());
        sc.auth.hs256_secret = self.secret.clone();
        self.scoring = Some(
            start_with_clock(&clm_scoring::DESCRIPTOR, sc, Arc::new(self.clock.clone())).await,
        );
    }

    async fn stop_scoring(&mut self) {
        if let Some(s) = self.scoring.take() {
            s.stop().await;
        }
    }

    fn scoring(&self) -> Scoring {
        ScoringServiceClient::new(self.scoring.as_ref().unwrap().channel())
    }

    fn customers(&self) -> Customers {
        CustomerServiceClient::new(self.customer.channel())
    }

    async fn new_customer(&self, email: &str) -> cpb::Customer {
        self.customers()
            .create_customer(cpb::CreateCustomerRequest {
                customer: Some(cpb::Customer {
                    email: email.into(),
                    display_name: email.into(),
                    demographics: Some(cpb::Demographics {
                        occupation: "engineer".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn touch(&self, customer: &str, event: &str, kind: cpb::TouchpointType, feature: &str) {
        self.customers()
            .record_touchpoints(cpb::RecordTouchpointsRequest {
                touchpoints: vec![cpb::Touchpoint {
                    customer: customer.into(),
                    event_id: event.into(),
                    r#type: kind as i32,
                    feature: feature.into(),
                    product: "app".into(),
                    occurred_time: Some(clm_platform::convert::timestamp(self.clock_now())),
                    ..Default::default()
                }],
            })
            .await
            .unwrap();
    }

    fn clock_now(&self) -> DateTime<Utc> {
        use clm_domain::Clock;
        self.clock.now()
    }

    async fn score(&self, customer: &str, model: &str, name: &str) -> f64 {
        let s = self
            .scoring()
            .get_score(pb::GetScoreRequest {
                customer: customer.into(),
                scoring_model: model.into(),
                read_time: None,
            })
            .await
            .unwrap()
            .into_inner();
        s.scores
            .iter()
            .find(|v| v.score == name)
            .map_or(f64::NAN, |v| v.value)
    }

    /// Waits (20 s at most) until score `name` of `customer` under `model`
    /// is `value`.
    async fn score_reaches(&self, customer: &str, model: &str, name: &str, value: f64) {
        eventually(std::time::Duration::from_secs(20), || async {
            (self.score(customer, model, name).await == value).then_some(())
        })
        .await;
    }

    /// Merges `duplicate` into `survivor` through the customer service.
    async fn merge(&self, survivor: &str, duplicate: &str) {
        self.customers()
            .merge_customers(cpb::MergeCustomersRequest {
                survivor: survivor.into(),
                duplicates: vec![duplicate.into()],
                policy: Default::default(),
                request_id: String::new(),
            })
            .await
            .unwrap();
    }

    async fn stages(&self, customer: &str) -> Vec<cpb::StageChange> {
        self.customers()
            .list_stage_history(cpb::ListStageHistoryRequest {
                parent: customer.into(),
                page_size: 100,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .changes
    }
}

fn micros(t: DateTime<Utc>) -> i64 {
    clm_domain::clock::micros(t).timestamp_micros()
}

/// The newest position of a service's change stream (-1 while an event
/// is not stamped with its position yet).
async fn stream_end(db: &sea_orm::DatabaseConnection) -> i64 {
    use sea_orm::ConnectionTrait;
    db.query_one_raw(sea_orm::Statement::from_string(
        db.get_database_backend(),
        "SELECT CASE WHEN COUNT(*) = COUNT(position) THEN COALESCE(MAX(position), 0) ELSE -1 END FROM outbox_events",
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get_by_index::<i64>(0)
    .unwrap()
}

/// When the timer queue looks at `customer`'s `threshold` next (µs;
/// `None`: no timer armed).
async fn timer_due(
    db: &sea_orm::DatabaseConnection,
    customer: &str,
    threshold: &str,
) -> Option<i64> {
    use sea_orm::ConnectionTrait;
    let sql = format!(
        "SELECT due_us FROM timer_queue WHERE kind = 'scoring.threshold' AND key LIKE '%|{threshold}|{customer}'"
    );
    db.query_one_raw(sea_orm::Statement::from_string(
        db.get_database_backend(),
        sql,
    ))
    .await
    .unwrap()
    .map(|row| row.try_get_by_index::<i64>(0).unwrap())
}

fn dur(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.num_seconds(),
        nanos: 0,
    }
}

fn event_rule(id: &str, query: &str, points: i64) -> pb::ScoringRule {
    pb::ScoringRule {
        id: id.into(),
        score: "engagement".into(),
        points,
        trigger: Some(pb::scoring_rule::Trigger::Touchpoint(query.into())),
        ..Default::default()
    }
}

fn model(rules: Vec<pb::ScoringRule>, thresholds: Vec<pb::Threshold>) -> pb::ScoringModel {
    pb::ScoringModel {
        display_name: "Leads".into(),
        rules,
        thresholds,
        ..Default::default()
    }
}

async fn create(s: &mut Scoring, id: &str, m: pb::ScoringModel) -> pb::ScoringModel {
    s.create_scoring_model(pb::CreateScoringModelRequest {
        scoring_model: Some(m),
        scoring_model_id: id.into(),
        request_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test]
async fn rules_caps_once_negative_fit_and_ledger() {
    let env = Env::start().await;
    let mut s = env.scoring();
    let mut capped = event_rule("visits", "product_access", 10);
    capped.cap = Some(pb::Cap {
        points: 25,
        period: pb::CapPeriod::Day as i32,
        rolling_window: None,
    });
    let mut once = event_rule("demo", r#"feature_use where feature = "demo""#, 15);
    once.once_per_customer = true;
    let complaint = event_rule("complaint", "support_contact", -5);
    let fit = pb::ScoringRule {
        id: "engineer".into(),
        score: "fit".into(),
        points: 30,
        trigger: Some(pb::scoring_rule::Trigger::ProfileCondition(
            r#"occupation = "engineer""#.into(),
        )),
        ..Default::default()
    };
    create(
        &mut s,
        "leads",
        model(vec![capped, once, complaint, fit], vec![]),
    )
    .await;
    let c = env.new_customer("a@example.com").await;
    for i in 0..4 {
        env.touch(
            &c.name,
            &format!("v{i}"),
            cpb::TouchpointType::ProductAccess,
            "",
        )
        .await;
    }
    env.touch(&c.name, "d1", cpb::TouchpointType::FeatureUse, "demo")
        .await;
    env.touch(&c.name, "d2", cpb::TouchpointType::FeatureUse, "demo")
        .await;
    env.touch(&c.name, "s1", cpb::TouchpointType::SupportContact, "")
        .await;
    // 10 + 10 + 5 (cap 25 a day) + 15 (demo once) − 5 (complaint) = 35.
    env.score_reaches(&c.name, "scoringModels/leads", "engagement", 35.0)
        .await;
    assert_eq!(env.score(&c.name, "scoringModels/leads", "fit").await, 30.0);
    // The ledger explains it, entry by entry.
    let ledger = s
        .list_score_ledger(pb::ListScoreLedgerRequest {
            customer: c.name.clone(),
            scoring_model: "scoringModels/leads".into(),
            page_size: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ledger.entries.len(), 3);
    let rest = s
        .list_score_ledger(pb::ListScoreLedgerRequest {
            customer: c.name.clone(),
            scoring_model: "scoringModels/leads".into(),
            page_size: 100,
            page_token: ledger.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let all: Vec<pb::LedgerEntry> = ledger.entries.into_iter().chain(rest.entries).collect();
    let engagement: f64 = all
        .iter()
        .filter(|e| e.score == "engagement")
        .map(|e| e.current_value)
        .sum();
    assert_eq!(engagement, 35.0);
    assert_eq!(all.iter().filter(|e| e.rule == "demo").count(), 1);
    assert_eq!(
        all.iter()
            .filter(|e| e.rule == "visits")
            .map(|e| e.points)
            .collect::<Vec<_>>(),
        vec![10, 10, 5]
    );
    // A manual adjustment, idempotent by request id.
    for _ in 0..2 {
        let e = s
            .adjust_score(pb::AdjustScoreRequest {
                customer: c.name.clone(),
                scoring_model: "scoringModels/leads".into(),
                score: "engagement".into(),
                points: 7,
                reason: "met at a fair".into(),
                request_id: "adj-1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(e.rule, "manual");
    }
    assert_eq!(
        env.score(&c.name, "scoringModels/leads", "engagement")
            .await,
        42.0
    );
    let top = s
        .list_top_customers(pb::ListTopCustomersRequest {
            scoring_model: "scoringModels/leads".into(),
            score: "engagement".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(top.customers[0].customer, c.name);
}

#[tokio::test]
async fn thresholds_fire_on_award_and_on_decay_at_the_exact_instant_across_a_restart() {
    let mut env = Env::start().await;
    let mut s = env.scoring();
    let mut r = event_rule("use", "feature_use", 40);
    r.decay = Some(pb::Decay {
        kind: Some(pb::decay::Kind::HalfLife(dur(Duration::days(1)))),
    });
    let up = pb::Threshold {
        id: "engaged".into(),
        score: "engagement".into(),
        value: 30.0,
        direction: pb::ThresholdDirection::AtOrAbove as i32,
        to_stage: cpb::Stage::Acquisition as i32,
        while_in_stage: 0,
    };
    let down = pb::Threshold {
        id: "cooled".into(),
        score: "engagement".into(),
        value: 20.0,
        direction: pb::ThresholdDirection::Below as i32,
        to_stage: cpb::Stage::Approach as i32,
        while_in_stage: cpb::Stage::Acquisition as i32,
    };
    create(&mut s, "leads", model(vec![r], vec![up, down])).await;
    let c = env.new_customer("b@example.com").await;
    let award_time = env.clock_now();
    env.touch(&c.name, "u1", cpb::TouchpointType::FeatureUse, "x")
        .await;
    let moved = eventually(std::time::Duration::from_secs(20), || async {
        env.stages(&c.name)
            .await
            .into_iter()
            .find(|h| h.to_stage == cpb::Stage::Acquisition as i32)
    })
    .await;
    assert_eq!(moved.reason, "score threshold: engaged");
    // 40 × 2^(−a/1d) is 20 at one day (not below: no move yet) and falls
    // below 20.0000 (4 decimal places) a fraction of a second later.
    // Once scoring has followed the customer stream to its end (it knows
    // the stage moved) and its queue has set the "cooled" timer's next look
    // at the crossing, after one day, nothing is due at one day exactly: no
    // move can come (no need to wait and see).
    let half = award_time + Duration::days(1);
    let db = sea_orm::Database::connect(&env.scoring_backend.database_url)
        .await
        .unwrap();
    let customer_db = sea_orm::Database::connect(&env.customer_backend.database_url)
        .await
        .unwrap();
    eventually(std::time::Duration::from_secs(20), || async {
        let end = stream_end(&customer_db).await;
        clm_platform::changes::load_cursor(&db, "customer")
            .await
            .unwrap()
            == end
            && timer_due(&db, &c.name, "cooled").await > Some(micros(half))
    })
    .await;
    env.clock.set(half);
    let early = env.stages(&c.name).await;
    assert!(
        early
            .iter()
            .all(|h| h.to_stage != cpb::Stage::Approach as i32 || h.from_stage == 0),
        "{early:?}"
    );
    // Scoring is down while the crossing passes; the timer survives the restart.
    env.stop_scoring().await;
    env.clock.set(half + Duration::hours(1));
    env.start_scoring().await;
    let back = eventually(std::time::Duration::from_secs(20), || async {
        env.stages(&c.name).await.into_iter().find(|h| {
            h.to_stage == cpb::Stage::Approach as i32
                && h.from_stage == cpb::Stage::Acquisition as i32
        })
    })
    .await;
    assert_eq!(back.reason, "score threshold: cooled");
    // Exactly once, and the crossing instant is the first microsecond below.
    // Once the queue recorded the move, the timer is no longer due: no
    // round can fire it again.
    let now = micros(env.clock_now());
    eventually(std::time::Duration::from_secs(20), || async {
        timer_due(&db, &c.name, "cooled")
            .await
            .is_none_or(|due| due > now)
    })
    .await;
    let moves = env.stages(&c.name).await;
    assert_eq!(
        moves
            .iter()
            .filter(|h| h.reason == "score threshold: cooled")
            .count(),
        1
    );
    let mut changes =
        clm_proto::common::change_stream_service_client::ChangeStreamServiceClient::new(
            env.scoring.as_ref().unwrap().channel(),
        );
    let mut stream = changes
        .watch_changes(clm_proto::common::WatchChangesRequest {
            after_sequence: 0,
            event_types: vec!["clm.scoring.v1.ThresholdCrossed".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let crossing = loop {
        let e = stream.message().await.unwrap().unwrap().event.unwrap();
        let t =
            <pb::ThresholdCrossed as prost::Message>::decode(e.payload.unwrap().value.as_slice())
                .unwrap();
        if t.threshold == "cooled" {
            break clm_platform::convert::from_timestamp("", &t.cross_time.unwrap()).unwrap();
        }
    };
    assert!(
        crossing > half && crossing < half + Duration::seconds(1),
        "{crossing}"
    );
    let at = |t: DateTime<Utc>| {
        let mut s = env.scoring();
        let c = c.name.clone();
        async move {
            s.get_score(pb::GetScoreRequest {
                customer: c,
                scoring_model: "scoringModels/leads".into(),
                read_time: Some(clm_platform::convert::timestamp(t)),
            })
            .await
            .unwrap()
            .into_inner()
            .scores
            .into_iter()
            .find(|v| v.score == "engagement")
            .unwrap()
            .value
        }
    };
    assert!(at(crossing - Duration::microseconds(1)).await >= 20.0);
    assert!(at(crossing).await < 20.0);
}

#[tokio::test]
async fn rescore_after_a_rule_change_and_erasure_receipt() {
    let env = Env::start().await;
    let mut s = env.scoring();
    create(
        &mut s,
        "leads",
        model(vec![event_rule("use", "feature_use", 5)], vec![]),
    )
    .await;
    let c = env.new_customer("c@example.com").await;
    env.touch(&c.name, "u1", cpb::TouchpointType::FeatureUse, "x")
        .await;
    env.touch(&c.name, "u2", cpb::TouchpointType::FeatureUse, "x")
        .await;
    env.score_reaches(&c.name, "scoringModels/leads", "engagement", 10.0)
        .await;
    // A manual adjustment survives the re-scoring (and its running sum).
    s.adjust_score(pb::AdjustScoreRequest {
        customer: c.name.clone(),
        scoring_model: "scoringModels/leads".into(),
        score: "engagement".into(),
        points: 3,
        reason: "call".into(),
        request_id: "adj-r".into(),
    })
    .await
    .unwrap();
    let current = s
        .get_scoring_model(pb::GetScoringModelRequest {
            name: "scoringModels/leads".into(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut next = model(
        vec![
            event_rule("use", "feature_use", 8),
            event_rule("buy", "purchase", 50),
        ],
        vec![],
    );
    next.scores = vec![pb::ScoreDefinition {
        name: "intent".into(),
        ..Default::default()
    }];
    next.name = "scoringModels/leads".into();
    next.etag = current.etag.clone();
    let updated = s
        .update_scoring_model(pb::UpdateScoringModelRequest {
            scoring_model: Some(next),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let diff = updated.rule_diff.unwrap();
    assert_eq!(diff.added, vec!["buy".to_string()]);
    assert_eq!(diff.changed, vec!["use".to_string()]);
    // v1 is still the active one (and GetScore now remembers it).
    assert!(
        env.score(&c.name, "scoringModels/leads", "intent")
            .await
            .is_nan()
    );
    s.activate_model_version(pb::ActivateModelVersionRequest {
        name: "scoringModels/leads".into(),
        version: 2,
        request_id: String::new(),
    })
    .await
    .unwrap();
    // GetScore remembered v1 as active; the activation drops that at once.
    assert_eq!(
        env.score(&c.name, "scoringModels/leads", "intent").await,
        0.0
    );
    let op = s
        .rescore_customers(pb::RescoreCustomersRequest {
            scoring_model: "scoringModels/leads".into(),
            model_version: 0,
            request_id: "rescore-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let done = operation_done(env.scoring.as_ref().unwrap().channel(), &op.name).await;
    let Some(clm_proto::google::longrunning::operation::Result::Response(any)) = done.result else {
        panic!("rescore failed: {:?}", done.result)
    };
    let resp =
        <pb::RescoreCustomersResponse as prost::Message>::decode(any.value.as_slice()).unwrap();
    assert_eq!(resp.customers, 1);
    assert_eq!(resp.ledger_entries, 2);
    assert_eq!(
        env.score(&c.name, "scoringModels/leads", "engagement")
            .await,
        19.0
    );
    let db = sea_orm::Database::connect(&env.scoring_backend.database_url)
        .await
        .unwrap();
    assert_sums_match_ledger(&db, "leads", std::slice::from_ref(&c.name)).await;
    let top = s
        .list_top_customers(pb::ListTopCustomersRequest {
            scoring_model: "scoringModels/leads".into(),
            score: "engagement".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ranked = &top.customers[0];
    assert_eq!(ranked.customer, c.name);
    let engagement = ranked.scores.iter().find(|v| v.score == "engagement");
    assert_eq!(engagement.map(|v| v.value), Some(19.0));
    // Erasure: the ledger goes, the receipt is on scoring's stream.
    env.customers()
        .erase_customer(cpb::EraseCustomerRequest {
            name: c.name.clone(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    env.score_reaches(&c.name, "scoringModels/leads", "engagement", 0.0)
        .await;
    let mut changes =
        clm_proto::common::change_stream_service_client::ChangeStreamServiceClient::new(
            env.scoring.as_ref().unwrap().channel(),
        );
    let mut stream = changes
        .watch_changes(clm_proto::common::WatchChangesRequest {
            after_sequence: 0,
            event_types: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let first = loop {
        let e = stream.message().await.unwrap().unwrap().event.unwrap();
        if e.event_type == "clm.common.v1.CustomerDataErased" {
            break e;
        }
    };
    let receipt = <clm_proto::common::CustomerDataErased as prost::Message>::decode(
        first.payload.unwrap().value.as_slice(),
    )
    .unwrap();
    assert_eq!(receipt.customer, c.name);
    assert_eq!(receipt.service, "scoring");
    assert!(
        clm_scoring::store::sums::load(&db, "leads", std::slice::from_ref(&c.name))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn bad_models_name_the_rule_and_field() {
    let env = Env::start().await;
    let mut s = env.scoring();
    let bad = |m: pb::ScoringModel| {
        let mut s = s.clone();
        async move {
            s.create_scoring_model(pb::CreateScoringModelRequest {
                scoring_model: Some(m),
                scoring_model_id: "bad".into(),
                request_id: String::new(),
            })
            .await
            .unwrap_err()
        }
    };
    assert_bad_field(&bad(model(vec![], vec![])).await, "scoring_model.rules");
    assert_bad_field(
        &bad(model(vec![event_rule("x", "teleport", 1)], vec![])).await,
        "scoring_model.rules[0].touchpoint",
    );
    let mut unknown_score = event_rule("x", "purchase", 1);
    unknown_score.score = "nope".into();
    assert_bad_field(
        &bad(model(vec![unknown_score], vec![])).await,
        "scoring_model.rules[0].score",
    );
    let mut neg_cap = event_rule("x", "purchase", 1);
    neg_cap.cap = Some(pb::Cap {
        points: -1,
        period: pb::CapPeriod::Day as i32,
        rolling_window: None,
    });
    assert_bad_field(
        &bad(model(vec![neg_cap], vec![])).await,
        "scoring_model.rules[0].cap.points",
    );
    let mut zero = event_rule("x", "purchase", 1);
    zero.decay = Some(pb::Decay {
        kind: Some(pb::decay::Kind::HalfLife(dur(Duration::zero()))),
    });
    assert_bad_field(
        &bad(model(vec![zero], vec![])).await,
        "scoring_model.rules[0].decay.half_life",
    );
    let th = pb::Threshold {
        id: "t".into(),
        score: "engagement".into(),
        value: 1.0,
        direction: pb::ThresholdDirection::AtOrAbove as i32,
        to_stage: 42,
        while_in_stage: 0,
    };
    assert_bad_field(
        &bad(model(vec![event_rule("x", "purchase", 1)], vec![th])).await,
        "scoring_model.thresholds[0].to_stage",
    );
    let err = bad(model(
        vec![event_rule("x", "purchase where revenue > 5", 1)],
        vec![],
    ))
    .await;
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let field = err
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations[0]
        .field
        .clone();
    assert!(
        field.starts_with("scoring_model.rules[0].touchpoint"),
        "{field}"
    );
    // Unknown model, bad names.
    let e = s
        .get_scoring_model(pb::GetScoringModelRequest {
            name: "scoringModels/none".into(),
            version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = s
        .get_score(pb::GetScoreRequest {
            customer: "people/1".into(),
            scoring_model: "scoringModels/x".into(),
            read_time: None,
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "customer");
    let e = s
        .adjust_score(pb::AdjustScoreRequest {
            customer: clm_domain::ids::CustomerId::new().name(),
            scoring_model: "scoringModels/none".into(),
            score: "engagement".into(),
            points: 1,
            reason: "x".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn merge_moves_the_ledger_to_the_survivor() {
    let env = Env::start().await;
    let mut s = env.scoring();
    create(
        &mut s,
        "leads",
        model(vec![event_rule("use", "feature_use", 5)], vec![]),
    )
    .await;
    let a = env.new_customer("m1@example.com").await;
    let b = env.new_customer("m2@example.com").await;
    env.touch(&a.name, "a1", cpb::TouchpointType::FeatureUse, "x")
        .await;
    env.touch(&b.name, "b1", cpb::TouchpointType::FeatureUse, "x")
        .await;
    env.touch(&b.name, "b2", cpb::TouchpointType::FeatureUse, "x")
        .await;
    env.score_reaches(&b.name, "scoringModels/leads", "engagement", 10.0)
        .await;
    env.merge(&a.name, &b.name).await;
    env.score_reaches(&a.name, "scoringModels/leads", "engagement", 15.0)
        .await;
    assert_eq!(
        env.score(&b.name, "scoringModels/leads", "engagement")
            .await,
        0.0
    );
}

#[tokio::test]
async fn with_auth_roles_are_enforced_and_the_service_token_moves_stages() {
    use clm_platform::auth::{Role, mint_hs256};
    use tonic::service::interceptor::InterceptedService;
    const SECRET: &str = "scoring-test-secret-of-enough-length-0123456789";
    let env = Env::start_with(Some(SECRET)).await;
    let bearer = |subject: &str, role: Role| {
        let token = mint_hs256(
            SECRET,
            subject,
            &[role],
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
        let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", value.clone());
            Ok(r)
        }
    };
    let mut analyst = ScoringServiceClient::new(InterceptedService::new(
        env.scoring.as_ref().unwrap().channel(),
        bearer("ann", Role::Analyst),
    ));
    let m = model(
        vec![event_rule("use", "feature_use", 40)],
        vec![pb::Threshold {
            id: "engaged".into(),
            score: "engagement".into(),
            value: 30.0,
            direction: pb::ThresholdDirection::AtOrAbove as i32,
            to_stage: cpb::Stage::Acquisition as i32,
            while_in_stage: 0,
        }],
    );
    let denied = analyst
        .create_scoring_model(pb::CreateScoringModelRequest {
            scoring_model: Some(m.clone()),
            scoring_model_id: "leads".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let mut marketer = ScoringServiceClient::new(InterceptedService::new(
        env.scoring.as_ref().unwrap().channel(),
        bearer("mia", Role::Marketer),
    ));
    marketer
        .create_scoring_model(pb::CreateScoringModelRequest {
            scoring_model: Some(m),
            scoring_model_id: "leads".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let mut customers = CustomerServiceClient::new(InterceptedService::new(
        env.customer.channel(),
        bearer("mia", Role::Marketer),
    ));
    let c = customers
        .create_customer(cpb::CreateCustomerRequest {
            customer: Some(cpb::Customer {
                email: "auth@example.com".into(),
                display_name: "A".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    customers
        .record_touchpoints(cpb::RecordTouchpointsRequest {
            touchpoints: vec![cpb::Touchpoint {
                customer: c.name.clone(),
                event_id: "auth-1".into(),
                r#type: cpb::TouchpointType::FeatureUse as i32,
                feature: "export".into(),
                occurred_time: Some(clm_platform::convert::timestamp(t0())),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    // Scoring follows the stream and moves the stage with its service token.
    let moved = eventually(std::time::Duration::from_secs(20), || {
        let mut customers = customers.clone();
        let name = c.name.clone();
        async move {
            customers
                .list_stage_history(cpb::ListStageHistoryRequest {
                    parent: name,
                    page_size: 10,
                    page_token: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .changes
                .into_iter()
                .find(|h| h.to_stage == cpb::Stage::Acquisition as i32)
        }
    })
    .await;
    assert_eq!(moved.actor, "service:scoring");
    // A manual adjustment records who made it.
    let e = marketer
        .adjust_score(pb::AdjustScoreRequest {
            customer: c.name.clone(),
            scoring_model: "scoringModels/leads".into(),
            score: "engagement".into(),
            points: -3,
            reason: "duplicate lead".into(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.actor, "mia");
    let denied = analyst
        .adjust_score(pb::AdjustScoreRequest {
            customer: c.name.clone(),
            scoring_model: "scoringModels/leads".into(),
            score: "engagement".into(),
            points: 1,
            reason: "x".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn inactivity_linear_decay_floor_and_custom_scores_read_at_any_time() {
    let env = Env::start().await;
    let mut s = env.scoring();
    let mut m = model(
        vec![
            event_rule("use", "feature_use", 25),
            pb::ScoringRule {
                id: "buy".into(),
                score: "product_a".into(),
                points: 30,
                trigger: Some(pb::scoring_rule::Trigger::Touchpoint("purchase".into())),
                decay: Some(pb::Decay {
                    kind: Some(pb::decay::Kind::LinearOver(dur(Duration::days(30)))),
                }),
                ..Default::default()
            },
        ],
        vec![],
    );
    m.scores = vec![
        pb::ScoreDefinition {
            name: "engagement".into(),
            floor: Some(0),
            ceiling: None,
            inactivity: Some(pb::InactivityDecay {
                points: -10,
                every: Some(dur(Duration::days(14))),
            }),
        },
        pb::ScoreDefinition {
            name: "product_a".into(),
            ..Default::default()
        },
    ];
    create(&mut s, "leads", m).await;
    let c = env.new_customer("i@example.com").await;
    env.touch(&c.name, "f1", cpb::TouchpointType::FeatureUse, "x")
        .await;
    env.customers()
        .record_touchpoints(cpb::RecordTouchpointsRequest {
            touchpoints: vec![cpb::Touchpoint {
                customer: c.name.clone(),
                event_id: "p1".into(),
                r#type: cpb::TouchpointType::Purchase as i32,
                product: "a".into(),
                revenue: Some(clm_proto::common::Money {
                    currency_code: "EUR".into(),
                    amount_minor: 1000,
                }),
                occurred_time: Some(clm_platform::convert::timestamp(t0())),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    eventually(std::time::Duration::from_secs(20), || async {
        (env.score(&c.name, "scoringModels/leads", "product_a").await == 30.0).then_some(())
    })
    .await;
    let at = |days: i64, score: &'static str| {
        let mut s = env.scoring();
        let c = c.name.clone();
        async move {
            s.get_score(pb::GetScoreRequest {
                customer: c,
                scoring_model: "scoringModels/leads".into(),
                read_time: Some(clm_platform::convert::timestamp(
                    t0() + Duration::days(days),
                )),
            })
            .await
            .unwrap()
            .into_inner()
            .scores
            .into_iter()
            .find(|v| v.score == score)
            .unwrap()
            .value
        }
    };
    // Inactivity: −10 for each whole 14 idle days since the newest touchpoint, floor 0.
    assert_eq!(at(13, "engagement").await, 25.0);
    assert_eq!(at(14, "engagement").await, 15.0);
    assert_eq!(at(28, "engagement").await, 5.0);
    assert_eq!(at(42, "engagement").await, 0.0);
    // Linear: 30 × (1 − a/30d).
    assert_eq!(at(15, "product_a").await, 15.0);
    assert_eq!(at(30, "product_a").await, 0.0);
    // Before the award nothing counts.
    assert_eq!(at(-1, "product_a").await, 0.0);
}

/// The stored running sums against the sums of the ledger recomputed from
/// scratch: the same entries and newest award per (customer, model, score,
/// decay), and the same value a day after the newest award.
async fn assert_sums_match_ledger(db: &sea_orm::DatabaseConnection, model: &str, custs: &[String]) {
    use clm_scoring::store::{ledger, sums};
    let stored = sums::load(db, model, custs).await.unwrap();
    let ledger = ledger::of_customers_all_models(db, custs).await.unwrap();
    let fresh = sums::of_rows(&ledger);
    let key = |r: &sums::SumRow| {
        (
            r.customer.clone(),
            r.score.clone(),
            r.decay_kind,
            r.decay_us,
        )
    };
    let mut stored_keys: Vec<_> = stored.iter().map(key).collect();
    stored_keys.sort();
    let mut fresh_keys: Vec<_> = fresh.iter().map(key).collect();
    fresh_keys.sort();
    assert_eq!(stored_keys, fresh_keys);
    for f in &fresh {
        let s = stored.iter().find(|s| key(s) == key(f)).unwrap();
        assert_eq!((s.entries, s.newest_us), (f.entries, f.newest_us), "{f:?}");
        let t = f.newest_us + 86_400_000_000;
        let (a, b) = (s.sum().value_at(t), f.sum().value_at(t));
        match (a, b) {
            (Some(a), Some(b)) => assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{s:?} {f:?}"),
            _ => assert_eq!(s.total, f.total, "{s:?} {f:?}"),
        }
    }
}

#[tokio::test]
async fn score_changes_agree_with_get_score_and_running_sums_with_the_ledger() {
    let env = Env::start().await;
    let mut s = env.scoring();
    let mut use_rule = event_rule("use", "feature_use", 5);
    use_rule.decay = Some(pb::Decay {
        kind: Some(pb::decay::Kind::HalfLife(dur(Duration::days(10)))),
    });
    let mut buy = event_rule("buy", "purchase", 30);
    buy.decay = Some(pb::Decay {
        kind: Some(pb::decay::Kind::LinearOver(dur(Duration::days(30)))),
    });
    let mut visit = event_rule("visit", "product_access", 2);
    visit.cap = Some(pb::Cap {
        points: 4,
        period: pb::CapPeriod::Day as i32,
        rolling_window: None,
    });
    let mut demo = event_rule("demo", r#"feature_use where feature = "demo""#, 9);
    demo.once_per_customer = true;
    create(
        &mut s,
        "mixed",
        model(vec![use_rule, buy, visit, demo], vec![]),
    )
    .await;
    let a = env.new_customer("sa@example.com").await;
    let b = env.new_customer("sb@example.com").await;
    let record = |customer: &str,
                  event: String,
                  kind: cpb::TouchpointType,
                  feature: &str,
                  at: DateTime<Utc>| {
        let mut c = env.customers();
        let customer = customer.to_owned();
        let feature = feature.to_owned();
        async move {
            c.record_touchpoints(cpb::RecordTouchpointsRequest {
                touchpoints: vec![cpb::Touchpoint {
                    customer,
                    event_id: event,
                    r#type: kind as i32,
                    feature,
                    product: "app".into(),
                    revenue: (kind == cpb::TouchpointType::Purchase).then(|| {
                        clm_proto::common::Money {
                            currency_code: "EUR".into(),
                            amount_minor: 500,
                        }
                    }),
                    occurred_time: Some(clm_platform::convert::timestamp(at)),
                    ..Default::default()
                }],
            })
            .await
            .unwrap();
        }
    };
    let db = sea_orm::Database::connect(&env.scoring_backend.database_url)
        .await
        .unwrap();
    let seen = || {
        let db = db.clone();
        async move {
            use sea_orm::ConnectionTrait;
            db.query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT COUNT(*) FROM score_touchpoints".to_owned(),
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get_by_index::<i64>(0)
            .unwrap()
        }
    };
    let scores_at = |customer: String, at: DateTime<Utc>| {
        let mut s = env.scoring();
        async move {
            let got = s
                .get_score(pb::GetScoreRequest {
                    customer,
                    scoring_model: "scoringModels/mixed".into(),
                    read_time: Some(clm_platform::convert::timestamp(at)),
                })
                .await
                .unwrap()
                .into_inner();
            (
                got.scores
                    .into_iter()
                    .map(|v| (v.score, v.value))
                    .collect::<std::collections::BTreeMap<_, _>>(),
                got.grade,
            )
        }
    };
    let mut changes =
        clm_proto::common::change_stream_service_client::ChangeStreamServiceClient::new(
            env.scoring.as_ref().unwrap().channel(),
        );
    let mut stream = changes
        .watch_changes(clm_proto::common::WatchChangesRequest {
            after_sequence: 0,
            event_types: vec!["clm.scoring.v1.ScoreChanged".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let mut sent = 0;
    let mut checked = 0;
    for day in 0..6i64 {
        let now = t0() + Duration::days(day) + Duration::hours(day * 3);
        env.clock.set(now);
        let before_a = scores_at(a.name.clone(), now).await;
        let before_b = scores_at(b.name.clone(), now).await;
        for (who, c) in [("a", &a), ("b", &b)] {
            record(
                &c.name,
                format!("{who}u{day}"),
                cpb::TouchpointType::FeatureUse,
                "demo",
                now,
            )
            .await;
            for v in 0..3 {
                record(
                    &c.name,
                    format!("{who}v{day}-{v}"),
                    cpb::TouchpointType::ProductAccess,
                    "",
                    now,
                )
                .await;
            }
            sent += 4;
        }
        if day % 2 == 0 {
            record(
                &a.name,
                format!("p{day}"),
                cpb::TouchpointType::Purchase,
                "",
                now,
            )
            .await;
            sent += 1;
        }
        // Out of order: an event that happened three days ago arrives now.
        record(
            &a.name,
            format!("late{day}"),
            cpb::TouchpointType::FeatureUse,
            "x",
            now - Duration::days(3),
        )
        .await;
        sent += 1;
        // A replay of an event already recorded changes nothing.
        record(
            &a.name,
            format!("au{day}"),
            cpb::TouchpointType::FeatureUse,
            "demo",
            now,
        )
        .await;
        eventually(std::time::Duration::from_secs(30), || async {
            (seen().await == sent).then_some(())
        })
        .await;
        // The day's changes per (customer, score): the first one's old value
        // is the score before the day's events, the last one's new value
        // (and grade) what GetScore says now.
        let mut day_changes: std::collections::BTreeMap<(String, String), Vec<pb::ScoreChanged>> =
            Default::default();
        while let Ok(Ok(Some(m))) =
            tokio::time::timeout(std::time::Duration::from_millis(500), stream.message()).await
        {
            let e = m.event.unwrap();
            let c =
                <pb::ScoreChanged as prost::Message>::decode(e.payload.unwrap().value.as_slice())
                    .unwrap();
            assert_eq!(c.change_time, Some(clm_platform::convert::timestamp(now)));
            day_changes
                .entry((c.customer.clone(), c.score.clone()))
                .or_default()
                .push(c);
        }
        assert!(!day_changes.is_empty(), "day {day}: no score changes");
        for ((customer, score), list) in day_changes {
            let before = if customer == a.name {
                &before_a
            } else {
                &before_b
            };
            let (after, grade) = scores_at(customer.clone(), now).await;
            let (first, last) = (&list[0], &list[list.len() - 1]);
            assert_eq!(first.old_value, before.0[&score], "day {day} {first:?}");
            assert_eq!(last.new_value, after[&score], "day {day} {last:?}");
            assert_eq!(last.grade, grade, "day {day} {last:?}");
            checked += list.len();
        }
    }
    assert!(checked >= 12, "only {checked} score changes");
    // Dated minutes ahead of the clock (the most the customer service
    // takes): it counts from then on, not now, so nothing changes now.
    record(
        &a.name,
        "ahead".into(),
        cpb::TouchpointType::FeatureUse,
        "x",
        env.clock_now() + Duration::minutes(4),
    )
    .await;
    sent += 1;
    eventually(std::time::Duration::from_secs(30), || async {
        (seen().await == sent).then_some(())
    })
    .await;
    let custs = vec![a.name.clone(), b.name.clone()];
    assert_sums_match_ledger(&db, "mixed", &custs).await;
    // The ranking (from the sums) says what GetScore says, highest first.
    let top = s
        .list_top_customers(pb::ListTopCustomersRequest {
            scoring_model: "scoringModels/mixed".into(),
            score: "engagement".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let next = s
        .list_top_customers(pb::ListTopCustomersRequest {
            scoring_model: "scoringModels/mixed".into(),
            score: "engagement".into(),
            page_size: 1,
            page_token: top.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ranked: Vec<&pb::CustomerScores> = top.customers.iter().chain(&next.customers).collect();
    assert_eq!(ranked.len(), 2);
    let now = env.clock_now();
    for r in &ranked {
        let (want, grade) = scores_at(r.customer.clone(), now).await;
        let got: std::collections::BTreeMap<String, f64> = r
            .scores
            .iter()
            .map(|v| (v.score.clone(), v.value))
            .collect();
        assert_eq!(got, want, "{r:?}");
        assert_eq!(r.grade, grade);
    }
    let value = |r: &pb::CustomerScores| {
        r.scores
            .iter()
            .find(|v| v.score == "engagement")
            .unwrap()
            .value
    };
    assert!(value(ranked[0]) >= value(ranked[1]));
    // A merge rebuilds the survivor's sums and drops the duplicate's.
    env.merge(&a.name, &b.name).await;
    env.score_reaches(&b.name, "scoringModels/mixed", "engagement", 0.0)
        .await;
    assert_sums_match_ledger(&db, "mixed", &custs).await;
    let after: Vec<String> = clm_scoring::store::sums::load(&db, "mixed", &custs)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.customer)
        .collect();
    assert!(after.iter().all(|c| *c == a.name), "{after:?}");
}

/// `ListAuditEntries` of the scoring service, newest first.
async fn audit_entries(env: &Env) -> Vec<clm_proto::common::AuditEntry> {
    clm_proto::common::audit_service_client::AuditServiceClient::new(
        env.scoring.as_ref().unwrap().channel(),
    )
    .list_audit_entries(clm_proto::common::ListAuditEntriesRequest {
        page_size: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .audit_entries
}

fn field(s: &Option<prost_types::Struct>, name: &str) -> Option<prost_types::value::Kind> {
    s.as_ref()?.fields.get(name)?.kind.clone()
}

#[tokio::test]
async fn every_write_leaves_one_audit_entry_and_a_same_etag_race_is_aborted() {
    use prost_types::value::Kind;
    let env = Env::start().await;
    let mut s = env.scoring();
    let created = create(
        &mut s,
        "audited",
        model(vec![event_rule("use", "feature_use", 5)], vec![]),
    )
    .await;
    let c = env.new_customer("audit@example.com").await;
    let mut next = model(vec![event_rule("use", "feature_use", 7)], vec![]);
    next.name = created.name.clone();
    next.etag = created.etag.clone();
    let update = pb::UpdateScoringModelRequest {
        scoring_model: Some(next.clone()),
        request_id: "upd-1".into(),
    };
    s.update_scoring_model(update.clone()).await.unwrap();
    // A retry of the same request is answered, not recorded again.
    s.update_scoring_model(update).await.unwrap();
    s.activate_model_version(pb::ActivateModelVersionRequest {
        name: created.name.clone(),
        version: 2,
        request_id: String::new(),
    })
    .await
    .unwrap();
    eventually(std::time::Duration::from_secs(20), || async {
        let r = env
            .scoring()
            .adjust_score(pb::AdjustScoreRequest {
                customer: c.name.clone(),
                scoring_model: created.name.clone(),
                score: "engagement".into(),
                points: 4,
                reason: "call".into(),
                request_id: "adj-audit".into(),
            })
            .await;
        r.is_ok().then_some(())
    })
    .await;
    s.rescore_customers(pb::RescoreCustomersRequest {
        scoring_model: created.name.clone(),
        model_version: 0,
        request_id: String::new(),
    })
    .await
    .unwrap();

    let entries = audit_entries(&env).await;
    let rpcs: Vec<&str> = entries
        .iter()
        .map(|e| e.rpc.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(
        rpcs,
        vec![
            "RescoreCustomers",
            "AdjustScore",
            "ActivateModelVersion",
            "UpdateScoringModel",
            "CreateScoringModel"
        ]
    );
    for e in &entries {
        assert_eq!(e.actor, "local");
        assert_eq!(e.roles, vec!["admin"]);
        assert!(e.rpc.starts_with("clm.scoring.v1.ScoringService/"));
    }
    let [rescore, adjust, activate, update, create_entry] = &entries[..] else {
        unreachable!()
    };
    assert_eq!(create_entry.resource, "scoringModels/audited");
    assert!(create_entry.before.is_none());
    assert_eq!(
        field(&create_entry.after, "version"),
        Some(Kind::NumberValue(1.0))
    );
    assert_eq!(update.request_id, "upd-1");
    assert_eq!(
        field(&update.before, "version"),
        Some(Kind::NumberValue(1.0))
    );
    assert_eq!(
        field(&update.after, "version"),
        Some(Kind::NumberValue(2.0))
    );
    assert_eq!(
        field(&activate.before, "active_version"),
        Some(Kind::NumberValue(1.0))
    );
    assert_eq!(
        field(&activate.after, "active_version"),
        Some(Kind::NumberValue(2.0))
    );
    assert_eq!(
        activate.update_mask.as_ref().unwrap().paths,
        ["active_version"]
    );
    assert!(adjust.resource.starts_with(&format!("{}/ledger/", c.name)));
    assert_eq!(field(&adjust.after, "points"), Some(Kind::NumberValue(4.0)));
    assert_eq!(rescore.resource, "scoringModels/audited");

    // Two updates under one etag: one wins, the other is ABORTED (never INTERNAL).
    let current = s
        .get_scoring_model(pb::GetScoringModelRequest {
            name: created.name.clone(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let latest = s
        .get_scoring_model(pb::GetScoringModelRequest {
            name: created.name.clone(),
            version: current.version.max(2),
        })
        .await
        .unwrap()
        .into_inner();
    next.etag = latest.etag.clone();
    let race = |points| {
        let mut s = env.scoring();
        let mut m = next.clone();
        m.rules[0].points = points;
        async move {
            s.update_scoring_model(pb::UpdateScoringModelRequest {
                scoring_model: Some(m),
                request_id: String::new(),
            })
            .await
        }
    };
    let outcomes: Vec<_> = futures::future::join_all((0..4).map(|i| race(10 + i))).await;
    let won = outcomes.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{outcomes:?}");
    for e in outcomes.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
    }
    assert_eq!(audit_entries(&env).await.len(), 6);
}

#[tokio::test]
async fn an_interrupted_rescore_is_resumed_by_exactly_one_of_two_replicas() {
    use sea_orm::ConnectionTrait;
    let env = Env::start().await;
    if !env.scoring_backend.is_postgres() {
        // Replicas share a PostgreSQL database; SQLite has one process.
        return;
    }
    let mut s = env.scoring();
    create(
        &mut s,
        "leads",
        model(vec![event_rule("use", "feature_use", 5)], vec![]),
    )
    .await;
    let c = env.new_customer("resume@example.com").await;
    env.touch(&c.name, "r1", cpb::TouchpointType::FeatureUse, "x")
        .await;
    env.score_reaches(&c.name, "scoringModels/leads", "engagement", 5.0)
        .await;
    // A re-scoring whose replica died holding it: its lease runs one more
    // second by the service clock.
    let db = sea_orm::Database::connect(&env.scoring_backend.database_url)
        .await
        .unwrap();
    let meta = pb::RescoreCustomersMetadata {
        scoring_model: "scoringModels/leads".into(),
        model_version: 1,
        customers_total: 1,
        customers_done: 0,
        start_time: Some(clm_platform::convert::timestamp(env.clock_now())),
    };
    clm_platform::operations::start(
        &db,
        "interrupted",
        clm_scoring::rescore::KIND,
        clm_proto::pack_any(&meta),
        env.clock_now(),
    )
    .await
    .unwrap();
    db.execute_unprepared(&format!(
        "UPDATE operations SET owner = 'dead-replica', lease_until_us = {} WHERE id = 'interrupted'",
        micros(env.clock_now()) + 1_000_000
    ))
    .await
    .unwrap();
    // A second replica beside the first.
    let mut config = env.scoring_backend.config("scoring");
    config.peers.insert("customer".into(), env.customer.url());
    // It looks for lapsed leases every 100 ms (the first, every 10 s).
    config.operation_lease_ms = 300;
    let second = start_with_clock(
        &clm_scoring::DESCRIPTOR,
        config,
        Arc::new(env.clock.clone()),
    )
    .await;
    let owner = || async {
        db.query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT owner, done FROM operations WHERE id = 'interrupted'",
        ))
        .await
        .unwrap()
        .map(|r| {
            (
                r.try_get_by_index::<Option<String>>(0).unwrap(),
                r.try_get_by_index::<bool>(1).unwrap(),
            )
        })
        .unwrap()
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        owner().await,
        (Some("dead-replica".into()), false),
        "nobody takes it while the lease holds"
    );
    env.clock.advance(Duration::seconds(2));
    let done = operation_done(second.channel(), "operations/interrupted").await;
    let Some(clm_proto::google::longrunning::operation::Result::Response(any)) = done.result else {
        panic!("the resumed re-scoring failed: {:?}", done.result)
    };
    let resp =
        <pb::RescoreCustomersResponse as prost::Message>::decode(any.value.as_slice()).unwrap();
    assert_eq!(resp.customers, 1);
    let (holder, finished) = owner().await;
    assert!(finished);
    let holder = holder.unwrap();
    assert_ne!(holder, "dead-replica");
    assert_eq!(
        env.score(&c.name, "scoringModels/leads", "engagement")
            .await,
        5.0
    );
    assert_sums_match_ledger(&db, "leads", std::slice::from_ref(&c.name)).await;
    second.stop().await;
}

/// Records `touchpoints` in one RecordTouchpoints call and waits until
/// scoring has kept `kept` touchpoints in all (so the next call is a later
/// batch of the stream, not part of this one).
async fn record_batch(
    env: &Env,
    db: &sea_orm::DatabaseConnection,
    tps: Vec<cpb::Touchpoint>,
    kept: i64,
) {
    use sea_orm::ConnectionTrait;
    env.customers()
        .record_touchpoints(cpb::RecordTouchpointsRequest { touchpoints: tps })
        .await
        .unwrap();
    eventually(std::time::Duration::from_secs(20), || async {
        let n = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT COUNT(*) FROM score_touchpoints",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get_by_index::<i64>(0)
            .unwrap();
        (n == kept).then_some(())
    })
    .await;
}

fn touchpoint(
    customer: &str,
    event: &str,
    kind: cpb::TouchpointType,
    at: DateTime<Utc>,
) -> cpb::Touchpoint {
    cpb::Touchpoint {
        customer: customer.into(),
        event_id: event.into(),
        r#type: kind as i32,
        product: "app".into(),
        feature: if kind == cpb::TouchpointType::FeatureUse {
            "x".into()
        } else {
            String::new()
        },
        revenue: (kind == cpb::TouchpointType::Purchase).then(|| clm_proto::common::Money {
            currency_code: "EUR".into(),
            amount_minor: 1999,
        }),
        occurred_time: Some(clm_platform::convert::timestamp(at)),
        ..Default::default()
    }
}

/// Every score of `customer` under `leads` at `at`.
async fn scores_at(s: &mut Scoring, customer: &str, at: DateTime<Utc>) -> Vec<(String, f64)> {
    s.get_score(pb::GetScoreRequest {
        customer: customer.into(),
        scoring_model: "scoringModels/leads".into(),
        read_time: Some(clm_platform::convert::timestamp(at)),
    })
    .await
    .unwrap()
    .into_inner()
    .scores
    .into_iter()
    .map(|v| (v.score, v.value))
    .collect()
}

fn close(a: &[(String, f64)], b: &[(String, f64)]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((n, x), (m, y))| n == m && (x - y).abs() < 1e-9)
}

/// Caps and once-per-customer rules give what the customer's touchpoints in
/// (time, event id) order give, whatever order they arrive in: a late
/// earlier touchpoint corrects the awards after it (the hand-worked case),
/// random arrival orders across batches (a property test with a fixed
/// seed) score what RescoreCustomers replays, a merge of two customers who
/// both scored a once-only rule keeps one award, and re-scoring keeps the
/// profile rule's history (GetScore at an earlier read time is unchanged).
#[tokio::test]
async fn scores_do_not_depend_on_arrival_order_merges_or_rescoring() {
    use proptest::strategy::{Strategy, ValueTree};
    let env = Env::start().await;
    let mut s = env.scoring();
    let db = sea_orm::Database::connect(&env.scoring_backend.database_url)
        .await
        .unwrap();
    let half_life = |days| pb::Decay {
        kind: Some(pb::decay::Kind::HalfLife(dur(Duration::days(days)))),
    };
    let mut daily = event_rule("daily", "feature_use", 4);
    daily.cap = Some(pb::Cap {
        points: 6,
        period: pb::CapPeriod::Day as i32,
        rolling_window: None,
    });
    daily.decay = Some(half_life(7));
    let mut rolling = event_rule("rolling", "product_access", 3);
    rolling.cap = Some(pb::Cap {
        points: 7,
        period: pb::CapPeriod::Rolling as i32,
        rolling_window: Some(dur(Duration::hours(36))),
    });
    rolling.decay = Some(pb::Decay {
        kind: Some(pb::decay::Kind::LinearOver(dur(Duration::days(30)))),
    });
    let mut once = event_rule("bought", "purchase", 10);
    once.once_per_customer = true;
    once.decay = Some(half_life(3));
    let plain = event_rule("complaint", "support_contact", -2);
    let fit = pb::ScoringRule {
        id: "engineer".into(),
        score: "fit".into(),
        points: 5,
        trigger: Some(pb::scoring_rule::Trigger::ProfileCondition(
            r#"occupation = "engineer""#.into(),
        )),
        ..Default::default()
    };
    create(
        &mut s,
        "leads",
        model(vec![daily, rolling, once, plain, fit], vec![]),
    )
    .await;
    let read = t0() + Duration::hours(1);
    let mut kept = 0i64;

    // The hand-worked case: 4 points a touch, at most 6 a day, half-life 7
    // days. The 12:00 touch arrives before the 08:00 one of the same day:
    // 08:00 keeps 4, 12:00 is cut to 2, as if they had arrived in order.
    let x = env.new_customer("x@example.com").await;
    let day = t0() - Duration::days(2) - Duration::hours(10); // 00:00 UTC
    let (at8, at12) = (day + Duration::hours(8), day + Duration::hours(12));
    kept += 1;
    record_batch(
        &env,
        &db,
        vec![touchpoint(
            &x.name,
            "x-noon",
            cpb::TouchpointType::FeatureUse,
            at12,
        )],
        kept,
    )
    .await;
    kept += 1;
    record_batch(
        &env,
        &db,
        vec![touchpoint(
            &x.name,
            "x-eight",
            cpb::TouchpointType::FeatureUse,
            at8,
        )],
        kept,
    )
    .await;
    let decayed = |points: f64, at: DateTime<Utc>| {
        let age = (read - at).num_microseconds().unwrap() as f64;
        points * 0.5f64.powf(age / Duration::days(7).num_microseconds().unwrap() as f64)
    };
    let want = decayed(4.0, at8) + decayed(2.0, at12);
    let got = scores_at(&mut s, &x.name, read).await;
    let engagement = got.iter().find(|(n, _)| n == "engagement").unwrap().1;
    // GetScore answers 4 decimals; in arrival order it would be 4.8620.
    assert!((engagement - want).abs() < 5e-5, "{engagement} != {want}");

    // Random arrival orders (fixed seed): each customer's touchpoints in
    // random batches, each batch scored before the next arrives.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let kinds = [
        cpb::TouchpointType::FeatureUse,
        cpb::TouchpointType::ProductAccess,
        cpb::TouchpointType::Purchase,
        cpb::TouchpointType::SupportContact,
    ];
    let plan = proptest::collection::vec(
        proptest::collection::vec((0usize..4, 0i64..72 * 60, 0u32..1000), 6..12),
        6,
    );
    let plans = plan.new_tree(&mut runner).unwrap().current();
    let mut customers = Vec::new();
    for (i, touches) in plans.iter().enumerate() {
        let c = env.new_customer(&format!("p{i}@example.com")).await;
        let mut tps: Vec<(u32, cpb::Touchpoint)> = touches
            .iter()
            .enumerate()
            .map(|(j, (k, minute, shuffle))| {
                // Customers 0 and 1 both buy (the merge below).
                let kind = if j == 0 && i < 2 {
                    cpb::TouchpointType::Purchase
                } else {
                    kinds[*k]
                };
                let at = t0() - Duration::minutes(*minute);
                (
                    *shuffle,
                    touchpoint(&c.name, &format!("p{i}-{j}"), kind, at),
                )
            })
            .collect();
        tps.sort_by_key(|(shuffle, _)| *shuffle);
        let tps: Vec<cpb::Touchpoint> = tps.into_iter().map(|(_, t)| t).collect();
        for batch in tps.chunks(1 + i % 3) {
            kept += batch.len() as i64;
            record_batch(&env, &db, batch.to_vec(), kept).await;
        }
        customers.push(c.name);
    }
    let mut live = Vec::new();
    for c in &customers {
        live.push(scores_at(&mut s, c, read).await);
    }
    let x_live = scores_at(&mut s, &x.name, read).await;

    // A merge of two customers who both bought: the once-only rule keeps
    // the earlier purchase only.
    env.merge(&customers[0], &customers[1]).await;
    eventually(std::time::Duration::from_secs(20), || async {
        use sea_orm::ConnectionTrait;
        let sql = format!(
            "SELECT COUNT(*) FROM score_ledger WHERE customer = '{}'",
            customers[1]
        );
        let n = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                sql,
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get_by_index::<i64>(0)
            .unwrap();
        (n == 0).then_some(())
    })
    .await;
    let merged = eventually(std::time::Duration::from_secs(20), || async {
        let now = scores_at(&mut env.scoring(), &customers[0], read).await;
        (!close(&now, &live[0])).then_some(now)
    })
    .await;

    // Re-scoring a day later replays every customer in (time, event id)
    // order: every score at the read time is what the live scoring gave.
    env.clock.advance(Duration::days(1));
    let op = s
        .rescore_customers(pb::RescoreCustomersRequest {
            scoring_model: "scoringModels/leads".into(),
            model_version: 0,
            request_id: "rescore-order".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let done = operation_done(env.scoring.as_ref().unwrap().channel(), &op.name).await;
    assert!(
        matches!(
            done.result,
            Some(clm_proto::google::longrunning::operation::Result::Response(
                _
            ))
        ),
        "{:?}",
        done.result
    );
    assert!(close(&scores_at(&mut s, &x.name, read).await, &x_live));
    assert!(
        close(&scores_at(&mut s, &customers[0], read).await, &merged),
        "merged survivor"
    );
    for (c, before) in customers.iter().zip(&live).skip(2) {
        let after = scores_at(&mut s, c, read).await;
        assert!(
            close(&after, before),
            "{c}: live {before:?}, rescored {after:?}"
        );
    }
    // The fit rule still counts from when the customer was created.
    let fit = scores_at(&mut s, &customers[2], read).await;
    assert_eq!(fit.iter().find(|(n, _)| n == "fit").map(|v| v.1), Some(5.0));
    assert_sums_match_ledger(&db, "leads", &customers).await;
}

/// Counts of scoring's outbox events of a type per subject.
async fn events_per_subject(
    db: &sea_orm::DatabaseConnection,
    event: &str,
) -> std::collections::HashMap<String, i64> {
    use sea_orm::ConnectionTrait;
    let sql = format!(
        "SELECT subject, COUNT(*) FROM outbox WHERE event_type LIKE '%.{event}' GROUP BY subject"
    );
    db.query_all_raw(sea_orm::Statement::from_string(
        db.get_database_backend(),
        sql,
    ))
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.try_get_by_index::<String>(0).unwrap(),
            r.try_get_by_index::<i64>(1).unwrap(),
        )
    })
    .collect()
}

/// Under concurrent ingest from four clients (batches of 200 over shared
/// customers), every customer whose score reaches the threshold crosses it
/// exactly once: one ThresholdCrossed each, recorded in the transaction of
/// the award that caused it, and every stage moved.
#[tokio::test]
async fn every_crossing_under_concurrent_ingest_is_recorded_once_and_moves_the_stage() {
    let env = Env::start().await;
    let mut s = env.scoring();
    let up = pb::Threshold {
        id: "engaged".into(),
        score: "engagement".into(),
        value: 40.0,
        direction: pb::ThresholdDirection::AtOrAbove as i32,
        to_stage: cpb::Stage::Acquisition as i32,
        while_in_stage: 0,
    };
    create(
        &mut s,
        "leads",
        model(vec![event_rule("use", "feature_use", 1)], vec![up]),
    )
    .await;
    let mut customers = Vec::new();
    for i in 0..60 {
        customers.push(env.new_customer(&format!("load{i}@example.com")).await.name);
    }
    // 45 touches each; customers 0..10 stop at 39 (never cross).
    let mut touches = Vec::new();
    for round in 0..45 {
        for (i, c) in customers.iter().enumerate() {
            if i < 10 && round >= 39 {
                continue;
            }
            let at = t0() - Duration::minutes(45 - round);
            touches.push(touchpoint(
                c,
                &format!("l{i}-{round}"),
                cpb::TouchpointType::FeatureUse,
                at,
            ));
        }
    }
    let batches: Vec<Vec<cpb::Touchpoint>> = touches.chunks(200).map(<[_]>::to_vec).collect();
    let mut tasks = Vec::new();
    for client in 0..4 {
        let mine: Vec<Vec<cpb::Touchpoint>> =
            batches.iter().skip(client).step_by(4).cloned().collect();
        let mut c = env.customers();
        tasks.push(tokio::spawn(async move {
            for b in mine {
                c.record_touchpoints(cpb::RecordTouchpointsRequest { touchpoints: b })
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for (i, c) in customers.iter().enumerate() {
        let want = if i < 10 { 39.0 } else { 45.0 };
        env.score_reaches(c, "scoringModels/leads", "engagement", want)
            .await;
    }
    let db = sea_orm::Database::connect(&env.scoring_backend.database_url)
        .await
        .unwrap();
    let crossed = events_per_subject(&db, "ThresholdCrossed").await;
    for (i, c) in customers.iter().enumerate() {
        let want = i64::from(i >= 10);
        assert_eq!(
            crossed.get(c).copied().unwrap_or(0),
            want,
            "{c}: ThresholdCrossed events"
        );
    }
    for c in customers.iter().skip(10) {
        eventually(std::time::Duration::from_secs(20), || async {
            let moved = env
                .stages(c)
                .await
                .iter()
                .any(|h| h.to_stage == cpb::Stage::Acquisition as i32);
            moved.then_some(())
        })
        .await;
    }
    // The timer queue's looks after the awards judge nothing twice.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(events_per_subject(&db, "ThresholdCrossed").await, crossed);
}

/// An enum number the API does not define is INVALID_ARGUMENT naming the
/// field (the platform checks every request), never read as "any".
#[tokio::test]
async fn unknown_enum_values_are_refused_by_field() {
    let env = Env::start().await;
    let mut s = env.scoring();
    let denial = pb::ScoringRule {
        id: "unsubscribed".into(),
        score: "engagement".into(),
        points: -10,
        trigger: Some(pb::scoring_rule::Trigger::ConsentDenied(
            pb::ConsentDenial { purpose: 99 },
        )),
        ..Default::default()
    };
    let status = s
        .create_scoring_model(pb::CreateScoringModelRequest {
            scoring_model: Some(model(vec![denial], vec![])),
            scoring_model_id: "leads".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_bad_field(&status, "scoring_model.rules[0].consent_denied.purpose");
    assert!(status.message().contains("99"), "{}", status.message());
    let status = env
        .customers()
        .record_touchpoints(cpb::RecordTouchpointsRequest {
            touchpoints: vec![cpb::Touchpoint {
                r#type: 42,
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_bad_field(&status, "touchpoints[0].type");
}

/// AdjustScore racing the customer's erasure never leaves an entry or a
/// customer row behind: the adjustment checks the customer under its lock
/// and the erasure takes that lock before deleting.
#[tokio::test]
async fn adjustments_racing_erasure_leave_nothing_behind() {
    use sea_orm::ConnectionTrait;
    let env = Env::start().await;
    let mut s = env.scoring();
    create(
        &mut s,
        "leads",
        model(vec![event_rule("use", "feature_use", 1)], vec![]),
    )
    .await;
    let mut customers = Vec::new();
    for i in 0..12 {
        let c = env.new_customer(&format!("gone{i}@example.com")).await.name;
        env.touch(&c, &format!("g{i}"), cpb::TouchpointType::FeatureUse, "x")
            .await;
        customers.push(c);
    }
    for c in &customers {
        env.score_reaches(c, "scoringModels/leads", "engagement", 1.0)
            .await;
    }
    let mut tasks = Vec::new();
    for c in &customers {
        for k in 0..4 {
            let (mut s, c) = (env.scoring(), c.clone());
            tasks.push(tokio::spawn(async move {
                // OK before the erasure, NOT_FOUND after it; nothing else.
                let r = s
                    .adjust_score(pb::AdjustScoreRequest {
                        customer: c.clone(),
                        scoring_model: "scoringModels/leads".into(),
                        score: "engagement".into(),
                        points: 5,
                        reason: "call".into(),
                        request_id: format!("{c}-{k}"),
                    })
                    .await;
                if let Err(e) = r {
                    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
                }
            }));
        }
        let (mut cs, c) = (env.customers(), c.clone());
        tasks.push(tokio::spawn(async move {
            cs.erase_customer(cpb::EraseCustomerRequest {
                name: c,
                request_id: String::new(),
            })
            .await
            .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let db = sea_orm::Database::connect(&env.scoring_backend.database_url)
        .await
        .unwrap();
    eventually(std::time::Duration::from_secs(20), || async {
        let erased = events_per_subject(&db, "CustomerDataErased").await;
        customers
            .iter()
            .all(|c| erased.contains_key(c))
            .then_some(())
    })
    .await;
    let list = customers
        .iter()
        .map(|c| format!("'{c}'"))
        .collect::<Vec<_>>()
        .join(",");
    for table in ["score_ledger", "score_customers", "score_sums"] {
        let sql = format!("SELECT COUNT(*) FROM {table} WHERE customer IN ({list})");
        let n = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                sql,
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get_by_index::<i64>(0)
            .unwrap();
        assert_eq!(n, 0, "{table} keeps rows of erased customers");
    }
}

/// ListTopCustomers pages rank the scores at the first page's read time
/// (pinned in the token): decay between pages neither repeats nor skips a
/// customer, and every page says the same read time.
#[tokio::test]
async fn top_customers_pages_keep_their_read_time() {
    let env = Env::start().await;
    let mut s = env.scoring();
    let mut fast = event_rule("buy", "purchase", 100);
    fast.decay = Some(pb::Decay {
        kind: Some(pb::decay::Kind::HalfLife(dur(Duration::hours(1)))),
    });
    let steady = event_rule("use", "feature_use", 20);
    create(&mut s, "leads", model(vec![fast, steady], vec![])).await;
    // a: 100 decaying fast; b: 60, c: 40, d: 20 steady.
    let mut names = Vec::new();
    for (i, uses) in [0, 3, 2, 1].iter().enumerate() {
        let c = env.new_customer(&format!("top{i}@example.com")).await.name;
        if i == 0 {
            let tp = touchpoint(&c, "top-buy", cpb::TouchpointType::Purchase, t0());
            env.customers()
                .record_touchpoints(cpb::RecordTouchpointsRequest {
                    touchpoints: vec![tp],
                })
                .await
                .unwrap();
        }
        for k in 0..*uses {
            env.touch(
                &c,
                &format!("top{i}-{k}"),
                cpb::TouchpointType::FeatureUse,
                "x",
            )
            .await;
        }
        names.push(c);
    }
    for (c, want) in names.iter().zip([100.0, 60.0, 40.0, 20.0]) {
        env.score_reaches(c, "scoringModels/leads", "engagement", want)
            .await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut read_times = std::collections::BTreeSet::new();
    loop {
        let page = s
            .list_top_customers(pb::ListTopCustomersRequest {
                scoring_model: "scoringModels/leads".into(),
                score: "engagement".into(),
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for c in page.customers {
            read_times.insert(c.read_time.map(|t| (t.seconds, t.nanos)));
            seen.push(c.customer);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        // Two half-lives pass between pages: a (100 → 25) would fall
        // behind b, c and d if later pages were ranked at a later time.
        env.clock.advance(Duration::hours(2));
    }
    assert_eq!(seen, names, "each customer once, in the first page's order");
    assert_eq!(read_times.len(), 1, "one read time for every page");
}

/// The stream's end once every committed event has its position.
async fn settled_end(db: &sea_orm::DatabaseConnection) -> i64 {
    eventually(std::time::Duration::from_secs(20), || async {
        let end = stream_end(db).await;
        (end >= 0).then_some(end)
    })
    .await
}

/// A ScoreChanged's curve as the maths takes it.
fn curve_of(c: &pb::ScoreCurve) -> clm_domain::scoring::Curve {
    use clm_domain::scoring::{Curve, Decay, Inactivity, Term};
    let us = |t: &Option<prost_types::Timestamp>| {
        clm_platform::convert::from_timestamp("t", t.as_ref().unwrap())
            .unwrap()
            .timestamp_micros()
    };
    let delta = |d: &prost_types::Duration| {
        Duration::seconds(d.seconds) + Duration::nanoseconds(i64::from(d.nanos))
    };
    Curve {
        terms: c
            .terms
            .iter()
            .map(|t| Term {
                coef: t.coefficient,
                since_us: us(&t.since),
                decay: match t.decay.as_ref().and_then(|d| d.kind.as_ref()) {
                    None => Decay::None,
                    Some(pb::decay::Kind::HalfLife(h)) => Decay::Exponential {
                        half_life: delta(h),
                    },
                    Some(pb::decay::Kind::LinearOver(o)) => Decay::Linear { over: delta(o) },
                },
            })
            .collect(),
        inactivity: c.inactivity.as_ref().map(|i| {
            (
                Inactivity {
                    points: i.points,
                    every: delta(i.every.as_ref().unwrap()),
                },
                us(&c.last_activity_time),
            )
        }),
        floor: c.floor,
        ceiling: c.ceiling,
    }
}

/// The ScoreChanged events on scoring's stream after `after`, until it is
/// quiet for half a second.
async fn score_changes_after(env: &Env, after: i64) -> Vec<pb::ScoreChanged> {
    let mut changes =
        clm_proto::common::change_stream_service_client::ChangeStreamServiceClient::new(
            env.scoring.as_ref().unwrap().channel(),
        );
    let mut stream = changes
        .watch_changes(clm_proto::common::WatchChangesRequest {
            after_sequence: after,
            event_types: vec!["clm.scoring.v1.ScoreChanged".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Ok(Ok(Some(m))) =
        tokio::time::timeout(std::time::Duration::from_millis(500), stream.message()).await
    {
        let e = m.event.unwrap();
        out.push(
            <pb::ScoreChanged as prost::Message>::decode(e.payload.unwrap().value.as_slice())
                .unwrap(),
        );
    }
    out
}

/// Every ScoreChanged carries a curve that gives its new value at its
/// change time, and the last of each customer's score gives GetScore's
/// answer then and at later instants (no award in between).
async fn assert_curves_agree(env: &Env, changes: &[pb::ScoreChanged], model: &str) {
    let mut s = env.scoring();
    let mut last = std::collections::BTreeMap::new();
    for c in changes {
        let curve = curve_of(c.curve.as_ref().expect("a curve"));
        let at =
            clm_platform::convert::from_timestamp("t", c.change_time.as_ref().unwrap()).unwrap();
        assert_eq!(curve.value_at(at.timestamp_micros()), c.new_value, "{c:?}");
        last.insert((c.customer.clone(), c.score.clone()), c);
    }
    for c in last.into_values() {
        let curve = curve_of(c.curve.as_ref().expect("a curve"));
        let at =
            clm_platform::convert::from_timestamp("t", c.change_time.as_ref().unwrap()).unwrap();
        assert_eq!(curve.value_at(at.timestamp_micros()), c.new_value, "{c:?}");
        for later in [Duration::zero(), Duration::days(3), Duration::days(40)] {
            let got = s
                .get_score(pb::GetScoreRequest {
                    customer: c.customer.clone(),
                    scoring_model: model.into(),
                    read_time: Some(clm_platform::convert::timestamp(at + later)),
                })
                .await
                .unwrap()
                .into_inner();
            let value = got
                .scores
                .iter()
                .find(|v| v.score == c.score)
                .unwrap()
                .value;
            assert_eq!(
                curve.value_at((at + later).timestamp_micros()),
                value,
                "{later} after {c:?}"
            );
        }
    }
}

#[tokio::test]
async fn rescore_merge_and_activation_restate_scores_with_their_curves() {
    let env = Env::start().await;
    let mut s = env.scoring();
    let mut uses = event_rule("use", "feature_use", 5);
    uses.decay = Some(pb::Decay {
        kind: Some(pb::decay::Kind::HalfLife(dur(Duration::days(10)))),
    });
    let mut buys = event_rule("visit", "product_access", 7);
    buys.decay = Some(pb::Decay {
        kind: Some(pb::decay::Kind::LinearOver(dur(Duration::days(20)))),
    });
    create(&mut s, "leads", model(vec![uses.clone(), buys], vec![])).await;
    let c = env.new_customer("curves@example.com").await;
    let d = env.new_customer("dup@example.com").await;
    env.touch(&c.name, "c1", cpb::TouchpointType::FeatureUse, "x")
        .await;
    env.touch(&c.name, "c2", cpb::TouchpointType::ProductAccess, "")
        .await;
    env.score_reaches(&c.name, "scoringModels/leads", "engagement", 12.0)
        .await;
    // Awards: each change carries its curve.
    let awarded = score_changes_after(&env, 0).await;
    assert!(
        awarded
            .iter()
            .all(|c| c.cause == pb::ScoreChangeCause::Award as i32),
        "{awarded:?}"
    );
    assert_curves_agree(&env, &awarded, "scoringModels/leads").await;
    let db = sea_orm::Database::connect(&env.scoring_backend.database_url)
        .await
        .unwrap();

    // Activation of a version with a ceiling re-states the scores under it.
    env.clock.set(t0() + Duration::days(2));
    let mark = settled_end(&db).await;
    let current = s
        .get_scoring_model(pb::GetScoringModelRequest {
            name: "scoringModels/leads".into(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut next = model(vec![uses], vec![]);
    next.scores = vec![pb::ScoreDefinition {
        name: "engagement".into(),
        ceiling: Some(8),
        ..Default::default()
    }];
    next.name = "scoringModels/leads".into();
    next.etag = current.etag;
    s.update_scoring_model(pb::UpdateScoringModelRequest {
        scoring_model: Some(next),
        request_id: String::new(),
    })
    .await
    .unwrap();
    s.activate_model_version(pb::ActivateModelVersionRequest {
        name: "scoringModels/leads".into(),
        version: 2,
        request_id: "activate-2".into(),
    })
    .await
    .unwrap();
    let activated = score_changes_after(&env, mark).await;
    let engagement: Vec<_> = activated
        .iter()
        .filter(|e| e.score == "engagement")
        .collect();
    assert_eq!(engagement.len(), 1, "{activated:?}");
    assert_eq!(engagement[0].cause, pb::ScoreChangeCause::Activation as i32);
    assert_eq!(engagement[0].new_value, 8.0);
    assert!(engagement[0].old_value > 8.0, "{:?}", engagement[0]);
    assert_eq!(engagement[0].curve.as_ref().unwrap().ceiling, Some(8));
    assert_curves_agree(&env, &activated, "scoringModels/leads").await;
    // The same request again changes nothing and emits nothing.
    let mark = settled_end(&db).await;
    s.activate_model_version(pb::ActivateModelVersionRequest {
        name: "scoringModels/leads".into(),
        version: 2,
        request_id: "activate-2".into(),
    })
    .await
    .unwrap();
    assert!(score_changes_after(&env, mark).await.is_empty());

    // Re-scoring under v2 (no visit rule): every score re-stated.
    let mark = settled_end(&db).await;
    let op = s
        .rescore_customers(pb::RescoreCustomersRequest {
            scoring_model: "scoringModels/leads".into(),
            model_version: 0,
            request_id: "rescore-curves".into(),
        })
        .await
        .unwrap()
        .into_inner();
    operation_done(env.scoring.as_ref().unwrap().channel(), &op.name).await;
    let rescored = score_changes_after(&env, mark).await;
    assert!(
        rescored
            .iter()
            .any(|e| e.customer == c.name && e.score == "engagement"),
        "{rescored:?}"
    );
    assert!(
        rescored
            .iter()
            .all(|e| e.cause == pb::ScoreChangeCause::Rescore as i32)
    );
    assert_curves_agree(&env, &rescored, "scoringModels/leads").await;

    // A merge re-states the survivor's scores with the merged ledger.
    env.touch(&d.name, "d1", cpb::TouchpointType::FeatureUse, "x")
        .await;
    env.score_reaches(&d.name, "scoringModels/leads", "engagement", 5.0)
        .await;
    let mark = settled_end(&db).await;
    env.merge(&c.name, &d.name).await;
    eventually(std::time::Duration::from_secs(30), || async {
        let merged = score_changes_after(&env, mark).await;
        merged
            .iter()
            .any(|e| e.cause == pb::ScoreChangeCause::Merge as i32 && e.customer == c.name)
            .then_some(())
    })
    .await;
    let merged = score_changes_after(&env, mark).await;
    assert_curves_agree(&env, &merged, "scoringModels/leads").await;
}

/// A touchpoint no rule scores still moves the last activity inactivity
/// decay counts from: the score is re-stated (cause ACTIVITY) with its new
/// curve, so a reader's value stays GetScore's.
#[tokio::test]
async fn activity_without_an_award_restates_scores_with_inactivity_decay() {
    let env = Env::start().await;
    let mut s = env.scoring();
    let mut m = model(
        vec![event_rule(
            "export",
            r#"feature_use where feature = "export""#,
            20,
        )],
        vec![],
    );
    m.scores = vec![pb::ScoreDefinition {
        name: "engagement".into(),
        inactivity: Some(pb::InactivityDecay {
            points: -5,
            every: Some(dur(Duration::days(7))),
        }),
        ..Default::default()
    }];
    create(&mut s, "idle", m).await;
    let c = env.new_customer("idle@example.com").await;
    env.touch(&c.name, "e1", cpb::TouchpointType::FeatureUse, "export")
        .await;
    env.score_reaches(&c.name, "scoringModels/idle", "engagement", 20.0)
        .await;
    let db = sea_orm::Database::connect(&env.scoring_backend.database_url)
        .await
        .unwrap();
    env.clock.set(t0() + Duration::days(10));
    assert_eq!(
        env.score(&c.name, "scoringModels/idle", "engagement").await,
        15.0
    );
    let mark = settled_end(&db).await;
    env.touch(&c.name, "v1", cpb::TouchpointType::ProductAccess, "")
        .await;
    let changes = eventually(std::time::Duration::from_secs(30), || async {
        let list = score_changes_after(&env, mark).await;
        (!list.is_empty()).then_some(list)
    })
    .await;
    assert_eq!(changes.len(), 1, "{changes:?}");
    let c0 = &changes[0];
    assert_eq!(c0.cause, pb::ScoreChangeCause::Activity as i32);
    assert_eq!((c0.old_value, c0.new_value), (15.0, 20.0));
    assert_eq!(
        c0.curve.as_ref().unwrap().last_activity_time,
        Some(clm_platform::convert::timestamp(t0() + Duration::days(10)))
    );
    assert_curves_agree(&env, &changes, "scoringModels/idle").await;
}
