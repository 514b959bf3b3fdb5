//! The CLM customer service (`clm.customer.v1.CustomerService`, port
//! 50051): customer profiles with demographics and typed custom
//! attributes, touchpoints (bulk, idempotent by event id), the lifecycle
//! stage with its history, and the change stream of all of it
//! (`clm.common.v1.ChangeStreamService` on the same port).
//!
//! Layout: [`DESCRIPTOR`] (what the platform runs) → [`api`] (rpcs) →
//! [`convert`] (proto ↔ domain) → [`store`] (SQL, migrations) and
//! [`events`] (outbox events); [`error`] maps the service's own failures to
//! the platform error.
#![forbid(unsafe_code)]

pub mod api;
pub mod campaigns;
pub mod convert;
pub mod error;
pub mod events;
pub mod reports;
pub mod store;

use clm_platform::Runtime;
use clm_platform::service::{Parts, ServiceDescriptor, migrate_with};
use clm_proto::customer::customer_service_server::CustomerServiceServer;

/// The service's name in config, logs and change events.
pub const SERVICE: &str = "customer";

/// The customer service, as the platform runs it.
pub static DESCRIPTOR: ServiceDescriptor = ServiceDescriptor {
    name: SERVICE,
    about: "profiles, attributes, touchpoints, lifecycle stage and history",
    migrate: migrate_with::<store::Migrator>,
    build,
};

fn build(rt: &Runtime) -> anyhow::Result<Parts> {
    Ok(Parts::new().grpc(
        CustomerServiceServer::new(api::CustomerApi::new(rt.clone()))
            .max_decoding_message_size(16 * 1024 * 1024),
    ))
}
