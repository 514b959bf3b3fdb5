//! The feedback service through gRPC, with the customer service beside it
//! (each on its own fresh backend: SQLite, or PostgreSQL + Redis when
//! `CLM_TEST_DATABASE_URL` is set), sharing one controlled clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Duration, Utc};
use clm_domain::ManualClock;
use clm_platform::convert::timestamp;
use clm_platform::testing::{Running, TestBackend, assert_bad_field, eventually, start_with_clock};
use clm_proto::customer as cpb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::feedback as pb;
use clm_proto::feedback::feedback_service_client::FeedbackServiceClient;
use std::collections::BTreeMap;
use std::sync::Arc;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

type Feedback = FeedbackServiceClient<Channel>;
type Customers = CustomerServiceClient<Channel>;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

struct Env {
    customer: Running,
    feedback: Running,
    clock: ManualClock,
    _backends: (TestBackend, TestBackend),
}

impl Env {
    async fn start() -> Env {
        let cb = TestBackend::migrated::<clm_customer::store::Migrator>().await;
        let fb = TestBackend::migrated::<clm_feedback::store::Migrator>().await;
        let clock = ManualClock::new(t0());
        let mut cc = cb.config("customer");
        cc.change_poll_interval_ms = 50;
        let customer =
            start_with_clock(&clm_customer::DESCRIPTOR, cc, Arc::new(clock.clone())).await;
        let mut fc = fb.config("feedback");
        fc.change_poll_interval_ms = 50;
        fc.peers.insert("customer".into(), customer.url());
        let feedback =
            start_with_clock(&clm_feedback::DESCRIPTOR, fc, Arc::new(clock.clone())).await;
        Env {
            customer,
            feedback,
            clock,
            _backends: (cb, fb),
        }
    }

    fn fb(&self) -> Feedback {
        FeedbackServiceClient::new(self.feedback.channel())
    }

    fn customers(&self) -> Customers {
        CustomerServiceClient::new(self.customer.channel())
    }

    fn now(&self) -> DateTime<Utc> {
        clm_domain::Clock::now(&self.clock)
    }

