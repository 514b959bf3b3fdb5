//! Change streams: the `clm.common.v1.ChangeStreamService` server every
//! service mounts over its outbox, the reconnecting [`Subscriber`] that
//! follows another service's stream, and the `DeadLetterService` that lists
//! and replays the events a subscriber had to park.
//!
//! **Writing a consumer.** Register a typed handler per event type in
//! [`Handlers`] and name the source in the service descriptor
//! (`Parts::follow("customer", handlers)`); the platform does the rest.
//! A handler receives the decoded message and an [`Apply`] context: the
//! transaction, `emit` for the service's own outbox events, and
//! `after_commit` for work that must wait for the commit (cache writes).
//! Implement [`On`] to take events one at a time, or [`OnBatch`] to take
//! each run of consecutive events of a type at once and write the effect
//! with one set-based statement (what a consumer of a fast stream should do).
//!
//! **Exactly once.** Up to `subscriber.batch_size` events are applied in one
//! transaction together with the stream cursor, so a crash or restart of
//! either side loses nothing and applies nothing twice. A failing batch is
//! applied again one event at a time: an event whose handler keeps failing
//! (for a reason other than [`Error::Unavailable`]) is parked as a dead
//! letter after `subscriber.max_attempts` and the stream moves on.
//!
//! **Following the service's own stream.** A service can keep derived data
//! (report projections) as a consumer of its *own* outbox:
//! `Parts::follow_own(handlers)` runs a [`Subscriber`] made with
//! [`Subscriber::own`], which reads the outbox straight from the primary
//! database (no gRPC hop, whatever `subscriber.source` says), woken by each
//! stamp and every `change_poll_interval_ms`. It reads every event type, so
//! its cursor (kept under the service's own name in `consumer_cursors`)
//! reaches the head of the stream even when the last events are of types
//! it does not handle: [`load_cursor`] then says how fresh the derived data
//! is. Batching, partitions, retries and dead letters work as for a peer.
//!
//! **Faults are loud.** UNAUTHENTICATED or PERMISSION_DENIED from the source
//! is a configuration fault: logged as an error on every attempt, counted in
//! `clm.subscriber.faults` and reported NOT_SERVING under the health name
//! `clm.subscription.<source>`. A source whose stream went backwards (its
//! outbox was reset or restored from an older backup) or that no longer
//! keeps the events after our cursor (retention) stops the subscription
//! with an error instead of silently skipping.

use crate::Runtime;
use crate::auth::{Policy, Role, authorize};
use crate::client::ClientInterceptor;
use crate::config::{Config, SubscriberConfig};
use crate::db::{from_micros, is_postgres, to_micros};
use crate::error::Error;
use crate::outbox::NewEvent;
use crate::page::Pager;
use clm_proto::common::change_stream_service_client::ChangeStreamServiceClient;
use clm_proto::common::change_stream_service_server::ChangeStreamService;
use clm_proto::common::dead_letter_service_server::DeadLetterService;
use clm_proto::common::{
    ChangeEvent, DeadLetter, ListDeadLettersRequest, ListDeadLettersResponse,
    ReplayDeadLetterRequest, ReplayDeadLetterResponse, WatchChangesRequest, WatchChangesResponse,
};
use futures::FutureExt;
use futures::future::BoxFuture;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, OnConflict, Order, Query};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr, QueryResult, TransactionTrait};
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Events read from the outbox per query.
const READ_BATCH: u64 = 500;

/// Serves a service's outbox as `WatchChanges`.
#[derive(Clone, Debug)]
pub struct ChangeStreamServer {
    rt: Runtime,
    shutdown: CancellationToken,
    poll: Duration,
}

impl ChangeStreamServer {
    /// Serves `rt`'s outbox; open streams end with UNAVAILABLE on `shutdown`.
    pub fn new(rt: Runtime, shutdown: CancellationToken) -> Self {
        Self {
            rt,
            shutdown,
            poll: Duration::from_secs(1),
        }
    }

    /// How often an idle stream re-reads the outbox even without a wake-up
    /// (a safety net: local stamps and NOTIFY from other replicas wake it at once).
    #[must_use]
    pub fn with_poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }
}

#[tonic::async_trait]
impl ChangeStreamService for ChangeStreamServer {
    type WatchChangesStream = ReceiverStream<Result<WatchChangesResponse, Status>>;

