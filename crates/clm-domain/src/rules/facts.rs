//! [`FactSet`]: the facts of one customer held in memory, a ready
//! [`Facts`] implementation for services that load a customer's projection
//! and for tests.

use super::ast::{ScoreRef, TouchQuery};
use super::eval::Facts;
use crate::attributes::{AttributeValue, Attributes};
use crate::demographics::{Demographics, Gender};
use crate::lifecycle::Stage;
use crate::money::Money;
use crate::scoring::Curve;
use crate::touchpoint::Touchpoint;
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use std::collections::{BTreeMap, BTreeSet};

/// Everything the rule language can read about one customer.
#[derive(Debug, Clone, Default)]
pub struct FactSet {
    /// Birth date, gender, income, occupation.
    pub demographics: Demographics,
    /// E-mail address.
    pub email: Option<String>,
    /// Display name.
    pub display_name: Option<String>,
    /// Custom attributes.
    pub attributes: Attributes,
    /// Lifecycle stage and when it was entered.
    pub stage: Option<(Stage, DateTime<Utc>)>,
    /// Scores that do not change with time, by name (read by the plain
    /// form `score.<name>` when `curves` has none of that name).
    pub scores: BTreeMap<String, f64>,
    /// Scores as curves in time, by (scoring model id, name), each with
    /// the instant it last changed (µs).
    pub curves: BTreeMap<(String, String), (i64, Curve)>,
    /// Grade.
    pub grade: Option<String>,
    /// Granted consents: purpose to channels.
    pub consents: BTreeMap<String, BTreeSet<String>>,
    /// Last NPS answer.
    pub nps_last: Option<u8>,
    /// Last CSAT answer.
    pub csat_last: Option<f64>,
    /// Loyalty tier.
    pub loyalty_tier: Option<String>,
    /// Loyalty points balance.
    pub loyalty_balance: Option<i64>,
    /// Segments the customer is a member of.
    pub segments: BTreeSet<String>,
    /// Touchpoints, in any order.
    pub touchpoints: Vec<Touchpoint>,
}

fn micros_of(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

impl FactSet {
    /// The curve `score` reads: its model's, or in the plain form the one
    /// changed last (then the smallest model id), as the SQL compilation
    /// picks it.
    pub fn curve(&self, score: &ScoreRef) -> Option<&Curve> {
        match &score.model {
            Some(m) => self
                .curves
                .get(&(m.clone(), score.name.clone()))
                .map(|(_, c)| c),
            None => self
                .curves
                .iter()
                .filter(|((_, n), _)| *n == score.name)
                .max_by(|((ma, _), (ta, _)), ((mb, _), (tb, _))| ta.cmp(tb).then(mb.cmp(ma)))
                .map(|(_, (_, c))| c),
        }
    }

    /// Records a granted consent.
    pub fn grant(&mut self, purpose: &str, channel: &str) {
        self.consents
            .entry(purpose.to_owned())
            .or_default()
            .insert(channel.to_owned());
    }

    fn matching<'a>(
        &'a self,
        query: &'a TouchQuery,
        at: DateTime<Utc>,
    ) -> impl Iterator<Item = &'a Touchpoint> + 'a {
        // The window's start, once per query rather than once per touchpoint:
        // `None` counts everything (no window, or one reaching before year -262143).
        let start = query.window.and_then(|w| at.checked_sub_signed(w));
        self.touchpoints.iter().filter(move |tp| {
            start.is_none_or(|start| tp.occurred_time > start) && query.matches(tp)
        })
    }
}

impl Facts for FactSet {
    fn birth_date(&self) -> Option<NaiveDate> {
        self.demographics.birth_date
    }

    fn gender(&self) -> Option<Gender> {
        self.demographics.gender
    }

    fn income(&self) -> Option<&Money> {
        self.demographics.annual_income.as_ref()
    }

    fn occupation(&self) -> Option<&str> {
        self.demographics.occupation.as_deref()
    }

    fn email(&self) -> Option<&str> {
        self.email.as_deref()
    }

    fn display_name(&self) -> Option<&str> {
        self.display_name.as_deref()
    }

    fn attribute(&self, key: &str) -> Option<&AttributeValue> {
        self.attributes.get(key)
    }

    fn stage(&self) -> Option<(Stage, DateTime<Utc>)> {
        self.stage
    }

    fn score(&self, score: &ScoreRef, at: DateTime<Utc>) -> Option<f64> {
        match self.curve(score) {
            Some(c) => Some(c.value_at(micros_of(at))),
            None if score.model.is_none() => self.scores.get(&score.name).copied(),
            None => None,
        }
    }

    fn score_crossing(
        &self,
        score: &ScoreRef,
        value: f64,
        strict: bool,
        at: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        self.curve(score)?
            .next_crossing(value, strict, micros_of(at))
            .and_then(DateTime::from_timestamp_micros)
    }

    fn grade(&self) -> Option<&str> {
        self.grade.as_deref()
    }

    fn consent(&self, purpose: &str, channel: &str) -> bool {
        self.consents
            .get(purpose)
            .is_some_and(|channels| channels.contains(channel))
    }

    fn nps_last(&self) -> Option<u8> {
        self.nps_last
    }

    fn csat_last(&self) -> Option<f64> {
        self.csat_last
    }

    fn loyalty_tier(&self) -> Option<&str> {
        self.loyalty_tier.as_deref()
    }

    fn loyalty_balance(&self) -> Option<i64> {
        self.loyalty_balance
    }

    fn in_segment(&self, segment: &str) -> bool {
        self.segments.contains(segment)
    }

    fn touch_count(&self, query: &TouchQuery, at: DateTime<Utc>) -> u64 {
        self.matching(query, at).count() as u64
    }

    fn touch_revenue(&self, query: &TouchQuery, currency: &str, at: DateTime<Utc>) -> i64 {
        self.matching(query, at)
            .filter_map(|tp| tp.revenue.as_ref())
            .filter(|m| m.currency == currency)
            .fold(0i64, |sum, m| sum.saturating_add(m.amount_minor))
    }

    fn touch_usage(&self, query: &TouchQuery, at: DateTime<Utc>) -> TimeDelta {
        let millis = self
            .matching(query, at)
            .filter_map(|tp| tp.usage_millis)
            .fold(0i64, i64::saturating_add);
        TimeDelta::try_milliseconds(millis).unwrap_or(TimeDelta::MAX)
    }

    fn touch_first(&self, query: &TouchQuery, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.matching(query, at).map(|tp| tp.occurred_time).min()
    }

    fn touch_last(&self, query: &TouchQuery, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.matching(query, at).map(|tp| tp.occurred_time).max()
    }

    fn touchpoints(&self) -> Option<&[Touchpoint]> {
        Some(&self.touchpoints)
    }
}
