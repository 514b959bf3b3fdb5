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
//!
//! # Decisions
//!
//! * **Models.** Any number of models; each has versions and one active
//!   version, and its own scores (`GetScore` names the model). Every active
//!   model scores every event. A score is what the model's ledger explains,
//!   whatever version wrote each entry; `RescoreCustomers` rewrites it.
//! * **Awards** are keyed by (source event, rule, model, version): the
//!   unique index makes a replayed event score nothing twice, also when the
//!   stream is replayed from 0 (touchpoints already kept are skipped).
//!   Touchpoint awards count from the touchpoint's `occurred_time`; caps and
//!   once-per-customer rules look at the same version's earlier awards of
//!   the customer, taken in (occurred time, event id) order whatever the
//!   arrival order: a late touchpoint makes [`recap`] correct the rule's
//!   awards after it. Awarded and capped points are integers.
//! * **Profile rules** hold or not: when the profile or stage changes the
//!   ledger gets the correcting entry (+points when it starts to hold,
//!   −points when it stops), sourced by the change event.
//! * **Consent denials** (a CONSENT_STATE_DENIED transition) score the
//!   model's consent rules once per purpose and channel.
//! * **Inactivity decay** counts from the customer's newest touchpoint at
//!   or before the read time.
//! * **Merges** move the duplicates' ledger, touchpoints and timers to the
//!   survivor (award keys do not name the customer, so they stay unique);
//!   [`recap`] then evaluates the survivor's caps and once-only rules over
//!   both ledgers (one award of a once-only rule, the earliest), as
//!   `RescoreCustomers` would.
//! * **Erasure** deletes ledger, touchpoints, profile and timers of the
//!   customer and the customers merged into it, and emits
//!   `clm.common.v1.CustomerDataErased` (service `scoring`) in the same
//!   transaction.
//! * **Thresholds** see [`thresholds`]; the stage is taken from StageChanged
//!   events, so a move the customer service refuses (not allowed, already
//!   there) is logged and not retried.
//! * **RescoreCustomers** keeps manual adjustments, the awards of the
//!   version's consent rules (denials are not kept as history) and its
//!   profile rules' entries (they say since when each rule held; only the
//!   correction a profile rule needs now is added, so reads of earlier
//!   instants are unchanged), replays touchpoints, and swaps 500 customers
//!   per transaction.
//! * **Active version on reads.** `GetScore`/`BatchGetScores` use the
//!   active version remembered by [`scorer::Models::active_for_read`]:
//!   forgotten on Create/Update/Activate in this process, trusted for
//!   [`scorer::ACTIVE_TTL`] otherwise (another replica's activation). Stream
//!   handlers and timers read it in their transaction.
//! * **Touchpoint batches** read, in one query, only the touched customers'
//!   entries of the scores the batch's matching rules add to (and `fit`,
//!   `engagement` for the grade): caps and once-only rules need only those
//!   rules' earlier awards, and no other score can change. Caps and
//!   once-only rules are read per (customer, rule) a touchpoint matches,
//!   inside that pair's cap windows, in one statement ([`store::limited`]).
//!   A late touchpoint of a once-only or day/week-capped rule is evaluated
//!   again from the rule's entries and the batch's touchpoints, up to the
//!   end of the cap windows it touches (see [`recap`]).
//! * **ListTopCustomers** computes every customer's score of the model at
//!   the read time from the model's running sums and selects the page:
//!   exact for any mix of decays, floors and ceilings, linear in the number
//!   of scored customers per page. The page token pins the read time and
//!   the model version, so pages never skip or repeat a customer.

pub mod api;
pub mod convert;
pub mod error;
pub mod events;
pub mod recap;
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
    policy: &api::POLICY,
    build,
};

fn build(rt: &Runtime) -> anyhow::Result<Parts> {
    let models = Arc::new(scorer::Models::default());
    Ok(Parts::new()
        .operation(rescore::KIND, rescore::runner(models.clone()))
        .timer(
            store::timers::THRESHOLD,
            Arc::new(thresholds::Thresholds::new(models.clone())),
        )
        .delivery(
            store::timers::STAGE_MOVE,
            Arc::new(thresholds::StageMoves::new(rt)),
        )
        .grpc(ScoringServiceServer::new(api::ScoringApi::new(
            rt.clone(),
            models.clone(),
        )))
        .follow("customer", events::customer_handlers(models.clone()))
        .follow_if_configured("feedback", events::feedback_handlers(models)))
}
