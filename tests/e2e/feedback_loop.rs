//! The feedback loop, through gRPC: customer, scoring, segmentation and
//! feedback running side by side (each on its own fresh backend: SQLite,
//! or PostgreSQL + Redis when `CLM_TEST_DATABASE_URL` is set). A detractor
//! answer lowers the customer's score by the survey rule and moves them
//! into a segment whose rule is `nps.last_category = DETRACTOR`; a window
//! over `survey_answer` touchpoints counts answers; a segment-targeted
//! survey invites members only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::testing::{Running, TestBackend, eventually, start};
use clm_proto::customer as cpb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::feedback as fpb;
use clm_proto::feedback::feedback_service_client::FeedbackServiceClient;
use clm_proto::scoring as spb;
use clm_proto::scoring::scoring_service_client::ScoringServiceClient;
use clm_proto::segmentation as gpb;
use clm_proto::segmentation::segmentation_service_client::SegmentationServiceClient;
use std::collections::BTreeMap;
use std::time::Duration;

struct Suite {
    customer: Running,
    scoring: Running,
    segmentation: Running,
    feedback: Running,
    _backends: Vec<TestBackend>,
}

/// A free port on loopback (feedback and segmentation call each other, so
/// one must know the other's address before it starts).
fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The local NATS with JetStream (`scripts/test.sh` starts it under CI).
const NATS_URL: &str = "nats://127.0.0.1:4222";

async fn suite() -> Suite {
    suite_over(None).await
}

/// The suite; with `jetstream` (a stream prefix of the test's own), every
/// service relays its change stream to JetStream and follows the others'
/// from there instead of WatchChanges.
async fn suite_over(jetstream: Option<&str>) -> Suite {
    let cb = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let sb = TestBackend::migrated::<clm_scoring::store::Migrator>().await;
    let gb = TestBackend::migrated::<clm_segmentation::store::Migrator>().await;
    let fb = TestBackend::migrated::<clm_feedback::store::Migrator>().await;
    let fast = |mut c: clm_platform::config::Config| {
        c.change_poll_interval_ms = 50;
        if let Some(prefix) = jetstream {
            c.nats.url = Some(NATS_URL.into());
            c.nats.relay = true;
            c.nats.stream_prefix = prefix.into();
            c.subscriber.source = clm_platform::config::StreamSource::Jetstream;
        }
        c
    };
    let customer = start(&clm_customer::DESCRIPTOR, fast(cb.config("customer"))).await;
    let seg_addr = free_addr();
    let mut fc = fast(fb.config("feedback"));
    fc.peers.insert("customer".into(), customer.url());
    fc.peers
        .insert("segmentation".into(), format!("http://{seg_addr}"));
    let feedback = start(&clm_feedback::DESCRIPTOR, fc).await;
    let mut gc = fast(gb.config("segmentation"));
    gc.listen = seg_addr;
    gc.peers.insert("customer".into(), customer.url());
    gc.peers.insert("feedback".into(), feedback.url());
    gc.segmentation.objective_cache_secs = 0;
    let segmentation = start(&clm_segmentation::DESCRIPTOR, gc).await;
    let mut sc = fast(sb.config("scoring"));
    sc.peers.insert("customer".into(), customer.url());
    sc.peers.insert("feedback".into(), feedback.url());
    let scoring = start(&clm_scoring::DESCRIPTOR, sc).await;
    Suite {
        customer,
        scoring,
        segmentation,
        feedback,
        _backends: vec![cb, sb, gb, fb],
    }
}

fn texts(t: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("en".to_owned(), t.to_owned())])
}

impl Suite {
    fn customers(&self) -> CustomerServiceClient<tonic::transport::Channel> {
        CustomerServiceClient::new(self.customer.channel())
    }
    fn feedback(&self) -> FeedbackServiceClient<tonic::transport::Channel> {
        FeedbackServiceClient::new(self.feedback.channel())
    }
    fn scoring(&self) -> ScoringServiceClient<tonic::transport::Channel> {
        ScoringServiceClient::new(self.scoring.channel())
    }
    fn segments(&self) -> SegmentationServiceClient<tonic::transport::Channel> {
        SegmentationServiceClient::new(self.segmentation.channel())
    }

