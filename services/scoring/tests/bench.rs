//! Scoring benchmarks, each printing its figure beside a reference
//! measured in the same run and the ratio. Ignored by default; run on
//! PostgreSQL with
//!
//! ```sh
//! CLM_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo test --release -p clm-scoring --features bench --test bench -- --ignored --nocapture --test-threads 1
//! ```
//!
//! `BENCH_EVENTS` sets the size (default 200,000); `BENCH_PER_CUSTOMER` the
//! touchpoints per customer when following the stream (default 100);
//! `BENCH_BATCH` and `BENCH_PARTITIONS` the subscriber's batch size and
//! partitions there (default: the config's).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Duration, Utc};
use clm_domain::ManualClock;
use clm_domain::scoring::{Award, Decay};
use clm_platform::testing::{TestBackend, start_with_clock};
use clm_proto::customer as cpb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::scoring as pb;
use clm_proto::scoring::scoring_service_client::ScoringServiceClient;
use clm_scoring::store::customers::{self, TouchRow};
use clm_scoring::store::ledger::{self, NewRow};
use prost::Message;
use sea_orm::ConnectionTrait;
use std::sync::Arc;
use std::time::Instant;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

/// Touchpoints per customer in the follow benchmark (`BENCH_PER_CUSTOMER`,
/// default 100): the ledger each customer ends with grows with it.
fn per_customer() -> usize {
    std::env::var("BENCH_PER_CUSTOMER")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
}

fn events() -> usize {
    std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000)
}

const FEATURES: [&str; 10] = [
    "export", "import", "share", "invite", "report", "api", "sso", "billing", "search", "chat",
];

/// A 20-rule model: feature and product rules, half of them capped.
fn model() -> pb::ScoringModel {
    let mut rules = Vec::new();
    for (i, f) in FEATURES.iter().enumerate() {
        rules.push(pb::ScoringRule {
            id: format!("feature_{f}"),
            score: "engagement".into(),
            points: 1 + i as i64,
            trigger: Some(pb::scoring_rule::Trigger::Touchpoint(format!(
                r#"feature_use where feature = "{f}""#
            ))),
            decay: Some(pb::Decay {
                kind: Some(pb::decay::Kind::HalfLife(prost_types::Duration {
                    seconds: 30 * 86_400,
                    nanos: 0,
                })),
            }),
            ..Default::default()
        });
        rules.push(pb::ScoringRule {
            id: format!("product_{f}"),
            score: "engagement".into(),
            points: 2,
            trigger: Some(pb::scoring_rule::Trigger::Touchpoint(format!(
                r#"product_access where product = "{f}""#
            ))),
            cap: (i % 2 == 0).then_some(pb::Cap {
                points: 20,
                period: pb::CapPeriod::IsoWeek as i32,
                rolling_window: None,
            }),
            ..Default::default()
        });
    }
    pb::ScoringModel {
        display_name: "bench".into(),
        rules,
        ..Default::default()
    }
}

fn touchpoint(customer: &str, i: usize) -> cpb::Touchpoint {
    cpb::Touchpoint {
        customer: customer.into(),
        event_id: format!("{customer}/e{i}"),
        r#type: if i.is_multiple_of(2) {
            cpb::TouchpointType::FeatureUse
        } else {
            cpb::TouchpointType::ProductAccess
        } as i32,
        feature: FEATURES[i % 10].into(),
        product: FEATURES[(i / 2) % 10].into(),
        occurred_time: Some(clm_platform::convert::timestamp(
            t0() - Duration::minutes((i % 10_000) as i64),
        )),
        ..Default::default()
    }
}

fn local<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.extensions_mut()
        .insert(clm_platform::auth::Principal::local());
    r
}

