//! The CLM scoring service (`clm.scoring.v1.ScoringService`, port 50052):
//! versioned lead-scoring models, an explainable score ledger with exact
//! decay, caps and thresholds that move the lifecycle stage.
//!
//! Layout: [`DESCRIPTOR`] (what the platform runs) → [`api`] (rpcs) →
//! [`convert`] (proto ↔ domain, model validation) → [`scorer`] (scores
//! from the ledger, applying awards) → [`store`] (SQL, migrations);
//! [`events`] follows the customer stream, [`thresholds`] is the timer
//! queue, [`rescore`] the re-scoring operation. The maths lives in
//! `clm_domain::scoring`.
#![forbid(unsafe_code)]

pub mod api;
pub mod convert;
pub mod error;
pub mod events;
pub mod rescore;
pub mod scorer;
pub mod store;
pub mod thresholds;

use clm_platform::Runtime;
use clm_platform::service::{Parts, ServiceDescriptor, migrate_with};
use clm_proto::scoring::scoring_service_server::ScoringServiceServer;
use std::sync::Arc;

/// The service's name in config, logs and change events.
pub const SERVICE: &str = "scoring";

/// The scoring service, as the platform runs it.
pub static DESCRIPTOR: ServiceDescriptor = ServiceDescriptor {
    name: SERVICE,
    about: "lead-scoring models, score ledger, decay and thresholds",
    migrate: migrate_with::<store::Migrator>,
    build,
};

fn build(rt: &Runtime) -> anyhow::Result<Parts> {
    let models = Arc::new(scorer::Models::default());
    let wake = Arc::new(tokio::sync::Notify::new());
    thresholds::spawn(rt.clone(), models.clone(), wake.clone())?;
    tokio::spawn(rescore::resume(rt.clone(), models.clone()));
    Ok(Parts::new()
        .grpc(ScoringServiceServer::new(api::ScoringApi::new(
            rt.clone(),
            models.clone(),
        )))
        .follow("customer", events::customer_handlers(models, wake)))
}
