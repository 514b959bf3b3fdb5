//! Evaluation: a rule against a customer's facts at an instant, and the
//! next instant at which time alone changes the answer.

use super::ast::{
    CmpOp, Condition, NpsCategory, Operand, Predicate, Rule, ScoreRef, SumField, Test, TouchField,
    TouchQuery, Value,
};
use super::timeline::{SharedTimelines, Timelines};
use crate::attributes::AttributeValue;
use crate::clock::micros;
use crate::demographics::{Gender, age_on};
use crate::lifecycle::Stage;
use crate::money::Money;
use crate::touchpoint::Touchpoint;
use chrono::{DateTime, Datelike, NaiveDate, TimeDelta, Utc};
use std::cmp::Ordering;

/// What a rule can ask about one customer.
///
/// Evaluation calls these once per condition, without allocating, so an
/// implementation should answer from memory (a projection row, a cached
/// aggregate). A missing fact is `None` (or `false` / zero for consent,
/// membership and counts).
///
/// The touchpoint methods answer for the touchpoints of `query.touch`
/// matching every `query.filter` predicate ([`TouchQuery::matches`]) that are
/// in the window at `at`: occurred after `at - window`, or all of them
/// without a window ([`TouchQuery::in_window`]). A touchpoint recorded a
/// little ahead of the clock (the customer service allows five minutes of
/// skew) counts at once: the window has no upper end, so as time passes
/// touchpoints only ever leave a window, which [`next_change`] relies on.
pub trait Facts {
    /// Date of birth (for `age`).
    fn birth_date(&self) -> Option<NaiveDate>;
    /// Gender.
    fn gender(&self) -> Option<Gender>;
    /// Yearly income.
    fn income(&self) -> Option<&Money>;
    /// Occupation.
    fn occupation(&self) -> Option<&str>;
    /// E-mail address.
    fn email(&self) -> Option<&str>;
    /// Display name.
    fn display_name(&self) -> Option<&str>;
    /// Custom attribute `key`.
    fn attribute(&self, key: &str) -> Option<&AttributeValue>;
    /// Lifecycle stage and when the customer entered it.
    fn stage(&self) -> Option<(Stage, DateTime<Utc>)>;
    /// Score `score` at `at` (`engagement`, `fit` or custom; of its model,
    /// or in the plain form of the one model the facts hold it from).
    fn score(&self, score: &ScoreRef, at: DateTime<Utc>) -> Option<f64>;
    /// The first instant after `at` at which time alone puts score `score`
    /// on the other side of `value` (`>=` it, or `>` when `strict`), for
    /// facts whose scores decay ([`next_change`] offers it as a candidate);
    /// the default: scores do not change with time.
    fn score_crossing(
        &self,
        _score: &ScoreRef,
        _value: f64,
        _strict: bool,
        _at: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        None
    }
    /// Grade, e.g. `A1`.
    fn grade(&self) -> Option<&str>;
    /// Whether consent for `purpose` on `channel` is granted.
    fn consent(&self, purpose: &str, channel: &str) -> bool;
    /// The last NPS answer, 0 to 10.
    fn nps_last(&self) -> Option<u8>;
    /// The last CSAT answer.
    fn csat_last(&self) -> Option<f64>;
    /// Loyalty tier name.
    fn loyalty_tier(&self) -> Option<&str>;
    /// Loyalty points balance.
    fn loyalty_balance(&self) -> Option<i64>;
    /// Whether the customer is a member of segment `segment`.
    fn in_segment(&self, segment: &str) -> bool;
    /// How many touchpoints match `query` at `at`.
    fn touch_count(&self, query: &TouchQuery, at: DateTime<Utc>) -> u64;
    /// Total revenue in `currency`, in minor units, of the touchpoints
    /// matching `query` at `at` (revenue in other currencies is left out).
    fn touch_revenue(&self, query: &TouchQuery, currency: &str, at: DateTime<Utc>) -> i64;
    /// Total usage duration of the touchpoints matching `query` at `at`.
    fn touch_usage(&self, query: &TouchQuery, at: DateTime<Utc>) -> TimeDelta;
    /// When the earliest touchpoint matching `query` at `at` occurred.
    fn touch_first(&self, query: &TouchQuery, at: DateTime<Utc>) -> Option<DateTime<Utc>>;
    /// When the latest touchpoint matching `query` at `at` occurred.
    fn touch_last(&self, query: &TouchQuery, at: DateTime<Utc>) -> Option<DateTime<Utc>>;
    /// Every touchpoint of the customer, in any order, if the facts hold
    /// them in memory. [`next_change`] then indexes the rule's touchpoint
    /// queries once (sorted times, prefix sums) instead of asking the
    /// `touch_*` methods at every instant it examines; the default `None`
    /// keeps it on those methods.
    fn touchpoints(&self) -> Option<&[Touchpoint]> {
        None
    }
}

