//! How an award fades with its age, and inactivity decay.

use chrono::TimeDelta;

/// Microseconds in a [`TimeDelta`] (saturating).
pub fn micros(d: TimeDelta) -> i64 {
    d.num_microseconds().unwrap_or(i64::MAX)
}

/// How one award fades with its age `a = t − award time` (microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decay {
    /// Never fades: factor 1.
    None,
    /// Halves every `half_life`: factor `2^(−a / half_life)`, computed as
    /// `pow(2, −a / half_life)` (what SQL computes too).
    Exponential {
        /// Half-life, longer than zero.
        half_life: TimeDelta,
    },
    /// Falls in a straight line to zero at `over`: factor `max(0, 1 − a / over)`.
    Linear {
        /// Time to fade out completely, longer than zero.
        over: TimeDelta,
    },
}

impl Decay {
    /// The factor for an award of age `age_us` microseconds: 0 before the
    /// award (negative age), else as the variant says.
    pub fn factor(&self, age_us: i64) -> f64 {
        if age_us < 0 {
            return 0.0;
        }
        match *self {
            Decay::None => 1.0,
            Decay::Exponential { half_life } => {
                let h = micros(half_life).max(1) as f64;
                2f64.powf(-(age_us as f64) / h)
            }
            Decay::Linear { over } => {
                let o = micros(over).max(1);
                if age_us >= o {
                    0.0
                } else {
                    1.0 - age_us as f64 / o as f64
                }
            }
        }
    }

    /// Age after which the factor no longer changes, if any (linear: `over`).
    pub fn settles_after(&self) -> Option<i64> {
        match *self {
            Decay::None => Some(0),
            Decay::Exponential { .. } => None,
            Decay::Linear { over } => Some(micros(over)),
        }
    }

    /// Storage code: (kind, parameter in microseconds). Kinds: 0 none,
    /// 1 exponential (half-life), 2 linear (duration).
    pub fn code(&self) -> (i16, i64) {
        match *self {
            Decay::None => (0, 0),
            Decay::Exponential { half_life } => (1, micros(half_life)),
            Decay::Linear { over } => (2, micros(over)),
        }
    }

    /// Inverse of [`Decay::code`]; an unknown kind is no decay.
    pub fn from_code(kind: i16, param_us: i64) -> Decay {
        match kind {
            1 => Decay::Exponential {
                half_life: TimeDelta::microseconds(param_us),
            },
            2 => Decay::Linear {
                over: TimeDelta::microseconds(param_us),
            },
            _ => Decay::None,
        }
    }
}

/// Inactivity decay: `points` (negative) for every whole `every` since the
/// customer's last activity: `points × floor((t − last) / every)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inactivity {
    /// Points per idle period (negative).
    pub points: i64,
    /// Length of one idle period, longer than zero.
    pub every: TimeDelta,
}

impl Inactivity {
    /// The penalty at `t_us` for a last activity at `last_us`.
    pub fn penalty(&self, last_us: i64, t_us: i64) -> f64 {
        let every = micros(self.every).max(1);
        if t_us <= last_us {
            return 0.0;
        }
        let periods = (t_us - last_us) / every;
        self.points as f64 * periods as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_halves_each_half_life() {
        let d = Decay::Exponential {
            half_life: TimeDelta::days(30),
        };
        let h = micros(TimeDelta::days(30));
        assert_eq!(d.factor(0), 1.0);
        assert_eq!(d.factor(h), 0.5);
        assert_eq!(d.factor(2 * h), 0.25);
        assert_eq!(d.factor(-1), 0.0);
    }

    #[test]
    fn linear_reaches_zero() {
        let d = Decay::Linear {
            over: TimeDelta::days(90),
        };
        let o = micros(TimeDelta::days(90));
        assert_eq!(d.factor(o / 2), 0.5);
        assert_eq!(d.factor(o), 0.0);
        assert_eq!(d.factor(2 * o), 0.0);
    }

    #[test]
    fn inactivity_counts_whole_periods() {
        let i = Inactivity {
            points: -10,
            every: TimeDelta::days(14),
        };
        let p = micros(TimeDelta::days(14));
        assert_eq!(i.penalty(0, p - 1), 0.0);
        assert_eq!(i.penalty(0, p), -10.0);
        assert_eq!(i.penalty(0, 3 * p + 5), -30.0);
    }
}
