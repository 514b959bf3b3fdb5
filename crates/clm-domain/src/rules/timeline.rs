//! Touchpoint timelines: a rule's touchpoint queries answered in O(log n)
//! at any instant, so [`super::next_change`] does not rescan a customer's
//! touchpoints at every instant it examines.
//!
//! For each touchpoint query of a rule, [`Timelines::new`] keeps the
//! occurrence times of the matching touchpoints (window aside) sorted, with
//! prefix sums of usage and of revenue per currency. The touchpoints in the
//! window at `at` are then a suffix of that order (those after
//! `at - window`): one binary search gives their count, first and last
//! time, and two prefix sums their total. Everything else is asked of the
//! facts themselves, so the answers are exactly those of the facts.

use super::ast::{Condition, Operand, Predicate, Rule, ScoreRef, SumField, TouchQuery, TouchType};
use super::eval::{Fact, Facts};
use crate::attributes::AttributeValue;
use crate::clock::micros;
use crate::demographics::Gender;
use crate::lifecycle::Stage;
use crate::money::Money;
use crate::touchpoint::Touchpoint;
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use std::sync::Arc;

/// Prefix sums `p` (`p[i]` is the total of the first `i` values), or `None`
/// when the values could overflow an `i64`: then a saturating sum depends on
/// the order of addition and is left to the facts.
type Prefix = Option<Vec<i64>>;

/// One query's matching touchpoints in time order.
struct Timeline {
    /// Occurrence times, ascending.
    times: Vec<DateTime<Utc>>,
    /// Whether every time is a whole microsecond (so a window's edge
    /// passes a touchpoint exactly at its time plus the window).
    whole_micros: bool,
    /// Prefix sums of usage in milliseconds.
    usage: Prefix,
    /// Prefix sums of revenue in minor units, per currency present.
    revenue: Vec<(String, Prefix)>,
}

fn prefix(values: impl Iterator<Item = i64> + Clone) -> Prefix {
    let bound: i128 = values.clone().map(|v| i128::from(v).abs()).sum();
    if bound > i128::from(i64::MAX) {
        return None;
    }
    let mut sums = vec![0i64];
    let mut total = 0i64;
    for v in values {
        // Cannot overflow: the absolute total fits.
        total += v;
        sums.push(total);
    }
    Some(sums)
}

impl Timeline {
    fn new(query: &TouchQuery, touchpoints: &[Touchpoint]) -> Self {
        let mut matching: Vec<_> = touchpoints.iter().filter(|tp| query.matches(tp)).collect();
        matching.sort_by_key(|tp| tp.occurred_time);
        let mut currencies: Vec<&str> = matching
            .iter()
            .filter_map(|tp| tp.revenue.as_ref().map(|m| m.currency.as_str()))
            .collect();
        currencies.sort_unstable();
        currencies.dedup();
        let revenue = currencies
            .into_iter()
            .map(|c| {
                let amounts = matching.iter().map(move |tp| match &tp.revenue {
                    Some(m) if m.currency == c => m.amount_minor,
                    _ => 0,
                });
                (c.to_owned(), prefix(amounts))
            })
            .collect();
        Self {
            whole_micros: matching
                .iter()
                .all(|tp| tp.occurred_time.timestamp_subsec_nanos() % 1000 == 0),
            times: matching.iter().map(|tp| tp.occurred_time).collect(),
            usage: prefix(matching.iter().map(|tp| tp.usage_millis.unwrap_or(0))),
            revenue,
        }
    }

    /// Index of the first touchpoint in `query`'s window at `at`: the same
    /// test as [`TouchQuery::in_window`].
    fn start(&self, query: &TouchQuery, at: DateTime<Utc>) -> usize {
        match query.window.and_then(|w| at.checked_sub_signed(w)) {
            None => 0,
            Some(start) => self.times.partition_point(|t| *t <= start),
        }
    }

    fn total(sums: &[i64], from: usize) -> Option<i64> {
        Some(sums.last()? - sums.get(from)?)
    }
}

/// The timelines of one customer's touchpoints, shared by every rule
/// evaluated against them ([`super::evaluate_and_next_change`]): a
/// timeline leaves the window aside, so queries that differ only in their
/// window share one, built by the first rule that asks. Valid only while
/// those touchpoints are unchanged: start a new one for each customer.
#[derive(Default)]
pub struct SharedTimelines {
    /// Keyed by the query's type and filter (few per customer: a linear
    /// search beats hashing an AST).
    lines: Vec<(TouchType, Vec<Predicate>, Arc<Timeline>)>,
}