    async fn customer(&self, email: &str) -> String {
        let c = self
            .customers()
            .create_customer(cpb::CreateCustomerRequest {
                customer: Some(cpb::Customer {
                    email: email.into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        self.customers()
            .set_consent(cpb::SetConsentRequest {
                name: c.name.clone(),
                settings: vec![cpb::ConsentSetting {
                    purpose: cpb::ConsentPurpose::Surveys as i32,
                    channel: cpb::ConsentChannel::InApp as i32,
                    state: cpb::ConsentState::Granted as i32,
                }],
                source: cpb::ConsentSource::Api as i32,
                request_id: format!("consent-{email}"),
            })
            .await
            .unwrap();
        c.name
    }

    /// Waits until feedback has applied the customer stream so far: a
    /// customer made now can be invited to an untargeted probe survey.
    async fn synced(&self) {
        let probe = self.customer("probe@x.io").await;
        let survey = self
            .feedback()
            .create_survey(fpb::CreateSurveyRequest {
                survey: Some(fpb::Survey {
                    display_name: "probe".into(),
                    questions: vec![fpb::Question {
                        id: "nps".into(),
                        kind: fpb::QuestionKind::Nps as i32,
                        text: texts("?"),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                survey_id: "probe".into(),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        self.feedback()
            .publish_survey(fpb::PublishSurveyRequest {
                name: survey.name.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        eventually(Duration::from_secs(30), || {
            let mut fb = self.feedback();
            let (survey, probe) = (survey.name.clone(), probe.clone());
            async move {
                !fb.create_invitations(fpb::CreateInvitationsRequest {
                    survey,
                    customers: vec![probe],
                    channel: cpb::ConsentChannel::InApp as i32,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .invitations
                .is_empty()
            }
        })
        .await;
    }

    async fn segment(&self, rule: &str) -> String {
        let s = self
            .segments()
            .create_segment(gpb::CreateSegmentRequest {
                segment: Some(gpb::Segment {
                    display_name: rule.into(),
                    owner: "crm-team".into(),
                    rule_text: rule.into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        s.name
    }

    async fn is_member(&self, segment: &str, customer: &str) -> bool {
        self.segments()
            .is_member(gpb::IsMemberRequest {
                segment: segment.into(),
                customer: customer.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .member
    }

    async fn engagement(&self, customer: &str) -> f64 {
        let s = self
            .scoring()
            .get_score(spb::GetScoreRequest {
                customer: customer.into(),
                scoring_model: "scoringModels/loop".into(),
                read_time: None,
            })
            .await
            .unwrap()
            .into_inner();
        s.scores
            .iter()
            .find(|v| v.score == "engagement")
            .map_or(0.0, |v| v.value)
    }
}

#[tokio::test]
async fn a_detractor_answer_lowers_the_score_and_joins_the_detractor_segment() {
    detractor_loop(&suite().await).await;
}

/// The same loop with every change stream carried by NATS JetStream.
#[tokio::test]
async fn the_feedback_loop_over_jetstream() {
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let s = suite_over(Some(&prefix)).await;
    detractor_loop(&s).await;
    let js = clm_platform::jetstream::connect(&clm_platform::config::NatsConfig {
        url: Some(NATS_URL.into()),
        ..Default::default()
    })
    .await
    .unwrap();
    for service in ["customer", "scoring", "segmentation", "feedback"] {
        let names = clm_platform::jetstream::names(&prefix, service);
        let mut stream = js.get_stream(&names.stream).await.unwrap();
        assert!(
            stream.info().await.unwrap().state.messages > 0,
            "{service} relayed"
        );
        js.delete_stream(&names.stream).await.unwrap();
    }
}

async fn detractor_loop(s: &Suite) {
    s.scoring()
        .create_scoring_model(spb::CreateScoringModelRequest {
            scoring_model: Some(spb::ScoringModel {
                display_name: "loop".into(),
                scores: vec![spb::ScoreDefinition {
                    name: "engagement".into(),
                    ..Default::default()
                }],
                rules: vec![
                    spb::ScoringRule {
                        id: "nps_detractor".into(),
                        score: "engagement".into(),
                        points: -30,
                        trigger: Some(spb::scoring_rule::Trigger::SurveyAnswer(
                            spb::SurveyAnswerTrigger {
                                kind: fpb::QuestionKind::Nps as i32,
                                nps_category: fpb::NpsCategory::Detractor as i32,
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    },
                    spb::ScoringRule {
                        id: "csat_low".into(),
                        score: "engagement".into(),
                        points: -10,
                        trigger: Some(spb::scoring_rule::Trigger::SurveyAnswer(
                            spb::SurveyAnswerTrigger {
                                kind: fpb::QuestionKind::Csat as i32,
                                max_value: Some(2),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            scoring_model_id: "loop".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let detractors = s.segment("nps.last_category = DETRACTOR").await;
    let answered_twice = s
        .segment(r#"count(survey_answer where properties.kind = "nps", 30d) >= 2"#)
        .await;
    // NPS and CSAT objectives over the answers' customers, computed from
    // the feedback stream's facts (docs/segment-owners.md).
    let deadline = prost_types::Timestamp {
        seconds: 4_102_444_800, // 2100-01-01
        nanos: 0,
    };
    let objective = |id: &str, metric: gpb::ObjectiveMetric, target: f64| gpb::Objective {
        id: id.into(),
        metric: metric as i32,
        target,
        direction: gpb::ObjectiveDirection::AtLeast as i32,
        deadline: Some(deadline),
        ..Default::default()
    };
    let answered = s
        .segments()
        .create_segment(gpb::CreateSegmentRequest {
            segment: Some(gpb::Segment {
                display_name: "x.io".into(),
                rule_text: r#"email contains "@x.io""#.into(),
                objectives: vec![
                    objective("nps", gpb::ObjectiveMetric::Nps, 50.0),
                    objective("csat", gpb::ObjectiveMetric::Csat, 4.0),
                ],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .name;
    let values = || {
        let mut seg = s.segments();
        let name = answered.clone();
        async move {
            let g = seg
                .get_segment(gpb::GetSegmentRequest { name })
                .await
                .unwrap()
                .into_inner();
            let v = |id: &str| {
                let o = g.objectives.iter().find(|o| o.id == id).unwrap();
                (o.current_value, o.status)
            };
            (v("nps"), v("csat"))
        }
    };
    let a = s.customer("a@x.io").await;
    let b = s.customer("b@x.io").await;
    let survey = s
        .feedback()
        .create_survey(fpb::CreateSurveyRequest {
            survey: Some(fpb::Survey {
                display_name: "loop".into(),
                questions: vec![
                    fpb::Question {
                        id: "nps".into(),
                        kind: fpb::QuestionKind::Nps as i32,
                        text: texts("How likely are you to recommend us?"),
                        required: true,
                        ..Default::default()
                    },
                    fpb::Question {
                        id: "csat".into(),
                        kind: fpb::QuestionKind::Csat as i32,
                        text: texts("How satisfied are you?"),
                        ..Default::default()
                    },
                ],
                recontact_period: Some(prost_types::Duration::default()),
                ..Default::default()
            }),
            survey_id: "loop".into(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    s.feedback()
        .publish_survey(fpb::PublishSurveyRequest {
            name: survey.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Feedback learns consent from the customer stream.
    let invite = |customer: String| {
        let mut fb = s.feedback();
        let survey = survey.name.clone();
        async move {
            let r = fb
                .create_invitations(fpb::CreateInvitationsRequest {
                    survey,
                    customers: vec![customer],
                    channel: cpb::ConsentChannel::InApp as i32,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            r.invitations.into_iter().next()
        }
    };
    let inv_a = eventually(Duration::from_secs(30), || invite(a.clone())).await;
    let inv_b = eventually(Duration::from_secs(30), || invite(b.clone())).await;
    let answer = |inv: fpb::Invitation, id: &'static str, nps: i64, csat: i64| {
        let mut fb = s.feedback();
        async move {
            fb.submit_response(fpb::SubmitResponseRequest {
                name: format!("surveys/loop/responses/{id}"),
                invitation: inv.name.clone(),
                answers: vec![
                    fpb::Answer {
                        question: "nps".into(),
                        value: Some(fpb::answer::Value::Number(nps)),
                        ..Default::default()
                    },
                    fpb::Answer {
                        question: "csat".into(),
                        value: Some(fpb::answer::Value::Number(csat)),
                        ..Default::default()
                    },
                ],
                finish: true,
            })
            .await
            .unwrap()
        }
    };
    answer(inv_a, "ra", 3, 2).await;
    answer(inv_b, "rb", 10, 5).await;
    // Scoring: -30 for the detractor, -10 for CSAT <= 2; nothing for b.
    eventually(Duration::from_secs(30), || async {
        s.engagement(&a).await == -40.0
    })
    .await;
    assert_eq!(s.engagement(&b).await, 0.0);
    // Segmentation: a is a detractor, b is not.
    eventually(Duration::from_secs(30), || async {
        s.is_member(&detractors, &a).await
    })
    .await;
    assert!(!s.is_member(&detractors, &b).await);
    assert!(!s.is_member(&answered_twice, &a).await);
    // a: NPS 3 (detractor), CSAT 2; b: NPS 10 (promoter), CSAT 5.
    // NPS = (1 promoter - 1 detractor) / 2 answers * 100 = 0 < 50: at risk
    // (no trend yet); CSAT = (2 + 5) / 2 = 3.5 < 4: at risk.
    let at_risk = gpb::ObjectiveStatus::AtRisk as i32;
    let met = gpb::ObjectiveStatus::Met as i32;
    let now = eventually(Duration::from_secs(30), || async {
        let v = values().await;
        (v.1.0 == 3.5).then_some(v)
    })
    .await;
    assert_eq!(now, ((0.0, at_risk), (3.5, at_risk)));
    // A second answer (cadence off) makes a promoter of a: out of the
    // detractor segment, into the "answered twice" window.
    let inv = eventually(Duration::from_secs(30), || invite(a.clone())).await;
    answer(inv, "ra2", 9, 4).await;
    eventually(Duration::from_secs(30), || async {
        !s.is_member(&detractors, &a).await && s.is_member(&answered_twice, &a).await
    })
    .await;
    // a's last answers are now NPS 9 (promoter) and CSAT 4: NPS = (2 - 0)
    // / 2 * 100 = 100 >= 50: met; CSAT = (4 + 5) / 2 = 4.5 >= 4: met.
    let now = eventually(Duration::from_secs(30), || async {
        let v = values().await;
        (v.1.0 == 4.5).then_some(v)
    })
    .await;
    assert_eq!(now, ((100.0, met), (4.5, met)));
    // The promoter answer scores nothing: still -40.
    assert_eq!(s.engagement(&a).await, -40.0);
}

#[tokio::test]
async fn a_segment_targeted_survey_invites_members_only() {
    let s = suite().await;
    let engineers = s.segment(r#"occupation = "engineer""#).await;
    let eng = s
        .customers()
        .create_customer(cpb::CreateCustomerRequest {
            customer: Some(cpb::Customer {
                email: "eng@x.io".into(),
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
        .name;
    s.customers()
        .set_consent(cpb::SetConsentRequest {
            name: eng.clone(),
            settings: vec![cpb::ConsentSetting {
                purpose: cpb::ConsentPurpose::Surveys as i32,
                channel: cpb::ConsentChannel::InApp as i32,
                state: cpb::ConsentState::Granted as i32,
            }],
            source: cpb::ConsentSource::Api as i32,
            request_id: "c-eng".into(),
        })
        .await
        .unwrap();
    let other = s.customer("other@x.io").await;
    let survey = s
        .feedback()
        .create_survey(fpb::CreateSurveyRequest {
            survey: Some(fpb::Survey {
                display_name: "engineers".into(),
                questions: vec![fpb::Question {
                    id: "nps".into(),
                    kind: fpb::QuestionKind::Nps as i32,
                    text: texts("Recommend us?"),
                    ..Default::default()
                }],
                targeting: Some(fpb::Targeting {
                    audience: Some(fpb::targeting::Audience::Segment(engineers.clone())),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            survey_id: "engineers".into(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    s.feedback()
        .publish_survey(fpb::PublishSurveyRequest {
            name: survey.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(30), || async {
        s.is_member(&engineers, &eng).await
    })
    .await;
    s.synced().await;
    let out = s
        .feedback()
        .create_invitations(fpb::CreateInvitationsRequest {
            survey: survey.name.clone(),
            customers: vec![eng.clone(), other.clone()],
            channel: cpb::ConsentChannel::InApp as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.invitations.len(), 1);
    assert_eq!(out.invitations[0].customer, eng);
    assert_eq!(out.refusals.len(), 1);
    assert_eq!(out.refusals[0].customer, other);
    assert_eq!(out.refusals[0].reason, "NOT_IN_SEGMENT");
    // The summary by segment at response time counts the engineer.
    s.feedback()
        .submit_response(fpb::SubmitResponseRequest {
            name: "surveys/engineers/responses/r1".into(),
            invitation: out.invitations[0].name.clone(),
            answers: vec![fpb::Answer {
                question: "nps".into(),
                value: Some(fpb::answer::Value::Number(10)),
                ..Default::default()
            }],
            finish: true,
        })
        .await
        .unwrap();
    let by = |segment: String| {
        let mut fb = s.feedback();
        async move {
            fb.get_survey_summary(fpb::GetSurveySummaryRequest {
                survey: "surveys/engineers".into(),
                segment,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .responses
        }
    };
    assert_eq!(by(engineers.clone()).await, 1);
    assert_eq!(by("segments/someone-else".into()).await, 0);
}
