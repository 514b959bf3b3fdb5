//! The CLM segmentation service (`clm.segmentation.v1.SegmentationService`,
//! port 50053): segments are rules in the shared rule language
//! (`clm_domain::rules`) over a projection of the customer stream, with
//! membership kept exact in real time and cached.
//!
//! * **Facts** ([`events`], [`store::facts`]): the customer stream is
//!   followed through the platform subscriber, in batches, into `fact_*`
//!   tables; merges re-key, erasures delete and send a receipt.
//! * **Incremental evaluation** ([`engine`]): a changed fact re-evaluates
//!   only the segments whose rules read it, for that customer only.
//! * **Backfill** ([`sql`]): creating, changing or refreshing a segment
//!   compiles its rule to one set-based SQL query and applies the diff.
//! * **Exact windows** ([`engine`]): next-change instants per (segment,
//!   customer) in the platform timer queue, fired by the clock.
//! * **Membership** ([`cache`]): history in the database, hot membership in
//!   the platform cache (Redis or in-process), versioned, never "not a
//!   member" by mistake.
//!
//! * **Accountability** (docs/segment-owners.md): owner, team, purpose and
//!   playbook on each segment; owner-scoped writes ([`access`], checked in
//!   the platform's `auth::authorize_owned` inside each write's
//!   transaction); objectives computed from the projections ([`objectives`],
//!   [`store::metrics`]); change requests (`api::edit` is the one way a
//!   segment is edited, by UpdateSegment or by an approval); membership
//!   history read from the membership rows themselves ([`store::history`]);
//!   daily snapshots and objective deadlines in the platform timer queue
//!   ([`accountability`]) with `ObjectiveStatusChanged` alerts.
//!
//! Layout: [`DESCRIPTOR`] → [`api`] → [`convert`] → [`store`] / [`engine`].
//!
//! # Choices a newcomer should know
//!
//! * Rules are stored as canonical text and parsed into the registry; a
//!   rule given as a tree is checked with `rules::check`, whose violation
//!   paths are the proto field paths inside `Rule`
//!   (`segment.rule.any.rules[1].condition.compare.operand.count.window`).
//! * Membership writers (subscriber batches, a backfill's chunks, timers,
//!   deletes) serialise on the `seg_meta` row, each taking it first in its
//!   transaction and holding it briefly: simple, correct on both backends,
//!   free of lock cycles, and the source of the cache's commit-ordered
//!   versions.
//! * A backfill never holds that lock for long: it takes its diff with
//!   no lock (evaluations of the segment meanwhile record whom they
//!   decided, `store::backfill_diffs`), then applies it under the lock a
//!   transaction per 5,000 customers (their members, events and cascade),
//!   leaving out those decided, gone or moved since the diff; a rule that
//!   reads time is then evaluated for every customer, 1,000 per
//!   transaction, which sets the timers. It is a long-running operation
//!   (kind `segmentation.backfill`, named by the segment's `operation`):
//!   one replica runs it under a lease, another resumes it (from the
//!   start: the diff is then what is left) if that one dies, and
//!   `google.longrunning.Operations` shows its progress and outcome. Each
//!   chunk's cache writes are read back after its commit from the rows its
//!   membership versions wrote (`cache::write_back`); the segment is
//!   `READY` once all are written.
//! * An evaluation loads only the touchpoints its rules can count
//!   ([`lookback`]): none of a type no rule reads, from the longest window
//!   back for a type every rule reads through a window, the whole history
//!   of a type some rule reads without one (a lifetime count).
//! * Membership reads use the customer's set (`{cust:ID}`), loaded from the
//!   database on a miss; segment sets (`{seg:ID}`) are kept up to date for
//!   consumers that read them but are not loaded whole.
//! * Customers without a profile are in no segment (the customer service
//!   emits `CustomerCreated` before anything else about them, but the
//!   loyalty and feedback streams can be ahead of it: their facts wait in
//!   a row marked `profiled = false`).
//! * Scores and grade come from the scoring service's stream when
//!   `peers.scoring` is configured (`clm up` does): each `ScoreChanged`
//!   sets the score's curve per (customer, model, name) and re-evaluates
//!   the segments reading scores; rules read a score at the evaluation
//!   instant, decay included, and timers fire at the exact instants decay
//!   moves it across a rule's numbers (`clm_domain::scoring::Curve`). A
//!   score for a customer the projection does not hold yet is kept for when
//!   it arrives; one for a customer erased or merged away is dropped.
//! * NPS and CSAT facts (`nps.last`, `nps.last_category`, `csat.last`)
//!   follow the feedback service's stream when `peers.feedback` is
//!   configured: each completed response sets the customer's last answers
//!   and adds its answers as `SURVEY_ANSWER` touchpoints, so
//!   `count(survey_answer where properties.category = "detractor", 90d)`
//!   works like any touchpoint window.
//! * Only admin changes any segment: marketer (who alone, with admin,
//!   creates segments) and segment_owner change the segments they own or
//!   whose team (token claim `teams`) they are in. Deleting a segment that
//!   requires approval is not gated by approval (only rule, objectives and
//!   the approval setting are).
//! * Reads (GetSegment, ListSegments) measure objectives live, and each
//!   replica reuses a segment's evaluation for `objective_cache_secs`
//!   (per revision and completed backfill); `evaluate_time` says when.
//! * Objective values count current members only; revenue metrics count
//!   purchases in the objective's currency (no conversion). Status after
//!   the deadline is frozen by a deadline timer at the value then.
//! * Loyalty facts follow the loyalty stream when `peers.loyalty` is set
//!   (`events::loyalty_handlers`): `TierChanged` sets `loyalty.tier` and
//!   `loyalty.balance`, `PointsChanged` the balance. With several programs
//!   they are the primary program's (`Program.primary`, else the oldest
//!   program): events of other programs carry `secondary` and are skipped.
#![forbid(unsafe_code)]