impl SharedTimelines {
    fn line(&mut self, q: &TouchQuery, touchpoints: &[Touchpoint]) -> Arc<Timeline> {
        if let Some((_, _, l)) = self
            .lines
            .iter()
            .find(|(t, f, _)| *t == q.touch && *f == q.filter)
        {
            return l.clone();
        }
        let l = Arc::new(Timeline::new(q, touchpoints));
        self.lines
            .push((q.touch.clone(), q.filter.clone(), l.clone()));
        l
    }
}

/// Facts whose touchpoint queries (those of one rule) are answered from
/// [`Timeline`]s; every other question goes to the wrapped facts.
pub(super) struct Timelines<'a> {
    inner: &'a dyn Facts,
    /// Keyed by the address of the rule's query: evaluation passes the
    /// rule's own queries, and anything else falls through to `inner`.
    lines: Vec<(&'a TouchQuery, Arc<Timeline>)>,
}

impl<'a> Timelines<'a> {
    /// Indexes the touchpoint queries of `rule`, if `inner` holds its
    /// touchpoints in memory (otherwise every question goes to `inner`).
    pub(super) fn new(rule: &'a Rule, inner: &'a dyn Facts) -> Self {
        Self::shared(rule, inner, &mut SharedTimelines::default())
    }

    /// [`Self::new`], taking each timeline from `shared` (built there on
    /// first use).
    pub(super) fn shared(
        rule: &'a Rule,
        inner: &'a dyn Facts,
        shared: &mut SharedTimelines,
    ) -> Self {
        let mut lines: Vec<(&TouchQuery, Arc<Timeline>)> = Vec::new();
        if let Some(tps) = inner.touchpoints() {
            rule.for_each_condition(&mut |c| {
                if let Condition::Compare { operand, .. } = c
                    && let Some(q) = operand.query()
                    && !lines.iter().any(|(k, _)| std::ptr::eq(*k, q))
                {
                    lines.push((q, shared.line(q, tps)));
                }
            });
        }
        Self { inner, lines }
    }

    fn line(&self, query: &TouchQuery) -> Option<&Timeline> {
        self.lines
            .iter()
            .find(|(k, _)| std::ptr::eq(*k, query))
            .map(|(_, l)| &**l)
    }
}

/// What a windowed `count` or `sum` adds up.
enum Measure<'c> {
    Count,
    Revenue(&'c str),
    Usage,
}

impl<'c> Measure<'c> {
    /// The value over the touchpoints of `l` from index `from` on, as
    /// [`Facts`] answers it; `None` when the prefix sums cannot say.
    fn of(&self, l: &Timeline, from: usize) -> Option<Fact<'c>> {
        Some(match *self {
            Measure::Count => Fact::Num((l.times.len() - from) as f64),
            Measure::Revenue(currency) => match l.revenue.iter().find(|(c, _)| c == currency) {
                None => Fact::Money(0, currency),
                Some((_, sums)) => Fact::Money(Timeline::total(sums.as_deref()?, from)?, currency),
            },
            Measure::Usage => {
                let millis = Timeline::total(l.usage.as_deref()?, from)?;
                Fact::Dur(TimeDelta::try_milliseconds(millis).unwrap_or(TimeDelta::MAX))
            }
        })
    }
}

impl Timelines<'_> {
    /// For a windowed `count` or `sum` condition (whose value only falls as
    /// touchpoints leave the window): the earliest instant after `t` at
    /// which it differs from `holds`, its value at `t`, read off the
    /// timeline in one pass over the touchpoints still in the window;
    /// `Some(None)` if it never does. `None` if this condition is not one
    /// the timeline answers (the caller walks its candidates instead).
    pub(super) fn flip(
        &self,
        c: &Condition,
        holds: bool,
        t: DateTime<Utc>,
    ) -> Option<Option<DateTime<Utc>>> {
        let Condition::Compare { operand, test } = c else {
            return None;
        };
        let (q, measure) = match operand {
            Operand::Count(q) => (q, Measure::Count),
            Operand::Sum(q, SumField::Revenue) => (q, Measure::Revenue(test.currency()?)),
            Operand::Sum(q, SumField::Usage) => (q, Measure::Usage),
            _ => return None,
        };
        let w = q.window?;
        let l = self.line(q)?;
        if !l.whole_micros
            || w.subsec_nanos() % 1000 != 0
            || t != micros(t)
            || t.checked_sub_signed(w).is_none()
        {
            return None;
        }
        // A count or sum test does not read the instant (only `within` and
        // `older_than` do, on times), so the value alone decides.
        let mut from = l.start(q, t);
        while from < l.times.len() {
            let leaves = l.times[from];
            // Every touchpoint at this same instant leaves with it.
            from += l.times[from..].partition_point(|x| *x == leaves);
            let fact = measure.of(l, from)?;
            if super::eval::test(Some(fact), test, t) != holds {
                return Some(Some(leaves.checked_add_signed(w)?));
            }
        }
        Some(None)
    }
}

