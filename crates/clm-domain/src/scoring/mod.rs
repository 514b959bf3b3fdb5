//! Lead-scoring maths: pure, deterministic, no I/O.
//!
//! * [`Decay`]: each award fades by its own age `a = t − award time`:
//!   none (`1`), exponential (`2^(−a/h)` for half-life `h`) or linear
//!   (`max(0, 1 − a/d)` over `d`); before its award time an award counts 0.
//! * [`Inactivity`]: `points × floor((t − last activity) / every)`, the last
//!   activity being the newest award time of an event rule.
//! * [`score_at`]: `round(clamp(Σ points × decay + inactivity, floor, ceiling))`,
//!   rounded to [`score::DECIMALS`] places half away from zero, summed in
//!   ledger order: the same ledger and `t` always give the same value.
//! * [`Cap`]: at most `points` (absolute, before decay) per rule per
//!   customer per period: the UTC day, the ISO week (Monday 00:00 UTC) or a
//!   rolling window `(award − d, award]`, all by award (event) time; an award
//!   that would pass the cap is cut to what is left, a zero award is not made.
//! * once-per-customer rules score only the first matching event.
//! * [`Bands`]: grade = fit letter A–D × engagement digit 1–4.
//! * [`Sum`]: a running sum per (score, decay) that gives a score's value
//!   now without its entries ([`score_from_sums`]); what stream batches use.
//! * [`Curve`]: a score from its last change on (what `ScoreChanged`
//!   carries), its value at any later instant and the exact microsecond it
//!   crosses a value ([`Curve::next_crossing`]).
//! * [`next_crossing`]: the exact microsecond at which decay alone moves a
//!   score across a threshold (what a timer queue stores).
//!
//! Conditions use [`crate::rules`]: an event rule's trigger is a
//! [`crate::rules::TouchQuery`] (`feature_use where feature = "export"`),
//! a profile rule's condition a [`crate::rules::Rule`].

mod curve;
mod decay;
mod model;
mod score;
mod sum;
#[cfg(test)]
mod tests;

pub use curve::{Curve, Term};
pub use decay::{Decay, Inactivity, micros};
pub use model::{
    Award, Bands, Cap, ConsentRule, ENGAGEMENT, EventRule, FIT, Model, Period, ProfileRule,
    RuleHistory, ScoreSpec, Threshold, ThresholdKind,
};
pub use score::{DECIMALS, Entry, next_crossing, round, score_at};
pub use sum::{REBASE_HALF_LIVES, Sum, score_from_sums};