    async fn watch_changes(
        &self,
        request: Request<WatchChangesRequest>,
    ) -> Result<Response<Self::WatchChangesStream>, Status> {
        authorize(&request, &CHANGE_STREAM_POLICY)?;
        crate::error::known_enums(request.get_ref())?;
        let req = request.into_inner();
        if req.after_sequence < 0 {
            return Err(Error::invalid("after_sequence", "must not be negative").into());
        }
        crate::convert::event_types("event_types", &req.event_types).map_err(Error::from)?;
        check_resume(&self.rt, req.after_sequence).await?;
        let (tx, rx) = mpsc::channel(2 * READ_BATCH as usize);
        let this = self.clone();
        tokio::spawn(async move {
            let mut cursor = req.after_sequence;
            let mut wake = this.rt.outbox.subscribe();
            loop {
                wake.mark_unchanged();
                match this
                    .rt
                    .outbox
                    .read_after(&this.rt.read, cursor, &req.event_types, READ_BATCH)
                    .await
                {
                    Ok(events) if !events.is_empty() => {
                        for event in events {
                            cursor = event.sequence;
                            if tx
                                .send(Ok(WatchChangesResponse { event: Some(event) }))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(Error::from(e).into())).await;
                        return;
                    }
                }
                tokio::select! {
                    _ = wake.changed() => {}
                    () = tokio::time::sleep(this.poll) => {}
                    () = tx.closed() => return,
                    () = this.shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("server is shutting down; resume from your last sequence"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What a handler works with while it applies events: the transaction that
/// will also store the cursor, the service's outbox and an after-commit hook.
pub struct Apply {
    txn: DatabaseTransaction,
    rt: Runtime,
    emitted: Vec<NewEvent>,
    after_commit: Vec<BoxFuture<'static, ()>>,
}

impl std::fmt::Debug for Apply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apply")
            .field("service", &self.rt.service)
            .field("emitted", &self.emitted.len())
            .field("after_commit", &self.after_commit.len())
            .finish()
    }
}

impl Apply {
    pub(crate) async fn begin(rt: &Runtime) -> Result<Self, DbErr> {
        Ok(Self {
            txn: rt.db.begin().await?,
            rt: rt.clone(),
            emitted: Vec::new(),
            after_commit: Vec::new(),
        })
    }

    /// The transaction the effect is written in (it also stores the cursor).
    pub fn txn(&self) -> &DatabaseTransaction {
        &self.txn
    }

    /// The service's shared resources (cache, clock, ...).
    pub fn runtime(&self) -> &Runtime {
        &self.rt
    }

    /// The current time, from the service's clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.rt.clock.now()
    }

    /// Emits an event on this service's own change stream; it commits with
    /// the effect and wakes local watchers at once.
    pub fn emit(&mut self, event: NewEvent) {
        self.emitted.push(event);
    }

    /// Finishes a service's handling of `clm.customer.v1.CustomerErased`,
    /// once its own tables no longer hold the customer: redacts the
    /// customer (and the customers merged into it) in the audit trail and
    /// emits this service's `clm.common.v1.CustomerDataErased` receipt, both
    /// in this transaction. Every consumer of the customer stream ends its
    /// erasure handler with this one call.
    pub async fn erased(
        &mut self,
        m: &clm_proto::customer::CustomerErased,
    ) -> Result<(), crate::Error> {
        let now = clm_domain::clock::micros(self.now());
        for customer in std::iter::once(&m.customer).chain(&m.merged_from) {
            crate::audit::redact_customer(&self.txn, self.rt.service, customer, now).await?;
        }
        self.emit(NewEvent::new(
            &m.customer,
            &clm_proto::common::CustomerDataErased {
                customer: m.customer.clone(),
                erasure_request: m.erasure_request.clone(),
                service: self.rt.service.to_owned(),
                erase_time: Some(crate::convert::timestamp(now)),
            },
        ));
        Ok(())
    }

    /// Runs `work` once the transaction has committed (never if it rolls
    /// back), e.g. writing what the database now holds to the cache.
    pub fn after_commit(&mut self, work: impl Future<Output = ()> + Send + 'static) {
        self.after_commit.push(Box::pin(work));
    }

    pub(crate) async fn commit(self) -> Result<(), DbErr> {
        let now = self.now();
        self.rt.outbox.append(&self.txn, &self.emitted, now).await?;
        self.rt.outbox.commit(self.txn).await?;
        for work in self.after_commit {
            work.await;
        }
        Ok(())
    }
}

/// Handles one event type of a followed stream. A service implements it
/// once per message type it cares about and registers it with
/// [`Handlers::on`].
#[async_trait::async_trait]
pub trait On<M>: Send + Sync + 'static {
    /// Applies `message` (the decoded payload of `event`) inside `cx`. An
    /// error rolls the batch back: [`Error::Unavailable`] (a dependency is
    /// down) is retried without limit, anything else up to `max_attempts`,
    /// then the event is parked as a dead letter.
    async fn on(&self, cx: &mut Apply, event: &ChangeEvent, message: M) -> Result<(), Error>;
}

/// Handles a run of consecutive events of one type at once, so the effect
/// can be one set-based statement instead of a statement per event (the
/// way to keep up with a fast source). Registered with [`Handlers::on_batch`].
#[async_trait::async_trait]
pub trait OnBatch<M>: Send + Sync + 'static {
    /// Applies `messages` (each with its event, in stream order) inside `cx`.
    /// Errors behave as for [`On::on`]; after a failure the subscriber
    /// retries the events one at a time (batches of one) to isolate the culprit.
    async fn on_batch(&self, cx: &mut Apply, messages: Vec<(&ChangeEvent, M)>)
    -> Result<(), Error>;
}

/// Runs first in each batch's transaction, with every event of the batch,
/// before any handler: where a service takes, in one order for the whole
/// batch, the locks its handlers would otherwise take one run at a time
/// (a later run taking a lock after an earlier run took another is how
/// two batches deadlock). Registered with [`Handlers::first`].
#[async_trait::async_trait]
pub trait BatchStart: Send + Sync + 'static {
    /// Prepares `cx` for `events` (in stream order). Errors behave as for
    /// [`On::on`].
    async fn start(&self, cx: &mut Apply, events: &[ChangeEvent]) -> Result<(), Error>;
}

#[async_trait::async_trait]
trait Dispatch: Send + Sync {
    /// Applies `events`, all of this dispatcher's type.
    async fn dispatch(&self, cx: &mut Apply, events: &[ChangeEvent]) -> Result<(), Error>;
}

fn decode<M: prost::Name + prost::Message + Default>(event: &ChangeEvent) -> Result<M, Error> {
    let bytes = event
        .payload
        .as_ref()
        .map_or(&[][..], |p| p.value.as_slice());
    M::decode(bytes)
        .map_err(|e| Error::Internal(format!("cannot decode {} payload: {e}", M::full_name())))
}

struct Typed<M, H> {
    handler: Arc<H>,
    message: PhantomData<fn() -> M>,
}

#[async_trait::async_trait]
impl<M, H> Dispatch for Typed<M, H>
where
    M: prost::Name + prost::Message + Default + Send + 'static,
    H: On<M>,
{
    async fn dispatch(&self, cx: &mut Apply, events: &[ChangeEvent]) -> Result<(), Error> {
        for event in events {
            self.handler.on(cx, event, decode(event)?).await?;
        }
        Ok(())
    }
}

struct TypedBatch<M, H> {
    handler: Arc<H>,
    message: PhantomData<fn() -> M>,
}

#[async_trait::async_trait]
impl<M, H> Dispatch for TypedBatch<M, H>
where
    M: prost::Name + prost::Message + Default + Send + 'static,
    H: OnBatch<M>,
{
    async fn dispatch(&self, cx: &mut Apply, events: &[ChangeEvent]) -> Result<(), Error> {
        let messages = events
            .iter()
            .map(|e| Ok((e, decode::<M>(e)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        self.handler.on_batch(cx, messages).await
    }
}

/// The handlers of one followed stream, by event type. Only these types are
/// requested from the source.
#[derive(Clone, Default)]
pub struct Handlers {
    by_type: BTreeMap<String, Arc<dyn Dispatch>>,
    first: Option<Arc<dyn BatchStart>>,
    /// Types whose batches may be split by subject
    /// ([`Handlers::on_batch_partitioned`]).
    partitioned: std::collections::BTreeSet<String>,
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_type.keys()).finish()
    }
}

impl Handlers {
    /// No handlers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies events of type `M` one at a time with `handler`.
    #[must_use]
    pub fn on<M, H>(mut self, handler: Arc<H>) -> Self
    where
        M: prost::Name + prost::Message + Default + Send + 'static,
        H: On<M>,
    {
        self.by_type.insert(
            M::full_name(),
            Arc::new(Typed::<M, H> {
                handler,
                message: PhantomData,
            }),
        );
        self
    }

    /// Applies runs of consecutive events of type `M` at once with `handler`.
    #[must_use]
    pub fn on_batch<M, H>(mut self, handler: Arc<H>) -> Self
    where
        M: prost::Name + prost::Message + Default + Send + 'static,
        H: OnBatch<M>,
    {
        self.by_type.insert(
            M::full_name(),
            Arc::new(TypedBatch::<M, H> {
                handler,
                message: PhantomData,
            }),
        );
        self
    }

    /// Like [`Handlers::on_batch`], and lets the subscriber split a batch
    /// made only of such events by subject into `subscriber.partitions`
    /// transactions applied side by side (PostgreSQL), then store the cursor
    /// in one more. The handler promises what makes that safe: it touches
    /// only rows of its events' subjects (so the partitions never wait on
    /// each other and each subject's events stay in stream order), and
    /// applying an event again changes nothing (a crash after some
    /// partitions committed replays them).
    #[must_use]
    pub fn on_batch_partitioned<M, H>(mut self, handler: Arc<H>) -> Self
    where
        M: prost::Name + prost::Message + Default + Send + 'static,
        H: OnBatch<M>,
    {
        self.partitioned.insert(M::full_name());
        self.on_batch::<M, H>(handler)
    }

    /// Whether every event of `events` may be applied in partitions (an
    /// event of a type without a handler is: it changes nothing).
    fn partitionable(&self, events: &[ChangeEvent]) -> bool {
        events.iter().all(|e| {
            self.partitioned.contains(&e.event_type) || !self.by_type.contains_key(&e.event_type)
        })
    }

    /// Runs `start` first in every batch's transaction ([`BatchStart`]).
    #[must_use]
    pub fn first(mut self, start: Arc<dyn BatchStart>) -> Self {
        self.first = Some(start);
        self
    }

    /// The event types handled.
    pub fn event_types(&self) -> Vec<String> {
        self.by_type.keys().cloned().collect()
    }

    /// Applies `events` in stream order, each run of one type with its handler.
    async fn dispatch(&self, cx: &mut Apply, events: &[ChangeEvent]) -> Result<(), Error> {
        if let Some(start) = &self.first {
            start.start(cx, events).await?;
        }
        let mut rest = events;
        while let Some(first) = rest.first() {
            let run = rest
                .iter()
                .take_while(|e| e.event_type == first.event_type)
                .count();
            if let Some(d) = self.by_type.get(&first.event_type) {
                d.dispatch(cx, &rest[..run]).await?;
            }
            rest = &rest[run..];
        }
        Ok(())
    }
}

/// A bearer token for calls to peers: minted from the HS256 secret with
/// role `service` and renewed when a third of its lifetime is left, or
/// (`auth.service_token_file`, for RS256 where a service cannot mint) read
/// from a file and re-read at most once per [`TOKEN_FILE_RECHECK`], so a
/// rotated token is picked up without a restart.
#[derive(Clone)]
pub struct TokenSource {
    source: Source,
}

#[derive(Clone)]
enum Source {
    Mint {
        auth: Arc<crate::config::AuthConfig>,
        subject: String,
        ttl: Duration,
        clock: Arc<dyn clm_domain::Clock>,
        cached: Arc<Mutex<Option<MintedToken>>>,
    },
    File(Arc<TokenFile>),
}

/// A minted token and when it expires.
type MintedToken = (String, chrono::DateTime<chrono::Utc>);

/// How often a token file is re-read at most.
pub const TOKEN_FILE_RECHECK: Duration = Duration::from_secs(1);

/// A token kept in a file, re-read when the copy in memory is older than
/// `recheck`.
struct TokenFile {
    path: std::path::PathBuf,
    recheck: Duration,
    /// The last token read and when.
    read: Mutex<Option<(String, std::time::Instant)>>,
}

impl TokenFile {
    fn token(&self) -> Result<String, Error> {
        let mut read = self
            .read
            .lock()
            .map_err(|_| Error::internal("token file cache poisoned"))?;
        if let Some((token, at)) = read.as_ref()
            && at.elapsed() < self.recheck
        {
            return Ok(token.clone());
        }
        let fresh = std::fs::read_to_string(&self.path).map_err(|e| e.to_string());
        match (fresh, read.as_mut()) {
            (Ok(t), _) if !t.trim().is_empty() => {
                let t = t.trim().to_owned();
                *read = Some((t.clone(), std::time::Instant::now()));
                Ok(t)
            }
            // A file being rotated may be missing or empty for a moment:
            // the last token read stays in use until the next look.
            (result, Some((token, at))) => {
                tracing::warn!(file = %self.path.display(), error = result.err().unwrap_or_else(|| "empty".into()), "service token file unreadable; using the last token read");
                *at = std::time::Instant::now();
                Ok(token.clone())
            }
            (result, None) => Err(Error::Unavailable(format!(
                "service token file {}: {}",
                self.path.display(),
                result.err().unwrap_or_else(|| "empty".into())
            ))),
        }
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Source::Mint { subject, ttl, .. } => f
                .debug_struct("TokenSource")
                .field("subject", subject)
                .field("ttl", ttl)
                .finish(),
            Source::File(file) => f
                .debug_struct("TokenSource")
                .field("file", &file.path)
                .finish(),
        }
    }
}

impl TokenSource {
    /// The token source of `service` under `config`: the token file when
    /// `auth.service_token_file` is set, else minted tokens when
    /// `auth.hs256_secret` is; none when auth is off.
    pub fn from_config(
        config: &Config,
        service: &str,
        clock: Arc<dyn clm_domain::Clock>,
    ) -> anyhow::Result<Option<Self>> {
        if let Some(path) = &config.auth.service_token_file {
            return Ok(Some(Self::from_file(path, TOKEN_FILE_RECHECK)));
        }
        match &config.auth.hs256_secret {
            Some(_) => Ok(Some(Self::new(
                &config.auth,
                format!("service:{service}"),
                Duration::from_secs(config.subscriber.token_ttl_secs),
                clock,
            ))),
            None => Ok(None),
        }
    }