impl Facts for Timelines<'_> {
    fn birth_date(&self) -> Option<NaiveDate> {
        self.inner.birth_date()
    }

    fn gender(&self) -> Option<Gender> {
        self.inner.gender()
    }

    fn income(&self) -> Option<&Money> {
        self.inner.income()
    }

    fn occupation(&self) -> Option<&str> {
        self.inner.occupation()
    }

    fn email(&self) -> Option<&str> {
        self.inner.email()
    }

    fn display_name(&self) -> Option<&str> {
        self.inner.display_name()
    }

    fn attribute(&self, key: &str) -> Option<&AttributeValue> {
        self.inner.attribute(key)
    }

    fn stage(&self) -> Option<(Stage, DateTime<Utc>)> {
        self.inner.stage()
    }

    fn score(&self, score: &ScoreRef, at: DateTime<Utc>) -> Option<f64> {
        self.inner.score(score, at)
    }

    fn score_crossing(
        &self,
        score: &ScoreRef,
        value: f64,
        strict: bool,
        at: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        self.inner.score_crossing(score, value, strict, at)
    }

    fn grade(&self) -> Option<&str> {
        self.inner.grade()
    }

    fn consent(&self, purpose: &str, channel: &str) -> bool {
        self.inner.consent(purpose, channel)
    }

    fn nps_last(&self) -> Option<u8> {
        self.inner.nps_last()
    }

    fn csat_last(&self) -> Option<f64> {
        self.inner.csat_last()
    }

    fn loyalty_tier(&self) -> Option<&str> {
        self.inner.loyalty_tier()
    }

    fn loyalty_balance(&self) -> Option<i64> {
        self.inner.loyalty_balance()
    }

    fn in_segment(&self, segment: &str) -> bool {
        self.inner.in_segment(segment)
    }

    fn touch_count(&self, query: &TouchQuery, at: DateTime<Utc>) -> u64 {
        match self.line(query) {
            Some(l) => (l.times.len() - l.start(query, at)) as u64,
            None => self.inner.touch_count(query, at),
        }
    }

    fn touch_revenue(&self, query: &TouchQuery, currency: &str, at: DateTime<Utc>) -> i64 {
        let Some(l) = self.line(query) else {
            return self.inner.touch_revenue(query, currency, at);
        };
        match l.revenue.iter().find(|(c, _)| c == currency) {
            None => 0,
            Some((_, Some(sums))) => Timeline::total(sums, l.start(query, at))
                .unwrap_or_else(|| self.inner.touch_revenue(query, currency, at)),
            Some((_, None)) => self.inner.touch_revenue(query, currency, at),
        }
    }

    fn touch_usage(&self, query: &TouchQuery, at: DateTime<Utc>) -> TimeDelta {
        let Some(l) = self.line(query) else {
            return self.inner.touch_usage(query, at);
        };
        match l
            .usage
            .as_deref()
            .and_then(|s| Timeline::total(s, l.start(query, at)))
        {
            Some(millis) => TimeDelta::try_milliseconds(millis).unwrap_or(TimeDelta::MAX),
            None => self.inner.touch_usage(query, at),
        }
    }

    fn touch_first(&self, query: &TouchQuery, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self.line(query) {
            Some(l) => l.times.get(l.start(query, at)).copied(),
            None => self.inner.touch_first(query, at),
        }
    }

    fn touch_last(&self, query: &TouchQuery, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self.line(query) {
            Some(l) => {
                let last = l.times.last().copied()?;
                (l.start(query, at) < l.times.len()).then_some(last)
            }
            None => self.inner.touch_last(query, at),
        }
    }
}
