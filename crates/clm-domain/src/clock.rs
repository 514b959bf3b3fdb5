//! Time as a dependency: decay, windows and expiry read a [`Clock`] that
//! tests control, so no test sleeps to let time pass.
//!
//! Times are stored as integer microseconds and answered exactly as stored,
//! so every clock here answers whole microseconds: a write answers the same
//! times as the next read, its events and its idempotent replays.

use chrono::{DateTime, SubsecRound, Utc};
use std::sync::{Arc, Mutex};

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time, in whole microseconds (see [`micros`]).
    fn now(&self) -> DateTime<Utc>;
}

/// `t` truncated to the precision times are stored with (microseconds).
pub fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

/// The real wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        micros(Utc::now())
    }
}

/// A clock that only moves when told to (for tests).
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<DateTime<Utc>>>);

impl ManualClock {
    /// A clock stopped at `at` (truncated to microseconds, as every time here).
    pub fn new(at: DateTime<Utc>) -> Self {
        Self(Arc::new(Mutex::new(micros(at))))
    }

    /// Moves the clock forward (or backward, for a negative duration).
    pub fn advance(&self, by: chrono::Duration) {
        let mut t = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *t = micros(*t + by);
    }

    /// Sets the clock.
    pub fn set(&self, at: DateTime<Utc>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = micros(at);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_answer_whole_microseconds() {
        for _ in 0..100 {
            assert_eq!(SystemClock.now().timestamp_subsec_nanos() % 1000, 0);
        }
        let at = DateTime::from_timestamp(1_700_000_000, 123_456_789).expect("valid");
        let c = ManualClock::new(at);
        assert_eq!(c.now().timestamp_subsec_nanos(), 123_456_000);
        c.advance(chrono::Duration::nanoseconds(999));
        assert_eq!(c.now().timestamp_subsec_nanos(), 123_456_000);
        c.set(at);
        assert_eq!(c.now().timestamp_subsec_nanos(), 123_456_000);
        let before_epoch = DateTime::from_timestamp(-1, 999_999_999).expect("valid");
        assert_eq!(micros(before_epoch).timestamp_subsec_nanos(), 999_999_000);
    }
}
