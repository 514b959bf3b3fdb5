//! One service shape. A service declares itself once, in a
//! [`ServiceDescriptor`]: its name, default port, migrator, gRPC services
//! and the change streams it follows with their handlers. [`run`] turns the
//! descriptor into a running server: database and cache, the outbox relay,
//! health, reflection, the change stream (`WatchChanges`), the dead-letter
//! service, the audit trail (`ListAuditEntries`), long-running operations
//! (`google.longrunning.Operations`, run by the replica holding each
//! one's lease), a subscriber per followed stream, and a graceful drain.
//!
//! `clm up` and `clm serve` read one list of descriptors, so adding a
//! service is one entry there. A service's `lib.rs` is its descriptor:
//!
//! ```ignore
//! pub static DESCRIPTOR: ServiceDescriptor = ServiceDescriptor {
//!     name: "scoring",
//!     about: "Lead scoring",
//!     migrate: migrate_with::<store::Migrator>,
//!     policy: &api::POLICY,
//!     build,
//! };
//!
//! fn build(rt: &Runtime) -> anyhow::Result<Parts> {
//!     Ok(Parts::new()
//!         .grpc(ScoringServiceServer::new(api::ScoringApi::new(rt.clone())))
//!         .follow("customer", events::customer_handlers(rt)))
//! }
//! ```

use crate::audit::AuditServer;
use crate::auth::Policy;
use crate::changes::{ChangeStreamServer, DeadLetterServer, Handlers, Subscriber, TokenSource};
use crate::config::Config;
use crate::{Runtime, open};
use clm_domain::{Clock, SystemClock};
use clm_proto::common::audit_service_server::AuditServiceServer;
use clm_proto::common::change_stream_service_server::ChangeStreamServiceServer;
use clm_proto::common::dead_letter_service_server::DeadLetterServiceServer;
use clm_proto::google::longrunning::operations_server::OperationsServer;
use futures::future::BoxFuture;
use sea_orm::{DatabaseConnection, DbErr};
use sea_orm_migration::MigratorTrait;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;

/// Runs a service's migrations.
pub type Migrate = for<'a> fn(&'a DatabaseConnection) -> BoxFuture<'a, Result<(), DbErr>>;

/// Everything the platform needs to know to run a service.
#[derive(Debug)]
pub struct ServiceDescriptor {
    /// Name in config, logs, metrics and change events (`customer`); its
    /// default port comes from [`crate::config::default_port`].
    pub name: &'static str,
    /// One line on what the service owns (for `clm --help` and logs).
    pub about: &'static str,
    /// Its migrator: `migrate_with::<store::Migrator>`.
    pub migrate: Migrate,
    /// Who may call each of its own rpcs (its `api::POLICY`); `clm roles`,
    /// docs/security.md's role table and the start-up check read it from here.
    pub policy: &'static Policy,
    /// Builds its gRPC services and stream handlers on the opened runtime.
    pub build: fn(&Runtime) -> anyhow::Result<Parts>,
}

/// The role tables of what the platform serves on every service (change
/// streams, dead letters, the audit trail, operations), after each
/// service's own.
pub static PLATFORM_POLICIES: &[&Policy] = &[
    &crate::changes::CHANGE_STREAM_POLICY,
    &crate::changes::DEAD_LETTER_POLICY,
    &crate::audit::AUDIT_POLICY,
    &crate::operations::OPERATIONS_POLICY,
];

/// Every role table of `services`: each one's own, then the platform's.
pub fn role_tables(services: &[&ServiceDescriptor]) -> Vec<&'static Policy> {
    services
        .iter()
        .map(|s| s.policy)
        .chain(PLATFORM_POLICIES.iter().copied())
        .collect()
}

/// [`Migrate`] for a sea-orm migrator (which lists the platform tables first).
pub fn migrate_with<M: MigratorTrait + 'static>(
    db: &DatabaseConnection,
) -> BoxFuture<'_, Result<(), DbErr>> {
    Box::pin(M::up(db, None))
}

/// What a service serves and follows, returned by its `build`.
#[derive(Default)]
pub struct Parts {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    follows: Vec<(String, Handlers)>,
    own: Option<Handlers>,
    optional: Vec<String>,
    tasks: Vec<Task>,
    runners: BTreeMap<String, crate::operations::Runner>,
    timers: BTreeMap<String, crate::timers::Handler>,
}

