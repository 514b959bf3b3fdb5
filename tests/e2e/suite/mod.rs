//! All five services side by side in this process, each on a fresh
//! backend of its own (SQLite, or PostgreSQL + Redis when
//! `CLM_TEST_DATABASE_URL` is set), every peer wired to every other as
//! `clm up` does, with short poll intervals. Services can be stopped and
//! started again on the same address and database.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use clm_platform::config::Config;
use clm_platform::service::ServiceDescriptor;
use clm_platform::testing::{
    Running, TestBackend, eventually, start, start_on, start_on_with_clock, start_with_clock,
};
use clm_proto::customer as cpb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::feedback::feedback_service_client::FeedbackServiceClient;
use clm_proto::loyalty::loyalty_service_client::LoyaltyServiceClient;
use clm_proto::scoring::scoring_service_client::ScoringServiceClient;
use clm_proto::segmentation as gpb;
use clm_proto::segmentation::segmentation_service_client::SegmentationServiceClient;
use std::collections::BTreeMap;
use std::time::Duration;
use tonic::transport::Channel;

/// The five services, in start order.
pub const SERVICES: [&str; 5] = ["customer", "scoring", "segmentation", "feedback", "loyalty"];

fn descriptor(service: &str) -> &'static ServiceDescriptor {
    match service {
        "customer" => &clm_customer::DESCRIPTOR,
        "scoring" => &clm_scoring::DESCRIPTOR,
        "segmentation" => &clm_segmentation::DESCRIPTOR,
        "feedback" => &clm_feedback::DESCRIPTOR,
        "loyalty" => &clm_loyalty::DESCRIPTOR,
        other => panic!("no service {other}"),
    }
}

async fn backend(service: &str) -> TestBackend {
    match service {
        "customer" => TestBackend::migrated::<clm_customer::store::Migrator>().await,
        "scoring" => TestBackend::migrated::<clm_scoring::store::Migrator>().await,
        "segmentation" => TestBackend::migrated::<clm_segmentation::store::Migrator>().await,
        "feedback" => TestBackend::migrated::<clm_feedback::store::Migrator>().await,
        "loyalty" => TestBackend::migrated::<clm_loyalty::store::Migrator>().await,
        other => panic!("no service {other}"),
    }
}

/// The running suite.
pub struct Suite {
    running: BTreeMap<&'static str, Running>,
    /// Listeners bound before the first start (the services call each
    /// other, so each must know the others' addresses before it starts).
    bound: BTreeMap<&'static str, std::net::TcpListener>,
    configs: BTreeMap<&'static str, Config>,
    backends: BTreeMap<&'static str, TestBackend>,
    /// The clock every service reads, when the test drives it.
    clock: Option<std::sync::Arc<dyn clm_domain::Clock>>,
}

impl Suite {
    /// All five, wired.
    pub async fn start() -> Self {
        Self::start_with(|_, _| {}).await
    }

    /// All five, reading `clock` (a `ManualClock` the test drives).
    pub async fn start_with_clock(clock: std::sync::Arc<dyn clm_domain::Clock>) -> Self {
        Self::start_inner(|_, _| {}, Some(clock)).await
    }

    /// All five, with `tweak` applied to each service's config.
    pub async fn start_with(tweak: impl Fn(&str, &mut Config)) -> Self {
        Self::start_inner(tweak, None).await
    }