impl TouchQuery {
    /// Whether a touchpoint that occurred at `occurred` is in the window at
    /// `at`: after `at - window`, or always without a window.
    pub fn in_window(&self, occurred: DateTime<Utc>, at: DateTime<Utc>) -> bool {
        match self.window {
            None => true,
            Some(w) => at
                .checked_sub_signed(w)
                .is_none_or(|start| occurred > start),
        }
    }

    /// Whether `tp` is of the query's type and passes its filter (the
    /// window aside).
    pub fn matches(&self, tp: &Touchpoint) -> bool {
        self.touch.matches(tp.kind, tp.custom_type.as_deref())
            && self.filter.iter().all(|p| p.matches(tp))
    }

    /// Every field of `tp` that [`Self::matches`] can read, for any query:
    /// two touchpoints with equal keys are matched alike by every query
    /// (their times differ only through a window, applied elsewhere).
    pub fn match_key(tp: &Touchpoint) -> impl std::hash::Hash + Eq + '_ {
        (
            tp.kind.code(),
            &tp.custom_type,
            (&tp.product, &tp.feature, &tp.campaign, &tp.channel),
            tp.revenue.as_ref().map(|m| (m.amount_minor, &m.currency)),
            tp.usage_millis,
            &tp.properties,
        )
    }
}

impl Predicate {
    /// Whether `tp` passes this predicate.
    pub fn matches(&self, tp: &Touchpoint) -> bool {
        let fact = match &self.field {
            TouchField::Product => tp.product.as_deref().map(Fact::Str),
            TouchField::Feature => tp.feature.as_deref().map(Fact::Str),
            TouchField::Campaign => tp.campaign.as_deref().map(Fact::Str),
            TouchField::Channel => tp.channel.as_deref().map(Fact::Str),
            TouchField::Revenue => tp.revenue.as_ref().map(Fact::money),
            TouchField::Usage => tp
                .usage_millis
                .and_then(TimeDelta::try_milliseconds)
                .map(Fact::Dur),
            TouchField::Property(k) => tp.properties.get(k).map(|v| Fact::Str(v)),
        };
        test(fact, &self.test, tp.occurred_time)
    }
}