    /// Tokens for `subject` that `auth` verifies (its secret, audience and
    /// issuer), each valid for `ttl`, renewed by `clock`'s time.
    pub fn new(
        auth: &crate::config::AuthConfig,
        subject: String,
        ttl: Duration,
        clock: Arc<dyn clm_domain::Clock>,
    ) -> Self {
        Self {
            source: Source::Mint {
                auth: Arc::new(auth.clone()),
                subject,
                ttl,
                clock,
                cached: Arc::default(),
            },
        }
    }

    /// The token kept in the file at `path` (surrounding whitespace
    /// ignored), re-read once the copy in memory is older than `recheck`.
    pub fn from_file(path: impl Into<std::path::PathBuf>, recheck: Duration) -> Self {
        Self {
            source: Source::File(Arc::new(TokenFile {
                path: path.into(),
                recheck,
                read: Mutex::new(None),
            })),
        }
    }

    /// A token with at least a third of its lifetime left (minted), or the
    /// file's current one.
    pub fn token(&self) -> Result<String, Error> {
        let (auth, subject, ttl, clock, cached) = match &self.source {
            Source::File(file) => return file.token(),
            Source::Mint {
                auth,
                subject,
                ttl,
                clock,
                cached,
            } => (auth, subject, *ttl, clock, cached),
        };
        let now = clock.now();
        let mut cached = cached
            .lock()
            .map_err(|_| Error::internal("token cache poisoned"))?;
        if let Some((token, expires)) = cached.as_ref()
            && (*expires - now).to_std().unwrap_or_default() > ttl / 3
        {
            return Ok(token.clone());
        }
        let token =
            crate::auth::mint(auth, subject, &[Role::Service], ttl).map_err(Error::internal)?;
        let ttl = chrono::Duration::from_std(ttl).map_err(Error::internal)?;
        *cached = Some((token.clone(), now + ttl));
        Ok(token)
    }
}

/// Decides, at a point of the apply path, whether to simulate a crash there
/// (tests only: `subscriber.before_cursor` fires after the handlers ran and
/// before the cursor is stored and the transaction commits).
pub type FailPoint = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Why a subscription stopped.
#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    /// The source cannot serve the stream from our cursor (reset, restored or purged).
    #[error("{0}")]
    Source(String),
    /// A fail point fired (tests).
    #[error("fail point {0} fired")]
    FailPoint(&'static str),
}

/// Follows one peer's change stream until shutdown, from the cursor it
/// keeps in `consumer_cursors`.
pub struct Subscriber {
    rt: Runtime,
    source: String,
    endpoint: String,
    handlers: Handlers,
    batch_size: usize,
    partitions: usize,
    min_backoff: Duration,
    max_backoff: Duration,
    max_attempts: u32,
    token: Option<TokenSource>,
    health: Option<HealthReporter>,
    fail_point: Option<FailPoint>,
    instruments: Instruments,
    stream_source: crate::config::StreamSource,
    /// Follows this service's own outbox ([`Subscriber::own`]).
    own: bool,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("source", &self.source)
            .field("endpoint", &self.endpoint)
            .field("handlers", &self.handlers)
            .finish()
    }
}