    async fn start_inner(
        tweak: impl Fn(&str, &mut Config),
        clock: Option<std::sync::Arc<dyn clm_domain::Clock>>,
    ) -> Self {
        let mut backends = BTreeMap::new();
        let mut addrs = BTreeMap::new();
        let mut bound = BTreeMap::new();
        for s in SERVICES {
            backends.insert(s, backend(s).await);
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            addrs.insert(s, l.local_addr().unwrap());
            bound.insert(s, l);
        }
        let mut configs = BTreeMap::new();
        for s in SERVICES {
            let mut c = backends[s].config(s);
            c.listen = addrs[s];
            c.change_poll_interval_ms = 50;
            // Five services a test: keep PostgreSQL's connections in bounds.
            c.database.max_connections = 4;
            c.segmentation.objective_cache_secs = 0;
            for p in SERVICES.into_iter().filter(|p| *p != s) {
                c.peers.insert(p.into(), format!("http://{}", addrs[p]));
            }
            tweak(s, &mut c);
            configs.insert(s, c);
        }
        let mut suite = Self {
            running: BTreeMap::new(),
            bound,
            configs,
            backends,
            clock,
        };
        for s in SERVICES {
            suite.start_service(s).await;
        }
        suite
    }

    /// Starts `service` (again) on its address and database.
    pub async fn start_service(&mut self, service: &'static str) {
        assert!(
            !self.running.contains_key(service),
            "{service} runs already"
        );
        let config = self.configs[service].clone();
        let running = match (self.bound.remove(service), self.clock.clone()) {
            (Some(listener), Some(clock)) => {
                start_on_with_clock(descriptor(service), config, listener, clock).await
            }
            (Some(listener), None) => start_on(descriptor(service), config, listener).await,
            (None, Some(clock)) => start_with_clock(descriptor(service), config, clock).await,
            (None, None) => start(descriptor(service), config).await,
        };
        self.running.insert(service, running);
    }

    /// Stops `service` gracefully (its peers keep running).
    pub async fn stop_service(&mut self, service: &'static str) {
        if let Some(r) = self.running.remove(service) {
            r.stop().await;
        }
    }

    /// Stops everything.
    pub async fn stop(mut self) {
        for s in SERVICES.into_iter().rev() {
            self.stop_service(s).await;
        }
    }

    /// The backend `service` runs on.
    pub fn backend(&self, service: &str) -> &TestBackend {
        &self.backends[service]
    }

    /// A channel to `service`.
    pub fn channel(&self, service: &str) -> Channel {
        clm_platform::client::channel(&format!("http://{}", self.configs[service].listen)).unwrap()
    }

    pub fn customers(&self) -> CustomerServiceClient<Channel> {
        CustomerServiceClient::new(self.channel("customer"))
    }
    pub fn scoring(&self) -> ScoringServiceClient<Channel> {
        ScoringServiceClient::new(self.channel("scoring"))
    }
    pub fn segments(&self) -> SegmentationServiceClient<Channel> {
        SegmentationServiceClient::new(self.channel("segmentation"))
    }
    pub fn feedback(&self) -> FeedbackServiceClient<Channel> {
        FeedbackServiceClient::new(self.channel("feedback"))
    }
    pub fn loyalty(&self) -> LoyaltyServiceClient<Channel> {
        LoyaltyServiceClient::new(self.channel("loyalty"))
    }

    /// A new customer with `email`, consenting to surveys in-app.
    pub async fn customer(&self, email: &str) -> String {
        let c = self
            .customers()
            .create_customer(cpb::CreateCustomerRequest {
                customer: Some(cpb::Customer {
                    email: email.into(),
                    ..Default::default()
                }),
                request_id: format!("create-{email}"),
            })
            .await
            .unwrap()
            .into_inner();
        self.customers()
            .set_consent(clm_tests::journey::survey_consent(
                &c.name,
                format!("consent-{email}"),
            ))
            .await
            .unwrap();
        c.name
    }

    /// A segment of `rule` (owned by the caller).
    pub async fn segment(&self, id: &str, rule: &str) -> String {
        self.segments()
            .create_segment(gpb::CreateSegmentRequest {
                segment: Some(gpb::Segment {
                    display_name: id.into(),
                    rule_text: rule.into(),
                    ..Default::default()
                }),
                request_id: format!("segment-{id}"),
            })
            .await
            .unwrap()
            .into_inner()
            .name
    }

