//! What every CLM service needs, built once: layered [`config`],
//! [`telemetry`], the gRPC [`server`] (health, reflection, request ids,
//! auth, RED metrics, graceful drain), bearer-token [`auth`], one [`error`]
//! type mapped to `tonic::Status`, the [`db`] pool, the [`cache`], the
//! transactional [`outbox`] with its [`changes`] stream server and
//! subscriber, the [`peer`] client for calls to other services,
//! [`idempotency`] keys, and (feature `testing`) the test
//! harness for both storage backends.
//!
//! A service declares itself once in a [`service::ServiceDescriptor`] and
//! writes only its API, storage and event handlers; [`service::run`] does the
//! rest. See `services/customer` for the shape.
//!
//! Conventions every service follows:
//! * each rpc: `authorize` against the service's one role table
//!   ([`auth::Policy`], `POLICY` in its `api.rs`, carried by its
//!   descriptor so `clm roles` and docs/security.md show it) →
//!   convert (proto → domain, violations name the field) → logic in one
//!   transaction → convert back;
//! * writes go through [`idempotency`] (a `request_id` retry returns the first
//!   answer) and append their events to the [`outbox`] in the same transaction;
//! * every change is recorded with [`audit::record`] in that transaction
//!   (the caller, rpc, trace and request id come from [`call`], set by
//!   [`error::respond`] and [`idempotency::write`]); erasure handlers end
//!   with [`changes::Apply::erased`], which redacts the trail and emits the
//!   receipt;
//! * work due at an instant is a [`timers`] kind: armed in the writer's
//!   transaction, fired once across replicas by the service clock, in the
//!   handler's transaction (or, for calls to peers, outside any);
//! * long-running work is an [`operations`] kind with a runner registered
//!   in the descriptor (`Parts::operation`): the rpc starts the operation in
//!   its write and wakes the runner task, which runs it on one replica under
//!   a lease;
//! * a failure is one [`Error`] variant: `DeadlineExceeded` for a passed
//!   deadline, `ResourceExhausted` (with `QuotaFailure`) for a limit,
//!   `Cancelled`; a unique key taken by a concurrent write maps to `Aborted`;
//! * streams of other services are followed with [`changes::Handlers`]
//!   registered in the descriptor: the handler's effect, the events it emits
//!   and the cursor commit together, in batches;
//! * calls to another service go through its [`peer::Peer`] from
//!   [`Runtime::peers`]: one reused, balanced channel per peer, a service
//!   token, trace context and a deadline (the caller's, passed on) on every
//!   call, retries only for calls marked idempotent, and the peer's status
//!   kept in a [`peer::PeerError`] that names peer and rpc; views built from
//!   several services use [`peer::fan_out`] and answer what they have;
//! * times are stored as integer microseconds ([`db::to_micros`]) and
//!   answered exactly as stored;
//! * lists page with the typed keyset [`page::Pager`]; the module docs of
//!   [`idempotency`] and [`page`] spell out both conventions.
#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod bootstrap;
pub mod bulk;
pub mod cache;
pub mod call;
pub mod changes;
pub mod client;
pub mod coalesce;
pub mod config;
pub mod convert;
pub mod customer_events;
pub mod db;
pub mod error;
pub mod idempotency;
pub mod jetstream;
pub mod lanes;
pub mod migration;
pub mod operations;
pub mod outbox;
pub mod page;
pub mod peer;
pub mod server;
pub mod service;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod timers;

pub use error::{Error, Result};

use clm_domain::Clock;
use sea_orm::DatabaseConnection;
use std::sync::Arc;

