//! A rule compiled to ONE set-based SQL condition over the facts
//! projection (sea-query, both backends): `SELECT customer_id FROM
//! fact_customers c WHERE <rule>`. The backfill of a segment is that query.
//!
//! It agrees with the in-memory evaluator (`clm_domain::rules::evaluate`,
//! a property test holds the two together): every condition is wrapped in
//! `COALESCE(.., FALSE)` so a missing fact is false and `not` of it true
//! (two-valued logic); strings compare by bytes (the `C` collation on
//! PostgreSQL, SQLite's default); money compares only within one currency;
//! `age` becomes a comparison of the birth date with cutoff dates computed
//! for the evaluation instant; windows and `within` / `older_than` become
//! comparisons of microsecond times with bound instants.

use crate::catalog::granted_by_default;
use crate::store::entity::fact_attributes::{Column as FA, Entity as FactAttributes};
use crate::store::entity::fact_consents::{Column as FK, Entity as FactConsents};
use crate::store::entity::fact_customers::{Column as FC, Entity as FactCustomers};
use crate::store::entity::fact_score_curves::{Column as SC, Entity as FactScoreCurves};
use crate::store::entity::fact_touch_props::{Column as FP, Entity as FactTouchProps};
use crate::store::entity::fact_touchpoints::{Column as FT, Entity as FactTouchpoints};
use crate::store::entity::members::{Column as M, Entity as Members};
use chrono::{DateTime, Datelike, Days, NaiveDate, Utc};
use clm_domain::demographics::age_on;
use clm_domain::ids::Uuid;
use clm_domain::rules::{
    CmpOp, Condition, NpsCategory, Operand, Predicate, Rule, ScoreRef, SumField, Test, TouchField,
    TouchQuery, Value,
};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Func, IntoIden, Query, SelectStatement};

/// The alias of the customer row in the compiled query.
pub const CUSTOMER: &str = "c";

fn a(s: &str) -> Alias {
    Alias::new(s)
}

fn col<C: IntoIden>(table: &str, column: C) -> Expr {
    Expr::col((a(table), column))
}

fn t() -> Expr {
    Expr::val(true)
}