/// A background task of a service: started once the service runs, handed a
/// token cancelled when the service stops (see [`Parts::task`]).
pub type Task = Box<dyn FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send>;

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts")
            .field("services", &self.names)
            .field(
                "follows",
                &self.follows.iter().map(|(s, _)| s).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Parts {
    /// Nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves a generated gRPC service (reported SERVING by health).
    #[must_use]
    pub fn grpc<S>(mut self, service: S) -> Self
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Follows the change stream of peer service `source` (its URL comes
    /// from `peers.<source>` in the config) with `handlers`.
    #[must_use]
    pub fn follow(mut self, source: &str, handlers: Handlers) -> Self {
        self.follows.push((source.to_owned(), handlers));
        self
    }

    /// Follows this service's own change stream with `handlers` (read from
    /// its outbox, cursor kept under the service's name; see
    /// [`Subscriber::own`]): how a service keeps derived data, such as
    /// report projections, off its write path.
    #[must_use]
    pub fn follow_own(mut self, handlers: Handlers) -> Self {
        self.own = Some(handlers);
        self
    }

    /// Follows `source` like [`Parts::follow`] when `peers.<source>` is
    /// configured, and skips it (with a log line) when it is not: for
    /// streams of services a deployment may not run, such as erasure
    /// receipts from every peer.
    #[must_use]
    pub fn follow_if_configured(mut self, source: &str, handlers: Handlers) -> Self {
        self.optional.push(source.to_owned());
        self.follow(source, handlers)
    }

    /// Runs the long-running operations of `kind` with `runner`: on the one
    /// replica that claims each (see [`crate::operations`]), resumed by
    /// another when that replica's lease lapses.
    #[must_use]
    pub fn operation(mut self, kind: &str, runner: crate::operations::Runner) -> Self {
        self.runners.insert(kind.to_owned(), runner);
        self
    }

    /// Fires the timers of `kind` with `handler`, in a transaction (see
    /// [`crate::timers`]).
    #[must_use]
    pub fn timer(mut self, kind: &str, handler: Arc<dyn crate::timers::OnDue>) -> Self {
        self.timers
            .insert(kind.to_owned(), crate::timers::Handler::Fire(handler));
        self
    }

    /// Delivers the timers of `kind` with `handler`, outside any
    /// transaction (calls to peers; see [`crate::timers`]).
    #[must_use]
    pub fn delivery(mut self, kind: &str, handler: Arc<dyn crate::timers::Deliver>) -> Self {
        self.timers
            .insert(kind.to_owned(), crate::timers::Handler::Deliver(handler));
        self
    }

    /// Runs `task` in the background while the service runs: it gets a
    /// token that is cancelled when the service stops (timer queues,
    /// schedulers), so a stopped service leaves nothing running.
    #[must_use]
    pub fn task(
        mut self,
        task: impl FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send + 'static,
    ) -> Self {
        self.tasks.push(Box::new(task));
        self
    }
}

/// Runs `service` on `listener` until `shutdown`, with the system clock.
pub async fn run(
    service: &'static ServiceDescriptor,
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_clock(service, config, listener, shutdown, Arc::new(SystemClock)).await
}

/// [`run`] with a chosen clock (tests control time with it).
pub async fn run_with_clock(
    service: &'static ServiceDescriptor,
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<()> {
    let name = service.name;
    crate::telemetry::register(name);
    // Relays, purges and subscribers stop when the server does.
    let background = shutdown.child_token();
    let rt = open(service, &config, clock, background.clone()).await?;
    let parts = (service.build)(&rt)?;
    let mut endpoints = BTreeMap::new();
    let mut follows = Vec::with_capacity(parts.follows.len());
    for (source, handlers) in parts.follows {
        if parts.optional.contains(&source) && !config.peers.contains_key(&source) {
            tracing::info!(
                service = name,
                source = %source,
                "not following the {source} change stream: peers.{source} is not configured"
            );
            continue;
        }
        let url = config.peers.get(&source).ok_or_else(|| {
            anyhow::anyhow!(
                "clm {name}: follows the {source} change stream but peers.{source} is not configured \
                 (set it in the config file, CLM_PEERS__{} or --peer {source}=URL)",
                source.to_uppercase()
            )
        })?;
        endpoints.insert(source.clone(), url.clone());
        follows.push((source, handlers));
    }
    let token = TokenSource::from_config(&config, name, rt.clock.clone())?;
    let reporter = tonic_health::server::HealthReporter::new();
    let mut routes = parts.routes;
    let mut names = parts.names;
    let changes = ChangeStreamServiceServer::new(
        ChangeStreamServer::new(rt.clone(), shutdown.clone()).with_poll_interval(
            std::time::Duration::from_millis(config.change_poll_interval_ms),
        ),
    );
    names.push(<ChangeStreamServiceServer<ChangeStreamServer> as NamedService>::NAME);
    routes.add_service(changes);
    let mut handlers: BTreeMap<String, Handlers> = follows.into_iter().collect();
    let own = parts.own;
    if let Some(h) = &own {
        // The dead-letter service replays the own stream's parked events too.
        handlers.insert(name.to_owned(), h.clone());
    }
    let dead_letters =
        DeadLetterServiceServer::new(DeadLetterServer::new(rt.clone(), handlers.clone()));
    names.push(<DeadLetterServiceServer<DeadLetterServer> as NamedService>::NAME);
    routes.add_service(dead_letters);
    let audit = AuditServiceServer::new(AuditServer::new(rt.clone()));
    names.push(<AuditServiceServer<AuditServer> as NamedService>::NAME);
    routes.add_service(audit);
    let operations = OperationsServer::new(crate::operations::OperationsServer::new(rt.clone()));
    names.push(<OperationsServer<crate::operations::OperationsServer> as NamedService>::NAME);
    routes.add_service(operations);
    if config.nats.relay {
        tokio::spawn(crate::jetstream::run_relay(
            rt.clone(),
            std::time::Duration::from_millis(config.change_poll_interval_ms),
            background.clone(),
        ));
    }
    tokio::spawn(crate::operations::run(rt.clone(), parts.runners));
    tokio::spawn(crate::timers::run(rt.clone(), parts.timers));
    for (source, handlers) in handlers {
        if own.is_some() && source == name {
            continue;
        }
        let endpoint = endpoints.remove(&source).unwrap_or_default();
        let subscriber = Subscriber::new(rt.clone(), source, endpoint, handlers)
            .with_config(&config.subscriber)
            .with_token(token.clone())
            .with_health(reporter.clone());
        tokio::spawn(subscriber.run(background.clone()));
    }
    if let Some(h) = own {
        let subscriber = Subscriber::own(rt.clone(), h)
            .with_config(&config.subscriber)
            .with_health(reporter.clone());
        tokio::spawn(subscriber.run(background.clone()));
    }
    for task in parts.tasks {
        tokio::spawn(task(background.clone()));
    }
    tracing::info!(service = name, listen = %listener.local_addr()?, "serving");
    let served = crate::server::serve(
        &config,
        name,
        listener,
        routes.routes(),
        &names,
        reporter,
        shutdown,
    )
    .await;
    background.cancel();
    served
}