struct Instruments {
    lag: opentelemetry::metrics::Histogram<f64>,
    applied: opentelemetry::metrics::Counter<u64>,
    dead_letters: opentelemetry::metrics::Counter<u64>,
    faults: opentelemetry::metrics::Counter<u64>,
    attrs: [opentelemetry::KeyValue; 2],
}

impl Instruments {
    fn new(service: &str, source: &str) -> Self {
        let meter = crate::telemetry::meter(service);
        Self {
            lag: meter
                .f64_histogram("clm.subscriber.lag")
                .with_unit("s")
                .with_description(
                    "Seconds between an event's commit at the source and its application here",
                )
                // Healthy lag is sub-second; the default buckets start at 5.
                .with_boundaries(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 900.0, 3600.0,
                ])
                .build(),
            applied: meter
                .u64_counter("clm.subscriber.applied")
                .with_description("Events applied from a followed stream")
                .build(),
            dead_letters: meter
                .u64_counter("clm.subscriber.dead_letters")
                .with_description("Events parked after failing max_attempts times")
                .build(),
            faults: meter
                .u64_counter("clm.subscriber.faults")
                .with_description(
                    "Configuration faults (the source refused our credentials) and stopped streams",
                )
                .build(),
            attrs: [
                opentelemetry::KeyValue::new("service", service.to_owned()),
                opentelemetry::KeyValue::new("source", source.to_owned()),
            ],
        }
    }
}

/// How one attempt to follow the stream ended.
enum Interrupted {
    /// Network, shutdown of the source, an unavailable dependency: retry.
    Transient(String),
    /// The source refused our credentials: a configuration fault.
    Refused(String),
    /// Stop for good.
    Stop(SubscriptionError),
}

impl From<DbErr> for Interrupted {
    fn from(e: DbErr) -> Self {
        Interrupted::Transient(format!("database: {e}"))
    }
}

impl Subscriber {
    /// Follows `source` at `endpoint` (`http://host:port`) with `handlers`,
    /// with the default settings of [`SubscriberConfig`].
    pub fn new(
        rt: Runtime,
        source: impl Into<String>,
        endpoint: impl Into<String>,
        handlers: Handlers,
    ) -> Self {
        let source = source.into();
        let defaults = Config::defaults(rt.service, std::path::Path::new(".")).subscriber;
        let instruments = Instruments::new(rt.service, &source);
        Self {
            rt,
            source,
            endpoint: endpoint.into(),
            handlers,
            batch_size: 0,
            partitions: 1,
            min_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
            max_attempts: 0,
            token: None,
            health: None,
            fail_point: None,
            instruments,
            stream_source: crate::config::StreamSource::Grpc,
            own: false,
        }
        .with_config(&defaults)
    }

    /// Follows this service's own change stream with `handlers`, reading
    /// its outbox from the database (see the module docs); the cursor is
    /// kept under the service's name.
    pub fn own(rt: Runtime, handlers: Handlers) -> Self {
        let source = rt.service;
        let mut s = Self::new(rt, source, String::new(), handlers);
        s.own = true;
        s
    }

    /// Applies the batch size, partitions, attempts and backoff of `c`.
    #[must_use]
    pub fn with_config(mut self, c: &SubscriberConfig) -> Self {
        self.batch_size = Ord::max(c.batch_size, 1);
        self.partitions = Ord::max(c.partitions, 1);
        self.max_attempts = Ord::max(c.max_attempts, 1);
        let min = Ord::max(c.min_backoff_ms, 1);
        self.min_backoff = Duration::from_millis(min);
        self.max_backoff = Duration::from_millis(Ord::max(c.max_backoff_ms, min));
        self.stream_source = c.source;
        self
    }

    /// Presents tokens from `token` to the source (when auth is on).
    #[must_use]
    pub fn with_token(mut self, token: Option<TokenSource>) -> Self {
        self.token = token;
        self
    }

    /// Reports the subscription's state under `clm.subscription.<source>`.
    #[must_use]
    pub fn with_health(mut self, health: HealthReporter) -> Self {
        self.health = Some(health);
        self
    }

    /// Simulates crashes where `fail_point` says so (tests).
    #[must_use]
    pub fn with_fail_point(mut self, fail_point: FailPoint) -> Self {
        self.fail_point = Some(fail_point);
        self
    }

    fn health_name(&self) -> String {
        format!("clm.subscription.{}", self.source)
    }

    async fn report(&self, status: ServingStatus) {
        if let Some(h) = &self.health {
            h.set_service_status(self.health_name(), status).await;
        }
    }

