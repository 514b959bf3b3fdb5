//! The canonical text of a rule: `Display` for the tree.
//!
//! Printing then parsing gives back the same tree, and printing is stable:
//! keywords and field names in lower case, enum values in upper case,
//! one space around operators, parentheses only where precedence (or an
//! explicit nesting of the same operator) needs them, durations in their
//! largest exact unit, money with the currency's decimal places, midnight
//! timestamps as dates.

use super::ast::{
    Condition, Operand, Predicate, Rule, SumField, Test, TouchField, TouchQuery, TouchType, Value,
    gender_name, minor_unit_digits,
};
use chrono::{SecondsFormat, TimeDelta, Timelike};
use std::fmt::{self, Display, Formatter, Write};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Top,
    InAnd,
    InOr,
    InNot,
}

fn rule(r: &Rule, f: &mut Formatter<'_>, ctx: Ctx) -> fmt::Result {
    let (ops, kw, inner, parens) = match r {
        Rule::And(ops) => (
            ops,
            " and ",
            Ctx::InAnd,
            matches!(ctx, Ctx::InAnd | Ctx::InNot),
        ),
        Rule::Or(ops) => (ops, " or ", Ctx::InOr, ctx != Ctx::Top),
        Rule::Not(r) => {
            f.write_str("not ")?;
            return rule(r, f, Ctx::InNot);
        }
        Rule::Cond(c) => return c.fmt(f),
    };
    if parens {
        f.write_char('(')?;
    }
    for (i, op) in ops.iter().enumerate() {
        if i > 0 {
            f.write_str(kw)?;
        }
        rule(op, f, inner)?;
    }
    if parens {
        f.write_char(')')?;
    }
    Ok(())
}

impl Display for Rule {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        rule(self, f, Ctx::Top)
    }
}

/// Whether `s` can be written without quotes where a name is expected.
fn is_bare(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Writes `s` as a string literal.
pub(crate) fn quoted(f: &mut impl Write, s: &str) -> fmt::Result {
    f.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            c if c.is_control() => write!(f, "\\u{{{:x}}}", u32::from(c))?,
            c => f.write_char(c)?,
        }
    }
    f.write_char('"')
}

fn name(f: &mut Formatter<'_>, s: &str) -> fmt::Result {
    if is_bare(s) {
        f.write_str(s)
    } else {
        quoted(f, s)
    }
}

impl Display for Condition {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Condition::Compare { operand, test } => write!(f, "{operand} {test}"),
            Condition::Consent { purpose, channel } => {
                f.write_str("consent(")?;
                name(f, purpose)?;
                f.write_str(", ")?;
                name(f, channel)?;
                f.write_char(')')
            }
            Condition::InSegment(s) => {
                f.write_str("in_segment(")?;
                quoted(f, s)?;
                f.write_char(')')
            }
        }
    }
}

impl Display for Operand {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let simple = match self {
            Operand::Age => "age",
            Operand::Gender => "gender",
            Operand::Income => "income",
            Operand::Occupation => "occupation",
            Operand::Email => "email",
            Operand::DisplayName => "display_name",
            Operand::Stage => "stage",
            Operand::TimeInStage => "time_in_stage",
            Operand::Grade => "grade",
            Operand::NpsLast => "nps.last",
            Operand::NpsLastCategory => "nps.last_category",
            Operand::CsatLast => "csat.last",
            Operand::LoyaltyTier => "loyalty.tier",
            Operand::LoyaltyBalance => "loyalty.balance",
            Operand::Attribute(k) => {
                f.write_str("attributes.")?;
                return name(f, k);
            }
            Operand::Score(k) => {
                f.write_str("score")?;
                if let Some(m) = &k.model {
                    f.write_str("(")?;
                    quoted(f, m)?;
                    f.write_str(")")?;
                }
                f.write_str(".")?;
                return name(f, &k.name);
            }
            Operand::Count(q) => return query(f, "count", q, None),
            Operand::First(q) => return query(f, "first", q, None),
            Operand::Last(q) => return query(f, "last", q, None),
            Operand::Sum(q, field) => return query(f, "sum", q, Some(*field)),
        };
        f.write_str(simple)
    }
}