    pub async fn is_member(&self, segment: &str, customer: &str) -> bool {
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

    /// The customer's stage.
    pub async fn stage(&self, customer: &str) -> cpb::Stage {
        let c = self
            .customers()
            .get_customer(cpb::GetCustomerRequest {
                name: customer.into(),
            })
            .await
            .unwrap()
            .into_inner();
        cpb::Stage::try_from(c.stage).unwrap()
    }

    /// A purchase of `minor` cents (EUR) by `customer`, with event id `id`.
    pub async fn purchase(&self, customer: &str, id: &str, minor: i64) {
        self.touch(customer, id, cpb::TouchpointType::Purchase, minor)
            .await;
    }

    /// A touchpoint of `kind` (a purchase carries `minor` cents, EUR).
    pub async fn touch(&self, customer: &str, id: &str, kind: cpb::TouchpointType, minor: i64) {
        let mut t = cpb::Touchpoint {
            customer: customer.into(),
            event_id: id.into(),
            r#type: kind as i32,
            occurred_time: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            ..Default::default()
        };
        match kind {
            cpb::TouchpointType::Purchase => {
                t.revenue = Some(clm_proto::common::Money {
                    currency_code: "EUR".into(),
                    amount_minor: minor,
                });
            }
            cpb::TouchpointType::FeatureUse => t.feature = "export".into(),
            _ => {}
        }
        self.customers()
            .record_touchpoints(cpb::RecordTouchpointsRequest {
                touchpoints: vec![t],
            })
            .await
            .unwrap();
    }
}

impl Suite {
    /// A published survey `id` asking NPS (required) and, optionally, a
    /// free-text comment; no recontact period, so a customer can answer
    /// again at once.
    pub async fn nps_survey(&self, id: &str) -> String {
        use clm_proto::feedback as fpb;
        let survey = self
            .feedback()
            .create_survey(clm_tests::journey::nps_survey(id))
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
        survey.name
    }

    /// `customer` answers `survey` with `nps` (and `comment`, if any) as
    /// response `response`, once feedback knows their consent.
    pub async fn answer(
        &self,
        survey: &str,
        customer: &str,
        response: &str,
        nps: i64,
        comment: Option<&str>,
    ) -> clm_proto::feedback::Response {
        use clm_proto::feedback as fpb;
        let invitation = eventually(Duration::from_secs(30), || {
            let mut fb = self.feedback();
            let (survey, customer) = (survey.to_owned(), customer.to_owned());
            async move {
                fb.create_invitations(fpb::CreateInvitationsRequest {
                    survey,
                    customers: vec![customer],
                    channel: cpb::ConsentChannel::InApp as i32,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .invitations
                .into_iter()
                .next()
            }
        })
        .await;
        let answers = clm_tests::journey::nps_answers(nps, comment);
        self.feedback()
            .submit_response(fpb::SubmitResponseRequest {
                name: format!("{survey}/responses/{response}"),
                invitation: invitation.name,
                answers,
                finish: true,
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// The customer's score `score` under model `model`.
    pub async fn score(&self, customer: &str, model: &str, score: &str) -> f64 {
        let s = self
            .scoring()
            .get_score(clm_proto::scoring::GetScoreRequest {
                customer: customer.into(),
                scoring_model: format!("scoringModels/{model}"),
                read_time: None,
            })
            .await
            .unwrap()
            .into_inner();
        s.scores
            .iter()
            .find(|v| v.score == score)
            .map_or(0.0, |v| v.value)
    }

    /// The loyalty member `customer` of `program`, once loyalty has it.
    pub async fn member(
        &self,
        program: &str,
        customer: &str,
    ) -> Option<clm_proto::loyalty::Member> {
        self.loyalty()
            .get_member(clm_proto::loyalty::GetMemberRequest {
                name: format!(
                    "programs/{program}/members/{}",
                    customer.trim_start_matches("customers/")
                ),
            })
            .await
            .ok()
            .map(tonic::Response::into_inner)
    }
}