pub mod access;
pub mod accountability;
pub mod api;
pub mod cache;
pub mod catalog;
pub mod convert;
pub mod engine;
pub mod error;
pub mod events;
pub mod lookback;
pub mod objectives;
pub mod sql;
pub mod store;

use clm_platform::Runtime;
use clm_platform::service::{Parts, ServiceDescriptor, migrate_with};
use clm_proto::segmentation::segmentation_service_server::SegmentationServiceServer;

/// The service's name in config, logs and change events.
pub const SERVICE: &str = "segmentation";

/// The segmentation service, as the platform runs it.
pub static DESCRIPTOR: ServiceDescriptor = ServiceDescriptor {
    name: SERVICE,
    about: "segments, rules, real-time membership (+ cache)",
    migrate: migrate_with::<store::Migrator>,
    policy: &api::POLICY,
    build,
};

fn build(rt: &Runtime) -> anyhow::Result<Parts> {
    let engine = engine::Engine::new(rt.clone());
    let resume = engine.clone();
    Ok(Parts::new()
        .grpc(SegmentationServiceServer::new(api::SegmentationApi::new(
            engine.clone(),
        )))
        .follow("customer", events::customer_handlers(engine.clone()))
        .follow_if_configured("scoring", events::scoring_handlers(engine.clone()))
        .follow_if_configured("feedback", events::feedback_handlers(engine.clone()))
        .follow_if_configured("loyalty", events::loyalty_handlers(engine.clone()))
        .operation(engine::BACKFILL, engine.runner())
        .timer(store::members::WINDOW, std::sync::Arc::new(engine))
        .timer(
            accountability::SNAPSHOT,
            std::sync::Arc::new(accountability::Timers {
                rt: rt.clone(),
                kind: accountability::SNAPSHOT,
            }),
        )
        .timer(
            accountability::DEADLINE,
            std::sync::Arc::new(accountability::Timers {
                rt: rt.clone(),
                kind: accountability::DEADLINE,
            }),
        )
        .task(move |_| Box::pin(resume.resume_backfills()))
        .task({
            let rt = rt.clone();
            move |_| Box::pin(accountability::arm_all(rt))
        })
        .task({
            let rt = rt.clone();
            move |shutdown| Box::pin(accountability::purge_history(rt, shutdown))
        }))
}
