//! A downstream service following the customer change stream through the
//! platform's service shape, the way scoring and segmentation do: typed
//! handlers, batched apply, events emitted to its own outbox, after-commit
//! hooks, service tokens under auth, dead letters, and a crash between the
//! effect and the cursor. Every effect must happen exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_domain::ManualClock;
use clm_platform::changes::{
    Apply, Handlers, On, OnBatch, Subscriber, SubscriptionError, load_cursor,
};
use clm_platform::config::Config;
use clm_platform::outbox::NewEvent;
use clm_platform::service::{Parts, ServiceDescriptor, migrate_with};
use clm_platform::testing::{TestBackend, eventually, scalar, start, start_with_clock};
use clm_platform::{Error, Runtime};
use clm_proto::common::dead_letter_service_client::DeadLetterServiceClient;
use clm_proto::common::{ChangeEvent, ListDeadLettersRequest, ReplayDeadLetterRequest};
use clm_proto::customer as pb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use sea_orm::sea_query::{Alias, OnConflict, Query};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use sea_orm_migration::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "e2e-secret-e2e-secret-e2e-secret-0123";

/// The consumer's own schema: platform tables plus its effects.
struct ConsumerMigrator;

impl MigratorTrait for ConsumerMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut m = clm_platform::migration::platform_migrations();
        m.push(Box::new(Effects));
        m
    }
}

struct Effects;

impl MigrationName for Effects {
    fn name(&self) -> &str {
        "m0100_effects"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Effects {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Alias::new("effects"))
                .col(
                    ColumnDef::new(Alias::new("event_id"))
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(
                    ColumnDef::new(Alias::new("sequence"))
                        .big_integer()
                        .not_null(),
                )
                .col(
                    ColumnDef::new(Alias::new("applied"))
                        .big_integer()
                        .not_null(),
                )
                .to_owned(),
        )
        .await
    }
}

/// Counts committed after-commit hooks of the descriptor-run consumer.
static HOOKS_RUN: AtomicU64 = AtomicU64::new(0);

/// The consumer as a service: follows customer, emits one event per effect.
static CONSUMER: ServiceDescriptor = ServiceDescriptor {
    name: "consumer",
    about: "test consumer of the customer stream",
    migrate: migrate_with::<ConsumerMigrator>,
    policy: &clm_platform::auth::Policy::PLATFORM_ONLY,
    build,
};

fn build(_rt: &Runtime) -> anyhow::Result<Parts> {
    let recorder = Arc::new(Recorder {
        hooks: Some(&HOOKS_RUN),
        heal: None,
        poison: None,
    });
    Ok(Parts::new().follow("customer", handlers(recorder)))
}

fn handlers(r: Arc<Recorder>) -> Handlers {
    Handlers::new()
        .on::<pb::CustomerCreated, _>(r.clone())
        .on_batch::<pb::TouchpointRecorded, _>(r)
}

/// The longest run of touchpoints a batch handler received at once.
static LONGEST_RUN: AtomicUsize = AtomicUsize::new(0);

/// Records each event as an effect; a second application of the same event
/// increments `applied` instead of failing, so doubles are counted, not hidden.
struct Recorder {
    hooks: Option<&'static AtomicU64>,
    /// When set, `poison` fails until this flag turns true.
    heal: Option<Arc<AtomicBool>>,
    poison: Option<String>,
}

