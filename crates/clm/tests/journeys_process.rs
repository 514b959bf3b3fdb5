//! Journeys that need the real binary.
//!
//! * Journey 5, crash and resume: the five services as separate `clm serve`
//!   processes (SQLite, or PostgreSQL when `CLM_TEST_DATABASE_URL` is set),
//!   purchases streaming in while a consumer service (loyalty, then
//!   segmentation) is killed with SIGKILL and started again: every balance,
//!   score and membership ends equal to what the rules give for the
//!   purchases, the figures of a run without the crash.
//! * One trace across every hop: `clm up` exporting to an OTLP receiver;
//!   the closed feedback loop driven under one client trace shows that
//!   trace in the spans of all five services, scoring's and
//!   segmentation's reached through change events only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::testing::{TestBackend, eventually, wait_serving};
use clm_proto::customer as cpb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::feedback as fpb;
use clm_proto::feedback::feedback_service_client::FeedbackServiceClient;
use clm_proto::loyalty as lpb;
use clm_proto::loyalty::loyalty_service_client::LoyaltyServiceClient;
use clm_proto::scoring as spb;
use clm_proto::scoring::scoring_service_client::ScoringServiceClient;
use clm_proto::segmentation as gpb;
use clm_proto::segmentation::segmentation_service_client::SegmentationServiceClient;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tonic::transport::Channel;

const SERVICES: [&str; 5] = ["customer", "scoring", "segmentation", "feedback", "loyalty"];
const WAIT: Duration = Duration::from_secs(60);

use clm_platform::testing::free_port;

/// Drains `child`'s stdout in the background, sending each
/// `<service> listening on ADDR` it prints.
fn addresses(child: &mut Child) -> std::sync::mpsc::Receiver<(String, SocketAddr)> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let mut words = line.split_whitespace();
            if let (Some(service), Some("listening"), Some("on"), Some(addr)) =
                (words.next(), words.next(), words.next(), words.next())
                && let Ok(addr) = addr.parse()
            {
                let _ = tx.send((service.to_owned(), addr));
            }
        }
    });
    rx
}

/// Five `clm serve` processes, each on its own backend and fixed port,
/// every peer configured.
struct Processes {
    ports: BTreeMap<&'static str, u16>,
    backends: BTreeMap<&'static str, TestBackend>,
    children: BTreeMap<&'static str, Child>,
}

impl Processes {
    async fn start() -> Self {
        let mut backends = BTreeMap::new();
        backends.insert(
            "customer",
            TestBackend::migrated::<clm_customer::store::Migrator>().await,
        );
        backends.insert(
            "scoring",
            TestBackend::migrated::<clm_scoring::store::Migrator>().await,
        );
        backends.insert(
            "segmentation",
            TestBackend::migrated::<clm_segmentation::store::Migrator>().await,
        );
        backends.insert(
            "feedback",
            TestBackend::migrated::<clm_feedback::store::Migrator>().await,
        );
        backends.insert(
            "loyalty",
            TestBackend::migrated::<clm_loyalty::store::Migrator>().await,
        );
        let mut p = Self {
            ports: SERVICES.iter().map(|s| (*s, free_port())).collect(),
            backends,
            children: BTreeMap::new(),
        };
        for s in SERVICES {
            p.start_one(s).await;
        }
        p
    }

    fn url(&self, service: &str) -> String {
        format!("http://127.0.0.1:{}", self.ports[service])
    }

    fn channel(&self, service: &str) -> Channel {
        clm_platform::client::channel(&self.url(service)).unwrap()
    }

