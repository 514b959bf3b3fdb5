//! A score as a function of time after its last change: what the scoring
//! service streams in `ScoreChanged`, so that a reader (segmentation) knows
//! the score's value at every later instant without another event, and the
//! exact microsecond at which decay alone moves it across a value.
//!
//! A [`Curve`] is `round4(clamp(Σ coef × decay(t − since) + inactivity(t),
//! floor, ceiling))`: the formula of [`score_at`](super::score_at) with each
//! ledger entry (or each running [`Sum`](super::Sum) of entries sharing a
//! decay) as one [`Term`]. A term counts 0 before its `since`. Exponential
//! factors are `pow(2, −a/h)` here as in [`Decay::factor`] and
//! [`Sum`](super::Sum), the function SQL offers on both backends (SQLite's
//! math functions, PostgreSQL's `power`), so an evaluator in SQL computes
//! the same bits, and terms are summed in the order scoring sums them: a
//! value is the one `GetScore` answers.
//!
//! [`Curve::next_crossing`] finds the first microsecond at which the
//! curve's side of a value changes. The curve is cut into stretches at the
//! instants where a term starts or ends or an inactivity step falls; within
//! a stretch whose changing terms all have one sign the curve is monotone,
//! so the first microsecond on the other side is exact: with a single
//! exponential term it is solved in closed form
//! (`t = since + h × log2(coef / (v − c))`) and then checked against the
//! evaluator itself one microsecond either side; otherwise it is found by
//! bisection over whole microseconds. A stretch mixing rising and falling
//! terms (awards of both signs with different decays) is sampled
//! ([`SAMPLES`] instants) before bisecting, which finds every crossing that
//! lasts longer than a sample step.

use super::decay::{Decay, Inactivity, micros};

use super::score::round;

/// One term of a curve: `coef × decay(t − since)`, 0 before `since`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Term {
    /// The term's value at `since` (points, or a running sum's total).
    pub coef: f64,
    /// When the term starts counting (µs).
    pub since_us: i64,
    /// How it fades.
    pub decay: Decay,
}

impl Term {
    /// Its value at `t_us`.
    pub fn value_at(&self, t_us: i64) -> f64 {
        self.coef * self.decay.factor(t_us.saturating_sub(self.since_us))
    }

    /// Whether the term changes with time after `since` (and is not 0).
    fn varies(&self) -> bool {
        self.coef != 0.0 && !matches!(self.decay, Decay::None)
    }
}

/// A score from its last change on (see the module documentation).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Curve {
    /// The terms, summed in this order.
    pub terms: Vec<Term>,
    /// Inactivity decay and the last activity it counts from.
    pub inactivity: Option<(Inactivity, i64)>,
    /// Lowest value, if any.
    pub floor: Option<i64>,
    /// Highest value, if any.
    pub ceiling: Option<i64>,
}

/// Samples per stretch whose terms rise and fall.
pub const SAMPLES: i64 = 256;
/// Inactivity steps looked at, at most.
pub const MAX_STEPS: i64 = 1_000;
/// After this many half-lives `pow(2, −a/h)` is 0 in a double.
const UNDERFLOW_HALF_LIVES: i64 = 1_100;

impl Curve {
    /// The unrounded, unclamped sum at `t_us`.
    pub fn raw_at(&self, t_us: i64) -> f64 {
        let mut sum: f64 = 0.0;
        for term in &self.terms {
            sum += term.value_at(t_us);
        }
        if let Some((i, last)) = self.inactivity {
            sum += i.penalty(last, t_us);
        }
        sum
    }

    /// The score at `t_us`: clamped, rounded to 4 decimals.
    pub fn value_at(&self, t_us: i64) -> f64 {
        let mut v = self.raw_at(t_us);
        if let Some(f) = self.floor {
            v = v.max(f as f64);
        }
        if let Some(c) = self.ceiling {
            v = v.min(c as f64);
        }
        round(v)
    }

