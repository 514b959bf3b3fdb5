//! How far back a customer's touchpoints must be read to evaluate a set of
//! rules at an instant: the facts loader ([`crate::store::facts::load`])
//! reads no more, so a customer's long history costs nothing to rules
//! that look at the last week.
//!
//! The bound, per touchpoint kind (`TouchpointKind::code`; custom types
//! share the custom kind):
//!
//! * a kind no rule reads is not read at all;
//! * a kind every rule reads through a window (`count(purchase, 30d)`,
//!   `sum(purchase.revenue, 7d)`, `last(feature_use, 1d)`) is read from
//!   `at - w` on, `w` the longest of those windows: a touchpoint that
//!   occurred at `e` is in a window `w` at `at` only when `e > at - w`, and
//!   touchpoints only ever leave a window as time passes, so the next
//!   instant a window changes the answer (`rules::next_change`) is also
//!   decided by touchpoints inside it. One that occurred after `at` (clock
//!   skew at its source) is always read;
//! * a kind some rule reads without a window is read whole: a lifetime
//!   `count`, `sum`, `first` or `last` (also `last(x) within 7d`, whose
//!   match may be filtered by fields) needs every touchpoint of the kind.
//!   That is what such a rule means; it is the only unbounded read left.

use chrono::{DateTime, TimeDelta, Utc};
use clm_domain::rules::{Condition, Rule};
use clm_platform::db::to_micros;
use std::collections::BTreeMap;

/// Per touchpoint kind code, the longest window rules read it through
/// (`None`: some rule reads the whole history). Kinds absent are read by
/// no rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lookback {
    kinds: BTreeMap<i16, Option<TimeDelta>>,
}

impl Lookback {
    /// The touchpoints `rules` read.
    pub fn of<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Self {
        let mut kinds: BTreeMap<i16, Option<TimeDelta>> = BTreeMap::new();
        for rule in rules {
            rule.for_each_condition(&mut |c| {
                let Condition::Compare { operand, .. } = c else {
                    return;
                };
                let Some(q) = operand.query() else { return };
                let code = q.touch.kind.code();
                let longest = match (kinds.get(&code), q.window) {
                    (None, w) => w,
                    (Some(Some(a)), Some(b)) => Some((*a).max(b)),
                    _ => None,
                };
                kinds.insert(code, longest);
            });
        }
        Self { kinds }
    }

    /// Whether no rule reads any touchpoint.
    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }

    /// What to read for an evaluation at `at`: per kind code, the earliest
    /// occurrence (µs, inclusive) that can count, or `None` for all of it.
    pub fn since(&self, at: DateTime<Utc>) -> Vec<(i16, Option<i64>)> {
        let at_us = to_micros(at);
        self.kinds
            .iter()
            .map(|(code, w)| {
                let since = w
                    .and_then(|w| w.num_microseconds())
                    .map(|w| at_us.saturating_sub(w));
                (*code, since)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clm_domain::rules::parse;
    use clm_domain::touchpoint::TouchpointKind;

    fn lookback(texts: &[&str]) -> Lookback {
        let rules: Vec<Rule> = texts.iter().map(|t| parse(t).unwrap()).collect();
        Lookback::of(&rules)
    }

    #[test]
    fn the_longest_window_of_each_kind_bounds_it() {
        let at = DateTime::parse_from_rfc3339("2026-01-31T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let lb = lookback(&[
            "count(purchase, 7d) > 1 and age > 30",
            "sum(purchase.revenue, 30d) > 10 EUR or count(feature_use, 1d) > 0",
        ]);
        let day = 86_400_000_000i64;
        // Feature use (code 3) from a day back, purchases (4) from 30.
        assert_eq!(
            lb.since(at),
            vec![
                (TouchpointKind::FeatureUse.code(), Some(to_micros(at) - day)),
                (
                    TouchpointKind::Purchase.code(),
                    Some(to_micros(at) - 30 * day)
                ),
            ]
        );
    }

    #[test]
    fn a_rule_without_a_window_reads_the_whole_history_of_its_kind_only() {
        let at = Utc::now();
        let lb = lookback(&[
            "count(purchase, 7d) > 1",
            "count(purchase) > 3",
            "count(feature_use, 2d) > 0",
        ]);
        let since: BTreeMap<i16, Option<i64>> = lb.since(at).into_iter().collect();
        assert_eq!(since[&TouchpointKind::Purchase.code()], None);
        assert!(since[&TouchpointKind::FeatureUse.code()].is_some());
        assert_eq!(since.len(), 2);
    }

    #[test]
    fn rules_reading_no_touchpoint_read_none() {
        let lb = lookback(&["age > 30 and stage = LOYALTY", "email = \"a@b.c\""]);
        assert!(lb.is_empty());
        assert!(lb.since(Utc::now()).is_empty());
    }
}