    async fn start_one(&mut self, service: &'static str) {
        let b = &self.backends[service];
        // Its stderr (each start writes it anew), for a failure to quote.
        let log = b.dir().join(format!("{service}.stderr"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clm"));
        cmd.args(["serve", service, "--listen"])
            .arg(format!("127.0.0.1:{}", self.ports[service]))
            .args(["--database-url", &b.database_url])
            .arg("--data-dir")
            .arg(b.dir())
            .env("RUST_LOG", "warn")
            .env("CLM_CHANGE_POLL_INTERVAL_MS", "50")
            .env("CLM_DATABASE__MAX_CONNECTIONS", "4")
            .env_remove("CLM_AUTH__HS256_SECRET")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("a log file for clm serve"));
        if let Some(redis) = &b.redis_url {
            cmd.env("CLM_CACHE__REDIS_URL", redis)
                .env("CLM_CACHE__KEY_PREFIX", &b.key_prefix);
        }
        for peer in SERVICES.into_iter().filter(|p| *p != service) {
            cmd.env(
                format!("CLM_PEERS__{}", peer.to_uppercase()),
                self.url(peer),
            );
        }
        let mut child = cmd.spawn().expect("spawn clm serve");
        if let Err(e) = addresses(&mut child).recv_timeout(Duration::from_secs(60)) {
            let _ = child.kill();
            let status = child.wait();
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: String = said.lines().rev().take(20).collect::<Vec<_>>().join("\n");
            panic!(
                "clm serve {service} on port {} printed no address ({e}); it exited with {status:?}; \
                 the last lines of its stderr, newest first:\n{tail}",
                self.ports[service],
            );
        }
        self.children.insert(service, child);
        wait_serving(&self.url(service)).await;
    }

    /// SIGKILL: no drain, no flush, transactions cut wherever they are.
    fn kill(&mut self, service: &str) {
        if let Some(mut c) = self.children.remove(service) {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for s in SERVICES {
            self.kill(s);
        }
    }
}

fn purchase(customer: &str, id: &str, euros: i64) -> cpb::Touchpoint {
    cpb::Touchpoint {
        customer: customer.into(),
        event_id: id.into(),
        r#type: cpb::TouchpointType::Purchase as i32,
        occurred_time: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
        revenue: Some(clm_proto::common::Money {
            currency_code: "EUR".into(),
            amount_minor: euros * 100,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn journey_5_a_consumer_killed_mid_stream_resumes_with_nothing_lost_or_doubled() {
    let mut p = Processes::start().await;
    let mut customers = CustomerServiceClient::new(p.channel("customer"));
    ScoringServiceClient::new(p.channel("scoring"))
        .create_scoring_model(spb::CreateScoringModelRequest {
            scoring_model: Some(spb::ScoringModel {
                display_name: "buyers".into(),
                scores: vec![spb::ScoreDefinition {
                    name: "engagement".into(),
                    ..Default::default()
                }],
                rules: vec![spb::ScoringRule {
                    id: "buys".into(),
                    score: "engagement".into(),
                    points: 5,
                    trigger: Some(spb::scoring_rule::Trigger::Touchpoint("purchase".into())),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scoring_model_id: "buyers".into(),
            request_id: "model".into(),
        })
        .await
        .unwrap();
    LoyaltyServiceClient::new(p.channel("loyalty"))
        .create_program(lpb::CreateProgramRequest {
            program: Some(lpb::Program {
                display_name: "Stars".into(),
                earning_rules: vec![lpb::EarningRule {
                    id: "buy".into(),
                    trigger: lpb::EarningTrigger::Purchase as i32,
                    currency_code: "EUR".into(),
                    points_per_unit: 1,
                    unit_minor: 100,
                    ..Default::default()
                }],
                auto_enroll: true,
                ..Default::default()
            }),
            program_id: "stars".into(),
            request_id: "program".into(),
        })
        .await
        .unwrap();
    let segment = |id: &str, rule: &str| gpb::CreateSegmentRequest {
        segment: Some(gpb::Segment {
            display_name: id.into(),
            rule_text: rule.into(),
            ..Default::default()
        }),
        request_id: format!("segment-{id}"),
    };
    let mut segments = SegmentationServiceClient::new(p.channel("segmentation"));
    let rich = segments
        .create_segment(segment("rich", "loyalty.balance >= 150"))
        .await
        .unwrap()
        .into_inner()
        .name;
    let keen = segments
        .create_segment(segment("keen", "score.engagement >= 50"))
        .await
        .unwrap()
        .into_inner()
        .name;

    // 40 customers; customer i buys i % 7 + 1 times, EUR 10 + i each time.
    let mut who = Vec::new();
    for i in 0..40 {
        who.push(
            customers
                .create_customer(cpb::CreateCustomerRequest {
                    customer: Some(cpb::Customer {
                        email: format!("c{i}@crash.io"),
                        ..Default::default()
                    }),
                    request_id: format!("c{i}"),
                })
                .await
                .unwrap()
                .into_inner()
                .name,
        );
    }
    let buys = |i: usize| i % 7 + 1;
    let euros = |i: usize| 10 + i as i64;
    let mut batches: Vec<Vec<cpb::Touchpoint>> = Vec::new();
    for round in 0..7 {
        let batch: Vec<_> = who
            .iter()
            .enumerate()
            .filter(|(i, _)| buys(*i) > round)
            .map(|(i, c)| purchase(c, &format!("p{i}-{round}"), euros(i)))
            .collect();
        batches.push(batch);
    }
    // Rounds 0-2, kill loyalty, rounds 3-4, restart it; kill
    // segmentation, rounds 5-6, restart it.
    let send = async |customers: &mut CustomerServiceClient<Channel>, b: &[cpb::Touchpoint]| {
        customers
            .record_touchpoints(cpb::RecordTouchpointsRequest {
                touchpoints: b.to_vec(),
            })
            .await
            .unwrap();
    };
    for b in &batches[0..3] {
        send(&mut customers, b).await;
    }
    p.kill("loyalty");
    for b in &batches[3..5] {
        send(&mut customers, b).await;
    }
    p.start_one("loyalty").await;
    p.kill("segmentation");
    for b in &batches[5..7] {
        send(&mut customers, b).await;
    }
    p.start_one("segmentation").await;

    let mut loyalty = LoyaltyServiceClient::new(p.channel("loyalty"));
    let scoring = ScoringServiceClient::new(p.channel("scoring"));
    let mut segments = SegmentationServiceClient::new(p.channel("segmentation"));
    for (i, c) in who.iter().enumerate() {
        let points = buys(i) as i64 * euros(i);
        let score = 5.0 * buys(i) as f64;
        let member = format!(
            "programs/stars/members/{}",
            c.trim_start_matches("customers/")
        );
        let m = eventually(WAIT, || {
            let mut loyalty = loyalty.clone();
            let member = member.clone();
            async move {
                let m = loyalty
                    .get_member(lpb::GetMemberRequest { name: member })
                    .await
                    .ok()?
                    .into_inner();
                (m.lifetime_earned >= points).then_some(m)
            }
        })
        .await;
        assert_eq!((m.balance, m.lifetime_earned), (points, points), "{c}");
        let got = eventually(WAIT, || {
            let mut scoring = scoring.clone();
            let c = c.clone();
            async move {
                let s = scoring
                    .get_score(spb::GetScoreRequest {
                        customer: c,
                        scoring_model: "scoringModels/buyers".into(),
                        read_time: None,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let v = s
                    .scores
                    .iter()
                    .find(|v| v.score == "engagement")
                    .map_or(0.0, |v| v.value);
                (v >= score).then_some(v)
            }
        })
        .await;
        assert_eq!(got, score, "{c}");
        let is = |segment: String| {
            let mut segments = segments.clone();
            let c = c.clone();
            async move {
                segments
                    .is_member(gpb::IsMemberRequest {
                        segment,
                        customer: c,
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .member
            }
        };
        let (want_rich, want_keen) = (points >= 150, score >= 50.0);
        eventually(WAIT, || async {
            is(rich.clone()).await == want_rich && is(keen.clone()).await == want_keen
        })
        .await;
    }
    // Settled and stable: nothing is applied a second time later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total: i64 = loyalty
        .list_members(lpb::ListMembersRequest {
            parent: "programs/stars".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .members
        .iter()
        .map(|m| m.lifetime_earned)
        .sum();
    let want: i64 = (0..who.len()).map(|i| buys(i) as i64 * euros(i)).sum();
    assert_eq!(total, want);
    let _ = &mut segments;
}

mod otlp {
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService;
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService;
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use std::sync::{Arc, Mutex};

    /// An OTLP receiver that keeps the spans and metrics it is sent.
    #[derive(Default, Clone)]
    pub struct Received(
        pub Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
        pub Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    );

    #[tonic::async_trait]
    impl MetricsService for Received {
        async fn export(
            &self,
            request: tonic::Request<ExportMetricsServiceRequest>,
        ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
            self.1.lock().unwrap().push(request.into_inner());
            Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
        }
    }

    #[tonic::async_trait]
    impl TraceService for Received {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            self.0.lock().unwrap().push(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }
}

/// `request` carrying a child of trace `trace` (a fresh span id each time).
fn traced<T>(trace: &str, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    let span = &uuid_like()[16..];
    r.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{span}-01").parse().unwrap(),
    );
    r
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    format!("{:032x}", N.fetch_add(1, Ordering::Relaxed) + 0xabc0_0000)
}

#[tokio::test]
async fn one_trace_follows_the_feedback_loop_through_all_five_services() {
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use opentelemetry_proto::tonic::metrics::v1::metric;

    let received = otlp::Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received.clone()))
            .add_service(MetricsServiceServer::new(received.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_clm"))
        .args(["up", "--base-port", "0", "--data-dir"])
        .arg(dir.path())
        .env("CLM_TELEMETRY__OTLP_ENDPOINT", &endpoint)
        .env("CLM_CHANGE_POLL_INTERVAL_MS", "50")
        .env("RUST_LOG", "warn")
        .env_remove("CLM_AUTH__HS256_SECRET")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = addresses(&mut child);
    let mut urls = BTreeMap::new();
    while urls.len() < SERVICES.len() {
        let (service, addr) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        urls.insert(service, format!("http://{addr}"));
    }
    for url in urls.values() {
        wait_serving(url).await;
    }
    let ch = |s: &str| clm_platform::client::channel(&urls[s]).unwrap();
    let (mut customers, mut scoring, mut segments, mut feedback, mut loyalty) = (
        CustomerServiceClient::new(ch("customer")),
        ScoringServiceClient::new(ch("scoring")),
        SegmentationServiceClient::new(ch("segmentation")),
        FeedbackServiceClient::new(ch("feedback")),
        LoyaltyServiceClient::new(ch("loyalty")),
    );

    // Set-up, untraced.
    scoring
        .create_scoring_model(spb::CreateScoringModelRequest {
            scoring_model: Some(spb::ScoringModel {
                display_name: "loop".into(),
                scores: vec![spb::ScoreDefinition {
                    name: "engagement".into(),
                    ..Default::default()
                }],
                rules: vec![spb::ScoringRule {
                    id: "detractor".into(),
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
                }],
                ..Default::default()
            }),
            scoring_model_id: "loop".into(),
            request_id: "model".into(),
        })
        .await
        .unwrap();
    let at_risk = segments
        .create_segment(gpb::CreateSegmentRequest {
            segment: Some(gpb::Segment {
                display_name: "at risk".into(),
                rule_text: "score.engagement < 0".into(),
                ..Default::default()
            }),
            request_id: "segment".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .name;
    loyalty
        .create_program(lpb::CreateProgramRequest {
            program: Some(lpb::Program {
                display_name: "Stars".into(),
                earning_rules: vec![lpb::EarningRule {
                    id: "buy".into(),
                    trigger: lpb::EarningTrigger::Purchase as i32,
                    currency_code: "EUR".into(),
                    points_per_unit: 1,
                    unit_minor: 100,
                    ..Default::default()
                }],
                tiers: vec![lpb::Tier {
                    id: "gold".into(),
                    threshold: 0,
                    ..Default::default()
                }],
                loyalty_tier: "gold".into(),
                auto_enroll: true,
                ..Default::default()
            }),
            program_id: "stars".into(),
            request_id: "program".into(),
        })
        .await
        .unwrap();
    loyalty
        .create_reward(lpb::CreateRewardRequest {
            parent: "programs/stars".into(),
            reward: Some(lpb::Reward {
                display_name: "Sorry".into(),
                cost: 10,
                eligible_segment: at_risk.clone(),
                ..Default::default()
            }),
            reward_id: "recovery".into(),
            request_id: "reward".into(),
        })
        .await
        .unwrap();
    let survey = feedback
        .create_survey(fpb::CreateSurveyRequest {
            survey: Some(fpb::Survey {
                display_name: "nps".into(),
                questions: vec![fpb::Question {
                    id: "nps".into(),
                    kind: fpb::QuestionKind::Nps as i32,
                    text: BTreeMap::from([("en".to_owned(), "?".to_owned())]),
                    required: true,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            survey_id: "nps".into(),
            request_id: "survey".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .name;
    feedback
        .publish_survey(fpb::PublishSurveyRequest {
            name: survey.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    // The journey, every call of it in one client trace.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let c = customers
        .create_customer(traced(
            trace,
            cpb::CreateCustomerRequest {
                customer: Some(cpb::Customer {
                    email: "traced@x.io".into(),
                    ..Default::default()
                }),
                request_id: "c".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .name;
    customers
        .set_consent(traced(
            trace,
            cpb::SetConsentRequest {
                name: c.clone(),
                settings: vec![cpb::ConsentSetting {
                    purpose: cpb::ConsentPurpose::Surveys as i32,
                    channel: cpb::ConsentChannel::InApp as i32,
                    state: cpb::ConsentState::Granted as i32,
                }],
                source: cpb::ConsentSource::Api as i32,
                request_id: "consent".into(),
            },
        ))
        .await
        .unwrap();
    customers
        .record_touchpoints(traced(
            trace,
            cpb::RecordTouchpointsRequest {
                touchpoints: vec![purchase(&c, "order-1", 20)],
            },
        ))
        .await
        .unwrap();
    let invitation = eventually(WAIT, || {
        let mut feedback = feedback.clone();
        let (survey, c) = (survey.clone(), c.clone());
        async move {
            feedback
                .create_invitations(traced(
                    trace,
                    fpb::CreateInvitationsRequest {
                        survey,
                        customers: vec![c],
                        channel: cpb::ConsentChannel::InApp as i32,
                        ..Default::default()
                    },
                ))
                .await
                .unwrap()
                .into_inner()
                .invitations
                .into_iter()
                .next()
        }
    })
    .await;
    feedback
        .submit_response(traced(
            trace,
            fpb::SubmitResponseRequest {
                name: format!("{survey}/responses/r1"),
                invitation: invitation.name,
                answers: vec![fpb::Answer {
                    question: "nps".into(),
                    value: Some(fpb::answer::Value::Number(3)),
                    ..Default::default()
                }],
                finish: true,
            },
        ))
        .await
        .unwrap();
    // Untraced polling: segmentation is reached through events only.
    eventually(WAIT, || {
        let mut segments = segments.clone();
        let (at_risk, c) = (at_risk.clone(), c.clone());
        async move {
            segments
                .is_member(gpb::IsMemberRequest {
                    segment: at_risk,
                    customer: c,
                })
                .await
                .unwrap()
                .into_inner()
                .member
        }
    })
    .await;
    let member = format!(
        "programs/stars/members/{}",
        c.trim_start_matches("customers/")
    );
    eventually(WAIT, || {
        let mut loyalty = loyalty.clone();
        let member = member.clone();
        async move {
            loyalty
                .redeem_reward(traced(
                    trace,
                    lpb::RedeemRewardRequest {
                        member,
                        reward: "programs/stars/rewards/recovery".into(),
                        request_id: "redeem".into(),
                    },
                ))
                .await
                .is_ok()
        }
    })
    .await;

    // SIGTERM flushes every exporter before the process exits.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exited.success(), "{exited:?}");

    // service → (span names in the trace, whether one is a consumer span).
    let mut seen: BTreeMap<String, (Vec<String>, bool)> = BTreeMap::new();
    let all = received.0.lock().unwrap().clone();
    for req in &all {
        for rs in &req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for s in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
                let hex: String = s.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                if hex == trace {
                    let e = seen.entry(service.clone()).or_default();
                    e.0.push(s.name.clone());
                    // SpanKind 5: CONSUMER.
                    e.1 |= s.kind == 5;
                }
            }
        }
    }
    for service in SERVICES {
        let key = format!("clm-{service}");
        assert!(
            seen.contains_key(&key),
            "no span of {key} in the trace: {seen:?}"
        );
    }
    for service in ["scoring", "segmentation"] {
        assert!(
            seen[&format!("clm-{service}")].1,
            "{service} joined the trace by applying an event: {seen:?}"
        );
    }

    // Freshness, event recorded → membership changed, measured by
    // segmentation: the detractor's answer moved the customer into the
    // at-risk segment (one change at least; the shutdown flushed it).
    let mut freshness = (0_u64, 0.0_f64);
    for req in received.1.lock().unwrap().iter() {
        for rm in &req.resource_metrics {
            for m in rm.scope_metrics.iter().flat_map(|sm| &sm.metrics) {
                if m.name != "clm.segmentation.freshness" {
                    continue;
                }
                if let Some(metric::Data::Histogram(h)) = &m.data {
                    for p in &h.data_points {
                        freshness = (p.count, p.sum.unwrap_or_default());
                    }
                }
            }
        }
    }
    assert!(freshness.0 >= 1, "no freshness recorded: {freshness:?}");
    println!(
        "freshness (event recorded → membership changed): {} changes, mean {:.1} ms",
        freshness.0,
        freshness.1 / freshness.0 as f64 * 1000.0
    );
}