    /// Whether the score at `t_us` is at or above `value` (`strict`: above).
    pub fn side(&self, value: f64, strict: bool, t_us: i64) -> bool {
        let v = self.value_at(t_us);
        if strict { v > value } else { v >= value }
    }

    /// Instants after `from_us` where a stretch ends: a term starts, a
    /// linear term reaches zero, an exponential one underflows, an
    /// inactivity step falls. Sorted, deduplicated.
    fn breaks(&self, from_us: i64) -> Vec<i64> {
        let mut out = Vec::new();
        for t in &self.terms {
            out.push(t.since_us);
            match t.decay {
                Decay::None => {}
                Decay::Linear { over } => out.push(t.since_us.saturating_add(micros(over))),
                Decay::Exponential { half_life } => out.push(
                    t.since_us
                        .saturating_add(micros(half_life).saturating_mul(UNDERFLOW_HALF_LIVES)),
                ),
            }
        }
        if let Some((i, last)) = self.inactivity {
            let every = micros(i.every).max(1);
            let first = if from_us < last {
                1
            } else {
                (from_us - last) / every + 1
            };
            for k in first..first.saturating_add(MAX_STEPS) {
                out.push(last.saturating_add(k.saturating_mul(every)));
            }
        }
        out.retain(|t| *t > from_us);
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The first instant after `from_us` at which the score's side of
    /// `value` (`>=`, or `>` when `strict`) differs from its side at
    /// `from_us`, if time alone ever brings it there (see the module
    /// documentation for how exact it is).
    pub fn next_crossing(&self, value: f64, strict: bool, from_us: i64) -> Option<i64> {
        let start = self.side(value, strict, from_us);
        let changed = |t: i64| self.side(value, strict, t) != start;
        let mut lo = from_us;
        for b in self.breaks(from_us) {
            // The stretch (lo, b): continuous; b itself may jump.
            if b - 1 > lo
                && let Some(t) = self.in_stretch(lo, b - 1, value, strict, &changed)
            {
                return Some(t);
            }
            if changed(b) {
                return Some(b);
            }
            lo = b;
        }
        None
    }

    /// The first `t` in `(lo, hi]` with `changed(t)`, given `!changed(lo)`
    /// (the curve is continuous on `[lo, hi]`).
    fn in_stretch(
        &self,
        lo: i64,
        hi: i64,
        value: f64,
        strict: bool,
        changed: &impl Fn(i64) -> bool,
    ) -> Option<i64> {
        let active: Vec<&Term> = self
            .terms
            .iter()
            .filter(|t| t.since_us <= lo && t.varies() && t.value_at(lo) != 0.0)
            .collect();
        if active.is_empty() {
            return None;
        }
        let monotone = active.iter().all(|t| t.coef > 0.0) || active.iter().all(|t| t.coef < 0.0);
        if monotone {
            if !changed(hi) {
                return None;
            }
            // Rounding to 4 decimals puts the edge half a unit of the last
            // place away from `value`.
            let edge = if strict {
                value + 0.5e-4
            } else {
                value - 0.5e-4
            };
            if let [single] = active[..]
                && let Some(guess) = self.closed_form(single, edge, lo)
                && guess > lo
                && guess <= hi
            {
                if changed(guess) {
                    if !changed(guess - 1) {
                        return Some(guess);
                    }
                    return Some(bisect(lo, guess, changed));
                }
                return Some(bisect(guess, hi, changed));
            }
            return Some(bisect(lo, hi, changed));
        }
        let step = ((hi - lo) / SAMPLES).max(1);
        let mut t = lo;
        while t < hi {
            let next = t.saturating_add(step).min(hi);
            if changed(next) {
                return Some(bisect(t, next, changed));
            }
            t = next;
        }
        None
    }

    /// Where a single exponential term brings the rest of the curve
    /// (constant on the stretch) to `value`, rounded to the microsecond
    /// (closed form; the caller checks it against the evaluator).
    fn closed_form(&self, term: &Term, value: f64, at_us: i64) -> Option<i64> {
        let Decay::Exponential { half_life } = term.decay else {
            return None;
        };
        let rest = self.raw_at(at_us) - term.value_at(at_us);
        let ratio = (value - rest) / term.coef;
        if !(ratio > 0.0 && ratio < 1.0) {
            return None;
        }
        let h = micros(half_life).max(1) as f64;
        let age = -h * ratio.log2();
        let t = term.since_us as f64 + age;
        if !t.is_finite() || t > i64::MAX as f64 {
            return None;
        }
        // The exact instant is within a microsecond of the real solution
        // unless rounding to 4 decimals moves it: the caller's check falls
        // back to bisection then.
        Some(t.ceil() as i64)
    }
}

/// The smallest `t` in `(lo, hi]` with `changed(t)`, given `changed(hi)`
/// and not `changed(lo)`.
fn bisect(mut lo: i64, mut hi: i64, changed: &impl Fn(i64) -> bool) -> i64 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    const DAY: i64 = 86_400_000_000;

