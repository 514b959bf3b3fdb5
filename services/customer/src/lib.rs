//! The CLM customer service (`clm.customer.v1.CustomerService`, port
//! 50051): customer profiles with demographics and typed custom
//! attributes, touchpoints (bulk, idempotent by event id), the lifecycle
//! stage with its history, and the change stream of all of it
//! (`clm.common.v1.ChangeStreamService` on the same port).
//!
//! **Erasure.** EraseCustomer deletes the customer's data in one
//! transaction, keeps salted hashes of its identifiers and emits
//! `CustomerErased`; every peer answers with `clm.common.v1.CustomerDataErased`
//! on its own change stream, which this service follows for each peer
//! configured (`peers.<service>`, see [`events::ReceiptHandler`]) and records
//! on the request until every expected receipt is in. Its own setting,
//! `erased_identifier_policy` in the `[customer]` config section
//! ([`clm_platform::config::CustomerSettings`]), says whether a write that
//! brings back an erased identifier is refused (default) or accepted and
//! flagged `reimported_after_erasure`.
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
pub mod projection;
pub mod reports;
pub mod store;
pub mod view;

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
    policy: &api::POLICY,
    build,
};

fn build(rt: &Runtime) -> anyhow::Result<Parts> {
    let mut parts = Parts::new().grpc(
        CustomerServiceServer::new(api::CustomerApi::new(rt.clone()))
            .max_decoding_message_size(16 * 1024 * 1024),
    );
    // Erasure receipts: each peer that runs (peers.<peer> configured)
    // reports on its own stream that it erased a customer's data.
    for peer in api::erasure_peers() {
        parts = parts.follow_if_configured(peer, events::peer_handlers(peer));
    }
    // The KPI rollups and journey rows the reports read: a consumer of
    // this service's own stream, off the write path.
    parts = parts.follow_own(projection::handlers());
    let watched = rt.clone();
    parts = parts.task(move |shutdown| Box::pin(api::watch_overdue_erasures(watched, shutdown)));
    Ok(parts)
}