/// A fact's value, borrowed from the facts.
#[derive(Clone, Copy)]
pub(super) enum Fact<'a> {
    Num(f64),
    Str(&'a str),
    Bool(bool),
    Time(DateTime<Utc>),
    Dur(TimeDelta),
    Money(i64, &'a str),
    Stage(Stage),
    Gender(Gender),
    Nps(NpsCategory),
}

impl<'a> Fact<'a> {
    fn money(m: &'a Money) -> Self {
        Fact::Money(m.amount_minor, &m.currency)
    }

    fn attribute(v: &'a AttributeValue) -> Self {
        match v {
            AttributeValue::String(s) => Fact::Str(s),
            AttributeValue::Number(n) => Fact::Num(*n),
            AttributeValue::Bool(b) => Fact::Bool(*b),
            AttributeValue::Timestamp(t) => Fact::Time(*t),
        }
    }
}

fn compare(fact: Fact<'_>, v: &Value) -> Option<Ordering> {
    match (fact, v) {
        (Fact::Num(a), Value::Num(b)) => a.partial_cmp(b),
        (Fact::Str(a), Value::Str(b)) => Some(a.cmp(b.as_str())),
        (Fact::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
        (Fact::Time(a), Value::Time(b)) => Some(a.cmp(b)),
        (Fact::Dur(a), Value::Duration(b)) => Some(a.cmp(b)),
        (Fact::Money(a, c), Value::Money(m)) if c == m.currency => Some(a.cmp(&m.amount_minor)),
        (Fact::Stage(a), Value::Stage(b)) => Some(a.cmp(b)),
        // Genders are unordered: the checker allows only = and != on them.
        (Fact::Gender(a), Value::Gender(b)) => Some(if a == *b {
            Ordering::Equal
        } else {
            Ordering::Less
        }),
        (Fact::Nps(a), Value::Nps(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

/// Applies `test` to a fact; a missing fact passes no test, and values of
/// another type (or currency) never compare.
pub(super) fn test(fact: Option<Fact<'_>>, test: &Test, at: DateTime<Utc>) -> bool {
    let Some(fact) = fact else {
        return false;
    };
    match test {
        Test::Exists => true,
        Test::Cmp(op, v) => compare(fact, v).is_some_and(|o| match op {
            CmpOp::Eq => o.is_eq(),
            CmpOp::Ne => o.is_ne(),
            CmpOp::Lt => o.is_lt(),
            CmpOp::Lte => o.is_le(),
            CmpOp::Gt => o.is_gt(),
            CmpOp::Gte => o.is_ge(),
        }),
        Test::Between(lo, hi) => {
            compare(fact, lo).is_some_and(Ordering::is_ge)
                && compare(fact, hi).is_some_and(Ordering::is_le)
        }
        Test::In(vs) => vs
            .iter()
            .any(|v| compare(fact, v).is_some_and(Ordering::is_eq)),
        Test::Contains(s) => matches!(fact, Fact::Str(x) if x.contains(s.as_str())),
        Test::StartsWith(s) => matches!(fact, Fact::Str(x) if x.starts_with(s.as_str())),
        Test::Within(d) => match fact {
            Fact::Time(x) => at.checked_sub_signed(*d).is_none_or(|start| x > start),
            _ => false,
        },
        Test::OlderThan(d) => match fact {
            Fact::Time(x) => at.checked_sub_signed(*d).is_some_and(|start| x <= start),
            _ => false,
        },
    }
}

fn fact<'f>(
    operand: &Operand,
    test: &'f Test,
    facts: &'f dyn Facts,
    at: DateTime<Utc>,
) -> Option<Fact<'f>> {
    match operand {
        Operand::Age => facts
            .birth_date()
            .map(|b| Fact::Num(f64::from(age_on(b, at.date_naive())))),
        Operand::Gender => facts.gender().map(Fact::Gender),
        Operand::Income => facts.income().map(Fact::money),
        Operand::Occupation => facts.occupation().map(Fact::Str),
        Operand::Email => facts.email().map(Fact::Str),
        Operand::DisplayName => facts.display_name().map(Fact::Str),
        Operand::Attribute(k) => facts.attribute(k).map(Fact::attribute),
        Operand::Stage => facts.stage().map(|(s, _)| Fact::Stage(s)),
        Operand::TimeInStage => facts
            .stage()
            .map(|(_, entered)| Fact::Dur(at.signed_duration_since(entered))),
        Operand::Score(s) => facts.score(s, at).map(Fact::Num),
        Operand::Grade => facts.grade().map(Fact::Str),
        Operand::NpsLast => facts.nps_last().map(|s| Fact::Num(f64::from(s))),
        Operand::NpsLastCategory => facts
            .nps_last()
            .map(|s| Fact::Nps(NpsCategory::of_score(s))),
        Operand::CsatLast => facts.csat_last().map(Fact::Num),
        Operand::LoyaltyTier => facts.loyalty_tier().map(Fact::Str),
        // Balances beyond 2^53 points lose precision; no program gets there.
        Operand::LoyaltyBalance => facts.loyalty_balance().map(|b| Fact::Num(b as f64)),
        Operand::Count(q) => Some(Fact::Num(facts.touch_count(q, at) as f64)),
        Operand::Sum(q, SumField::Revenue) => {
            let currency = test.currency()?;
            Some(Fact::Money(facts.touch_revenue(q, currency, at), currency))
        }
        Operand::Sum(q, SumField::Usage) => Some(Fact::Dur(facts.touch_usage(q, at))),
        Operand::First(q) => facts.touch_first(q, at).map(Fact::Time),
        Operand::Last(q) => facts.touch_last(q, at).map(Fact::Time),
    }
}

fn condition(c: &Condition, facts: &dyn Facts, at: DateTime<Utc>) -> bool {
    match c {
        Condition::Compare { operand, test: t } => test(fact(operand, t, facts, at), t, at),
        Condition::Consent { purpose, channel } => facts.consent(purpose, channel),
        Condition::InSegment(s) => facts.in_segment(s),
    }
}

fn eval(rule: &Rule, facts: &dyn Facts, at: DateTime<Utc>) -> bool {
    match rule {
        Rule::And(ops) => ops.iter().all(|r| eval(r, facts, at)),
        Rule::Or(ops) => ops.iter().any(|r| eval(r, facts, at)),
        Rule::Not(r) => !eval(r, facts, at),
        Rule::Cond(c) => condition(c, facts, at),
    }
}

/// Whether `rule` holds for `facts` at instant `at` (truncated to whole
/// microseconds, the precision times are stored with).
///
/// Two-valued: a condition on a missing fact is false, and `not` of it is
/// true (a SQL compilation must wrap each condition in `COALESCE(.., false)`
/// to agree). Does not allocate.
pub fn evaluate(rule: &Rule, facts: &dyn Facts, at: DateTime<Utc>) -> bool {
    eval(rule, facts, micros(at))
}

/// Most instants [`next_change`] examines before it gives up and answers
/// the last one (an instant at which the caller simply asks again).
pub const MAX_NEXT_CHANGE_STEPS: usize = 10_000;

/// The earliest instant after `now` at which `evaluate(rule, facts, _)`
/// differs from `evaluate(rule, facts, now)` with the facts unchanged, or
/// `None` if time alone never changes it.
///
/// Time moves a rule's answer through: a touchpoint leaving a window (at
/// its time plus the window), a birthday (`age`, at midnight UTC; 29
/// February birthdays count from 1 March in other years), `time_in_stage`
/// reaching a compared duration, and `within` / `older_than` thresholds (at
/// the time plus the duration). The answer is exact: the result is the same at every
/// instant in `[now, answer)` and differs at `answer`, so a timer queue
/// fires once per real change. (After [`MAX_NEXT_CHANGE_STEPS`] instants
/// where nothing changes it returns the last one instead: re-evaluating
/// there and asking again continues the search.)
pub fn next_change(rule: &Rule, facts: &dyn Facts, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    // Without a time-dependent condition no condition offers a candidate
    // instant: answer before indexing anything.
    if !depends_on_time(rule) {
        return None;
    }
    let indexed = Timelines::new(rule, facts);
    walk_flips(rule, &indexed, now)
}

/// [`evaluate`] and [`next_change`] at once, the rule's touchpoint queries
/// indexed once for both (each a timeline of the matching touchpoints, so
/// windowed counts and sums are read off it by binary search), and each
/// index taken from `shared` when another rule evaluated against the same
/// facts built it (queries equal but for their window share one). The
/// answers are those of the two functions called one after the other.
pub fn evaluate_and_next_change(
    rule: &Rule,
    facts: &dyn Facts,
    at: DateTime<Utc>,
    shared: &mut SharedTimelines,
) -> (bool, Option<DateTime<Utc>>) {
    if !depends_on_time(rule) {
        return (evaluate(rule, facts, at), None);
    }
    let indexed = Timelines::shared(rule, facts, shared);
    (
        eval(rule, &indexed, micros(at)),
        walk_flips(rule, &indexed, at),
    )
}

/// Walks from condition flip to condition flip: the rule's answer can only
/// change where one of its conditions does. Each condition's next flip is
/// kept until time reaches it ([`condition_flip`], exact), so a condition
/// is walked once along its own change points, not once per rule step.
fn walk_flips(rule: &Rule, facts: &Timelines<'_>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let now = micros(now);
    let start = eval(rule, facts, now);
    let mut flips: Vec<(&Condition, Option<DateTime<Utc>>)> = Vec::new();
    rule.for_each_condition(&mut |c| flips.push((c, condition_flip(c, facts, now))));
    let mut t = now;
    for _ in 0..MAX_NEXT_CHANGE_STEPS {
        let next = flips.iter().filter_map(|(_, f)| *f).min()?;
        if eval(rule, facts, next) != start {
            return Some(next);
        }
        t = next;
        for (c, f) in &mut flips {
            if *f == Some(next) {
                *f = condition_flip(c, facts, next);
            }
        }
    }
    Some(t)
}

/// The earliest instant after `t` at which condition `c` differs from its
/// value at `t` (`None`: never). Windowed counts and sums jump there from
/// the timeline ([`Timelines::flip`]); other conditions walk their own
/// candidate instants.
fn condition_flip(c: &Condition, facts: &Timelines<'_>, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let start = condition(c, facts, t);
    if let Some(flip) = facts.flip(c, start, t) {
        return flip;
    }
    let mut at = t;
    for _ in 0..MAX_NEXT_CHANGE_STEPS {
        let next = condition_candidate(c, facts, at)?;
        if condition(c, facts, next) != start {
            return Some(next);
        }
        at = next;
    }
    Some(at)
}

/// [`next_change`] without the touchpoint index: every instant examined
/// rescans the touchpoints through the `touch_*` methods, about O(n²) for n
/// touchpoints. The previous implementation, kept as the reference for
/// tests and the bench only.
#[doc(hidden)]
pub fn next_change_by_rescan(
    rule: &Rule,
    facts: &dyn Facts,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let now = micros(now);
    let start = eval(rule, facts, now);
    let mut t = now;
    for _ in 0..MAX_NEXT_CHANGE_STEPS {
        let next = rule_candidate(rule, facts, t)?;
        if eval(rule, facts, next) != start {
            return Some(next);
        }
        t = next;
    }
    Some(t)
}

/// The earliest instant after `t` at which any condition may change.
fn rule_candidate(rule: &Rule, facts: &dyn Facts, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let mut best: Option<DateTime<Utc>> = None;
    rule.for_each_condition(&mut |c| {
        if let Some(x) = condition_candidate(c, facts, t) {
            best = Some(best.map_or(x, |b| b.min(x)));
        }
    });
    best
}

/// `t` rounded up to a whole microsecond.
fn ceil_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    let down = micros(t);
    if down == t {
        t
    } else {
        down.checked_add_signed(TimeDelta::microseconds(1))
            .unwrap_or(down)
    }
}

/// An instant after `t` such that the condition is constant on
/// `[t, instant)`, or `None` if it never changes after `t`.
fn condition_candidate(
    c: &Condition,
    facts: &dyn Facts,
    t: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let Condition::Compare { operand, test: tst } = c else {
        return None;
    };
    let mut best: Option<DateTime<Utc>> = None;
    let mut offer = |x: Option<DateTime<Utc>>| {
        if let Some(x) = x.map(ceil_micros).filter(|x| *x > t) {
            best = Some(best.map_or(x, |b| b.min(x)));
        }
    };
    match operand {
        Operand::Age => {
            if let Some(b) = facts.birth_date() {
                offer(next_age_flip(b, tst, t));
            }
        }
        Operand::TimeInStage => {
            if let Some((_, entered)) = facts.stage() {
                tst.for_each_value(&mut |v| {
                    if let Value::Duration(d) = v {
                        let at = entered.checked_add_signed(*d);
                        offer(at);
                        offer(at.and_then(|x| x.checked_add_signed(TimeDelta::microseconds(1))));
                    }
                });
            }
        }
        Operand::Score(s) => {
            // The value only matters relative to the test's numbers: the
            // answer can change only where the score crosses one of them.
            tst.for_each_value(&mut |v| {
                if let Value::Num(n) = v {
                    offer(facts.score_crossing(s, *n, false, t));
                    offer(facts.score_crossing(s, *n, true, t));
                }
            });
        }
        _ => {}
    }
    if let Some(q) = operand.query()
        && let Some(w) = q.window
    {
        offer(
            facts
                .touch_first(q, t)
                .and_then(|x| x.checked_add_signed(w)),
        );
    }
    if let Test::Within(d) | Test::OlderThan(d) = tst {
        let x = match operand {
            Operand::Attribute(k) => match facts.attribute(k) {
                Some(AttributeValue::Timestamp(x)) => Some(*x),
                _ => None,
            },
            Operand::First(q) => facts.touch_first(q, t),
            Operand::Last(q) => facts.touch_last(q, t),
            _ => None,
        };
        offer(x.and_then(|x| x.checked_add_signed(*d)));
    }
    best
}

/// Midnight UTC of the day someone born on `birth` turns `years`.
fn birthday(birth: NaiveDate, years: i32) -> Option<DateTime<Utc>> {
    let year = birth.year().checked_add(years)?;
    NaiveDate::from_ymd_opt(year, birth.month(), birth.day())
        .or_else(|| NaiveDate::from_ymd_opt(year, 3, 1))
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc())
}

/// The next birthday after `t` at which the age test changes its answer.
fn next_age_flip(birth: NaiveDate, tst: &Test, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let age = age_on(birth, t.date_naive());
    let holds = |a: i32| test(Some(Fact::Num(f64::from(a))), tst, t);
    let now = holds(age);
    (age + 1..=age.saturating_add(200))
        .find(|a| holds(*a) != now)
        .and_then(|a| birthday(birth, a))
}

/// Whether the rule's answer can change with time alone (it reads `age`,
/// `time_in_stage`, a score (scores decay), a windowed touchpoint query, or
/// `within` / `older_than`).
pub fn depends_on_time(rule: &Rule) -> bool {
    let mut timed = false;
    rule.for_each_condition(&mut |c| {
        if let Condition::Compare { operand, test } = c {
            timed |= matches!(
                operand,
                Operand::Age | Operand::TimeInStage | Operand::Score(_)
            ) || operand.query().is_some_and(|q| q.window.is_some())
                || matches!(test, Test::Within(_) | Test::OlderThan(_));
        }
    });
    timed
}
