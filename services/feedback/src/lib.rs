//! The CLM feedback service (`clm.feedback.v1.FeedbackService`, port
//! 50054): versioned surveys, invitations under a fatigue cap, a recontact
//! cadence and survey consent, partial and completed responses, and
//! summaries (NPS, CSAT, CES, distributions, response, completion and
//! drop-off rates) computed by the database. Completed responses are
//! change events carrying each answer's class, which scoring and
//! segmentation follow: the feedback loop is closed.
//!
//! Layout: [`DESCRIPTOR`] (what the platform runs) → [`api`] (rpcs) →
//! [`convert`] (proto ↔ domain, survey validation) → [`invite`] (making
//! invitations), [`submit`] (taking answers), [`summary`] (the formulas)
//! → [`store`] (SQL, migrations); [`events`] follows the customer stream,
//! [`triggers`] holds the timers, [`segments`] asks segmentation. The
//! survey logic (answers, display conditions, shown and dropped) lives in
//! `clm_domain::survey`.
//!
//! # Decisions
//!
//! * **Versions.** Changing a survey's questions (or default language)
//!   makes a new version; an invitation is made for the latest version and
//!   its response is checked against that version to the end, so a
//!   customer half way through never meets a changed questionnaire.
//!   Summaries match questions by id across versions, or take one version.
//! * **States.** DRAFT → PUBLISHED → CLOSED, forward only. Only a
//!   published survey invites; a closed one refuses late answers.
//! * **Invitations** are the only way to answer: one response per
//!   invitation. See [`invite`] for the checks (consent, segment, fatigue
//!   cap, cadence), made under the locks that order invitation writes.
//! * **Responses** are partial until submitted with `finish`; the response
//!   limit counts completions only, with one conditional UPDATE, so it
//!   holds under concurrency. Answers to questions a changed answer hides
//!   are dropped; an answer sent to a hidden question is refused.
//! * **Segments at response time** are asked of segmentation when a
//!   response completes, before the transaction; if segmentation does not
//!   answer, the response is kept and counts in no segment's summary.
//! * **Stage at response time** is the stage feedback last saw on the
//!   customer stream when the response was last submitted.
//! * **Erasure** keeps the numbers (anonymous) and deletes the text: open
//!   text answers are deleted, responses and invitations are unlinked from
//!   the customer, timers and the customer's row deleted, then the receipt.

pub mod api;
pub mod convert;
pub mod error;
pub mod events;
pub mod invite;
pub mod segments;
pub mod store;
pub mod submit;
pub mod summary;
pub mod triggers;

use clm_platform::Runtime;
use clm_platform::service::{Parts, ServiceDescriptor, migrate_with};
use clm_proto::feedback::feedback_service_server::FeedbackServiceServer;
use std::sync::Arc;

/// The service's name in config, logs and change events.
pub const SERVICE: &str = "feedback";

/// The feedback service, as the platform runs it.
pub static DESCRIPTOR: ServiceDescriptor = ServiceDescriptor {
    name: SERVICE,
    about: "surveys, invitations, responses and their summaries",
    migrate: migrate_with::<store::Migrator>,
    policy: &api::POLICY,
    build,
};

fn build(rt: &Runtime) -> anyhow::Result<Parts> {
    Ok(Parts::new()
        .grpc(FeedbackServiceServer::new(api::FeedbackApi::new(
            rt.clone(),
        )))
        .timer(invite::EXPIRY, Arc::new(triggers::Expiry))
        .timer(triggers::AFTER_PURCHASE, Arc::new(triggers::AfterPurchase))
        .follow("customer", events::customer_handlers()))
}