#[tokio::test]
#[ignore = "benchmark"]
async fn bench_rescore() {
    use clm_proto::scoring::scoring_service_server::ScoringService;
    let n = events();
    let per_customer = 100;
    let backend = TestBackend::migrated::<clm_scoring::store::Migrator>().await;
    let clock = ManualClock::new(t0());
    let stop = tokio_util::sync::CancellationToken::new();
    let rt = clm_platform::open(
        &clm_scoring::DESCRIPTOR,
        &backend.config("scoring"),
        Arc::new(clock),
        stop.clone(),
    )
    .await
    .unwrap();
    let models = Arc::new(clm_scoring::scorer::Models::default());
    let api = clm_scoring::api::ScoringApi::new(rt.clone(), models);
    api.create_scoring_model(local(pb::CreateScoringModelRequest {
        scoring_model: Some(model()),
        scoring_model_id: "bench".into(),
        request_id: String::new(),
    }))
    .await
    .unwrap();
    // History: n touchpoints of n / 100 customers.
    let customers: Vec<String> = (0..n / per_customer)
        .map(|_| clm_domain::ids::CustomerId::new().name())
        .collect();
    let rows: Vec<TouchRow> = customers
        .iter()
        .flat_map(|c| {
            (0..per_customer).map(move |i| {
                let t = touchpoint(c, i);
                TouchRow {
                    event_id: t.event_id.clone(),
                    customer: c.clone(),
                    occurred_us: i as i64,
                    body: t.encode_to_vec(),
                }
            })
        })
        .collect();
    for part in rows.chunks(10_000) {
        customers::ensure_and_lock(
            &rt.db,
            &part.iter().map(|r| r.customer.clone()).collect::<Vec<_>>(),
        )
        .await
        .unwrap();
        customers::insert_touchpoints(&rt.db, part).await.unwrap();
    }
    // Reference: a raw set-based INSERT of n ledger rows.
    let reference: Vec<NewRow> = rows
        .iter()
        .map(|r| NewRow {
            customer: r.customer.clone(),
            model: "reference".into(),
            model_version: 1,
            award: Award {
                rule: "r".into(),
                score: "engagement".into(),
                points: 1,
                source_event: r.event_id.clone(),
                award_us: r.occurred_us,
                decay: Decay::None,
            },
            reason: String::new(),
            actor: String::new(),
        })
        .collect();
    let started = Instant::now();
    for part in reference.chunks(10_000) {
        let txn = sea_orm::TransactionTrait::begin(&rt.db).await.unwrap();
        ledger::insert(&txn, part).await.unwrap();
        txn.commit().await.unwrap();
    }
    let raw = started.elapsed();
    rt.db
        .execute_unprepared("DELETE FROM score_ledger")
        .await
        .unwrap();
    let started = Instant::now();
    let op = api
        .rescore_customers(local(pb::RescoreCustomersRequest {
            scoring_model: "scoringModels/bench".into(),
            model_version: 0,
            request_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    let done = loop {
        let o = api
            .get_operation(local(clm_proto::google::longrunning::GetOperationRequest {
                name: op.name.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        if o.done {
            break o;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let took = started.elapsed();
    let Some(clm_proto::google::longrunning::operation::Result::Response(any)) = done.result else {
        panic!("rescore failed: {:?}", done.result)
    };
    let resp = pb::RescoreCustomersResponse::decode(any.value.as_slice()).unwrap();
    println!(
        "RescoreCustomers: {n} touchpoints of {} customers -> {} ledger entries in {:.2} s ({:.0} events/s); \
         reference raw set-based INSERT of {n} ledger rows: {:.2} s ({:.0} rows/s); ratio {:.2}",
        resp.customers,
        resp.ledger_entries,
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        raw.as_secs_f64(),
        n as f64 / raw.as_secs_f64(),
        raw.as_secs_f64() / took.as_secs_f64()
    );
    stop.cancel();
}

fn percentile(sorted: &[std::time::Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_get_score_p99_at_64_streams() {
    let backend = TestBackend::migrated::<clm_scoring::store::Migrator>().await;
    let clock = ManualClock::new(t0());
    let mut config = backend.config("scoring");
    // No customer service here: the subscription retries in the background.
    config
        .peers
        .insert("customer".into(), "http://127.0.0.1:9".into());
    let server = start_with_clock(&clm_scoring::DESCRIPTOR, config, Arc::new(clock)).await;
    let mut s = ScoringServiceClient::new(server.channel());
    s.create_scoring_model(pb::CreateScoringModelRequest {
        scoring_model: Some(model()),
        scoring_model_id: "bench".into(),
        request_id: String::new(),
    })
    .await
    .unwrap();
    // 1,000 customers with 50 ledger entries each.
    let db = sea_orm::Database::connect(&backend.database_url)
        .await
        .unwrap();
    let customers: Vec<String> = (0..1000)
        .map(|_| clm_domain::ids::CustomerId::new().name())
        .collect();
    let rows: Vec<NewRow> = customers
        .iter()
        .flat_map(|c| {
            (0..50).map(move |i| NewRow {
                customer: c.clone(),
                model: "bench".into(),
                model_version: 1,
                award: Award {
                    rule: format!("feature_{}", FEATURES[i % 10]),
                    score: "engagement".into(),
                    points: 3,
                    source_event: format!("{c}/{i}"),
                    award_us: t0().timestamp_micros() - i as i64 * 3_600_000_000,
                    decay: Decay::Exponential {
                        half_life: Duration::days(30),
                    },
                },
                reason: String::new(),
                actor: String::new(),
            })
        })
        .collect();
    ledger::insert(&db, &rows).await.unwrap();
    let calls = 200;
    let run = |health: bool| {
        let channel = server.channel();
        let customers = customers.clone();
        async move {
            let mut tasks = Vec::new();
            for w in 0..64 {
                let channel = channel.clone();
                let customers = customers.clone();
                tasks.push(tokio::spawn(async move {
                    let mut s = ScoringServiceClient::new(channel.clone());
                    let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
                    let mut lat = Vec::with_capacity(calls);
                    for i in 0..calls {
                        let started = Instant::now();
                        if health {
                            h.check(tonic_health::pb::HealthCheckRequest {
                                service: String::new(),
                            })
                            .await
                            .unwrap();
                        } else {
                            s.get_score(pb::GetScoreRequest {
                                customer: customers[(w * calls + i) % customers.len()].clone(),
                                scoring_model: "scoringModels/bench".into(),
                                read_time: None,
                            })
                            .await
                            .unwrap();
                        }
                        lat.push(started.elapsed());
                    }
                    lat
                }));
            }
            let started = Instant::now();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            let wall = started.elapsed();
            all.sort();
            (all, wall)
        }
    };
    let _ = run(true).await;
    let (health, hwall) = run(true).await;
    let (score, swall) = run(false).await;
    println!(
        "GetScore at 64 streams (50 decaying entries per customer): p50 {:.2} ms, p99 {:.2} ms, {:.0} rpc/s; \
         reference bare tonic rpc (grpc.health Check): p50 {:.2} ms, p99 {:.2} ms, {:.0} rpc/s; p99 ratio {:.2}",
        percentile(&score, 0.5),
        percentile(&score, 0.99),
        score.len() as f64 / swall.as_secs_f64(),
        percentile(&health, 0.5),
        percentile(&health, 0.99),
        health.len() as f64 / hwall.as_secs_f64(),
        percentile(&score, 0.99) / percentile(&health, 0.99)
    );
    server.stop().await;
}

/// A customer service with `customers` customers, and the scoring
/// service's database holding the bench model (created by a scoring service
/// started without peers, then stopped).
struct Follow {
    clock: ManualClock,
    /// The customer database (dropping it removes the database).
    cb: TestBackend,
    sb: TestBackend,
    customer: clm_platform::testing::Running,
    names: Vec<String>,
}

impl Follow {
    async fn new(customers: usize) -> Self {
        let clock = ManualClock::new(t0());
        let cb = TestBackend::migrated::<clm_customer::store::Migrator>().await;
        let sb = TestBackend::migrated::<clm_scoring::store::Migrator>().await;
        let mut cc = cb.config("customer");
        cc.change_poll_interval_ms = 50;
        let customer =
            start_with_clock(&clm_customer::DESCRIPTOR, cc, Arc::new(clock.clone())).await;
        // Scoring needs a customer peer to start; one that refuses
        // connections keeps its cursor at 0 while the model is made.
        let mut sc = sb.config("scoring");
        sc.peers
            .insert("customer".into(), "http://127.0.0.1:9".into());
        let scoring = start_with_clock(&clm_scoring::DESCRIPTOR, sc, Arc::new(clock.clone())).await;
        ScoringServiceClient::new(scoring.channel())
            .create_scoring_model(pb::CreateScoringModelRequest {
                scoring_model: Some(model()),
                scoring_model_id: "bench".into(),
                request_id: String::new(),
            })
            .await
            .unwrap();
        scoring.stop().await;
        let mut c = CustomerServiceClient::new(customer.channel());
        let mut names = Vec::new();
        for i in 0..customers.max(1) {
            names.push(
                c.create_customer(cpb::CreateCustomerRequest {
                    customer: Some(cpb::Customer {
                        email: format!("b{i}@example.com"),
                        display_name: "B".into(),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .name,
            );
        }
        Self {
            clock,
            cb,
            sb,
            customer,
            names,
        }
    }

    /// Starts scoring following the customer stream (the subscriber's batch
    /// size and partitions from `BENCH_BATCH`, `BENCH_PARTITIONS`, by
    /// default the config's).
    async fn follow(&self) -> clm_platform::testing::Running {
        let mut sc = self.sb.config("scoring");
        sc.peers.insert("customer".into(), self.customer.url());
        let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
        if let Some(size) = env("BENCH_BATCH") {
            sc.subscriber.batch_size = size;
        }
        if let Some(n) = env("BENCH_PARTITIONS") {
            sc.subscriber.partitions = n;
        }
        start_with_clock(&clm_scoring::DESCRIPTOR, sc, Arc::new(self.clock.clone())).await
    }

    /// Records `n` touchpoints round-robin over the customers, 1,000 per
    /// call, from 4 concurrent clients.
    async fn ingest(&self, n: usize) {
        let batches: Vec<Vec<cpb::Touchpoint>> = (0..n)
            .map(|i| touchpoint(&self.names[i % self.names.len()], i))
            .collect::<Vec<_>>()
            .chunks(1000)
            .map(<[cpb::Touchpoint]>::to_vec)
            .collect();
        let mut tasks = Vec::new();
        for chunk in batches.chunks(batches.len().div_ceil(4)) {
            let mut c = CustomerServiceClient::new(self.customer.channel());
            let chunk = chunk.to_vec();
            tasks.push(tokio::spawn(async move {
                for b in chunk {
                    c.record_touchpoints(cpb::RecordTouchpointsRequest { touchpoints: b })
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }

    /// Waits until scoring has kept `n` touchpoints; returns the largest
    /// backlog seen (events of the customer stream) and the ledger's size.
    ///
    /// Each look is two index lookups: the customer stream's head and
    /// scoring's cursor on it. A `COUNT(*)` of the kept touchpoints every
    /// 100 ms, as this used to poll, scanned up to 200,000 rows each time
    /// and took PostgreSQL CPU from the scoring it was timing; it runs once
    /// here, when the cursor has reached the head.
    async fn scored(&self, n: usize) -> (i64, i64) {
        let scoring = sea_orm::Database::connect(&self.sb.database_url)
            .await
            .unwrap();
        let customer = sea_orm::Database::connect(&self.cb.database_url)
            .await
            .unwrap();
        let one = |db: &sea_orm::DatabaseConnection, sql: &'static str| {
            let db = db.clone();
            async move {
                let row = db
                    .query_one_raw(sea_orm::Statement::from_string(
                        db.get_database_backend(),
                        sql.to_owned(),
                    ))
                    .await
                    .unwrap()
                    .unwrap();
                row.try_get_by_index::<i64>(0).unwrap()
            }
        };
        let mut max_lag = 0i64;
        loop {
            let head = one(
                &customer,
                "SELECT COALESCE(MAX(position), 0) FROM outbox_events",
            )
            .await;
            let cursor = one(
                &scoring,
                "SELECT COALESCE(MAX(sequence), 0) FROM consumer_cursors WHERE source = 'customer'",
            )
            .await;
            max_lag = max_lag.max(head - cursor);
            if cursor >= head
                && one(&scoring, "SELECT COUNT(*) FROM score_touchpoints").await as usize >= n
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        (
            max_lag,
            one(&scoring, "SELECT COUNT(*) FROM score_ledger").await,
        )
    }
}

/// `n` events in `scored` beside the reference `n` in `ingest`, and the ratio.
fn pace(
    n: usize,
    scored: std::time::Duration,
    ingest: std::time::Duration,
    reference: &str,
) -> String {
    format!(
        "{:.0}/s ({:.2} s); reference {reference} {:.0}/s ({:.2} s); ratio {:.2}",
        n as f64 / scored.as_secs_f64(),
        scored.as_secs_f64(),
        n as f64 / ingest.as_secs_f64(),
        ingest.as_secs_f64(),
        ingest.as_secs_f64() / scored.as_secs_f64(),
    )
}

/// Scoring follows while the customer service ingests: keeps it up, and
/// how far behind it is when the ingest ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_follow_the_customer_stream() {
    let n = events();
    let f = Follow::new(n / per_customer()).await;
    let scoring = f.follow().await;
    let started = Instant::now();
    f.ingest(n).await;
    let ingest = started.elapsed();
    let (max_lag, ledger) = f.scored(n).await;
    let scored = started.elapsed();
    println!(
        "follow: {n} touchpoints of {} customers scored ({ledger} ledger entries) end to end {}; \
         lag when ingest ended {max_lag} events",
        f.names.len(),
        pace(n, scored, ingest, "customer ingest beside it"),
    );
    scoring.stop().await;
    f.customer.stop().await;
}

/// Scoring's own pace: the customer stream already holds every touchpoint
/// (ingested with scoring stopped: the reference, ingest alone), then
/// scoring starts and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_catch_up_with_the_customer_stream() {
    let n = events();
    let f = Follow::new(n / per_customer()).await;
    let started = Instant::now();
    f.ingest(n).await;
    let ingest = started.elapsed();
    let started = Instant::now();
    let scoring = f.follow().await;
    let (_, ledger) = f.scored(n).await;
    let scored = started.elapsed();
    println!(
        "catch up: {n} touchpoints of {} customers scored ({ledger} ledger entries) {}",
        f.names.len(),
        pace(n, scored, ingest, "customer ingest alone"),
    );
    scoring.stop().await;
    f.customer.stop().await;
}