    /// Runs until `shutdown` (Ok), or until the subscription must stop
    /// (the source cannot serve our cursor; a test fail point fired).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SubscriptionError> {
        let mut backoff = self.min_backoff;
        loop {
            let mut progressed = false;
            let outcome = tokio::select! {
                r = self.follow(&mut progressed) => r,
                () = shutdown.cancelled() => return Ok(()),
            };
            if progressed {
                backoff = self.min_backoff;
            }
            match outcome {
                Interrupted::Transient(e) => {
                    tracing::warn!(service = self.rt.service, source = %self.source, error = %e, ?backoff, "change stream interrupted; reconnecting");
                }
                Interrupted::Refused(e) => {
                    backoff = self.max_backoff;
                    self.instruments.faults.add(1, &self.instruments.attrs);
                    self.report(ServingStatus::NotServing).await;
                    tracing::error!(service = self.rt.service, source = %self.source, endpoint = %self.endpoint, error = %e, "the source refused this service's credentials: check auth.hs256_secret / audience on both sides; retrying slowly");
                }
                Interrupted::Stop(e) => {
                    self.instruments.faults.add(1, &self.instruments.attrs);
                    self.report(ServingStatus::NotServing).await;
                    tracing::error!(service = self.rt.service, source = %self.source, error = %e, "subscription stopped");
                    return Err(e);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }

    async fn follow(&self, progressed: &mut bool) -> Interrupted {
        if self.own {
            return self.follow_own(progressed).await;
        }
        match self.stream_source {
            crate::config::StreamSource::Grpc => self.follow_grpc(progressed).await,
            crate::config::StreamSource::Jetstream => self.follow_jetstream(progressed).await,
        }
    }

    /// Follows the source's JetStream stream ([`crate::jetstream`]): events
    /// at or before the cursor (redeliveries, a relay's repeats) are
    /// skipped, the others applied as from `WatchChanges`.
    async fn follow_jetstream(&self, progressed: &mut bool) -> Interrupted {
        let mut cursor = match load_cursor(&self.rt.db, &self.source).await {
            Ok(c) => c,
            Err(e) => return e.into(),
        };
        let nats = &self.rt.config.nats;
        let js = match crate::jetstream::connect(nats).await {
            Ok(js) => js,
            Err(e) => return Interrupted::Transient(e.to_string()),
        };
        let names = crate::jetstream::names(&nats.stream_prefix, &self.source);
        let events = match crate::jetstream::events_after(&js, &names, cursor).await {
            Ok(s) => s,
            Err(e) => return Interrupted::Transient(e.to_string()),
        };
        let mut events = std::pin::pin!(events);
        let types = self.handlers.event_types();
        self.report(ServingStatus::Serving).await;
        loop {
            let mut batch = Vec::new();
            let mut ended = None;
            match futures::StreamExt::next(&mut events).await {
                Some(Ok(e)) => batch.push(e),
                Some(Err(e)) => return Interrupted::Transient(e.to_string()),
                None => return Interrupted::Transient("the JetStream consumer ended".into()),
            }
            while batch.len() < self.batch_size {
                match futures::StreamExt::next(&mut events).now_or_never() {
                    Some(Some(Ok(e))) => batch.push(e),
                    Some(Some(Err(e))) => {
                        ended = Some(Interrupted::Transient(e.to_string()));
                        break;
                    }
                    Some(None) => {
                        ended = Some(Interrupted::Transient(
                            "the JetStream consumer ended".into(),
                        ));
                        break;
                    }
                    None => break,
                }
            }
            let mut wanted = Vec::with_capacity(batch.len());
            for e in batch {
                if e.sequence <= cursor {
                    continue;
                }
                cursor = e.sequence;
                if types.is_empty() || types.contains(&e.event_type) {
                    wanted.push(e);
                }
            }
            if !wanted.is_empty() {
                if let Err(e) = self.apply(&wanted).await {
                    return e;
                }
                *progressed = true;
            }
            if let Some(e) = ended {
                return e;
            }
        }
    }

    /// Follows this service's own outbox: every event after the cursor, in
    /// batches of up to `batch_size`, read from the primary on PostgreSQL
    /// (a replica may lag behind the stamps that wake us).
    async fn follow_own(&self, progressed: &mut bool) -> Interrupted {
        let mut cursor = match load_cursor(&self.rt.db, &self.source).await {
            Ok(c) => c,
            Err(e) => return e.into(),
        };
        let poll = Duration::from_millis(Ord::max(self.rt.config.change_poll_interval_ms, 1));
        // SQLite: the read pool sees every commit and never waits behind
        // the one writer connection.
        let db = if is_postgres(&self.rt.db) {
            &self.rt.db
        } else {
            &self.rt.read
        };
        let mut wake = self.rt.outbox.subscribe();
        self.report(ServingStatus::Serving).await;
        loop {
            wake.mark_unchanged();
            let batch = match self
                .rt
                .outbox
                .read_after(db, cursor, &[], self.batch_size as u64)
                .await
            {
                Ok(b) => b,
                Err(e) => return e.into(),
            };
            if let Some(last) = batch.last() {
                cursor = last.sequence;
                if let Err(e) = self.apply(&batch).await {
                    return e;
                }
                *progressed = true;
                continue;
            }
            tokio::select! {
                _ = wake.changed() => {}
                () = tokio::time::sleep(poll) => {}
            }
        }
    }

    async fn follow_grpc(&self, progressed: &mut bool) -> Interrupted {
        let mut cursor = match load_cursor(&self.rt.db, &self.source).await {
            Ok(c) => c,
            Err(e) => return e.into(),
        };
        let token = match self.token.as_ref().map(TokenSource::token).transpose() {
            Ok(t) => t,
            Err(e) => return Interrupted::Transient(e.to_string()),
        };
        let channel = match crate::client::channel(&self.endpoint) {
            Ok(c) => c,
            Err(e) => {
                return Interrupted::Stop(SubscriptionError::Source(format!(
                    "peers.{}: {e}",
                    self.source
                )));
            }
        };
        let mut client = ChangeStreamServiceClient::with_interceptor(
            channel,
            ClientInterceptor::new(token.as_deref()),
        );
        let mut stream = match client
            .watch_changes(WatchChangesRequest {
                after_sequence: cursor,
                event_types: self.handlers.event_types(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return classify(&s),
        };
        self.report(ServingStatus::Serving).await;
        loop {
            let mut batch = Vec::new();
            let mut ended = None;
            match stream.next().await {
                Some(Ok(m)) => batch.extend(m.event),
                Some(Err(s)) => return classify(&s),
                None => return Interrupted::Transient("the source ended the stream".into()),
            }
            // Take what has already arrived, up to a batch.
            while batch.len() < self.batch_size {
                match stream.next().now_or_never() {
                    Some(Some(Ok(m))) => batch.extend(m.event),
                    Some(Some(Err(s))) => {
                        ended = Some(classify(&s));
                        break;
                    }
                    Some(None) => {
                        ended = Some(Interrupted::Transient("the source ended the stream".into()));
                        break;
                    }
                    None => break,
                }
            }
            for e in &batch {
                if e.sequence <= cursor {
                    return Interrupted::Stop(SubscriptionError::Source(format!(
                        "the {} stream went backwards (sequence {} after {cursor}): its outbox was reset or restored",
                        self.source, e.sequence
                    )));
                }
                cursor = e.sequence;
            }
            if !batch.is_empty() {
                if let Err(e) = self.apply(&batch).await {
                    return e;
                }
                *progressed = true;
            }
            if let Some(e) = ended {
                return e;
            }
        }
    }

    fn fire(&self, point: &'static str) -> Result<(), Interrupted> {
        match &self.fail_point {
            Some(f) if f(point) => Err(Interrupted::Stop(SubscriptionError::FailPoint(point))),
            _ => Ok(()),
        }
    }

    /// Applies `batch` inside a span that continues the trace of its first
    /// traced event (see [`apply_span`]); the events it emits carry that
    /// trace on.
    async fn apply(&self, batch: &[ChangeEvent]) -> Result<(), Interrupted> {
        use tracing::Instrument as _;
        let span = apply_span(self.rt.service, &self.source, batch);
        self.apply_in_span(batch).instrument(span).await
    }

    /// Applies `batch` in one transaction with the cursor (or in partitions,
    /// [`Self::apply_partitioned`]); on a handler failure, one event at a time.
    async fn apply_in_span(&self, batch: &[ChangeEvent]) -> Result<(), Interrupted> {
        let Some(last) = batch.last() else {
            return Ok(());
        };
        if self.partitions > 1
            && batch.len() > 1
            && is_postgres(&self.rt.db)
            && self.handlers.partitionable(batch)
        {
            return self.apply_partitioned(batch).await;
        }
        let mut cx = Apply::begin(&self.rt).await?;
        let failed = match self.handlers.dispatch(&mut cx, batch).await {
            Ok(()) => None,
            Err(Error::Unavailable(e)) => return Err(Interrupted::Transient(e)),
            Err(e) => Some(e),
        };
        if failed.is_some() && batch.len() > 1 {
            drop(cx);
            for event in batch {
                self.apply_one(event).await?;
            }
            return Ok(());
        }
        if let Some(e) = failed {
            drop(cx);
            return self.retry_or_park(last, e).await;
        }
        self.finish(cx, batch).await
    }

    /// Applies `batch` (partition-safe events only) split by subject into
    /// up to `partitions` transactions side by side, then stores the cursor
    /// in one more. A partition that fails sends the whole batch through
    /// one event at a time; the partitions already committed apply
    /// nothing twice (the handlers' promise).
    async fn apply_partitioned(&self, batch: &[ChangeEvent]) -> Result<(), Interrupted> {
        let mut parts: Vec<Vec<ChangeEvent>> = vec![Vec::new(); self.partitions];
        for e in batch {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&e.subject, &mut h);
            let i = (std::hash::Hasher::finish(&h) % self.partitions as u64) as usize;
            parts[i].push(e.clone());
        }
        let applied = futures::future::join_all(parts.iter().filter(|p| !p.is_empty()).map(
            |part| async move {
                let mut cx = Apply::begin(&self.rt).await?;
                self.handlers.dispatch(&mut cx, part).await?;
                cx.commit().await?;
                Ok::<(), Error>(())
            },
        ))
        .await;
        let mut failed = None;
        for r in applied {
            match r {
                Ok(()) => {}
                Err(Error::Unavailable(e)) => return Err(Interrupted::Transient(e)),
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            tracing::warn!(service = self.rt.service, source = %self.source, error = %e, "a partition failed; applying the batch one event at a time");
            for event in batch {
                self.apply_one(event).await?;
            }
            return Ok(());
        }
        let cx = Apply::begin(&self.rt).await?;
        self.finish(cx, batch).await
    }

    /// Stores the cursor after `events` in `cx`'s transaction, commits it
    /// with the emitted events and runs the after-commit hooks.
    async fn finish(&self, cx: Apply, events: &[ChangeEvent]) -> Result<(), Interrupted> {
        let Some(last) = events.last() else {
            return Ok(());
        };
        self.fire("subscriber.before_cursor")?;
        save_cursor(cx.txn(), &self.source, last.sequence, cx.now()).await?;
        cx.commit().await?;
        self.applied(events);
        Ok(())
    }

    async fn apply_one(&self, event: &ChangeEvent) -> Result<(), Interrupted> {
        let mut cx = Apply::begin(&self.rt).await?;
        match self
            .handlers
            .dispatch(&mut cx, std::slice::from_ref(event))
            .await
        {
            Ok(()) => self.finish(cx, std::slice::from_ref(event)).await,
            Err(Error::Unavailable(e)) => Err(Interrupted::Transient(e)),
            Err(e) => {
                drop(cx);
                self.retry_or_park(event, e).await
            }
        }
    }

    /// Retries a failing event with backoff, parking it after `max_attempts`.
    async fn retry_or_park(&self, event: &ChangeEvent, first: Error) -> Result<(), Interrupted> {
        let mut failure = first;
        let mut attempt = 1;
        let mut backoff = self.min_backoff;
        loop {
            if attempt >= self.max_attempts {
                tracing::error!(service = self.rt.service, source = %self.source, sequence = event.sequence, event_type = %event.event_type, error = %failure, attempt, "event parked as a dead letter");
                let txn = self.rt.db.begin().await?;
                let now = self.rt.clock.now();
                park(
                    &txn,
                    &self.source,
                    event,
                    &failure.to_string(),
                    attempt,
                    now,
                )
                .await?;
                save_cursor(&txn, &self.source, event.sequence, now).await?;
                txn.commit().await?;
                self.instruments
                    .dead_letters
                    .add(1, &self.instruments.attrs);
                return Ok(());
            }
            tracing::warn!(service = self.rt.service, source = %self.source, sequence = event.sequence, error = %failure, attempt, "event failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.max_backoff);
            attempt += 1;
            let mut cx = Apply::begin(&self.rt).await?;
            match self
                .handlers
                .dispatch(&mut cx, std::slice::from_ref(event))
                .await
            {
                Ok(()) => return self.finish(cx, std::slice::from_ref(event)).await,
                Err(Error::Unavailable(e)) => return Err(Interrupted::Transient(e)),
                Err(e) => failure = e,
            }
        }
    }

    fn applied(&self, events: &[ChangeEvent]) {
        let i = &self.instruments;
        i.applied.add(events.len() as u64, &i.attrs);
        if let Some(t) = events.last().and_then(|e| e.occurred_time.as_ref()) {
            let at = from_micros(t.seconds * 1_000_000 + i64::from(t.nanos) / 1000);
            let lag = (self.rt.clock.now() - at).as_seconds_f64().max(0.0);
            i.lag.record(lag, &i.attrs);
        }
    }
}

/// The span a batch of `source`'s events is applied in, marked with the
/// consuming `service` (so it is exported under that service's resource).
/// It continues the trace of the batch's first traced event; each other
/// trace in the batch gets a span of its own here, so every trace shows
/// the hop. The events the batch emits carry the batch span's trace.
fn apply_span(service: &'static str, source: &str, batch: &[ChangeEvent]) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let span = tracing::info_span!(
        "apply",
        otel.name = %format!("{source} apply"),
        otel.kind = "consumer",
        messaging.system = "clm",
        messaging.source.name = %source,
        messaging.batch.message_count = batch.len(),
        clm.service = service,
    );
    let mut traces = batch
        .iter()
        .map(|e| e.traceparent.as_str())
        .filter(|t| !t.is_empty());
    if let Some(first) = traces.next() {
        let _ = span.set_parent(crate::client::remote_context(first));
        let mut seen = std::collections::BTreeSet::from([trace_id_of(first)]);
        for other in traces {
            if seen.insert(trace_id_of(other)) {
                let hop = tracing::info_span!(
                    "apply",
                    otel.name = %format!("{source} apply"),
                    otel.kind = "consumer",
                    clm.service = service,
                );
                let _ = hop.set_parent(crate::client::remote_context(other));
                drop(hop.entered());
            }
        }
    }
    span
}

/// The trace id part of a `traceparent` (`00-<trace>-<span>-<flags>`).
fn trace_id_of(traceparent: &str) -> &str {
    traceparent.split('-').nth(1).unwrap_or(traceparent)
}

fn classify(s: &Status) -> Interrupted {
    match s.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            Interrupted::Refused(format!("{:?}: {}", s.code(), s.message()))
        }
        Code::OutOfRange => Interrupted::Stop(SubscriptionError::Source(s.message().to_owned())),
        _ => Interrupted::Transient(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// Stores an event that could not be applied, for inspection and replay.
async fn park(
    txn: &DatabaseTransaction,
    source: &str,
    event: &ChangeEvent,
    error: &str,
    attempts: u32,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), DbErr> {
    let payload = event
        .payload
        .as_ref()
        .map(|p| p.value.clone())
        .unwrap_or_default();
    let occurred = event
        .occurred_time
        .as_ref()
        .map_or(0, |t| t.seconds * 1_000_000 + i64::from(t.nanos) / 1000);
    let mut insert = Query::insert();
    insert
        .into_table(Alias::new("dead_letters"))
        .columns(
            [
                "source",
                "sequence",
                "event_id",
                "event_type",
                "subject",
                "payload",
                "error",
                "attempts",
                "create_us",
                "occurred_us",
            ]
            .map(Alias::new),
        )
        .values_panic([
            source.into(),
            event.sequence.into(),
            event.event_id.clone().into(),
            event.event_type.clone().into(),
            event.subject.clone().into(),
            payload.into(),
            error.into(),
            i64::from(attempts).into(),
            to_micros(now).into(),
            occurred.into(),
        ])
        .on_conflict(
            OnConflict::columns([Alias::new("source"), Alias::new("sequence")])
                .do_nothing()
                .to_owned(),
        );
    txn.execute(&insert).await?;
    Ok(())
}

/// The last sequence applied from `source` (0 if none).
pub async fn load_cursor(db: &impl ConnectionTrait, source: &str) -> Result<i64, DbErr> {
    let row = db
        .query_one(
            Query::select()
                .column(Alias::new("sequence"))
                .from(Alias::new("consumer_cursors"))
                .and_where(Expr::col(Alias::new("source")).eq(source)),
        )
        .await?;
    row.map_or(Ok(0), |r| r.try_get("", "sequence"))
}

/// Stores the cursor of `source` (inside the caller's transaction).
pub async fn save_cursor(
    txn: &impl ConnectionTrait,
    source: &str,
    sequence: i64,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), DbErr> {
    let mut upsert = Query::insert();
    upsert
        .into_table(Alias::new("consumer_cursors"))
        .columns(["source", "sequence", "update_us"].map(Alias::new))
        .values_panic([source.into(), sequence.into(), to_micros(now).into()])
        .on_conflict(
            OnConflict::column(Alias::new("source"))
                .update_columns([Alias::new("sequence"), Alias::new("update_us")])
                .to_owned(),
        );
    txn.execute(&upsert).await?;
    Ok(())
}

/// Serves `clm.common.v1.DeadLetterService` over the service's parked events.
#[derive(Clone, Debug)]
pub struct DeadLetterServer {
    rt: Runtime,
    handlers: BTreeMap<String, Handlers>,
}

/// Who may follow a service's change stream (admin may too).
pub const CHANGE_STREAM_POLICY: Policy = Policy {
    service: "clm.common.v1.ChangeStreamService",
    rules: &[("WatchChanges", &[Role::Service, Role::Analyst])],
};

/// Who may see and replay a service's dead letters (admin may too).
pub const DEAD_LETTER_POLICY: Policy = Policy {
    service: "clm.common.v1.DeadLetterService",
    rules: &[
        ("ListDeadLetters", &[Role::DataSteward]),
        ("ReplayDeadLetter", &[Role::DataSteward]),
    ],
};

const DEAD_LETTER_COLUMNS: [&str; 10] = [
    "source",
    "sequence",
    "event_id",
    "event_type",
    "subject",
    "payload",
    "error",
    "attempts",
    "create_us",
    "occurred_us",
];

fn dead_letter(r: &QueryResult) -> Result<DeadLetter, DbErr> {
    let source: String = r.try_get("", "source")?;
    let sequence: i64 = r.try_get("", "sequence")?;
    let event_type: String = r.try_get("", "event_type")?;
    let attempts: i64 = r.try_get("", "attempts")?;
    Ok(DeadLetter {
        name: format!("deadLetters/{source}.{sequence}"),
        event: Some(ChangeEvent {
            sequence,
            event_id: r.try_get("", "event_id")?,
            subject: r.try_get("", "subject")?,
            occurred_time: Some(crate::convert::timestamp(from_micros(
                r.try_get("", "occurred_us")?,
            ))),
            payload: Some(prost_types::Any {
                type_url: format!("{}{event_type}", clm_proto::TYPE_URL_PREFIX),
                value: r.try_get("", "payload")?,
            }),
            event_type,
            source: source.clone(),
            traceparent: String::new(),
        }),
        source,
        error: r.try_get("", "error")?,
        attempts: i32::try_from(attempts).unwrap_or(i32::MAX),
        create_time: Some(crate::convert::timestamp(from_micros(
            r.try_get("", "create_us")?,
        ))),
    })
}

fn parse_dead_letter_name(name: &str) -> Result<(String, i64), Error> {
    name.strip_prefix("deadLetters/")
        .and_then(|rest| rest.rsplit_once('.'))
        .and_then(|(source, seq)| Some((source.to_owned(), seq.parse::<i64>().ok()?)))
        .filter(|(source, _)| !source.is_empty())
        .ok_or_else(|| Error::invalid("name", "must look like deadLetters/{source}.{sequence}"))
}

impl DeadLetterServer {
    /// Serves `rt`'s dead letters, replaying them with `handlers` (by source).
    pub fn new(rt: Runtime, handlers: BTreeMap<String, Handlers>) -> Self {
        Self { rt, handlers }
    }

    async fn list(&self, req: ListDeadLettersRequest) -> Result<ListDeadLettersResponse, Error> {
        let size =
            clm_domain::validation::page_size("page_size", req.page_size, 50, 1000)? as usize;
        let source = match clm_domain::filter::parse("filter", &req.filter)?.as_slice() {
            [] => None,
            [c] if c.field == "source" && c.op == clm_domain::filter::Op::Eq => Some(
                c.value
                    .as_text()
                    .ok_or_else(|| Error::invalid("filter", "source must be compared with a name"))?
                    .to_owned(),
            ),
            _ => {
                return Err(Error::invalid(
                    "filter",
                    "only `source = \"<service>\"` is supported",
                ));
            }
        };
        let pager = Pager::new(&["deadLetters", &req.filter]);
        // Position: (sequence, source); rows are ordered by (source, sequence).
        let after = pager
            .after::<i64>(&req.page_token)?
            .map(|(sequence, source)| (source, sequence));
        let mut sel = Query::select();
        sel.columns(DEAD_LETTER_COLUMNS.map(Alias::new))
            .from(Alias::new("dead_letters"))
            .order_by(Alias::new("source"), Order::Asc)
            .order_by(Alias::new("sequence"), Order::Asc)
            .limit(size as u64 + 1);
        if let Some(s) = &source {
            sel.and_where(Expr::col(Alias::new("source")).eq(s.as_str()));
        }
        if let Some((s, n)) = after {
            sel.and_where(
                Expr::tuple([
                    Expr::col(Alias::new("source")),
                    Expr::col(Alias::new("sequence")),
                ])
                .gt(Expr::tuple([Expr::val(s), Expr::val(n)])),
            );
        }
        let rows = self.rt.db.query_all(&sel).await?;
        let letters = rows
            .iter()
            .map(dead_letter)
            .collect::<Result<Vec<_>, _>>()?;
        let (dead_letters, next_page_token) =
            pager.page(&letters, size, Clone::clone, |d: &DeadLetter| {
                (d.event.as_ref().map_or(0, |e| e.sequence), d.source.clone())
            });
        Ok(ListDeadLettersResponse {
            dead_letters,
            next_page_token,
        })
    }

    async fn replay(
        &self,
        req: ReplayDeadLetterRequest,
    ) -> Result<ReplayDeadLetterResponse, Error> {
        let (source, sequence) = parse_dead_letter_name(&req.name)?;
        let find = |q: &mut sea_orm::sea_query::SelectStatement| {
            q.from(Alias::new("dead_letters"))
                .and_where(Expr::col(Alias::new("source")).eq(source.as_str()))
                .and_where(Expr::col(Alias::new("sequence")).eq(sequence));
        };
        let mut sel = Query::select();
        sel.columns(DEAD_LETTER_COLUMNS.map(Alias::new));
        find(&mut sel);
        let row = self
            .rt
            .db
            .query_one(&sel)
            .await?
            .ok_or_else(|| Error::NotFound(req.name.clone()))?;
        let letter = dead_letter(&row)?;
        let handlers = self
            .handlers
            .get(&source)
            .ok_or_else(|| Error::FailedPrecondition {
                reason: "SOURCE_NOT_FOLLOWED",
                message: format!("this service no longer follows the {source} stream"),
            })?;
        let event = letter.event.clone().unwrap_or_default();
        let mut cx = Apply::begin(&self.rt).await?;
        match handlers
            .dispatch(&mut cx, std::slice::from_ref(&event))
            .await
        {
            Ok(()) => {
                let mut del = Query::delete();
                del.from_table(Alias::new("dead_letters"))
                    .and_where(Expr::col(Alias::new("source")).eq(source.as_str()))
                    .and_where(Expr::col(Alias::new("sequence")).eq(sequence));
                if cx.txn().execute(&del).await?.rows_affected() == 0 {
                    return Err(Error::NotFound(req.name));
                }
                cx.commit().await?;
                Ok(ReplayDeadLetterResponse {
                    applied: true,
                    error: String::new(),
                    dead_letter: None,
                })
            }
            Err(e) => {
                drop(cx);
                let message = e.to_string();
                let mut upd = Query::update();
                upd.table(Alias::new("dead_letters"))
                    .value(Alias::new("error"), message.clone())
                    .value(
                        Alias::new("attempts"),
                        Expr::col(Alias::new("attempts")).add(1),
                    )
                    .and_where(Expr::col(Alias::new("source")).eq(source.as_str()))
                    .and_where(Expr::col(Alias::new("sequence")).eq(sequence));
                self.rt.db.execute(&upd).await?;
                let row = self.rt.db.query_one(&sel).await?;
                Ok(ReplayDeadLetterResponse {
                    applied: false,
                    error: message,
                    dead_letter: row.as_ref().map(dead_letter).transpose()?,
                })
            }
        }
    }
}

#[tonic::async_trait]
impl DeadLetterService for DeadLetterServer {
    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        authorize(&request, &DEAD_LETTER_POLICY)?;
        crate::error::known_enums(request.get_ref())?;
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn replay_dead_letter(
        &self,
        request: Request<ReplayDeadLetterRequest>,
    ) -> Result<Response<ReplayDeadLetterResponse>, Status> {
        authorize(&request, &DEAD_LETTER_POLICY)?;
        crate::error::known_enums(request.get_ref())?;
        Ok(Response::new(self.replay(request.into_inner()).await?))
    }
}

/// Refuses to resume a stream of this service's outbox after `after`
/// when that position cannot be served: OUT_OF_RANGE when events after it
/// were purged by retention, or when it is beyond the newest event (the
/// outbox was reset or restored). WatchChanges and every stream that
/// resumes by sequence use it.
pub async fn check_resume(rt: &Runtime, after: i64) -> Result<(), Error> {
    let bounds = rt.outbox.bounds(&rt.read).await.map_err(Error::from)?;
    if after < bounds.purged_through {
        return Err(Error::OutOfRange(format!(
            "after_sequence {after} is older than the oldest kept event {}: events up to {} were \
             removed by retention (outbox_retention_days); rebuild from a snapshot and resume from {}",
            bounds.purged_through + 1,
            bounds.purged_through,
            bounds.purged_through
        )));
    }
    if after > bounds.head {
        return Err(Error::OutOfRange(format!(
            "after_sequence {after} is beyond the newest event {}: the {} outbox was reset or \
             restored from an older backup",
            bounds.head, rt.service
        )));
    }
    Ok(())
}

/// Serves this service's own events of type `M` after position `after`
/// (checked first with [`check_resume`]) as a stream: each decoded event
/// and its position go through `item` (`None` skips it). Read in batches
/// from the read pool, woken by each stamp of the outbox and every 500 ms,
/// ended when the caller goes away. The rpcs that watch one event type of
/// their own service (WatchMembership, WatchObjectiveAlerts) are this.
pub async fn watch_own<M, R, F>(
    rt: &Runtime,
    after: i64,
    item: F,
) -> Result<ReceiverStream<Result<R, Status>>, Error>
where
    M: prost::Name + prost::Message + Default,
    R: Send + 'static,
    F: Fn(i64, M) -> Option<R> + Send + 'static,
{
    check_resume(rt, after).await?;
    let rt = rt.clone();
    let types = vec![M::full_name()];
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let mut cursor = after;
        let mut wake = rt.outbox.subscribe();
        loop {
            wake.mark_unchanged();
            match rt.outbox.read_after(&rt.read, cursor, &types, 500).await {
                Ok(events) if !events.is_empty() => {
                    for e in events {
                        cursor = e.sequence;
                        let Some(m) = e
                            .payload
                            .as_ref()
                            .and_then(|p| M::decode(p.value.as_slice()).ok())
                        else {
                            continue;
                        };
                        let Some(out) = item(e.sequence, m) else {
                            continue;
                        };
                        if tx.send(Ok(out)).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(Error::from(e).into())).await;
                    return;
                }
            }
            tokio::select! {
                _ = wake.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = tx.closed() => return,
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_tokens_are_reused_then_renewed_before_they_expire() {
        let secret = "0123456789abcdef0123456789abcdef";
        let clock = clm_domain::ManualClock::new(chrono::Utc::now());
        let auth_config = crate::config::AuthConfig {
            hs256_secret: Some(secret.into()),
            ..Default::default()
        };
        let source = TokenSource::new(
            &auth_config,
            "service:scoring".into(),
            Duration::from_secs(300),
            Arc::new(clock.clone()),
        );
        let first = source.token().expect("mint");
        let expiry = |s: &TokenSource| match &s.source {
            Source::Mint { cached, .. } => cached.lock().expect("lock").as_ref().map(|c| c.1),
            Source::File(_) => None,
        };
        let minted_at = expiry(&source);
        clock.advance(chrono::Duration::seconds(190));
        assert_eq!(source.token().expect("cached"), first, "reused while fresh");
        assert_eq!(expiry(&source), minted_at);
        clock.advance(chrono::Duration::seconds(20));
        let renewed = source.token().expect("renew");
        assert!(
            expiry(&source) > minted_at,
            "renewed once a third of its life is left"
        );
        let auth = crate::auth::Authenticator::from_config(&auth_config)
            .expect("config")
            .expect("enabled");
        let p = auth
            .authenticate(Some(&format!("Bearer {renewed}")))
            .expect("valid token");
        assert_eq!(p.subject, "service:scoring");
        assert_eq!(p.roles, vec![Role::Service]);
    }

    #[test]
    fn dead_letter_names_parse() {
        assert_eq!(
            parse_dead_letter_name("deadLetters/customer.42").expect("valid"),
            ("customer".to_owned(), 42)
        );
        for bad in [
            "",
            "deadLetters/",
            "deadLetters/customer",
            "deadLetters/.4",
            "x/customer.4",
        ] {
            assert!(parse_dead_letter_name(bad).is_err(), "{bad}");
        }
    }
}