impl Recorder {
    async fn record(&self, cx: &mut Apply, event: &ChangeEvent) -> Result<(), Error> {
        if let (Some(p), Some(heal)) = (&self.poison, &self.heal)
            && *p == event.event_id
            && !heal.load(Ordering::SeqCst)
        {
            return Err(Error::internal(format!("cannot apply {}", event.event_id)));
        }
        let mut upsert = Query::insert();
        upsert
            .into_table(Alias::new("effects"))
            .columns(["event_id", "sequence", "applied"].map(Alias::new))
            .values_panic([
                event.event_id.clone().into(),
                event.sequence.into(),
                1_i64.into(),
            ])
            .on_conflict(
                OnConflict::column(Alias::new("event_id"))
                    .value(
                        Alias::new("applied"),
                        Expr::col((Alias::new("effects"), Alias::new("applied"))).add(1),
                    )
                    .to_owned(),
            );
        cx.txn().execute(&upsert).await?;
        cx.emit(NewEvent::new(
            event.subject.clone(),
            &pb::StageChanged {
                customer: event.subject.clone(),
                change: None,
            },
        ));
        if let Some(counter) = self.hooks {
            cx.after_commit(async move {
                counter.fetch_add(1, Ordering::SeqCst);
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl On<pb::CustomerCreated> for Recorder {
    async fn on(
        &self,
        cx: &mut Apply,
        event: &ChangeEvent,
        message: pb::CustomerCreated,
    ) -> Result<(), Error> {
        assert!(
            message.customer.is_some(),
            "typed dispatch decodes the payload"
        );
        self.record(cx, event).await
    }
}

#[async_trait::async_trait]
impl OnBatch<pb::TouchpointRecorded> for Recorder {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, pb::TouchpointRecorded)>,
    ) -> Result<(), Error> {
        LONGEST_RUN.fetch_max(messages.len(), Ordering::SeqCst);
        let mut last = 0;
        for (event, message) in messages {
            assert!(event.sequence > last, "a run keeps stream order");
            last = event.sequence;
            assert_eq!(
                message.touchpoint.map(|t| t.customer).unwrap_or_default(),
                event.subject
            );
            self.record(cx, event).await?;
        }
        Ok(())
    }
}

/// Asserts the consumer's database holds exactly `n` effects, each applied
/// once, no dead letter, and one emitted event per effect.
async fn assert_exactly_once(db: &DatabaseConnection, n: i64) {
    eventually(Duration::from_secs(30), || async {
        scalar(db, "SELECT COUNT(*) FROM effects").await == n
            && scalar(
                db,
                "SELECT COUNT(*) FROM outbox_events WHERE position IS NOT NULL",
            )
            .await
                == n
    })
    .await;
    assert_eq!(
        scalar(db, "SELECT COUNT(*) FROM effects WHERE applied <> 1").await,
        0,
        "an effect was applied twice"
    );
    assert_eq!(
        scalar(db, "SELECT COUNT(*) FROM dead_letters").await,
        0,
        "no event was parked"
    );
    assert_eq!(
        scalar(db, "SELECT COUNT(*) FROM outbox").await,
        n,
        "one emitted event per effect"
    );
}

fn touchpoints(customer: &str, from: usize, to: usize) -> pb::RecordTouchpointsRequest {
    pb::RecordTouchpointsRequest {
        touchpoints: (from..to)
            .map(|i| pb::Touchpoint {
                customer: customer.to_owned(),
                event_id: format!("t{i}"),
                r#type: pb::TouchpointType::SupportContact as i32,
                occurred_time: Some(prost_types::Timestamp {
                    seconds: 1_760_000_000,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .collect(),
    }
}

type Client = CustomerServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        clm_platform::client::ClientInterceptor,
    >,
>;

fn client(url: &str, token: Option<&str>) -> Client {
    CustomerServiceClient::with_interceptor(
        clm_platform::client::channel(url).unwrap(),
        clm_platform::client::ClientInterceptor::new(token),
    )
}

async fn create_customer(c: &mut Client, email: &str) -> String {
    c.create_customer(pb::CreateCustomerRequest {
        customer: Some(pb::Customer {
            email: email.into(),
            ..Default::default()
        }),
        request_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .name
}

fn with_auth(mut c: Config) -> Config {
    c.auth.hs256_secret = Some(SECRET.into());
    c
}

#[tokio::test]
async fn a_consumer_service_follows_under_auth_and_applies_every_event_once() {
    let source_backend = TestBackend::new().await;
    let mut source_config = with_auth(source_backend.config("customer"));
    let source = start(&clm_customer::DESCRIPTOR, source_config.clone()).await;
    source_config.listen = source.addr;
    let admin = clm_platform::auth::mint_hs256(
        SECRET,
        "ada",
        &[clm_platform::auth::Role::Admin],
        Duration::from_secs(600),
    )
    .unwrap();

    let consumer_backend = TestBackend::new().await;
    let mut consumer_config = with_auth(consumer_backend.config("consumer"));
    consumer_config
        .peers
        .insert("customer".into(), source.url());
    consumer_config.subscriber.batch_size = 64;
    consumer_config.subscriber.min_backoff_ms = 20;
    consumer_config.subscriber.max_backoff_ms = 200;
    // Tokens live 2 s and are renewed by the consumer's clock; the source
    // restarts after they expired.
    consumer_config.subscriber.token_ttl_secs = 2;
    let clock = ManualClock::new(chrono::Utc::now());
    let consumer =
        start_with_clock(&CONSUMER, consumer_config.clone(), Arc::new(clock.clone())).await;
    let db = clm_platform::db::connect(&consumer_config.database)
        .await
        .unwrap();

    let mut c = client(&source.url(), Some(&admin));
    let customer = create_customer(&mut c, "e2e@example.com").await;
    c.record_touchpoints(touchpoints(&customer, 0, 300))
        .await
        .unwrap();
    assert_exactly_once(&db, 301).await;

    // The source restarts on the same port once the first token expired
    // (by the consumer's clock, moved past the 2 s instead of waiting them
    // out); the subscriber reconnects with a fresh token and resumes.
    source.stop().await;
    clock.advance(chrono::Duration::milliseconds(2500));
    let source = start(&clm_customer::DESCRIPTOR, source_config.clone()).await;
    let mut c = client(&source.url(), Some(&admin));
    c.record_touchpoints(touchpoints(&customer, 300, 600))
        .await
        .unwrap();
    assert_exactly_once(&db, 601).await;
    eventually(Duration::from_secs(10), || async {
        HOOKS_RUN.load(Ordering::SeqCst) == 601
    })
    .await;
    assert_eq!(
        load_cursor(&db, "customer").await.unwrap(),
        scalar(&db, "SELECT MAX(sequence) FROM effects").await,
        "the cursor is the last applied sequence"
    );

    // Without a token the consumer's own dead-letter service refuses the caller.
    let mut dl = DeadLetterServiceClient::new(consumer.channel());
    let refused = dl
        .list_dead_letters(ListDeadLettersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    consumer.stop().await;
    source.stop().await;
}

/// A consumer runtime opened the way the platform opens it.
async fn consumer_runtime(backend: &TestBackend) -> (Runtime, CancellationToken) {
    let shutdown = CancellationToken::new();
    let rt = clm_platform::open(
        &CONSUMER,
        &backend.config("consumer"),
        Arc::new(clm_domain::SystemClock),
        shutdown.clone(),
    )
    .await
    .unwrap();
    (rt, shutdown)
}

fn subscriber(rt: &Runtime, url: &str, recorder: Recorder) -> Subscriber {
    let mut c = Config::defaults("consumer", std::path::Path::new(".")).subscriber;
    c.batch_size = 50;
    c.min_backoff_ms = 5;
    c.max_backoff_ms = 100;
    c.max_attempts = 3;
    Subscriber::new(rt.clone(), "customer", url, handlers(Arc::new(recorder))).with_config(&c)
}

fn plain() -> Recorder {
    Recorder {
        hooks: None,
        heal: None,
        poison: None,
    }
}

#[tokio::test]
async fn a_crash_between_effect_and_cursor_loses_and_doubles_nothing() {
    let source_backend = TestBackend::new().await;
    let source = start(&clm_customer::DESCRIPTOR, source_backend.config("customer")).await;
    let mut c = client(&source.url(), None);
    let customer = create_customer(&mut c, "crash@example.com").await;
    c.record_touchpoints(touchpoints(&customer, 0, 400))
        .await
        .unwrap();

    let consumer_backend = TestBackend::new().await;
    let (rt, stop) = consumer_runtime(&consumer_backend).await;
    // The third transaction "crashes" after its handlers ran, before its cursor.
    let transactions = Arc::new(Mutex::new(0_u32));
    let seen = transactions.clone();
    let crashed = subscriber(&rt, &source.url(), plain())
        .with_fail_point(Arc::new(move |point| {
            assert_eq!(point, "subscriber.before_cursor");
            let mut n = seen.lock().unwrap();
            *n += 1;
            *n == 3
        }))
        .run(CancellationToken::new())
        .await;
    assert!(matches!(crashed, Err(SubscriptionError::FailPoint(_))));
    let before = scalar(&rt.db, "SELECT COUNT(*) FROM effects").await;
    assert!(
        before > 0 && before < 401,
        "two batches committed before the crash, got {before}"
    );

    // Restarted, it resumes from the stored cursor.
    let transactions_after = Arc::new(Mutex::new(0_u32));
    let seen = transactions_after.clone();
    let token = CancellationToken::new();
    let run = tokio::spawn(
        subscriber(&rt, &source.url(), plain())
            .with_fail_point(Arc::new(move |_| {
                *seen.lock().unwrap() += 1;
                false
            }))
            .run(token.clone()),
    );
    assert_exactly_once(&rt.db, 401).await;
    token.cancel();
    run.await.unwrap().unwrap();
    assert!(
        LONGEST_RUN.load(Ordering::SeqCst) > 1,
        "a batch handler receives runs of events"
    );
    let batches = *transactions.lock().unwrap() + *transactions_after.lock().unwrap();
    assert!(
        batches < 401 / 10,
        "events are applied in batches, not one transaction each ({batches} transactions)"
    );
    stop.cancel();
    source.stop().await;
}

#[tokio::test]
async fn a_poison_event_is_parked_listed_and_replayed() {
    let source_backend = TestBackend::new().await;
    let source = start(&clm_customer::DESCRIPTOR, source_backend.config("customer")).await;
    let mut c = client(&source.url(), None);
    let customer = create_customer(&mut c, "poison@example.com").await;
    c.record_touchpoints(touchpoints(&customer, 0, 10))
        .await
        .unwrap();

    let consumer_backend = TestBackend::new().await;
    let (rt, stop) = consumer_runtime(&consumer_backend).await;
    // Find the sequence of touchpoint t5 the way the consumer will see it.
    let heal = Arc::new(AtomicBool::new(false));
    let recorder = || Recorder {
        hooks: None,
        heal: Some(heal.clone()),
        poison: None,
    };
    let poisoned_event = {
        let mut w =
            clm_proto::common::change_stream_service_client::ChangeStreamServiceClient::new(
                source.channel(),
            )
            .watch_changes(clm_proto::common::WatchChangesRequest {
                after_sequence: 0,
                event_types: vec!["clm.customer.v1.TouchpointRecorded".into()],
            })
            .await
            .unwrap()
            .into_inner();
        let mut id = String::new();
        for _ in 0..6 {
            id = w.message().await.unwrap().unwrap().event.unwrap().event_id;
        }
        id
    };
    let token = CancellationToken::new();
    let run = tokio::spawn(
        subscriber(
            &rt,
            &source.url(),
            Recorder {
                poison: Some(poisoned_event.clone()),
                ..recorder()
            },
        )
        .run(token.clone()),
    );
    eventually(Duration::from_secs(30), || async {
        load_cursor(&rt.db, "customer").await.unwrap() >= 11
    })
    .await;
    token.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(
        scalar(&rt.db, "SELECT COUNT(*) FROM effects").await,
        10,
        "every event but the poison one"
    );

    // The dead letter is listed and replayed through the consumer's own gRPC
    // DeadLetterService once the cause is fixed.
    let handlers = std::collections::BTreeMap::from([(
        "customer".to_owned(),
        handlers(Arc::new(Recorder {
            poison: Some(poisoned_event.clone()),
            ..recorder()
        })),
    )]);
    let server = dead_letter_server(rt.clone(), handlers).await;
    let mut dl = DeadLetterServiceClient::new(clm_platform::client::channel(&server.0).unwrap());
    let listed = dl
        .list_dead_letters(ListDeadLettersRequest {
            filter: "source = \"customer\"".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.dead_letters.len(), 1);
    let letter = &listed.dead_letters[0];
    assert_eq!(letter.attempts, 3);
    assert!(letter.error.contains("cannot apply"), "{}", letter.error);
    assert_eq!(letter.event.as_ref().unwrap().event_id, poisoned_event);

    // Still broken: the replay says why and the letter stays.
    let still = dl
        .replay_dead_letter(ReplayDeadLetterRequest {
            name: letter.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!still.applied);
    assert_eq!(still.dead_letter.unwrap().attempts, 4);

    heal.store(true, Ordering::SeqCst);
    let replayed = dl
        .replay_dead_letter(ReplayDeadLetterRequest {
            name: letter.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(replayed.applied, "{}", replayed.error);
    assert_eq!(scalar(&rt.db, "SELECT COUNT(*) FROM effects").await, 11);
    assert_eq!(scalar(&rt.db, "SELECT COUNT(*) FROM dead_letters").await, 0);
    let gone = dl
        .replay_dead_letter(ReplayDeadLetterRequest {
            name: letter.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    let bad = dl
        .replay_dead_letter(ReplayDeadLetterRequest {
            name: "deadLetters/nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    server.1.cancel();
    stop.cancel();
    source.stop().await;
}

/// Serves the dead-letter service of `rt` on an ephemeral port.
async fn dead_letter_server(
    rt: Runtime,
    handlers: std::collections::BTreeMap<String, Handlers>,
) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let token = CancellationToken::new();
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(
        clm_proto::common::dead_letter_service_server::DeadLetterServiceServer::new(
            clm_platform::changes::DeadLetterServer::new(rt, handlers),
        ),
    );
    let config = Config::defaults("consumer", std::path::Path::new("."));
    let t = token.clone();
    tokio::spawn(async move {
        clm_platform::server::serve(
            &config,
            "consumer",
            listener,
            routes.routes(),
            &[],
            tonic_health::server::HealthReporter::new(),
            t,
        )
        .await
    });
    clm_platform::testing::wait_serving(&url).await;
    (url, token)
}

#[tokio::test]
async fn a_source_that_went_backwards_stops_the_subscription() {
    let source_backend = TestBackend::new().await;
    let source = start(&clm_customer::DESCRIPTOR, source_backend.config("customer")).await;
    let mut c = client(&source.url(), None);
    create_customer(&mut c, "reset@example.com").await;

    let consumer_backend = TestBackend::new().await;
    let (rt, stop) = consumer_runtime(&consumer_backend).await;
    // The consumer has applied far more than the source now holds: the
    // source was restored from an older backup.
    clm_platform::changes::save_cursor(&rt.db, "customer", 1_000, chrono::Utc::now())
        .await
        .unwrap();
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        subscriber(&rt, &source.url(), plain()).run(CancellationToken::new()),
    )
    .await
    .expect("the subscription stops instead of waiting forever");
    match outcome {
        Err(SubscriptionError::Source(m)) => {
            assert!(m.contains("beyond the newest event"), "{m}")
        }
        other => panic!("expected a source error, got {other:?}"),
    }
    assert_eq!(load_cursor(&rt.db, "customer").await.unwrap(), 1_000);
    stop.cancel();
    source.stop().await;
}

#[tokio::test]
async fn refused_credentials_are_a_visible_fault_not_a_silent_retry() {
    let source_backend = TestBackend::new().await;
    let source = start(
        &clm_customer::DESCRIPTOR,
        with_auth(source_backend.config("customer")),
    )
    .await;
    let consumer_backend = TestBackend::new().await;
    let mut consumer_config = consumer_backend.config("consumer");
    // Another secret than the source's: every token we present is refused.
    consumer_config.auth.hs256_secret = Some("x".repeat(40));
    consumer_config
        .peers
        .insert("customer".into(), source.url());
    consumer_config.subscriber.min_backoff_ms = 10;
    consumer_config.subscriber.max_backoff_ms = 50;
    let consumer = start(&CONSUMER, consumer_config).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(consumer.channel());
    eventually(Duration::from_secs(30), || {
        let mut health = health.clone();
        async move {
            health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "clm.subscription.customer".into(),
                })
                .await
                .is_ok_and(|r| {
                    r.into_inner().status
                        == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
                })
        }
    })
    .await;
    // The service itself still serves.
    let overall = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        overall.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    consumer.stop().await;
    source.stop().await;
}

/// A `nats-server` with JetStream of this test's own (its store in a
/// temporary directory, so a restart keeps the streams), killed on drop.
struct Nats {
    port: u16,
    store: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl Nats {
    fn start(port: u16, store: std::path::PathBuf) -> Self {
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server on PATH");
        Self {
            port,
            store,
            child: Some(child),
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The customer stream over NATS JetStream: the customer service relays its
/// outbox to its own stream and the consumer follows that stream instead of
/// WatchChanges. The broker is restarted while events are pending and the
/// relay (the source service) restarts too: every effect happens once.
#[tokio::test]
async fn over_jetstream_a_broker_and_a_relay_restart_lose_and_double_nothing() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let store = tempfile::tempdir().unwrap();
    let mut nats = Nats::start(port, store.path().to_path_buf());
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let nats_url = nats.url();
    let with_nats = |mut c: Config| {
        c.nats.url = Some(nats_url.clone());
        c.nats.stream_prefix.clone_from(&prefix);
        c
    };

    let source_backend = TestBackend::new().await;
    let mut source_config = with_nats(source_backend.config("customer"));
    source_config.nats.relay = true;
    let source = start(&clm_customer::DESCRIPTOR, source_config.clone()).await;
    source_config.listen = source.addr;

    let consumer_backend = TestBackend::new().await;
    let mut consumer_config = with_nats(consumer_backend.config("consumer"));
    consumer_config.subscriber.source = clm_platform::config::StreamSource::Jetstream;
    consumer_config.subscriber.batch_size = 64;
    consumer_config.subscriber.min_backoff_ms = 20;
    consumer_config.subscriber.max_backoff_ms = 300;
    consumer_config
        .peers
        .insert("customer".into(), source.url());
    let consumer = start(&CONSUMER, consumer_config.clone()).await;
    let db = clm_platform::db::connect(&consumer_config.database)
        .await
        .unwrap();

    let mut c = client(&source.url(), None);
    let customer = create_customer(&mut c, "js@example.com").await;
    c.record_touchpoints(touchpoints(&customer, 0, 300))
        .await
        .unwrap();
    assert_exactly_once(&db, 301).await;

    // The broker goes down; events committed meanwhile wait in the outbox
    // and reach the consumer once it is back (same store, same streams).
    nats.stop();
    c.record_touchpoints(touchpoints(&customer, 300, 500))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) FROM effects").await,
        301,
        "the consumer reads the broker, not WatchChanges"
    );
    let nats = Nats::start(port, nats.store.clone());
    assert_exactly_once(&db, 501).await;

    // The relay restarts with the source service: it resumes after the
    // stream's last position, republishing nothing the consumer applies.
    source.stop().await;
    let source = start(&clm_customer::DESCRIPTOR, source_config.clone()).await;
    // Idempotent by event id: retried as a client would while the restarted
    // service warms up under load.
    eventually(Duration::from_secs(20), || async {
        let mut c = client(&source.url(), None);
        match c.record_touchpoints(touchpoints(&customer, 500, 700)).await {
            Ok(_) => Some(()),
            Err(e)
                if matches!(
                    e.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Aborted
                ) =>
            {
                None
            }
            Err(e) => panic!("{e:?}"),
        }
    })
    .await;
    assert_exactly_once(&db, 701).await;
    assert_eq!(
        load_cursor(&db, "customer").await.unwrap(),
        scalar(&db, "SELECT MAX(sequence) FROM effects").await,
        "the cursor is the last applied sequence"
    );
    // The stream holds each position once, in order.
    let source_db = clm_platform::db::connect(&source_config.database)
        .await
        .unwrap();
    let js = clm_platform::jetstream::connect(&consumer_config.nats)
        .await
        .unwrap();
    let names = clm_platform::jetstream::names(&prefix, "customer");
    let mut stream = js.get_stream(&names.stream).await.unwrap();
    let messages = stream.info().await.unwrap().state.messages;
    assert_eq!(
        messages,
        <u64 as TryFrom<i64>>::try_from(scalar(&source_db, "SELECT COUNT(*) FROM outbox").await)
            .unwrap()
    );
    assert_eq!(
        clm_platform::jetstream::last_position(&stream, &names.subject)
            .await
            .unwrap(),
        <i64 as TryFrom<u64>>::try_from(messages).unwrap()
    );
    js.delete_stream(&names.stream).await.unwrap();
    consumer.stop().await;
    source.stop().await;
    drop(nats);
}
