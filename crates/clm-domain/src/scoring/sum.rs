//! Running sums of a customer's ledger, one per (score, decay): what a
//! stream batch keeps up to date so that it knows a score's value now
//! without reading every entry the customer ever earned.
//!
//! * no decay: `total = Σ points`, the value at `t`;
//! * exponential (half-life `h`): `total = Σ points × 2^((award − A)/h)`
//!   for an anchor instant `A`, so the value at `t` is
//!   `total × 2^(−(t − A)/h)`. The anchor moves forward to a new award once
//!   it lies [`REBASE_HALF_LIVES`] half-lives behind it, which keeps
//!   `total` within `Σ|points| × 2^64`;
//! * linear: not summable (each award stops counting at its own end), so
//!   the entries of the last `over` are read and counted one by one.
//!
//! A sum only describes instants at or after its newest award (an award
//! counts 0 before its time); a reader at an earlier instant (a future-dated
//! award) counts the entries themselves. Sums and entries agree up to
//! floating-point rounding in the last bits, far below the
//! [`DECIMALS`](super::DECIMALS) a score is answered with.

use super::decay::{Decay, micros};
use super::model::ScoreSpec;
use super::score::{Entry, finish};

/// The anchor of an exponential sum moves to a new award once it is this
/// many half-lives older.
pub const REBASE_HALF_LIVES: f64 = 64.0;

/// The running sum of one score's entries that share one decay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sum {
    /// The entries' decay.
    pub decay: Decay,
    /// Exponential: the anchor instant `A` (µs); 0 otherwise.
    pub anchor_us: i64,
    /// See the module documentation.
    pub total: f64,
    /// Entries summed.
    pub entries: i64,
    /// The newest award time summed (µs).
    pub newest_us: i64,
}

impl Sum {
    /// A sum of no entries yet, for `decay`.
    pub fn new(decay: Decay) -> Self {
        Sum {
            decay,
            anchor_us: 0,
            total: 0.0,
            entries: 0,
            newest_us: i64::MIN,
        }
    }

    /// Adds an award of `points` at `award_us`.
    pub fn add(&mut self, points: i64, award_us: i64) {
        match self.decay {
            Decay::Exponential { half_life } => {
                let h = micros(half_life).max(1) as f64;
                if self.entries == 0 {
                    self.anchor_us = award_us;
                } else if (award_us.saturating_sub(self.anchor_us)) as f64 / h > REBASE_HALF_LIVES {
                    self.total *= 2f64.powf(-((award_us - self.anchor_us) as f64) / h);
                    self.anchor_us = award_us;
                }
                self.total +=
                    points as f64 * 2f64.powf((award_us.saturating_sub(self.anchor_us)) as f64 / h);
            }
            Decay::None | Decay::Linear { .. } => self.total += points as f64,
        }
        self.entries += 1;
        self.newest_us = self.newest_us.max(award_us);
    }

    /// The sum of `entries` (all of one decay).
    pub fn of(decay: Decay, entries: impl IntoIterator<Item = (i64, i64)>) -> Self {
        let mut s = Sum::new(decay);
        for (points, award_us) in entries {
            s.add(points, award_us);
        }
        s
    }

    /// Σ points × decay at `t_us`, when the sum can tell: `None` for a
    /// linear sum or when `t_us` is before the newest award.
    pub fn value_at(&self, t_us: i64) -> Option<f64> {
        if self.entries == 0 {
            return Some(0.0);
        }
        if t_us < self.newest_us {
            return None;
        }
        match self.decay {
            Decay::None => Some(self.total),
            Decay::Exponential { half_life } => {
                let h = micros(half_life).max(1) as f64;
                Some(self.total * 2f64.powf(-((t_us - self.anchor_us) as f64) / h))
            }
            Decay::Linear { .. } => None,
        }
    }
}

/// A score at `t_us` from its non-linear `sums` and its `linear` entries
/// awarded in the last `over` before `t_us` (older ones count 0), then as
/// [`score_at`](super::score_at): inactivity, clamp, round. `None` when a
/// sum cannot tell (see [`Sum::value_at`]): count the entries instead.
pub fn score_from_sums(
    spec: &ScoreSpec,
    sums: &[Sum],
    linear: &[Entry],
    last_activity_us: Option<i64>,
    t_us: i64,
) -> Option<f64> {
    let mut sum = 0.0;
    for s in sums {
        if matches!(s.decay, Decay::Linear { .. }) {
            continue;
        }
        sum += s.value_at(t_us)?;
    }
    for e in linear {
        if e.award_us > t_us {
            return None;
        }
        sum += e.value_at(t_us);
    }
    Some(finish(spec, sum, last_activity_us, t_us))
}
