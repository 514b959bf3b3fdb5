//! The CLM customer service (`clm.customer.v1.CustomerService`, port
//! 50051): customer profiles with demographics and typed custom
//! attributes, touchpoints (bulk, idempotent by event id), the lifecycle
//! stage with its history, and the change stream of all of it
//! (`clm.common.v1.ChangeStreamService` on the same port).
//!
//! Layout: [`api`] (rpcs) → [`convert`] (proto ↔ domain) → [`store`]
//! (SQL, migrations) and [`events`] (outbox events); [`error`] maps the
//! service's own failures to the platform error.
#![forbid(unsafe_code)]

pub mod api;
pub mod convert;
pub mod error;
pub mod events;
pub mod store;

use clm_domain::{Clock, SystemClock};
use clm_platform::changes::ChangeStreamServer;
use clm_platform::config::Config;
use clm_proto::common::change_stream_service_server::ChangeStreamServiceServer;
use clm_proto::customer::customer_service_server::CustomerServiceServer;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;

/// The service's name in config, logs and change events.
pub const SERVICE: &str = "customer";

/// Runs the service on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_clock(config, listener, shutdown, Arc::new(SystemClock)).await
}

/// [`run`] with a chosen clock (tests control time with it).
pub async fn run_with_clock(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<()> {
    let rt =
        clm_platform::open::<store::Migrator>(&config, SERVICE, clock, shutdown.clone()).await?;
    let api = CustomerServiceServer::new(api::CustomerApi::new(rt.clone()))
        .max_decoding_message_size(16 * 1024 * 1024);
    let changes = ChangeStreamServiceServer::new(
        ChangeStreamServer::new(rt.db.clone(), rt.outbox.clone(), shutdown.clone())
            .with_poll_interval(std::time::Duration::from_millis(
                config.change_poll_interval_ms,
            )),
    );
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(api).add_service(changes);
    let names = [
        <CustomerServiceServer<api::CustomerApi> as NamedService>::NAME,
        <ChangeStreamServiceServer<ChangeStreamServer> as NamedService>::NAME,
    ];
    tracing::info!(service = SERVICE, listen = %listener.local_addr()?, "serving");
    clm_platform::server::serve(
        &config,
        SERVICE,
        listener,
        routes.routes(),
        &names,
        shutdown,
    )
    .await
}