fn f() -> Expr {
    Expr::val(false)
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn dur_us(d: chrono::TimeDelta) -> i64 {
    d.num_microseconds().unwrap_or(i64::MAX)
}

/// Compiles rules for one evaluation instant on one backend.
#[derive(Debug, Clone, Copy)]
pub struct Compiler {
    /// The evaluation instant.
    pub at: DateTime<Utc>,
    /// Whether the target is PostgreSQL (function names differ).
    pub postgres: bool,
}

/// The typed SQL expression of a fact.
enum Fact {
    Num(Expr),
    Str(Expr),
    Time(Expr),
    Dur(Expr),
    /// Amount and currency.
    Money(Expr, Expr),
    /// A stage or gender code (compared by code; genders only by equality).
    Stage(Expr),
    Gender(Expr),
    /// The NPS answer, compared through its category.
    Nps(Expr),
    /// A custom attribute row (`fact_attributes a`): typed by its `kind`.
    Attr,
}

/// Attribute kinds as stored in `fact_attributes.kind`.
pub mod attr_kind {
    /// String.
    pub const STRING: i16 = 1;
    /// Number.
    pub const NUMBER: i16 = 2;
    /// Boolean.
    pub const BOOL: i16 = 3;
    /// Timestamp (microseconds).
    pub const TIMESTAMP: i16 = 4;
}

fn cmp(e: Expr, op: CmpOp, v: Expr) -> Expr {
    match op {
        CmpOp::Eq => e.eq(v),
        CmpOp::Ne => e.ne(v),
        CmpOp::Lt => e.lt(v),
        CmpOp::Lte => e.lte(v),
        CmpOp::Gt => e.gt(v),
        CmpOp::Gte => e.gte(v),
    }
}

fn any(parts: Vec<Expr>) -> Expr {
    parts.into_iter().reduce(|x, y| x.or(y)).unwrap_or_else(f)
}

fn all(parts: Vec<Expr>) -> Expr {
    parts.into_iter().reduce(|x, y| x.and(y)).unwrap_or_else(t)
}

/// The score range of an NPS category.
fn nps_range(c: NpsCategory) -> (i64, i64) {
    match c {
        NpsCategory::Detractor => (i64::from(i16::MIN), 6),
        NpsCategory::Passive => (7, 8),
        NpsCategory::Promoter => (9, i64::from(i16::MAX)),
    }
}

impl Compiler {
    /// The condition `rule` holds, over the customer row `c`.
    pub fn rule(&self, rule: &Rule) -> Expr {
        match rule {
            Rule::And(ops) => all(ops.iter().map(|r| self.rule(r)).collect()),
            Rule::Or(ops) => any(ops.iter().map(|r| self.rule(r)).collect()),
            Rule::Not(r) => self.rule(r).not(),
            Rule::Cond(c) => Expr::from(Func::coalesce([self.condition(c), f()])),
        }
    }

    /// `SELECT c.customer_id FROM fact_customers c WHERE <rule>`.
    pub fn select(&self, rule: &Rule) -> SelectStatement {
        Query::select()
            .expr(col(CUSTOMER, FC::CustomerId))
            .from_as(FactCustomers, a(CUSTOMER))
            .and_where(col(CUSTOMER, FC::Profiled).eq(true))
            .and_where(self.rule(rule))
            .to_owned()
    }

    fn condition(&self, c: &Condition) -> Expr {
        match c {
            Condition::Consent { purpose, channel } => {
                let row = |granted: bool| {
                    Query::select()
                        .expr(Expr::val(1))
                        .from_as(FactConsents, a("k"))
                        .and_where(col("k", FK::CustomerId).equals((a(CUSTOMER), FC::CustomerId)))
                        .and_where(col("k", FK::Purpose).eq(purpose.as_str()))
                        .and_where(col("k", FK::Channel).eq(channel.as_str()))
                        .and_where(col("k", FK::Granted).eq(granted))
                        .to_owned()
                };
                if granted_by_default(purpose) {
                    Expr::not_exists(row(false))
                } else {
                    Expr::exists(row(true))
                }
            }
            Condition::InSegment(name) => {
                let Some(id) = name
                    .strip_prefix("segments/")
                    .and_then(|s| Uuid::parse_str(s).ok())
                else {
                    return f();
                };
                Expr::exists(
                    Query::select()
                        .expr(Expr::val(1))
                        .from_as(Members, a("m"))
                        .and_where(col("m", M::SegmentId).eq(id.to_string()))
                        .and_where(col("m", M::CustomerId).equals((a(CUSTOMER), FC::CustomerId)))
                        .to_owned(),
                )
            }
            Condition::Compare { operand, test } => self.compare(operand, test),
        }
    }

    fn compare(&self, operand: &Operand, test: &Test) -> Expr {
        let c = |name: FC| col(CUSTOMER, name);
        let fact = match operand {
            Operand::Age => return self.age(test),
            Operand::Gender => Fact::Gender(c(FC::Gender)),
            Operand::Income => Fact::Money(c(FC::IncomeMinor), c(FC::IncomeCurrency)),
            Operand::Occupation => Fact::Str(c(FC::Occupation)),
            Operand::Email => Fact::Str(c(FC::Email)),
            Operand::DisplayName => Fact::Str(c(FC::DisplayName)),
            Operand::Grade => Fact::Str(c(FC::Grade)),
            Operand::LoyaltyTier => Fact::Str(c(FC::LoyaltyTier)),
            Operand::Stage => Fact::Stage(c(FC::Stage)),
            Operand::TimeInStage => Fact::Dur(Expr::val(micros(self.at)).sub(c(FC::StageUs))),
            Operand::NpsLast => Fact::Num(c(FC::NpsLast)),
            Operand::NpsLastCategory => Fact::Nps(c(FC::NpsLast)),
            Operand::CsatLast => Fact::Num(c(FC::CsatLast)),
            Operand::LoyaltyBalance => Fact::Num(c(FC::LoyaltyBalance)),
            Operand::Score(score) => Fact::Num(self.score(score)),
            Operand::Attribute(key) => {
                return Expr::exists(
                    Query::select()
                        .expr(Expr::val(1))
                        .from_as(FactAttributes, a("a"))
                        .and_where(col("a", FA::CustomerId).equals((a(CUSTOMER), FC::CustomerId)))
                        .and_where(col("a", FA::Key).eq(key.as_str()))
                        .and_where(self.test(&Fact::Attr, test))
                        .to_owned(),
                );
            }
            Operand::Count(q) => Fact::Num(Expr::from(
                self.touches(q).expr(Func::count(Expr::val(1))).to_owned(),
            )),
            Operand::Sum(q, SumField::Revenue) => {
                let Some(currency) = test.currency() else {
                    return f();
                };
                let total = self
                    .touches(q)
                    .expr(Func::sum(col("t", FT::RevenueMinor)))
                    .and_where(col("t", FT::RevenueCurrency).eq(currency))
                    .to_owned();
                Fact::Money(
                    Expr::from(Func::coalesce([Expr::from(total), Expr::val(0i64)])),
                    Expr::val(currency),
                )
            }
            Operand::Sum(q, SumField::Usage) => {
                let total = self
                    .touches(q)
                    .expr(Func::sum(col("t", FT::UsageMs)))
                    .to_owned();
                Fact::Dur(
                    Expr::from(Func::coalesce([Expr::from(total), Expr::val(0i64)]))
                        .mul(Expr::val(1000i64)),
                )
            }
            Operand::First(q) => Fact::Time(Expr::from(
                self.touches(q)
                    .expr(Func::min(col("t", FT::OccurredUs)))
                    .to_owned(),
            )),
            Operand::Last(q) => Fact::Time(Expr::from(
                self.touches(q)
                    .expr(Func::max(col("t", FT::OccurredUs)))
                    .to_owned(),
            )),
        };
        self.test(&fact, test)
    }

    /// The value of `score` at the evaluation instant, computed as
    /// `clm_domain::scoring::Curve::value_at` computes it, operation for
    /// operation: each term `coef × factor` (exponential `pow(2, −a/h)`,
    /// linear `1 − a/over` until it ends, 0 before `since`), summed, plus
    /// the inactivity penalty, clamped to floor and ceiling, rounded to 4
    /// decimals half away from zero (as `floor(|y| + 0.5)`: the same as
    /// Rust's `round` for every value a score takes, below 2^52 / 10^4).
    /// The plain form reads the customer's most recently changed score of
    /// that name (then the smallest model id), as `FactSet::curve` does.
    /// SQLite needs its math functions (`pow`, `floor`): `.cargo/config.toml`
    /// builds the bundled SQLite with them.
    fn score(&self, score: &ScoreRef) -> Expr {
        let t = micros(self.at);
        let dbl = if self.postgres {
            "DOUBLE PRECISION"
        } else {
            "REAL"
        };
        let term = format!(
            "CASE WHEN k.since_us > {t} THEN CAST(0 AS {dbl}) \
             WHEN k.kind = 1 THEN k.coef * POWER(CAST(2 AS {dbl}), \
               -CAST({t} - k.since_us AS {dbl}) / CAST(k.param_us AS {dbl})) \
             WHEN k.kind = 2 THEN CASE WHEN {t} - k.since_us >= k.param_us THEN CAST(0 AS {dbl}) \
               ELSE k.coef * (CAST(1 AS {dbl}) - CAST({t} - k.since_us AS {dbl}) / CAST(k.param_us AS {dbl})) END \
             ELSE k.coef END"
        );
        let raw = format!(
            "COALESCE((SELECT SUM({term}) FROM fact_score_terms k \
               WHERE k.customer_id = s.customer_id AND k.model = s.model AND k.name = s.name), \
               CAST(0 AS {dbl})) \
             + CASE WHEN s.idle_points IS NULL OR s.last_us IS NULL OR {t} <= s.last_us \
               THEN CAST(0 AS {dbl}) \
               ELSE CAST(s.idle_points AS {dbl}) * CAST(({t} - s.last_us) / s.idle_every_us AS {dbl}) END"
        );
        let mut curve = Query::select();
        curve
            .expr_as(Expr::cust(raw), a("raw"))
            .expr_as(col("s", SC::Floor), a("lo"))
            .expr_as(col("s", SC::Ceiling), a("hi"))
            .from_as(FactScoreCurves, a("s"))
            .and_where(col("s", SC::CustomerId).equals((a(CUSTOMER), FC::CustomerId)))
            .and_where(col("s", SC::Name).eq(score.name.as_str()));
        match &score.model {
            Some(m) => {
                curve.and_where(col("s", SC::Model).eq(m.as_str()));
            }
            None => {
                curve
                    .order_by((a("s"), SC::ChangedUs), sea_orm::Order::Desc)
                    .order_by((a("s"), SC::Model), sea_orm::Order::Asc)
                    .limit(1);
            }
        }
        let clamped = format!(
            "(CASE WHEN r.hi IS NOT NULL AND \
               (CASE WHEN r.lo IS NOT NULL AND r.raw < r.lo THEN CAST(r.lo AS {dbl}) ELSE r.raw END) > r.hi \
               THEN CAST(r.hi AS {dbl}) \
               ELSE (CASE WHEN r.lo IS NOT NULL AND r.raw < r.lo THEN CAST(r.lo AS {dbl}) ELSE r.raw END) END) \
             * CAST(10000 AS {dbl})"
        );
        let scaled = Query::select()
            .expr_as(Expr::cust(clamped), a("y"))
            .from_subquery(curve, a("r"))
            .to_owned();
        let rounded = format!(
            "(CASE WHEN q.y < 0 THEN -FLOOR(-q.y + CAST(0.5 AS {dbl})) \
               ELSE FLOOR(q.y + CAST(0.5 AS {dbl})) END) / CAST(10000 AS {dbl})"
        );
        Expr::from(
            Query::select()
                .expr(Expr::cust(rounded))
                .from_subquery(scaled, a("q"))
                .to_owned(),
        )
    }

    /// The customer's touchpoints matching `q` (type, filter, window), to
    /// which the caller adds the aggregate.
    fn touches(&self, q: &TouchQuery) -> SelectStatement {
        let mut s = Query::select();
        s.from_as(FactTouchpoints, a("t"))
            .and_where(col("t", FT::CustomerId).equals((a(CUSTOMER), FC::CustomerId)))
            .and_where(col("t", FT::Kind).eq(q.touch.kind.code()));
        if let Some(name) = &q.touch.custom_type {
            s.and_where(col("t", FT::CustomType).eq(name.as_str()));
        }
        if let Some(w) = q.window {
            s.and_where(col("t", FT::OccurredUs).gt(micros(self.at).saturating_sub(dur_us(w))));
        }
        for p in &q.filter {
            s.and_where(self.predicate(p));
        }
        s
    }

    fn predicate(&self, p: &Predicate) -> Expr {
        let tc = |name: FT| col("t", name);
        let fact = match &p.field {
            TouchField::Product => Fact::Str(tc(FT::Product)),
            TouchField::Feature => Fact::Str(tc(FT::Feature)),
            TouchField::Campaign => Fact::Str(tc(FT::Campaign)),
            TouchField::Channel => Fact::Str(tc(FT::Channel)),
            TouchField::Revenue => Fact::Money(tc(FT::RevenueMinor), tc(FT::RevenueCurrency)),
            TouchField::Usage => Fact::Dur(tc(FT::UsageMs).mul(Expr::val(1000i64))),
            TouchField::Property(key) => {
                return Expr::exists(
                    Query::select()
                        .expr(Expr::val(1))
                        .from_as(FactTouchProps, a("p"))
                        .and_where(col("p", FP::EventId).equals((a("t"), FT::EventId)))
                        .and_where(col("p", FP::Key).eq(key.as_str()))
                        .and_where(self.test(&Fact::Str(col("p", FP::Value)), &p.test))
                        .to_owned(),
                );
            }
        };
        // A missing field fails every test, `!=` included.
        Expr::from(Func::coalesce([self.test(&fact, &p.test), f()]))
    }

    /// Whether the fact is known.
    fn present(fact: &Fact) -> Expr {
        match fact {
            Fact::Num(e)
            | Fact::Str(e)
            | Fact::Time(e)
            | Fact::Dur(e)
            | Fact::Money(e, _)
            | Fact::Stage(e)
            | Fact::Gender(e)
            | Fact::Nps(e) => e.clone().is_not_null(),
            Fact::Attr => t(),
        }
    }

    /// `fact op v`, FALSE when the value is of another type (or currency).
    fn cmp_value(&self, fact: &Fact, op: CmpOp, v: &Value) -> Expr {
        let ac = |name: FA| col("a", name);
        let kind = |k: i16| ac(FA::Kind).eq(k);
        match (fact, v) {
            (Fact::Num(e), Value::Num(n)) => cmp(e.clone(), op, Expr::val(*n)),
            (Fact::Str(e), Value::Str(s)) => cmp(e.clone(), op, Expr::val(s.as_str())),
            (Fact::Time(e), Value::Time(x)) => cmp(e.clone(), op, Expr::val(micros(*x))),
            (Fact::Dur(e), Value::Duration(d)) => cmp(e.clone(), op, Expr::val(dur_us(*d))),
            (Fact::Money(amount, currency), Value::Money(m)) => currency
                .clone()
                .eq(m.currency.as_str())
                .and(cmp(amount.clone(), op, Expr::val(m.amount_minor))),
            (Fact::Stage(e), Value::Stage(s)) => cmp(e.clone(), op, Expr::val(s.code())),
            (Fact::Gender(e), Value::Gender(g)) => {
                // Genders are unordered: equal, or "less".
                let eq = e.clone().eq(g.code());
                match op {
                    CmpOp::Eq | CmpOp::Gte => eq,
                    CmpOp::Ne | CmpOp::Lt => e.clone().ne(g.code()),
                    CmpOp::Lte => e.clone().is_not_null(),
                    CmpOp::Gt => f(),
                }
            }
            (Fact::Nps(e), Value::Nps(c)) => {
                let (lo, hi) = nps_range(*c);
                let e = e.clone();
                match op {
                    CmpOp::Eq => e.clone().gte(lo).and(e.lte(hi)),
                    CmpOp::Ne => e.clone().lt(lo).or(e.gt(hi)),
                    CmpOp::Lt => e.lt(lo),
                    CmpOp::Lte => e.lte(hi),
                    CmpOp::Gt => e.gt(hi),
                    CmpOp::Gte => e.gte(lo),
                }
            }
            (Fact::Attr, Value::Str(s)) => {
                kind(attr_kind::STRING).and(cmp(ac(FA::StrValue), op, Expr::val(s.as_str())))
            }
            (Fact::Attr, Value::Num(n)) => {
                kind(attr_kind::NUMBER).and(cmp(ac(FA::NumValue), op, Expr::val(*n)))
            }
            (Fact::Attr, Value::Bool(b)) => {
                kind(attr_kind::BOOL).and(cmp(ac(FA::BoolValue), op, Expr::val(*b)))
            }
            (Fact::Attr, Value::Time(x)) => {
                kind(attr_kind::TIMESTAMP).and(cmp(ac(FA::TimeUs), op, Expr::val(micros(*x))))
            }
            _ => f(),
        }
    }

    /// The string column of a fact, with the guard that it is a string.
    fn string_of(fact: &Fact) -> Option<(Expr, Expr)> {
        match fact {
            Fact::Str(e) => Some((e.clone(), t())),
            Fact::Attr => Some((
                col("a", FA::StrValue),
                col("a", FA::Kind).eq(attr_kind::STRING),
            )),
            _ => None,
        }
    }

    /// The time column (microseconds) of a fact, with its guard.
    fn time_of(fact: &Fact) -> Option<(Expr, Expr)> {
        match fact {
            Fact::Time(e) => Some((e.clone(), t())),
            Fact::Attr => Some((
                col("a", FA::TimeUs),
                col("a", FA::Kind).eq(attr_kind::TIMESTAMP),
            )),
            _ => None,
        }
    }

    fn contains(&self, e: Expr, s: &str) -> Expr {
        let f = if self.postgres { "strpos" } else { "instr" };
        Expr::from(Func::cust(a(f)).args([e, Expr::val(s)])).gt(0)
    }

    fn starts_with(e: Expr, s: &str) -> Expr {
        // `substr(text, integer, integer)`: 32-bit positions on PostgreSQL.
        let len = i32::try_from(s.chars().count()).unwrap_or(i32::MAX);
        Expr::from(Func::cust(a("substr")).args([e, Expr::val(1i32), Expr::val(len)])).eq(s)
    }

    fn test(&self, fact: &Fact, test: &Test) -> Expr {
        let at = micros(self.at);
        match test {
            Test::Exists => Self::present(fact),
            Test::Cmp(op, v) => self.cmp_value(fact, *op, v),
            Test::Between(lo, hi) => {
                self.cmp_value(fact, CmpOp::Gte, lo)
                    .and(self.cmp_value(fact, CmpOp::Lte, hi))
            }
            Test::In(vs) => any(vs
                .iter()
                .map(|v| self.cmp_value(fact, CmpOp::Eq, v))
                .collect()),
            Test::Contains(s) => {
                Self::string_of(fact).map_or_else(f, |(e, guard)| guard.and(self.contains(e, s)))
            }
            Test::StartsWith(s) => Self::string_of(fact)
                .map_or_else(f, |(e, guard)| guard.and(Self::starts_with(e, s))),
            Test::Within(d) => Self::time_of(fact).map_or_else(f, |(e, guard)| {
                guard.and(e.gt(at.saturating_sub(dur_us(*d))))
            }),
            Test::OlderThan(d) => Self::time_of(fact).map_or_else(f, |(e, guard)| {
                guard.and(e.lte(at.saturating_sub(dur_us(*d))))
            }),
        }
    }

    /// `age <test>` as comparisons of the birth date (`YYYY-MM-DD` text,
    /// which orders as dates) with cutoffs for the evaluation day.
    fn age(&self, test: &Test) -> Expr {
        let today = self.at.date_naive();
        let birth = col(CUSTOMER, FC::BirthDate);
        // age >= k  <=>  birth_date <= cutoff(k)
        let at_least = |k: i64| -> Expr {
            if k < -20_000 {
                return birth.clone().is_not_null();
            }
            match i32::try_from(k).ok().and_then(|k| age_cutoff(today, k)) {
                Some(c) if c.year() > 9999 => birth.clone().is_not_null(),
                Some(c) if c.year() >= 1 => birth.clone().lte(c.format("%Y-%m-%d").to_string()),
                _ => f(),
            }
        };
        let below = |k: i64| at_least(k).not();
        let num = |v: &Value| match v {
            Value::Num(n) if n.is_finite() => Some(*n),
            _ => None,
        };
        // Clamp to a range where every cutoff is a real date.
        let clamp = |x: f64| x.clamp(-30_000.0, 30_000.0);
        let eq = |n: f64| -> Expr {
            if n.fract() != 0.0 {
                return f();
            }
            let k = clamp(n) as i64;
            at_least(k).and(below(k + 1))
        };
        let cmp_num = |op: CmpOp, n: f64| -> Expr {
            let (ceil, floor) = (clamp(n.ceil()) as i64, clamp(n.floor()) as i64);
            match op {
                CmpOp::Gte => at_least(ceil),
                CmpOp::Gt => at_least(floor + 1),
                CmpOp::Lte => below(floor + 1),
                CmpOp::Lt => below(ceil),
                CmpOp::Eq => eq(n),
                CmpOp::Ne => birth.clone().is_not_null().and(eq(n).not()),
            }
        };
        match test {
            Test::Exists => birth.clone().is_not_null(),
            Test::Cmp(op, v) => num(v).map_or_else(f, |n| cmp_num(*op, n)),
            Test::Between(lo, hi) => match (num(lo), num(hi)) {
                (Some(lo), Some(hi)) => cmp_num(CmpOp::Gte, lo).and(cmp_num(CmpOp::Lte, hi)),
                _ => f(),
            },
            Test::In(vs) => any(vs.iter().filter_map(num).map(eq).collect()),
            _ => f(),
        }
    }
}

/// The latest birth date of someone at least `k` years old on `today`.
fn age_cutoff(today: NaiveDate, k: i32) -> Option<NaiveDate> {
    let year = today.year().checked_sub(k)?;
    let mut c = NaiveDate::from_ymd_opt(year, today.month(), today.day())
        .or_else(|| NaiveDate::from_ymd_opt(year, today.month(), 28))?;
    // Birthdays on 29 February count from 1 March: step to the exact edge.
    while let Some(next) = c.checked_add_days(Days::new(1)) {
        if age_on(next, today) >= k {
            c = next;
        } else {
            break;
        }
    }
    while age_on(c, today) < k {
        c = c.checked_sub_days(Days::new(1))?;
    }
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoffs_are_exact_edges() {
        let today = NaiveDate::from_ymd_opt(2026, 3, 1).expect("date");
        let c = age_cutoff(today, 25).expect("cutoff");
        assert_eq!(age_on(c, today), 25);
        assert!(age_on(c.succ_opt().expect("next"), today) < 25);
        // Someone born on 29 February 2000 turns 26 on 1 March 2026.
        let leap = NaiveDate::from_ymd_opt(2000, 2, 29).expect("date");
        assert_eq!(age_on(leap, today), 26);
        assert!(leap <= age_cutoff(today, 26).expect("cutoff"));
    }
}