    fn exp(coef: f64, since_us: i64, half_life_days: i64) -> Term {
        Term {
            coef,
            since_us,
            decay: Decay::Exponential {
                half_life: TimeDelta::days(half_life_days),
            },
        }
    }

    fn constant(coef: f64) -> Term {
        Term {
            coef,
            since_us: 0,
            decay: Decay::None,
        }
    }

    fn curve(terms: Vec<Term>) -> Curve {
        Curve {
            terms,
            ..Curve::default()
        }
    }

    /// The crossing is the first microsecond on the other side: checked
    /// against the evaluator one microsecond before.
    fn assert_exact(c: &Curve, value: f64, strict: bool, from: i64, at: i64) {
        let start = c.side(value, strict, from);
        assert_ne!(c.side(value, strict, at), start, "other side at {at}");
        assert_eq!(
            c.side(value, strict, at - 1),
            start,
            "same side at {}",
            at - 1
        );
    }

    #[test]
    fn exponential_crossing_is_the_half_life_solution() {
        // 40 halving every 30 days is 20 after 30 days: `< 20` from the
        // first microsecond the rounded value is below 20.
        let c = curve(vec![exp(40.0, 0, 30)]);
        let t = c.next_crossing(20.0, false, 0).expect("falls below 20");
        assert_exact(&c, 20.0, false, 0, t);
        assert!((t - 30 * DAY).abs() < DAY / 1000, "{t}");
        assert!(t > 30 * DAY, "exactly 20 at the half-life is still >= 20");
        assert_eq!(c.value_at(30 * DAY), 20.0);
    }

    #[test]
    fn value_exactly_at_the_threshold() {
        // At 20 now: `>= 20` holds now and stops holding the first moment
        // the value rounds below 20; `> 20` never held and never will.
        let c = curve(vec![exp(20.0, 0, 30)]);
        let t = c.next_crossing(20.0, false, 0).expect("leaves 20");
        assert_exact(&c, 20.0, false, 0, t);
        assert_eq!(c.next_crossing(20.0, true, 0), None);
    }

    #[test]
    fn no_decay_never_crosses() {
        let c = curve(vec![constant(25.0)]);
        assert_eq!(c.next_crossing(20.0, false, 0), None);
        assert_eq!(c.next_crossing(30.0, false, 0), None);
    }

    #[test]
    fn threshold_zero() {
        // A positive score tends to 0 but never goes below it: `< 0` never
        // holds; `> 0` stops holding once it rounds to 0.0000.
        let c = curve(vec![exp(10.0, 0, 1)]);
        assert_eq!(c.next_crossing(0.0, false, 0), None);
        let t = c.next_crossing(0.0, true, 0).expect("rounds to zero");
        assert_exact(&c, 0.0, true, 0, t);
        assert_eq!(c.value_at(t), 0.0);
    }