    /// A customer with survey consent on e-mail (unless `consent` is false),
    /// once feedback has seen it.
    async fn customer(&self, email: &str, consent: bool) -> String {
        let c = self
            .customers()
            .create_customer(cpb::CreateCustomerRequest {
                customer: Some(cpb::Customer {
                    email: email.into(),
                    display_name: email.into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        if consent {
            self.customers()
                .set_consent(cpb::SetConsentRequest {
                    name: c.name.clone(),
                    settings: vec![cpb::ConsentSetting {
                        purpose: cpb::ConsentPurpose::Surveys as i32,
                        channel: cpb::ConsentChannel::Email as i32,
                        state: cpb::ConsentState::Granted as i32,
                    }],
                    source: cpb::ConsentSource::Api as i32,
                    request_id: format!("consent-{email}"),
                })
                .await
                .unwrap();
        }
        c.name
    }

    /// Waits until feedback has applied the customer stream so far.
    async fn synced(&self) {
        let probe = self.customer(&format!("probe-{}@x.io", uuid()), true).await;
        let fb = self.fb();
        let survey = self
            .survey_named(&format!("p-{}", uuid()), &[nps("nps", false)])
            .await;
        eventually(std::time::Duration::from_secs(30), || {
            let mut fb = fb.clone();
            let survey = survey.clone();
            let probe = probe.clone();
            async move {
                let r = fb
                    .create_invitations(pb::CreateInvitationsRequest {
                        survey,
                        customers: vec![probe],
                        channel: cpb::ConsentChannel::Email as i32,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                !r.invitations.is_empty()
            }
        })
        .await;
    }

    async fn survey_named(&self, id: &str, questions: &[pb::Question]) -> String {
        self.survey_with(id, questions, |_| {}).await
    }

    async fn survey_with(
        &self,
        id: &str,
        questions: &[pb::Question],
        edit: impl FnOnce(&mut pb::Survey),
    ) -> String {
        let mut s = pb::Survey {
            display_name: format!("Survey {id}"),
            questions: questions.to_vec(),
            ..Default::default()
        };
        edit(&mut s);
        let s = self
            .fb()
            .create_survey(pb::CreateSurveyRequest {
                survey: Some(s),
                survey_id: id.into(),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        self.fb()
            .publish_survey(pb::PublishSurveyRequest {
                name: s.name.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        s.name
    }

    async fn invite(&self, survey: &str, customers: &[&str]) -> pb::CreateInvitationsResponse {
        self.fb()
            .create_invitations(pb::CreateInvitationsRequest {
                survey: survey.into(),
                customers: customers.iter().map(|c| c.to_string()).collect(),
                channel: cpb::ConsentChannel::Email as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn submit(
        &self,
        invitation: &pb::Invitation,
        response: &str,
        answers: Vec<pb::Answer>,
        finish: bool,
    ) -> Result<pb::Response, tonic::Status> {
        let survey = invitation.name.split("/invitations/").next().unwrap();
        self.fb()
            .submit_response(pb::SubmitResponseRequest {
                name: format!("{survey}/responses/{response}"),
                invitation: invitation.name.clone(),
                answers,
                finish,
            })
            .await
            .map(tonic::Response::into_inner)
    }
}

fn uuid() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

fn texts(t: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("en".to_owned(), t.to_owned())])
}

fn question(id: &str, kind: pb::QuestionKind, required: bool) -> pb::Question {
    pb::Question {
        id: id.into(),
        kind: kind as i32,
        text: texts(id),
        required,
        ..Default::default()
    }
}

fn nps(id: &str, required: bool) -> pb::Question {
    question(id, pb::QuestionKind::Nps, required)
}

fn num(question: &str, n: i64) -> pb::Answer {
    pb::Answer {
        question: question.into(),
        value: Some(pb::answer::Value::Number(n)),
        ..Default::default()
    }
}

fn text(question: &str, t: &str) -> pb::Answer {
    pb::Answer {
        question: question.into(),
        value: Some(pb::answer::Value::Text(t.into())),
        ..Default::default()
    }
}

fn choices(question: &str, ids: &[&str]) -> pb::Answer {
    pb::Answer {
        question: question.into(),
        value: Some(pb::answer::Value::Choices(pb::ChoiceIds {
            ids: ids.iter().map(|s| s.to_string()).collect(),
        })),
        ..Default::default()
    }
}

fn choice(id: &str) -> pb::Choice {
    pb::Choice {
        id: id.into(),
        text: texts(id),
    }
}

/// NPS (optional), "why" (required, shown for NPS <= 6), CSAT (required),
/// CES (optional).
fn detractor_survey() -> Vec<pb::Question> {
    let mut why = question("why", pb::QuestionKind::OpenText, true);
    why.show_if = Some(pb::DisplayCondition {
        question: "nps".into(),
        max_value: Some(6),
        ..Default::default()
    });
    vec![
        nps("nps", false),
        why,
        question("csat", pb::QuestionKind::Csat, true),
        question("ces", pb::QuestionKind::Ces, false),
    ]
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn every_question_type_is_checked_when_the_survey_is_written() {
    let env = Env::start().await;
    let mut rating = question("stars", pb::QuestionKind::Rating, false);
    rating.scale_min = 0;
    rating.scale_max = 10;
    let mut single = question("plan", pb::QuestionKind::SingleChoice, false);
    single.choices = vec![choice("basic"), choice("pro")];
    let mut multi = question("uses", pb::QuestionKind::MultipleChoice, false);
    multi.choices = vec![choice("mail"), choice("chat"), choice("api")];
    let all = vec![
        nps("nps", true),
        question("csat", pb::QuestionKind::Csat, false),
        question("ces", pb::QuestionKind::Ces, false),
        rating,
        single,
        multi,
        question("note", pb::QuestionKind::OpenText, false),
    ];
    let name = env.survey_named("all-kinds", &all).await;
    let s = env
        .fb()
        .get_survey(pb::GetSurveyRequest {
            name: name.clone(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, pb::SurveyState::Published as i32);
    assert_eq!(s.version, 1);
    assert_eq!(
        (s.questions[0].scale_min, s.questions[0].scale_max),
        (0, 10)
    );
    assert_eq!((s.questions[1].scale_min, s.questions[1].scale_max), (1, 5));
    assert_eq!((s.questions[2].scale_min, s.questions[2].scale_max), (1, 7));

    let bad = |edit: &dyn Fn(&mut Vec<pb::Question>), field: &'static str| {
        let mut qs = all.clone();
        edit(&mut qs);
        let fb = env.fb();
        async move {
            let err = fb
                .clone()
                .create_survey(pb::CreateSurveyRequest {
                    survey: Some(pb::Survey {
                        display_name: "bad".into(),
                        questions: qs,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_bad_field(&err, field);
        }
    };
    bad(&|q| q[0].kind = 0, "survey.questions[0].kind").await;
    bad(
        &|q| q[0].text = BTreeMap::from([("fr".to_owned(), "x".to_owned())]),
        "survey.questions[0].text",
    )
    .await;
    bad(&|q| q[3].scale_max = -1, "survey.questions[3].scale_max").await;
    bad(&|q| q[4].choices.truncate(1), "survey.questions[4].choices").await;
    bad(
        &|q| q[5].choices[1].id = "mail".into(),
        "survey.questions[5].choices[1].id",
    )
    .await;
    bad(&|q| q[1].id = "nps".into(), "survey.questions[1].id").await;
    bad(
        &|q| {
            q[0].show_if = Some(pb::DisplayCondition {
                question: "csat".into(),
                min_value: Some(1),
                ..Default::default()
            })
        },
        "survey.questions[0].show_if.question",
    )
    .await;
    bad(
        &|q| {
            q[6].show_if = Some(pb::DisplayCondition {
                question: "plan".into(),
                any_of_choices: vec!["gold".into()],
                ..Default::default()
            })
        },
        "survey.questions[6].show_if.any_of_choices[0]",
    )
    .await;

    // Changing the questions makes version 2; a closed survey cannot change.
    let mut changed = s.clone();
    changed
        .questions
        .push(question("more", pb::QuestionKind::OpenText, false));
    let v2 = env
        .fb()
        .update_survey(pb::UpdateSurveyRequest {
            survey: Some(changed.clone()),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["questions".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v2.version, 2);
    let stale = env
        .fb()
        .update_survey(pb::UpdateSurveyRequest {
            survey: Some(changed),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    env.fb()
        .close_survey(pb::CloseSurveyRequest {
            name: name.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let closed = env
        .fb()
        .update_survey(pb::UpdateSurveyRequest {
            survey: Some(pb::Survey {
                etag: String::new(),
                ..v2
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(closed.code(), Code::FailedPrecondition, "{closed:?}");
}

#[tokio::test]
async fn answers_are_checked_and_partial_responses_complete_once() {
    let env = Env::start().await;
    let a = env.customer("a@x.io", true).await;
    env.synced().await;
    let survey = env.survey_named("loop", &detractor_survey()).await;
    let inv = env.invite(&survey, &[&a]).await.invitations.remove(0);

    // Each answer is checked against its question.
    let err = env
        .submit(&inv, "r1", vec![num("nps", 11)], false)
        .await
        .unwrap_err();
    assert_bad_field(&err, "answers[0]");
    let err = env
        .submit(&inv, "r1", vec![num("csat", 0)], false)
        .await
        .unwrap_err();
    assert_bad_field(&err, "answers[0]");
    let err = env
        .submit(&inv, "r1", vec![text("nps", "ten")], false)
        .await
        .unwrap_err();
    assert_bad_field(&err, "answers[0]");
    let err = env
        .submit(&inv, "r1", vec![num("nope", 1)], false)
        .await
        .unwrap_err();
    assert_bad_field(&err, "answers[0].question");

    // A partial response, then a retry of the same page: one response.
    let p1 = env
        .submit(&inv, "r1", vec![num("nps", 3)], false)
        .await
        .unwrap();
    assert!(!p1.completed);
    let again = env
        .submit(&inv, "r1", vec![num("nps", 3)], false)
        .await
        .unwrap();
    assert_eq!(p1, again);
    // A detractor must say why before completing.
    let err = env
        .submit(&inv, "r1", vec![num("csat", 2)], true)
        .await
        .unwrap_err();
    assert_bad_field(&err, "answers");
    assert!(err.message().contains("why"), "{err:?}");
    let done = env
        .submit(
            &inv,
            "r1",
            vec![text("why", "too slow"), num("csat", 2)],
            true,
        )
        .await
        .unwrap();
    assert!(done.completed);
    assert_eq!(done.answers.len(), 3);
    assert_eq!(
        done.answers[0].nps_category,
        pb::NpsCategory::Detractor as i32
    );
    assert_eq!(
        done.answers[2].satisfaction,
        pb::Satisfaction::Unsatisfied as i32
    );
    // The completing submission retried answers as before; anything else
    // is refused, and the invitation takes no second response.
    let retried = env
        .submit(
            &inv,
            "r1",
            vec![text("why", "too slow"), num("csat", 2)],
            true,
        )
        .await
        .unwrap();
    assert_eq!(retried, done);
    let err = env
        .submit(&inv, "r1", vec![num("ces", 3)], false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "RESPONSE_COMPLETED");
    let err = env
        .submit(&inv, "r2", vec![num("nps", 9)], false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // A promoter is never shown "why": an answer to it is refused.
    let b = env.customer("b@x.io", true).await;
    env.synced().await;
    let inv_b = env.invite(&survey, &[&b]).await.invitations.remove(0);
    let err = env
        .submit(&inv_b, "rb", vec![num("nps", 9), text("why", "?")], false)
        .await
        .unwrap_err();
    assert_bad_field(&err, "answers[1]");
    let ok = env
        .submit(&inv_b, "rb", vec![num("nps", 9), num("csat", 5)], true)
        .await
        .unwrap();
    assert!(ok.completed);

    // Choice answers.
    let mut single = question("plan", pb::QuestionKind::SingleChoice, true);
    single.choices = vec![choice("basic"), choice("pro")];
    let mut multi = question("uses", pb::QuestionKind::MultipleChoice, false);
    multi.choices = vec![choice("mail"), choice("chat")];
    let c = env.customer("c@x.io", true).await;
    env.synced().await;
    let plans = env.survey_named("plans", &[single, multi]).await;
    let inv_c = env.invite(&plans, &[&c]).await.invitations.remove(0);
    let err = env
        .submit(
            &inv_c,
            "rc",
            vec![choices("plan", &["basic", "pro"])],
            false,
        )
        .await
        .unwrap_err();
    assert_bad_field(&err, "answers[0]");
    let err = env
        .submit(&inv_c, "rc", vec![choices("uses", &["fax"])], false)
        .await
        .unwrap_err();
    assert_bad_field(&err, "answers[0]");
    let ok = env
        .submit(
            &inv_c,
            "rc",
            vec![
                choices("plan", &["pro"]),
                choices("uses", &["mail", "chat"]),
            ],
            true,
        )
        .await
        .unwrap();
    assert!(ok.completed);
    let read = env
        .fb()
        .get_response(pb::GetResponseRequest {
            name: ok.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read, ok);
}

#[tokio::test]
async fn the_fatigue_cap_the_cadence_and_consent_each_refuse_by_name() {
    let env = Env::start().await;
    let a = env.customer("a@x.io", true).await;
    let no = env.customer("no@x.io", false).await;
    env.synced().await;
    env.fb()
        .update_fatigue_policy(pb::UpdateFatiguePolicyRequest {
            policy: Some(pb::FatiguePolicy {
                max_invitations: 2,
                period: Some(prost_types::Duration {
                    seconds: 30 * 86_400,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["max_invitations".into(), "period".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let s1 = env.survey_named("s1", &[nps("nps", true)]).await;
    let s2 = env.survey_named("s2", &[nps("nps", true)]).await;
    let s3 = env.survey_named("s3", &[nps("nps", true)]).await;
    // Surveys page newest first (the probe survey of `synced` is oldest).
    let page = env
        .fb()
        .list_surveys(pb::ListSurveysRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.surveys.len(), 2);
    let rest = env
        .fb()
        .list_surveys(pb::ListSurveysRequest {
            page_size: 2,
            page_token: page.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut names: Vec<String> = page
        .surveys
        .iter()
        .chain(&rest.surveys)
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(names.len(), 4);
    names.dedup();
    assert_eq!(names.len(), 4);
    assert!(rest.next_page_token.is_empty());
    assert!(rest.surveys.iter().all(|s| !s.questions.is_empty()));
    let first = env.invite(&s1, &[&a, &no]).await;
    assert_eq!(first.invitations.len(), 1);
    assert_eq!(first.refusals.len(), 1);
    assert_eq!(first.refusals[0].customer, no);
    assert_eq!(first.refusals[0].reason, "NO_SURVEY_CONSENT");
    assert_eq!(first.refusals[0].code, Code::FailedPrecondition as i32);
    // Consent on e-mail says nothing of SMS.
    let sms = env
        .fb()
        .create_invitations(pb::CreateInvitationsRequest {
            survey: s2.clone(),
            customers: vec![a.clone()],
            channel: cpb::ConsentChannel::Sms as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sms.refusals[0].reason, "NO_SURVEY_CONSENT");
    // The same survey again within its cadence (90 days by default).
    let again = env.invite(&s1, &[&a]).await;
    assert_eq!(again.refusals[0].reason, "RECONTACT_CADENCE");
    assert_eq!(again.refusals[0].code, Code::ResourceExhausted as i32);
    // A second survey is fine; a third passes the cap of 2 per 30 days.
    assert_eq!(env.invite(&s2, &[&a]).await.invitations.len(), 1);
    let capped = env.invite(&s3, &[&a]).await;
    assert_eq!(capped.refusals[0].reason, "FATIGUE_CAP");
    assert_eq!(capped.refusals[0].code, Code::ResourceExhausted as i32);
    // The window slides: 30 days later the cap has room again.
    env.clock.advance(Duration::days(30));
    assert_eq!(env.invite(&s3, &[&a]).await.invitations.len(), 1);
    // A retried call (same request id) answers the same invitations.
    let req = pb::CreateInvitationsRequest {
        survey: s2.clone(),
        customers: vec![no.clone()],
        channel: cpb::ConsentChannel::Email as i32,
        request_id: "retry-1".into(),
        ..Default::default()
    };
    let one = env
        .fb()
        .create_invitations(req.clone())
        .await
        .unwrap()
        .into_inner();
    let two = env.fb().create_invitations(req).await.unwrap().into_inner();
    assert_eq!(one, two);
}

#[tokio::test]
async fn an_expired_invitation_refuses_at_the_exact_instant() {
    let env = Env::start().await;
    let a = env.customer("a@x.io", true).await;
    let b = env.customer("b@x.io", true).await;
    env.synced().await;
    let s = env.survey_named("short", &[nps("nps", true)]).await;
    let invs = env
        .fb()
        .create_invitations(pb::CreateInvitationsRequest {
            survey: s.clone(),
            customers: vec![a.clone(), b.clone()],
            channel: cpb::ConsentChannel::Email as i32,
            ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .invitations;
    let expire = invs[0].expire_time.unwrap();
    assert_eq!(expire, timestamp(env.now() + Duration::hours(1)));
    // One microsecond before: accepted.
    env.clock
        .advance(Duration::hours(1) - Duration::microseconds(1));
    env.submit(&invs[0], "ra", vec![num("nps", 8)], false)
        .await
        .unwrap();
    // At the instant: refused, also for the one already started.
    env.clock.advance(Duration::microseconds(1));
    for (inv, id) in [(&invs[0], "ra"), (&invs[1], "rb")] {
        let err = env
            .submit(inv, id, vec![num("nps", 9)], true)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert_eq!(reason(&err), "INVITATION_EXPIRED");
    }
    // The timer marks them expired.
    let fb = env.fb();
    eventually(std::time::Duration::from_secs(30), || {
        let mut fb = fb.clone();
        let s = s.clone();
        async move {
            let l = fb
                .list_invitations(pb::ListInvitationsRequest {
                    parent: s,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            l.invitations
                .iter()
                .all(|i| i.state == pb::InvitationState::Expired as i32)
        }
    })
    .await;
    // A closed survey refuses late answers too.
    let s2 = env.survey_named("closing", &[nps("nps", true)]).await;
    let c = env.customer("c@x.io", true).await;
    env.synced().await;
    let inv = env.invite(&s2, &[&c]).await.invitations.remove(0);
    env.fb()
        .close_survey(pb::CloseSurveyRequest {
            name: s2,
            ..Default::default()
        })
        .await
        .unwrap();
    let err = env
        .submit(&inv, "rc", vec![num("nps", 9)], true)
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "SURVEY_STATE");
}

#[tokio::test]
async fn a_response_limit_counts_completed_responses_only() {
    let env = Env::start().await;
    let a = env.customer("a@x.io", true).await;
    let b = env.customer("b@x.io", true).await;
    let c = env.customer("c@x.io", true).await;
    env.synced().await;
    let s = env
        .survey_with("limited", &[nps("nps", true)], |s| s.response_limit = 1)
        .await;
    let invs = env.invite(&s, &[&a, &b, &c]).await.invitations;
    // Partial responses do not count.
    env.submit(&invs[0], "ra", vec![num("nps", 1)], false)
        .await
        .unwrap();
    env.submit(&invs[1], "rb", vec![num("nps", 2)], false)
        .await
        .unwrap();
    env.submit(&invs[1], "rb", vec![], true).await.unwrap();
    let err = env.submit(&invs[0], "ra", vec![], true).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "RESPONSE_LIMIT");
    let err = env
        .fb()
        .create_invitations(pb::CreateInvitationsRequest {
            survey: s,
            customers: vec![c],
            channel: cpb::ConsentChannel::Email as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
}

/// The summary of a fixed data set, worked out by hand: skips, a partial
/// response, a display condition, two days, two stages.
#[tokio::test]
async fn summaries_match_nps_csat_and_ces_worked_out_by_hand() {
    let env = Env::start().await;
    let mut who = Vec::new();
    for i in 0..6 {
        who.push(env.customer(&format!("c{i}@x.io"), true).await);
    }
    // c3 answers from ACQUISITION.
    env.customers()
        .transition_stage(cpb::TransitionStageRequest {
            name: who[3].clone(),
            to_stage: cpb::Stage::Acquisition as i32,
            reason: "test".into(),
            request_id: "t1".into(),
            etag: String::new(),
            forward_only: false,
        })
        .await
        .unwrap();
    env.synced().await;
    let s = env.survey_named("hand", &detractor_survey()).await;
    let refs: Vec<&str> = who.iter().map(String::as_str).collect();
    let invs = env.invite(&s, &refs).await.invitations;
    assert_eq!(invs.len(), 6);
    // Day 1.
    env.submit(
        &invs[0],
        "r1",
        vec![num("nps", 10), num("csat", 5), num("ces", 2)],
        true,
    )
    .await
    .unwrap();
    env.submit(&invs[1], "r2", vec![num("nps", 9), num("csat", 4)], true)
        .await
        .unwrap();
    env.submit(
        &invs[2],
        "r3",
        vec![num("nps", 7), num("csat", 3), num("ces", 4)],
        true,
    )
    .await
    .unwrap();
    // Day 2.
    env.clock.advance(Duration::days(1));
    env.submit(
        &invs[3],
        "r4",
        vec![
            num("nps", 3),
            text("why", "slow"),
            num("csat", 1),
            num("ces", 7),
        ],
        true,
    )
    .await
    .unwrap();
    env.submit(&invs[4], "r5", vec![num("nps", 8)], false)
        .await
        .unwrap();
    env.submit(&invs[5], "r6", vec![num("csat", 2)], true)
        .await
        .unwrap();

    let summary = |edit: &dyn Fn(&mut pb::GetSurveySummaryRequest)| {
        let mut req = pb::GetSurveySummaryRequest {
            survey: s.clone(),
            ..Default::default()
        };
        edit(&mut req);
        let mut fb = env.fb();
        async move { fb.get_survey_summary(req).await.unwrap().into_inner() }
    };
    let all = summary(&|_| {}).await;
    assert_eq!(all.invitations, 6);
    assert_eq!(all.responses, 6);
    assert_eq!(all.completed_responses, 5);
    assert!((all.response_rate - 1.0).abs() < 1e-9);
    assert!((all.completion_rate - 5.0 / 6.0).abs() < 1e-9);
    // NPS over the five who answered it (r6 skipped it): 10, 9 promoters;
    // 7, 8 passives; 3 detractor: 100 * (2 - 1) / 5 = 20.
    let nps = all.nps.unwrap();
    assert_eq!((nps.promoters, nps.passives, nps.detractors), (2, 2, 1));
    assert!((nps.score - 20.0).abs() < 1e-9, "{nps:?}");
    // CSAT: 5, 4, 3, 1, 2 -> 2 satisfied of 5 = 40.
    let csat = all.csat.unwrap();
    assert_eq!((csat.satisfied, csat.answered), (2, 5));
    assert!((csat.score - 40.0).abs() < 1e-9);
    // CES: 2, 4, 7 -> 13 / 3.
    let ces = all.ces.unwrap();
    assert_eq!(ces.answered, 3);
    assert!((ces.mean - 13.0 / 3.0).abs() < 1e-9);
    let q: BTreeMap<&str, &pb::QuestionSummary> = all
        .questions
        .iter()
        .map(|q| (q.question.as_str(), q))
        .collect();
    assert_eq!(
        all.questions
            .iter()
            .map(|q| q.question.as_str())
            .collect::<Vec<_>>(),
        ["nps", "why", "csat", "ces"]
    );
    // NPS was shown to all six, skipped by r6.
    assert_eq!(
        (
            q["nps"].shown,
            q["nps"].answered,
            q["nps"].skipped,
            q["nps"].dropped
        ),
        (6, 5, 1, 0)
    );
    // "why" was shown to the one detractor only.
    assert_eq!((q["why"].shown, q["why"].answered), (1, 1));
    // r5 stopped at CSAT: shown to six, dropped one.
    assert_eq!(
        (q["csat"].shown, q["csat"].answered, q["csat"].dropped),
        (6, 5, 1)
    );
    assert!((q["csat"].drop_off_rate - 1.0 / 6.0).abs() < 1e-9);
    // CES: r5 never got there; r2 and r6 skipped it.
    assert_eq!(
        (q["ces"].shown, q["ces"].answered, q["ces"].skipped),
        (5, 3, 2)
    );
    assert_eq!(
        q["nps"]
            .distribution
            .iter()
            .map(|v| (v.value.as_str(), v.count))
            .collect::<Vec<_>>(),
        [("3", 1), ("7", 1), ("8", 1), ("9", 1), ("10", 1)]
    );
    // Completed only: 10, 9 | 7 | 3 -> 100 * (2 - 1) / 4 = 25.
    let done = summary(&|r| r.completed_only = true).await;
    assert!((done.nps.unwrap().score - 25.0).abs() < 1e-9);
    // By stage at response time: only c3 answered from ACQUISITION.
    let acq = summary(&|r| r.stage = cpb::Stage::Acquisition as i32).await;
    assert_eq!(acq.responses, 1);
    assert!((acq.nps.unwrap().score + 100.0).abs() < 1e-9);
    // By period and as a daily trend.
    let day2 = summary(&|r| r.start_time = Some(timestamp(t0() + Duration::hours(14)))).await;
    assert_eq!(day2.responses, 3);
    let trend = summary(&|r| {
        r.trend_bucket = Some(prost_types::Duration {
            seconds: 86_400,
            nanos: 0,
        })
    })
    .await
    .trend;
    assert_eq!(trend.len(), 2);
    // Day 1: 10, 9, 7 -> 66.67; day 2: 3, 8 -> -50.
    assert!((trend[0].nps.unwrap().score - 200.0 / 3.0).abs() < 1e-9);
    assert!((trend[1].nps.unwrap().score + 50.0).abs() < 1e-9);
    assert_eq!((trend[0].responses, trend[1].responses), (3, 3));
    // A bad filter names its field.
    let err = env
        .fb()
        .get_survey_summary(pb::GetSurveySummaryRequest {
            survey: s.clone(),
            stage: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&err, "stage");
}

#[tokio::test]
async fn erasure_deletes_open_text_and_merge_moves_responses() {
    let env = Env::start().await;
    let a = env.customer("a@x.io", true).await;
    let b = env.customer("b@x.io", true).await;
    let c = env.customer("c@x.io", true).await;
    env.synced().await;
    let s = env.survey_named("erase", &detractor_survey()).await;
    let invs = env.invite(&s, &[&a, &b, &c]).await.invitations;
    let ra = env
        .submit(
            &invs[0],
            "ra",
            vec![num("nps", 2), text("why", "my secret"), num("csat", 1)],
            true,
        )
        .await
        .unwrap();
    env.submit(&invs[1], "rb", vec![num("nps", 9), num("csat", 5)], true)
        .await
        .unwrap();
    env.submit(&invs[2], "rc", vec![num("nps", 10)], false)
        .await
        .unwrap();

    // Merge c into b: b now has two invitations and two responses.
    env.customers()
        .merge_customers(cpb::MergeCustomersRequest {
            survivor: b.clone(),
            duplicates: vec![c.clone()],
            request_id: "m1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let fb = env.fb();
    eventually(std::time::Duration::from_secs(30), || {
        let mut fb = fb.clone();
        let b = b.clone();
        async move {
            fb.list_invitations(pb::ListInvitationsRequest {
                parent: "surveys/-".into(),
                customer: b,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .invitations
            .len()
                == 2
        }
    })
    .await;
    let rc = env
        .fb()
        .get_response(pb::GetResponseRequest {
            name: format!("{s}/responses/rc"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rc.customer, b);

    // Erase a: the text goes, the numbers stay (anonymous).
    env.customers()
        .erase_customer(cpb::EraseCustomerRequest {
            name: a.clone(),
            request_id: "e1".into(),
        })
        .await
        .unwrap();
    eventually(std::time::Duration::from_secs(30), || {
        let mut fb = fb.clone();
        let name = ra.name.clone();
        async move {
            let r = fb
                .get_response(pb::GetResponseRequest { name })
                .await
                .unwrap()
                .into_inner();
            r.customer.is_empty()
        }
    })
    .await;
    let r = env
        .fb()
        .get_response(pb::GetResponseRequest {
            name: ra.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.answers.iter().all(|a| a.question != "why"),
        "open text survived erasure: {r:?}"
    );
    let summary = env
        .fb()
        .get_survey_summary(pb::GetSurveySummaryRequest {
            survey: s.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.nps.unwrap().detractors, 1, "the number stays");
    let none = env
        .fb()
        .list_invitations(pb::ListInvitationsRequest {
            parent: "surveys/-".into(),
            customer: a.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.invitations.is_empty());
}

#[tokio::test]
async fn lifecycle_triggers_invite_on_entering_a_stage_and_after_a_purchase() {
    let env = Env::start().await;
    let a = env.customer("a@x.io", true).await;
    env.synced().await;
    let entered = env
        .survey_with("welcome", &[nps("nps", true)], |s| {
            s.targeting = Some(pb::Targeting {
                audience: Some(pb::targeting::Audience::StageEntered(pb::StageEntered {
                    stage: cpb::Stage::Acquisition as i32,
                })),
                channel: cpb::ConsentChannel::Email as i32,
                ..Default::default()
            })
        })
        .await;
    let bought = env
        .survey_with("after-purchase", &[nps("nps", true)], |s| {
            s.targeting = Some(pb::Targeting {
                audience: Some(pb::targeting::Audience::AfterPurchase(pb::AfterPurchase {
                    delay: Some(prost_types::Duration {
                        seconds: 2 * 86_400,
                        nanos: 0,
                    }),
                })),
                channel: cpb::ConsentChannel::Email as i32,
                ..Default::default()
            })
        })
        .await;
    let of = |survey: String| {
        let mut fb = env.fb();
        let a = a.clone();
        async move {
            fb.list_invitations(pb::ListInvitationsRequest {
                parent: survey,
                customer: a,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .invitations
        }
    };
    env.customers()
        .transition_stage(cpb::TransitionStageRequest {
            name: a.clone(),
            to_stage: cpb::Stage::Acquisition as i32,
            reason: "demo booked".into(),
            request_id: "stage-1".into(),
            etag: String::new(),
            forward_only: false,
        })
        .await
        .unwrap();
    eventually(std::time::Duration::from_secs(30), || {
        let of = of(entered.clone());
        async move { of.await.len() == 1 }
    })
    .await;
    env.customers()
        .record_touchpoints(cpb::RecordTouchpointsRequest {
            touchpoints: vec![cpb::Touchpoint {
                customer: a.clone(),
                event_id: "order-1".into(),
                r#type: cpb::TouchpointType::Purchase as i32,
                occurred_time: Some(timestamp(env.now())),
                revenue: Some(clm_proto::common::Money {
                    currency_code: "EUR".into(),
                    amount_minor: 4_900,
                }),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    // Not before the delay...
    env.synced().await;
    assert!(of(bought.clone()).await.is_empty());
    // ...at it.
    env.clock.advance(Duration::days(2));
    let invs = eventually(std::time::Duration::from_secs(30), || {
        let of = of(bought.clone());
        async move {
            let l = of.await;
            (!l.is_empty()).then_some(l)
        }
    })
    .await;
    assert_eq!(invs[0].create_time, Some(timestamp(env.now())));
    // Survey answers cannot be recorded as touchpoints by callers.
    let err = env
        .customers()
        .record_touchpoints(cpb::RecordTouchpointsRequest {
            touchpoints: vec![cpb::Touchpoint {
                customer: a.clone(),
                event_id: "fake".into(),
                r#type: cpb::TouchpointType::SurveyAnswer as i32,
                occurred_time: Some(timestamp(env.now())),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_bad_field(&err, "touchpoints[0].type");
}
