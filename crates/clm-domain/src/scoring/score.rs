//! A score as a function of the ledger and the read time, and the next
//! instant at which decay alone moves it across a threshold.

use super::decay::Decay;
use super::model::ScoreSpec;

/// One ledger entry of one score, as the maths needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry {
    /// Points awarded (before decay).
    pub points: i64,
    /// Award time, microseconds since the epoch.
    pub award_us: i64,
    /// Its decay.
    pub decay: Decay,
}

impl Entry {
    /// Its value at `t_us`: `points × decay(t − award)`; 0 before the award.
    pub fn value_at(&self, t_us: i64) -> f64 {
        self.points as f64 * self.decay.factor(t_us.saturating_sub(self.award_us))
    }
}

/// Scores are answered rounded to this many decimal places (half away from zero).
pub const DECIMALS: i32 = 4;

/// Rounds to [`DECIMALS`] places, half away from zero.
pub fn round(x: f64) -> f64 {
    let k = 10f64.powi(DECIMALS);
    (x * k).round() / k
}

/// The score at `t_us`:
/// `round(clamp(Σ value_at(t) + inactivity(t), floor, ceiling))`, the sum
/// taken over `entries` in the order given (the ledger's order: award time,
/// then entry id), the inactivity penalty counted from `last_activity_us`.
pub fn score_at(
    spec: &ScoreSpec,
    entries: &[Entry],
    last_activity_us: Option<i64>,
    t_us: i64,
) -> f64 {
    let sum: f64 = entries.iter().map(|e| e.value_at(t_us)).sum();
    finish(spec, sum, last_activity_us, t_us)
}

/// The rest of [`score_at`] once the entries' values are summed: adds the
/// inactivity penalty, clamps to floor and ceiling, rounds.
pub(crate) fn finish(
    spec: &ScoreSpec,
    mut sum: f64,
    last_activity_us: Option<i64>,
    t_us: i64,
) -> f64 {
    if let (Some(i), Some(last)) = (spec.inactivity, last_activity_us) {
        sum += i.penalty(last, t_us);
    }
    if let Some(f) = spec.floor {
        sum = sum.max(f as f64);
    }
    if let Some(c) = spec.ceiling {
        sum = sum.min(c as f64);
    }
    round(sum)
}

/// Samples per stretch between break points when searching for a crossing.
const SAMPLES: i64 = 256;
/// Exponential awards are followed for this many half-lives (2^-64 of any
/// realistic award rounds to 0 at [`DECIMALS`] places).
const HALF_LIVES: i64 = 64;
/// Most inactivity steps looked at.
const MAX_STEPS: i64 = 1_000;

/// The first instant after `from_us` at which decay alone (no new award)
/// puts the score on the other side of `threshold` (`score ≥ threshold`
/// versus `<`), or `None` if it stays on its side.
///
/// The search evaluates the score at the break points (linear decays
/// reaching zero, inactivity steps) and at [`SAMPLES`] evenly spaced
/// instants between consecutive ones, up to where every award has settled;
/// the first sample on the other side is then narrowed down by bisection
/// over whole microseconds, so the answer is the exact first microsecond
/// on the other side whenever the score is monotone within that stretch
/// (always true for awards of one sign or of one decay kind).
pub fn next_crossing(
    spec: &ScoreSpec,
    entries: &[Entry],
    last_activity_us: Option<i64>,
    threshold: f64,
    from_us: i64,
) -> Option<i64> {
    let side = |t: i64| score_at(spec, entries, last_activity_us, t) >= threshold;
    let start = side(from_us);
    let mut breaks: Vec<i64> = Vec::new();
    let mut horizon = from_us;
    for e in entries {
        match e.decay {
            Decay::None => {}
            Decay::Linear { .. } => {
                if let Some(end) = e.decay.settles_after() {
                    let t = e.award_us.saturating_add(end);
                    breaks.push(t);
                    horizon = horizon.max(t);
                }
            }
            Decay::Exponential { half_life } => {
                let h = super::decay::micros(half_life);
                horizon = horizon.max(e.award_us.saturating_add(h.saturating_mul(HALF_LIVES)));
            }
        }
        if e.award_us > from_us {
            breaks.push(e.award_us);
            horizon = horizon.max(e.award_us);
        }
    }
    if let (Some(i), Some(last)) = (spec.inactivity, last_activity_us) {
        let every = super::decay::micros(i.every).max(1);
        let first = if from_us < last {
            1
        } else {
            (from_us - last) / every + 1
        };
        for k in first..first + MAX_STEPS {
            breaks.push(last.saturating_add(k.saturating_mul(every)));
        }
        horizon = horizon.max(last.saturating_add((first + MAX_STEPS).saturating_mul(every)));
    }
    breaks.retain(|t| *t > from_us && *t <= horizon);
    breaks.push(horizon);
    breaks.sort_unstable();
    breaks.dedup();
    let mut prev = from_us;
    for b in breaks {
        let span = b - prev;
        let step = (span / SAMPLES).max(1);
        let mut t = prev;
        loop {
            let next = (t + step).min(b);
            if side(next) != start {
                return Some(bisect(t, next, |x| side(x) != start));
            }
            if next >= b {
                break;
            }
            t = next;
        }
        prev = b;
    }
    None
}

/// The smallest `t` in `(lo, hi]` with `changed(t)`, given `changed(hi)`
/// and not `changed(lo)`.
fn bisect(mut lo: i64, mut hi: i64, changed: impl Fn(i64) -> bool) -> i64 {
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if changed(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}