    #[test]
    fn negative_scores_rise() {
        // -40 rising toward 0: `< -20` stops holding where it reaches -20.
        let c = curve(vec![exp(-40.0, 0, 30)]);
        assert!(!c.side(-20.0, false, 0));
        let t = c.next_crossing(-20.0, false, 0).expect("rises to -20");
        assert_exact(&c, -20.0, false, 0, t);
        assert_eq!(c.value_at(t), -20.0);
    }

    #[test]
    fn constant_part_and_a_decaying_part() {
        // 10 forever plus 30 halving every 7 days: 20 when the decaying
        // part is 10, log2(3) half-lives on.
        let c = curve(vec![constant(10.0), exp(30.0, 5 * DAY, 7)]);
        let t = c.next_crossing(20.0, false, 5 * DAY).expect("falls");
        assert_exact(&c, 20.0, false, 5 * DAY, t);
        // The rounded value is below 20 once the decaying part is below
        // 9.99995: log2(30 / 9.99995) half-lives on.
        let expected = 5 * DAY + (7.0 * DAY as f64 * (30.0f64 / 9.99995).log2()).ceil() as i64;
        assert!((t - expected).abs() <= 1, "{t} vs {expected}");
        // Never below the constant part.
        assert_eq!(c.next_crossing(9.0, false, 5 * DAY), None);
    }

    #[test]
    fn two_half_lives_bisect_exactly() {
        let c = curve(vec![exp(30.0, 0, 3), exp(30.0, 0, 20)]);
        let t = c.next_crossing(25.0, false, 0).expect("falls");
        assert_exact(&c, 25.0, false, 0, t);
    }

    #[test]
    fn a_future_term_jumps_at_its_start() {
        let c = curve(vec![
            constant(10.0),
            Term {
                coef: 15.0,
                since_us: 3 * DAY,
                decay: Decay::None,
            },
        ]);
        assert_eq!(c.next_crossing(20.0, false, 0), Some(3 * DAY));
    }

    #[test]
    fn linear_and_inactivity() {
        let c = curve(vec![Term {
            coef: 30.0,
            since_us: 0,
            decay: Decay::Linear {
                over: TimeDelta::days(30),
            },
        }]);
        let t = c.next_crossing(10.0, false, 0).expect("falls");
        assert_exact(&c, 10.0, false, 0, t);
        let idle = Curve {
            terms: vec![constant(50.0)],
            inactivity: Some((
                Inactivity {
                    points: -10,
                    every: TimeDelta::days(14),
                },
                DAY,
            )),
            floor: Some(25),
            ceiling: None,
        };
        assert_eq!(idle.next_crossing(35.0, false, DAY), Some(DAY + 28 * DAY));
        // The floor stops it at 25.
        assert_eq!(idle.next_crossing(25.0, false, DAY), None);
    }

    #[test]
    fn mixed_signs_are_found_by_sampling() {
        // +40 fading fast, -20 fading slowly: dips below 0, then back to 0.
        let c = curve(vec![exp(40.0, 0, 1), exp(-20.0, 0, 10)]);
        let t = c.next_crossing(0.0, false, 0).expect("dips below 0");
        assert_exact(&c, 0.0, false, 0, t);
    }

    #[test]
    fn agrees_with_score_at_on_entries() {
        use super::super::{Entry, ScoreSpec, score_at};
        let spec = ScoreSpec {
            name: "engagement".into(),
            floor: None,
            ceiling: Some(100),
            inactivity: None,
        };
        let entries = [
            Entry {
                points: 12,
                award_us: 0,
                decay: Decay::Exponential {
                    half_life: TimeDelta::days(30),
                },
            },
            Entry {
                points: 7,
                award_us: DAY,
                decay: Decay::None,
            },
        ];
        let c = Curve {
            terms: entries
                .iter()
                .map(|e| Term {
                    coef: e.points as f64,
                    since_us: e.award_us,
                    decay: e.decay,
                })
                .collect(),
            ceiling: Some(100),
            ..Curve::default()
        };
        for t in [0, DAY, 17 * DAY + 5, 90 * DAY] {
            assert_eq!(c.value_at(t), score_at(&spec, &entries, None, t));
        }
    }
}