impl Display for TouchType {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match &self.custom_type {
            Some(n) => {
                f.write_str("custom(")?;
                quoted(f, n)?;
                f.write_char(')')
            }
            None => f.write_str(&self.kind.as_str().to_ascii_lowercase()),
        }
    }
}

fn query(f: &mut Formatter<'_>, func: &str, q: &TouchQuery, sum: Option<SumField>) -> fmt::Result {
    write!(f, "{func}({}", q.touch)?;
    match sum {
        Some(SumField::Revenue) => f.write_str(".revenue")?,
        Some(SumField::Usage) => f.write_str(".usage")?,
        None => {}
    }
    query_rest(f, q)?;
    f.write_char(')')
}

fn query_rest(f: &mut Formatter<'_>, q: &TouchQuery) -> fmt::Result {
    for (i, p) in q.filter.iter().enumerate() {
        f.write_str(if i == 0 { " where " } else { " and " })?;
        p.fmt(f)?;
    }
    if let Some(w) = q.window {
        write!(f, ", {}", DurationText(w))?;
    }
    Ok(())
}

impl Display for TouchQuery {
    /// The query as inside `count(...)`: `feature_use where feature = "x", 1w`.
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        self.touch.fmt(f)?;
        query_rest(f, self)
    }
}

impl Display for Predicate {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field, self.test)
    }
}

impl Display for TouchField {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            TouchField::Product => f.write_str("product")?,
            TouchField::Feature => f.write_str("feature")?,
            TouchField::Campaign => f.write_str("campaign")?,
            TouchField::Channel => f.write_str("channel")?,
            TouchField::Revenue => f.write_str("revenue")?,
            TouchField::Usage => f.write_str("usage")?,
            TouchField::Property(k) => {
                f.write_str("properties.")?;
                name(f, k)?;
            }
        }
        Ok(())
    }
}

impl Display for Test {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Test::Cmp(op, v) => write!(f, "{} {v}", op.as_str()),
            Test::Between(lo, hi) => write!(f, "between {lo} and {hi}"),
            Test::In(vs) => {
                f.write_str("in (")?;
                for (i, v) in vs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    v.fmt(f)?;
                }
                f.write_char(')')
            }
            Test::Contains(s) => {
                f.write_str("contains ")?;
                quoted(f, s)
            }
            Test::StartsWith(s) => {
                f.write_str("starts_with ")?;
                quoted(f, s)
            }
            Test::Exists => f.write_str("exists"),
            Test::Within(d) => write!(f, "within {}", DurationText(*d)),
            Test::OlderThan(d) => write!(f, "older_than {}", DurationText(*d)),
        }
    }
}

/// A duration in its largest exact unit (`2w`, `36h`, `90s`).
pub(crate) struct DurationText(pub(crate) TimeDelta);

impl Display for DurationText {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let secs = self.0.num_seconds();
        for (unit, size) in [('w', 604_800), ('d', 86_400), ('h', 3600), ('m', 60)] {
            if secs != 0 && secs % size == 0 {
                return write!(f, "{}{unit}", secs / size);
            }
        }
        write!(f, "{secs}s")
    }
}

impl Display for Value {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) => quoted(f, s),
            Value::Num(n) => write!(f, "{n}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Time(t) => {
                if t.num_seconds_from_midnight() == 0 && t.nanosecond() == 0 {
                    write!(f, "{}", t.format("%Y-%m-%d"))
                } else {
                    f.write_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
                }
            }
            Value::Duration(d) => DurationText(*d).fmt(f),
            Value::Money(m) => {
                let digits = minor_unit_digits(&m.currency);
                let scale = 10i128.pow(digits);
                let amount = i128::from(m.amount_minor);
                let sign = if amount < 0 { "-" } else { "" };
                let (int, frac) = (amount.abs() / scale, amount.abs() % scale);
                if digits == 0 {
                    write!(f, "{sign}{int} {}", m.currency)
                } else {
                    write!(
                        f,
                        "{sign}{int}.{frac:0width$} {}",
                        m.currency,
                        width = digits as usize
                    )
                }
            }
            Value::Stage(s) => f.write_str(s.as_str()),
            Value::Gender(g) => f.write_str(gender_name(*g)),
            Value::Nps(c) => f.write_str(c.as_str()),
        }
    }
}