/// The shared resources of a running service.
#[derive(Clone, Debug)]
pub struct Runtime {
    /// The service's name (`customer`).
    pub service: &'static str,
    /// Database pool for transactions and writes (on SQLite: the one writer connection).
    pub db: DatabaseConnection,
    /// Database pool for reads outside a transaction (on SQLite: read-only
    /// connections that never wait behind the writer; on PostgreSQL: `db`).
    pub read: DatabaseConnection,
    /// Database pool the reports read from: `database.read_url` (a
    /// replica, as stale as its lag) when set, else [`Runtime::read`].
    pub reports: DatabaseConnection,
    /// Cache (Redis or in-process).
    pub cache: cache::Cache,
    /// The service's outbox.
    pub outbox: outbox::Outbox,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    /// The configuration it runs with (peers, auth).
    pub config: Arc<config::Config>,
    /// This replica's long-running operations: its lease identity and the
    /// wake-up of its runner task.
    pub operations: operations::Operations,
    /// The wake-up of the service's timer queue ([`timers`]).
    pub timers: timers::Timers,
    /// Cancelled when the service stops: background work of the service
    /// (timers, long-running operations) ends with it.
    pub background: tokio_util::sync::CancellationToken,
    /// The other services it calls (`peers.<name>`), one channel each.
    pub peers: peer::Peers,
}

/// Connects the database (running the service's migrations unless turned
/// off) and the cache, and starts the outbox relay and the hourly purge of
/// expired idempotency keys and outbox events.
pub async fn open(
    descriptor: &service::ServiceDescriptor,
    config: &config::Config,
    clock: Arc<dyn Clock>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Runtime> {
    let service = descriptor.name;
    let mut db = db::connect(&config.database).await?;
    if config.database.migrate {
        (descriptor.migrate)(&db).await?;
    }
    let mut read = db::connect_readers(&config.database, &db).await?;
    // After the migrations: their statements are no call's children.
    telemetry::observe_database(&mut db, service);
    telemetry::observe_database(&mut read, service);
    let cache = match (&config.cache.redis_url, config.cache.cluster) {
        (Some(seeds), true) => {
            cache::Cache::connect_cluster(seeds, &config.cache.key_prefix).await?
        }
        (url, _) => cache::Cache::connect(url.as_deref(), &config.cache.key_prefix).await?,
    };
    let retention = chrono::Duration::days(i64::from(config.idempotency_retention_days));
    let outbox_retention = chrono::Duration::days(i64::from(config.outbox_retention_days));
    let operation_retention = chrono::Duration::days(i64::from(config.operation_retention_days));
    let outbox = outbox::Outbox::new(service);
    {
        let db = db.clone();
        let clock = clock.clone();
        let shutdown = shutdown.clone();
        let outbox = outbox.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        match idempotency::purge_older_than(&db, clock.now() - retention).await {
                            Ok(n) if n > 0 => tracing::info!(service, purged = n, "expired idempotency keys removed"),
                            Ok(_) => {}
                            Err(e) => tracing::warn!(service, error = %e, "idempotency purge failed"),
                        }
                        match outbox.purge(&db, clock.now() - outbox_retention).await {
                            Ok(n) if n > 0 => tracing::info!(service, purged = n, "expired outbox events removed"),
                            Ok(_) => {}
                            Err(e) => tracing::warn!(service, error = %e, "outbox purge failed"),
                        }
                        match operations::purge_older_than(&db, clock.now() - operation_retention).await {
                            Ok(n) if n > 0 => tracing::info!(service, purged = n, "finished operations removed"),
                            Ok(_) => {}
                            Err(e) => tracing::warn!(service, error = %e, "operations purge failed"),
                        }
                    }
                    () = shutdown.cancelled() => return,
                }
            }
        });
    }
    outbox.spawn(
        &db,
        std::time::Duration::from_millis(config.change_poll_interval_ms),
        shutdown.clone(),
    );
    let tokens = changes::TokenSource::from_config(config, service, clock.clone())?;
    let peers = peer::Peers::new(service, config, tokens, shutdown.clone());
    let reports = match &config.database.read_url {
        Some(url) => {
            let replica = config::DatabaseConfig {
                url: url.clone(),
                migrate: false,
                read_url: None,
                ..config.database.clone()
            };
            let mut pool = db::connect(&replica).await?;
            telemetry::observe_database(&mut pool, service);
            pool
        }
        None => read.clone(),
    };
    Ok(Runtime {
        service,
        db,
        read,
        reports,
        cache,
        outbox,
        clock,
        config: Arc::new(config.clone()),
        timers: timers::Timers::default(),
        operations: operations::Operations::new(std::time::Duration::from_millis(
            config.operation_lease_ms,
        )),
        background: shutdown,
        peers,
    })
}
