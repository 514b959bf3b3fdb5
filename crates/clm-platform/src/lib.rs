//! What every CLM service needs, built once: layered [`config`],
//! [`telemetry`], the gRPC [`server`] (health, reflection, request ids,
//! auth, RED metrics, graceful drain), bearer-token [`auth`], one [`error`]
//! type mapped to `tonic::Status`, the [`db`] pool, the [`cache`], the
//! transactional [`outbox`] with its [`changes`] stream server and
//! subscriber, [`idempotency`] keys, and (feature `testing`) the test
//! harness for both storage backends.
//!
//! A service writes only its API, storage and event handlers; see
//! `services/customer` for the shape.
#![forbid(unsafe_code)]

pub mod auth;
pub mod bootstrap;
pub mod cache;
pub mod changes;
pub mod client;
pub mod config;
pub mod convert;
pub mod db;
pub mod error;
pub mod idempotency;
pub mod migration;
pub mod outbox;
pub mod page;
pub mod server;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::{Error, Result};

use clm_domain::Clock;
use sea_orm::DatabaseConnection;
use sea_orm_migration::MigratorTrait;
use std::sync::Arc;

/// The shared resources of a running service.
#[derive(Clone, Debug)]
pub struct Runtime {
    /// Database pool for transactions and writes (on SQLite: the one writer connection).
    pub db: DatabaseConnection,
    /// Database pool for reads outside a transaction (on SQLite: read-only
    /// connections that never wait behind the writer; on PostgreSQL: `db`).
    pub read: DatabaseConnection,
    /// Cache (Redis or in-process).
    pub cache: cache::Cache,
    /// The service's outbox.
    pub outbox: outbox::Outbox,
    /// Time source.
    pub clock: Arc<dyn Clock>,
}

/// Connects the database (running `M`'s migrations unless turned off) and
/// the cache, and starts the idempotency-key purge.
pub async fn open<M: MigratorTrait>(
    config: &config::Config,
    service: &'static str,
    clock: Arc<dyn Clock>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Runtime> {
    let db = db::connect(&config.database).await?;
    if config.database.migrate {
        M::up(&db, None).await?;
    }
    let read = db::connect_readers(&config.database, &db).await?;
    let cache =
        cache::Cache::connect(config.cache.redis_url.as_deref(), &config.cache.key_prefix).await?;
    let retention = chrono::Duration::days(i64::from(config.idempotency_retention_days));
    {
        let db = db.clone();
        let clock = clock.clone();
        let shutdown = shutdown.clone();
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
                    }
                    () = shutdown.cancelled() => return,
                }
            }
        });
    }
    let outbox = outbox::Outbox::new(service);
    outbox.spawn_listener(&db, shutdown);
    Ok(Runtime {
        db,
        read,
        cache,
        outbox,
        clock,
    })
}
