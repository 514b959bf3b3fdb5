//! Type checking against a catalog of fields.
//!
//! [`check`] takes a tree (say, converted from a proto message) and names
//! each problem by its field path in the proto message `Rule`
//! (`all.rules[1].condition.compare.operand.count.window`); [`compile`] parses
//! text and names each problem by line and column. Both find every problem
//! (up to [`MAX_ERRORS`](super::error::MAX_ERRORS)), not just the first.

use super::ast::{
    Condition, Operand, Rule, SumField, Test, TouchField, TouchQuery, Value, ValueType,
};
use super::error::{Location, MAX_ERRORS, RuleError, RuleErrors};
use super::parser::{
    CondSpans, MAX_DEPTH, SpanTree, TestSpans, parse_touch_query_with_spans, parse_with_spans,
};
use crate::money::is_iso_4217;
use crate::touchpoint::TouchpointKind;
use chrono::{Datelike, TimeDelta};
use std::collections::{BTreeMap, BTreeSet};

/// Most conditions in one rule.
pub const MAX_CONDITIONS: usize = 1000;
/// Most `where` predicates in one touchpoint query.
pub const MAX_FILTER: usize = 20;
/// Most values in one `in (...)` list.
pub const MAX_IN_VALUES: usize = 1000;
/// Longest string literal, in characters.
pub const MAX_STRING_CHARS: usize = 4096;
/// Longest window or duration: 100 years of 365 days.
pub const MAX_DURATION: TimeDelta = TimeDelta::days(36_500);

/// What the checker needs to know about the fields a rule may name.
///
/// Built-in fields (`age`, `stage`, `score.engagement`, ...) are always
/// known; the catalog answers for the open-ended ones.
pub trait Catalog {
    /// The type of custom attribute `key`, or `None` if there is none.
    fn attribute_type(&self, key: &str) -> Option<ValueType>;
    /// Whether an attribute the catalog does not know is accepted anyway,
    /// typed by the literal it is compared with (for schemaless attributes).
    fn infer_unknown_attributes(&self) -> bool;
    /// Whether custom score `name` exists (`engagement` and `fit` always do).
    fn has_score(&self, name: &str) -> bool;
    /// Whether custom touchpoint type `name` exists.
    fn has_custom_touchpoint(&self, name: &str) -> bool;
    /// Whether consent for `purpose` on `channel` exists.
    fn has_consent(&self, purpose: &str, channel: &str) -> bool;
    /// Whether segment `name` exists.
    fn has_segment(&self, name: &str) -> bool;
    /// The scoring models (by id) and the scores each defines (`fit` and
    /// `engagement` included), if the catalog knows them; `None` checks
    /// score names with [`Catalog::has_score`] alone and lets the plain
    /// form stand for any model.
    fn score_models(&self) -> Option<&BTreeMap<String, BTreeSet<String>>> {
        None
    }
}

/// A catalog from plain sets. An open set (`None`) accepts any
/// well-formed name.
#[derive(Debug, Clone, Default)]
pub struct FieldCatalog {
    /// Custom attributes and their types (`String`, `Number`, `Bool`,
    /// `Timestamp`).
    pub attributes: BTreeMap<String, ValueType>,
    /// Accept attributes not in `attributes`, typed by their literal.
    pub infer_unknown_attributes: bool,
    /// Custom score names besides `engagement` and `fit`.
    pub scores: BTreeSet<String>,
    /// The scoring models by id and the scores each defines (see
    /// [`Catalog::score_models`]).
    pub score_models: Option<BTreeMap<String, BTreeSet<String>>>,
    /// Custom touchpoint types; `None` accepts any valid name
    /// (1..64 characters of `[a-z0-9_.-]`).
    pub custom_touchpoints: Option<BTreeSet<String>>,
    /// Consent purposes; `None` accepts any identifier.
    pub consent_purposes: Option<BTreeSet<String>>,
    /// Consent channels; `None` accepts any identifier.
    pub consent_channels: Option<BTreeSet<String>>,
    /// Segment names; `None` accepts any non-empty name.
    pub segments: Option<BTreeSet<String>>,
}

impl FieldCatalog {
    /// A catalog knowing only the built-in fields, with open sets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a custom attribute.
    #[must_use]
    pub fn with_attribute(mut self, key: &str, ty: ValueType) -> Self {
        self.attributes.insert(key.to_owned(), ty);
        self
    }

    /// Adds a custom score.
    #[must_use]
    pub fn with_score(mut self, name: &str) -> Self {
        self.scores.insert(name.to_owned());
        self
    }
}

fn identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn custom_type_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
}

fn in_open_set(set: &Option<BTreeSet<String>>, s: &str, well_formed: fn(&str) -> bool) -> bool {
    match set {
        Some(set) => set.contains(s),
        None => well_formed(s),
    }
}

impl Catalog for FieldCatalog {
    fn attribute_type(&self, key: &str) -> Option<ValueType> {
        self.attributes.get(key).copied()
    }

    fn infer_unknown_attributes(&self) -> bool {
        self.infer_unknown_attributes
    }

    fn has_score(&self, name: &str) -> bool {
        self.scores.contains(name)
    }

    fn score_models(&self) -> Option<&BTreeMap<String, BTreeSet<String>>> {
        self.score_models.as_ref()
    }

    fn has_custom_touchpoint(&self, name: &str) -> bool {
        in_open_set(&self.custom_touchpoints, name, custom_type_name)
    }

    fn has_consent(&self, purpose: &str, channel: &str) -> bool {
        in_open_set(&self.consent_purposes, purpose, identifier)
            && in_open_set(&self.consent_channels, channel, identifier)
    }

    fn has_segment(&self, name: &str) -> bool {
        in_open_set(&self.segments, name, |s| {
            !s.trim().is_empty() && s.len() <= 256
        })
    }
}

/// Checks a rule tree: errors name the path of the node.
pub fn check(rule: &Rule, catalog: &dyn Catalog) -> Result<(), RuleErrors> {
    let mut c = Checker::new(catalog);
    let mut path = String::new();
    c.rule(rule, None, &mut path, 0);
    c.finish()
}

/// Parses and checks rule text: errors name line and column.
pub fn compile(text: &str, catalog: &dyn Catalog) -> Result<Rule, RuleErrors> {
    let (rule, spans) = parse_with_spans(text)?;
    let mut c = Checker::new(catalog);
    let mut path = String::new();
    c.rule(&rule, Some(&spans), &mut path, 0);
    c.finish().map(|()| rule)
}

/// Checks a touchpoint query on its own (e.g. a scoring event rule's
/// trigger): errors name the path of the part.
pub fn check_touch_query(query: &TouchQuery, catalog: &dyn Catalog) -> Result<(), RuleErrors> {
    let mut c = Checker::new(catalog);
    c.query(
        query,
        &Here {
            spans: None,
            path: "",
            cond: None,
        },
    );
    c.finish()
}

/// Parses and checks a touchpoint query on its own (`feature_use where
/// feature = "export"`): errors name line and column.
pub fn compile_touch_query(text: &str, catalog: &dyn Catalog) -> Result<TouchQuery, RuleErrors> {
    let (query, spans) = parse_touch_query_with_spans(text)?;
    let mut c = Checker::new(catalog);
    c.query(
        &query,
        &Here {
            spans: Some(&spans),
            path: "",
            cond: None,
        },
    );
    c.finish().map(|()| query)
}

/// A part of a condition an error points at.
#[derive(Clone, Copy)]
enum Part {
    Operand,
    Op,
    /// The test's value, at this path inside the proto `Test`.
    Value(&'static str),
    /// The touchpoint type (`true`: a custom one, named in `custom_type`).
    Touch(bool),
    Window,
    FilterField(usize),
    FilterProperty(usize),
    FilterOp(usize),
    FilterValue(usize, &'static str),
}

struct Checker<'a> {
    catalog: &'a dyn Catalog,
    errors: Vec<RuleError>,
    dropped: usize,
    conditions: usize,
}

/// Where a condition is, for error messages.
struct Here<'s> {
    spans: Option<&'s CondSpans>,
    /// The path of the proto `Condition` (or, for a query checked on its
    /// own, of the `TouchQuery`).
    path: &'s str,
    /// The condition, whose shape decides the proto path of each part.
    cond: Option<&'s Condition>,
}

impl Here<'_> {
    fn loc(&self, part: Part) -> Location {
        if let Some(s) = self.spans {
            let test_pos = |t: &TestSpans, value: bool| if value { t.value } else { t.op };
            let pos = match part {
                Part::Operand => s.start,
                Part::Op => s.test.op,
                Part::Value(_) => s.test.value,
                Part::Touch(_) => s.touch,
                Part::Window => s.window,
                Part::FilterField(i) | Part::FilterProperty(i) => {
                    s.filter.get(i).map_or(s.start, |f| f.0)
                }
                Part::FilterOp(i) => s.filter.get(i).map_or(s.start, |f| test_pos(&f.1, false)),
                Part::FilterValue(i, _) => {
                    s.filter.get(i).map_or(s.start, |f| test_pos(&f.1, true))
                }
            };
            return Location::Text(pos);
        }
        // The proto `Condition` of a comparison holds `compare.operand` and
        // `compare.test`; a touchpoint query sits in the operand's `count`,
        // `first`, `last` or `sum.query`.
        let (operand, query) = match self.cond {
            None => ("", ""),
            Some(Condition::Consent { .. }) => ("consent", ""),
            Some(Condition::InSegment(_)) => ("in_segment", ""),
            Some(Condition::Compare { operand, .. }) => (
                "compare.operand",
                match operand {
                    Operand::Count(_) => "compare.operand.count",
                    Operand::Sum(..) => "compare.operand.sum.query",
                    Operand::First(_) => "compare.operand.first",
                    Operand::Last(_) => "compare.operand.last",
                    _ => "compare.operand",
                },
            ),
        };
        let suffix = match part {
            Part::Operand => operand.to_owned(),
            Part::Op => "compare.test".to_owned(),
            Part::Value(v) => join("compare.test", v),
            Part::Touch(custom) => join(query, if custom { "custom_type" } else { "type" }),
            Part::Window => join(query, "window"),
            Part::FilterField(i) => join(query, &format!("filter[{i}].field")),
            Part::FilterProperty(i) => join(query, &format!("filter[{i}].property")),
            Part::FilterOp(i) => join(query, &format!("filter[{i}].test")),
            Part::FilterValue(i, v) => join(query, &format!("filter[{i}].test.{v}")),
        };
        Location::Path(join(self.path, &suffix))
    }
}

/// Where a test's value sits inside the proto `Test`.
fn value_path(test: &Test) -> &'static str {
    match test {
        Test::Cmp(..) => "compare.value",
        Test::Between(..) => "between",
        Test::In(_) => "in.values",
        Test::Contains(_) => "contains",
        Test::StartsWith(_) => "starts_with",
        Test::Exists => "exists",
        Test::Within(_) => "within",
        Test::OlderThan(_) => "older_than",
    }
}

fn join(path: &str, seg: &str) -> String {
    if path.is_empty() {
        seg.to_owned()
    } else {
        format!("{path}.{seg}")
    }
}

fn short(text: impl std::fmt::Display) -> String {
    crate::validation::shorten(&text.to_string(), 60).into_owned()
}

impl<'a> Checker<'a> {
    fn new(catalog: &'a dyn Catalog) -> Self {
        Self {
            catalog,
            errors: Vec::new(),
            dropped: 0,
            conditions: 0,
        }
    }

    fn push(&mut self, at: Location, message: impl Into<String>) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(RuleError {
                at,
                message: message.into(),
            });
        } else {
            self.dropped += 1;
        }
    }

    fn finish(mut self) -> Result<(), RuleErrors> {
        if self.errors.is_empty() {
            return Ok(());
        }
        if self.dropped > 0
            && let Some(last) = self.errors.last_mut()
        {
            last.message
                .push_str(&format!(" (and {} more errors)", self.dropped));
        }
        Err(RuleErrors(self.errors))
    }

    fn rule(&mut self, rule: &Rule, spans: Option<&SpanTree>, path: &mut String, depth: usize) {
        if depth > MAX_DEPTH {
            self.push(
                Location::Path(path.clone()),
                format!("rule nested too deeply: at most {MAX_DEPTH} levels"),
            );
            return;
        }
        // Text names groups by keyword; a tree by its proto fields
        // (`all.rules[i]`, `any.rules[i]`, `negate`).
        let (ops, kw) = match rule {
            Rule::And(ops) => (ops, if spans.is_some() { "and" } else { "all" }),
            Rule::Or(ops) => (ops, if spans.is_some() { "or" } else { "any" }),
            Rule::Not(inner) => {
                let inner_spans = match spans {
                    Some(SpanTree::Not(s)) => Some(&**s),
                    _ => None,
                };
                let len = path.len();
                *path = join(path, "negate");
                self.rule(inner, inner_spans, path, depth + 1);
                path.truncate(len);
                return;
            }
            Rule::Cond(c) => {
                let cond_spans = match spans {
                    Some(SpanTree::Cond(s)) => Some(s),
                    _ => None,
                };
                let cond_path = join(path, "condition");
                self.condition(
                    c,
                    &Here {
                        spans: cond_spans,
                        path: &cond_path,
                        cond: Some(c),
                    },
                );
                return;
            }
        };
        if ops.len() < 2 {
            self.push(
                Location::Path(path.clone()),
                format!("`{kw}` needs at least two operands, got {}", ops.len()),
            );
        }
        let child = |i: usize| {
            if spans.is_some() {
                format!("{kw}[{i}]")
            } else {
                format!("{kw}.rules[{i}]")
            }
        };
        for (i, op) in ops.iter().enumerate() {
            let child_spans = match spans {
                Some(SpanTree::Group(g)) => g.get(i),
                _ => None,
            };
            let len = path.len();
            *path = join(path, &child(i));
            self.rule(op, child_spans, path, depth + 1);
            path.truncate(len);
        }
    }

    fn condition(&mut self, c: &Condition, here: &Here<'_>) {
        self.conditions += 1;
        if self.conditions == MAX_CONDITIONS + 1 {
            self.push(
                here.loc(Part::Operand),
                format!("too many conditions: at most {MAX_CONDITIONS}"),
            );
        }
        match c {
            Condition::Consent { purpose, channel } => {
                if !self.catalog.has_consent(purpose, channel) {
                    self.push(
                        here.loc(Part::Operand),
                        format!("unknown consent {}", short(format_args!("{c}"))),
                    );
                }
            }
            Condition::InSegment(name) => {
                if !self.catalog.has_segment(name) {
                    self.push(
                        here.loc(Part::Operand),
                        format!("unknown segment {}", crate::validation::echo(name)),
                    );
                }
            }
            Condition::Compare { operand, test } => self.compare(operand, test, here),
        }
    }

    fn compare(&mut self, operand: &Operand, test: &Test, here: &Here<'_>) {
        let ty = match operand {
            Operand::Age
            | Operand::NpsLast
            | Operand::CsatLast
            | Operand::LoyaltyBalance
            | Operand::Count(_) => Some(ValueType::Number),
            Operand::Gender => Some(ValueType::Gender),
            Operand::Income | Operand::Sum(_, SumField::Revenue) => Some(ValueType::Money),
            Operand::Occupation
            | Operand::Email
            | Operand::DisplayName
            | Operand::Grade
            | Operand::LoyaltyTier => Some(ValueType::String),
            Operand::Stage => Some(ValueType::Stage),
            Operand::TimeInStage | Operand::Sum(_, SumField::Usage) => Some(ValueType::Duration),
            Operand::NpsLastCategory => Some(ValueType::NpsCategory),
            Operand::First(_) | Operand::Last(_) => Some(ValueType::Timestamp),
            Operand::Score(score) => {
                let name = &score.name;
                let builtin = name == "engagement" || name == "fit";
                let problem = match (self.catalog.score_models(), &score.model) {
                    (None, _) => (!builtin && !self.catalog.has_score(name))
                        .then(|| format!("unknown score {}", short(operand))),
                    (Some(models), Some(model)) => match models.get(model) {
                        None => Some(format!(
                            "unknown scoring model {}",
                            crate::validation::echo(model)
                        )),
                        Some(scores) if !builtin && !scores.contains(name) => {
                            Some(format!("unknown score {}", short(operand)))
                        }
                        Some(_) => None,
                    },
                    (Some(models), None) => {
                        let owners: Vec<&String> = models
                            .iter()
                            .filter(|(_, scores)| builtin || scores.contains(name))
                            .map(|(m, _)| m)
                            .collect();
                        match owners.as_slice() {
                            [] if !builtin && !self.catalog.has_score(name) => {
                                Some(format!("unknown score {}", short(operand)))
                            }
                            [] | [_] => None,
                            [first, ..] => {
                                let list: Vec<String> = owners
                                    .iter()
                                    .take(5)
                                    .map(|m| crate::validation::echo(m))
                                    .collect();
                                Some(format!(
                                    "{} is ambiguous: scoring models {} define it; name one, e.g. {}",
                                    short(operand),
                                    list.join(", "),
                                    short(Operand::Score(super::ast::ScoreRef::of(first, name)))
                                ))
                            }
                        }
                    }
                };
                if let Some(problem) = problem {
                    self.push(here.loc(Part::Operand), problem);
                    return;
                }
                Some(ValueType::Number)
            }
            Operand::Attribute(key) => match self.catalog.attribute_type(key) {
                Some(t) => Some(t),
                None if self.catalog.infer_unknown_attributes()
                    && crate::attributes::key("", key).is_ok() =>
                {
                    inferred_type(test)
                }
                None => {
                    self.push(
                        here.loc(Part::Operand),
                        format!("unknown field {}", short(operand)),
                    );
                    return;
                }
            },
        };
        if let Some(q) = operand.query() {
            self.query(q, here);
        }
        let aggregate = matches!(operand, Operand::Count(_) | Operand::Sum(..));
        if let Some(ty) = ty {
            let name = short(operand);
            self.test(
                &name,
                ty,
                aggregate,
                test,
                here,
                Part::Op,
                Part::Value(value_path(test)),
            );
        }
        if let Operand::Sum(_, SumField::Revenue) = operand {
            let mut currencies = BTreeSet::new();
            test.for_each_value(&mut |v| {
                if let Value::Money(m) = v {
                    currencies.insert(m.currency.as_str());
                }
            });
            if currencies.len() > 1 {
                self.push(
                    here.loc(Part::Value(value_path(test))),
                    "a sum of revenue is compared in one currency",
                );
            }
        }
    }

    fn query(&mut self, q: &TouchQuery, here: &Here<'_>) {
        match (&q.touch.custom_type, q.touch.kind) {
            (Some(_), k) if k != TouchpointKind::Custom => self.push(
                here.loc(Part::Touch(q.touch.custom_type.is_some())),
                "only custom touchpoints have a custom type name",
            ),
            (Some(name), _) if !self.catalog.has_custom_touchpoint(name) => self.push(
                here.loc(Part::Touch(q.touch.custom_type.is_some())),
                format!("unknown touchpoint type {}", short(&q.touch)),
            ),
            _ => {}
        }
        if let Some(w) = q.window
            && let Some(problem) = duration_problem(w, true)
        {
            self.push(here.loc(Part::Window), format!("window {problem}"));
        }
        if q.filter.len() > MAX_FILTER {
            self.push(
                here.loc(Part::FilterField(MAX_FILTER)),
                format!("at most {MAX_FILTER} conditions after `where`"),
            );
        }
        for (i, p) in q.filter.iter().enumerate() {
            let ty = match &p.field {
                TouchField::Revenue => ValueType::Money,
                TouchField::Usage => ValueType::Duration,
                TouchField::Property(k) => {
                    if k.is_empty() || k.len() > 64 || k.contains('\0') {
                        self.push(
                            here.loc(Part::FilterProperty(i)),
                            "property keys are 1..64 bytes without NUL",
                        );
                    }
                    ValueType::String
                }
                _ => ValueType::String,
            };
            let name = short(&p.field);
            self.test(
                &name,
                ty,
                false,
                &p.test,
                here,
                Part::FilterOp(i),
                Part::FilterValue(i, value_path(&p.test)),
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn test(
        &mut self,
        name: &str,
        ty: ValueType,
        aggregate: bool,
        test: &Test,
        here: &Here<'_>,
        op_part: Part,
        value_part: Part,
    ) {
        let mismatch = |this: &mut Self, v: &Value| {
            if let Some(p) = value_problem(v) {
                this.push(here.loc(value_part), p);
            } else if v.value_type() != ty {
                this.push(
                    here.loc(value_part),
                    format!(
                        "type mismatch: {name} is {}, but {} is {}",
                        ty.describe(),
                        short(v),
                        v.value_type().describe()
                    ),
                );
            }
        };
        let op_name = match test {
            Test::Cmp(op, _) => op.as_str(),
            Test::Between(..) => "between",
            Test::In(_) => "in",
            Test::Contains(_) => "contains",
            Test::StartsWith(_) => "starts_with",
            Test::Exists => "exists",
            Test::Within(_) => "within",
            Test::OlderThan(_) => "older_than",
        };
        let not_for = |this: &mut Self, hint: &str| {
            this.push(
                here.loc(op_part),
                format!(
                    "`{op_name}` does not apply to {name}, which is {}{hint}",
                    ty.describe()
                ),
            );
        };
        match test {
            Test::Cmp(op, v) => {
                if op.is_ordering() && !ty.is_ordered() {
                    not_for(self, ": use = or !=");
                }
                mismatch(self, v);
            }
            Test::Between(lo, hi) => {
                if !ty.is_ordered() {
                    not_for(self, "");
                }
                mismatch(self, lo);
                mismatch(self, hi);
                if let (Value::Money(a), Value::Money(b)) = (lo, hi)
                    && a.currency != b.currency
                {
                    self.push(
                        here.loc(value_part),
                        "both ends of `between` use the same currency",
                    );
                }
            }
            Test::In(vs) => {
                if vs.is_empty() || vs.len() > MAX_IN_VALUES {
                    self.push(
                        here.loc(value_part),
                        format!("`in` takes 1 to {MAX_IN_VALUES} values"),
                    );
                }
                for v in vs {
                    mismatch(self, v);
                }
            }
            Test::Contains(s) | Test::StartsWith(s) => {
                if ty != ValueType::String {
                    not_for(self, "");
                }
                if let Some(p) = value_problem(&Value::Str(s.clone())) {
                    self.push(here.loc(value_part), p);
                }
            }
            Test::Exists => {
                if aggregate {
                    self.push(
                        here.loc(op_part),
                        format!("{name} always has a value: compare it instead (e.g. = 0)"),
                    );
                }
            }
            Test::Within(d) | Test::OlderThan(d) => {
                if ty != ValueType::Timestamp {
                    not_for(self, "");
                }
                if *d < TimeDelta::zero() {
                    self.push(here.loc(value_part), "duration must not be negative");
                } else if let Some(problem) = duration_problem(*d, false) {
                    self.push(here.loc(value_part), format!("duration {problem}"));
                }
            }
        }
    }
}

/// The type of an unknown attribute, from the literal it is tested with.
fn inferred_type(test: &Test) -> Option<ValueType> {
    match test {
        Test::Cmp(_, v) | Test::Between(v, _) => Some(v.value_type()),
        Test::In(vs) => vs.first().map(Value::value_type),
        Test::Contains(_) | Test::StartsWith(_) => Some(ValueType::String),
        Test::Within(_) | Test::OlderThan(_) => Some(ValueType::Timestamp),
        Test::Exists => None,
    }
}

fn duration_problem(d: TimeDelta, positive: bool) -> Option<String> {
    let text = super::print::DurationText(d);
    if positive && d <= TimeDelta::zero() {
        Some(format!("must be longer than zero, got {text}"))
    } else if d.subsec_nanos() != 0 {
        Some("must be a whole number of seconds".to_owned())
    } else if d.abs() > MAX_DURATION {
        Some(format!(
            "must be at most {}",
            super::print::DurationText(MAX_DURATION)
        ))
    } else {
        None
    }
}

/// What is wrong with a literal on its own (possible in trees built by hand
/// or converted from proto; the parser never builds these).
fn value_problem(v: &Value) -> Option<String> {
    match v {
        Value::Num(n) if !n.is_finite() => Some("numbers must be finite".to_owned()),
        Value::Str(s) if s.contains('\0') => Some("strings must not contain NUL".to_owned()),
        Value::Str(s) if s.chars().count() > MAX_STRING_CHARS => {
            Some(format!("strings are at most {MAX_STRING_CHARS} characters"))
        }
        Value::Money(m) if !is_iso_4217(&m.currency) => Some(format!(
            "{} is not an active ISO 4217 currency code",
            crate::validation::echo(&m.currency)
        )),
        Value::Duration(d) => duration_problem(*d, false).map(|p| format!("duration {p}")),
        Value::Time(t)
            if !(1..=9999).contains(&t.year()) || t.timestamp_subsec_nanos() % 1000 != 0 =>
        {
            Some("timestamps are between years 1 and 9999, in whole microseconds".to_owned())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::ast::{CmpOp, TouchType};

    fn catalog() -> FieldCatalog {
        FieldCatalog {
            segments: Some(["segments/a".to_owned()].into()),
            custom_touchpoints: Some(["survey_answer".to_owned()].into()),
            ..FieldCatalog::new()
        }
        .with_attribute("plan", ValueType::String)
        .with_attribute("seats", ValueType::Number)
        .with_attribute("renewal", ValueType::Timestamp)
        .with_score("product_a")
    }

    fn errors(text: &str) -> Vec<String> {
        compile(text, &catalog())
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn well_typed_rules_pass() {
        for text in [
            r#"age >= 25 and count(feature_use where feature = "export", 7d) >= 3"#,
            r#"attributes.plan in ("pro", "team") or attributes.seats between 5 and 10"#,
            r#"attributes.renewal within 30d and last(purchase) older_than 90d"#,
            r#"score.engagement > 50 and score.product_a >= 1 and grade starts_with "A""#,
            r#"stage = RETENTION and time_in_stage >= 30d and income >= 50000.00 EUR"#,
            r#"sum(purchase.revenue where revenue > 0 EUR, 30d) between 10 EUR and 20 EUR"#,
            r#"sum(usage_time.usage, 7d) >= 2h and count(custom("survey_answer")) = 0"#,
            r#"consent(marketing, email) and in_segment("segments/a") and not email exists"#,
            r#"nps.last_category = DETRACTOR or csat.last <= 2 or loyalty.tier = "gold" or loyalty.balance > 100"#,
        ] {
            assert!(
                compile(text, &catalog()).is_ok(),
                "{text}: {:?}",
                compile(text, &catalog())
            );
        }
    }

    #[test]
    fn problems_are_named_with_line_and_column() {
        assert_eq!(
            errors(r#"age = "x""#),
            vec![r#"line 1, column 7: type mismatch: age is a number, but "x" is a string"#]
        );
        assert_eq!(
            errors("attributes.colour = \"red\" and\n count(feature_use, 0d) > 1"),
            vec![
                "line 1, column 1: unknown field attributes.colour",
                "line 2, column 21: window must be longer than zero, got 0s",
            ]
        );
        assert_eq!(
            errors("count(feature_use, -7d) > 1"),
            vec!["line 1, column 20: window must be longer than zero, got -1w"]
        );
        assert_eq!(
            errors(r#"count(custom("page_view")) > 1"#),
            vec![r#"line 1, column 7: unknown touchpoint type custom("page_view")"#]
        );
        assert_eq!(
            errors("score.karma > 1"),
            vec!["line 1, column 1: unknown score score.karma"]
        );
        assert_eq!(
            errors("stage > RETENTION"),
            vec![
                "line 1, column 7: `>` does not apply to stage, which is a lifecycle stage: use = or !="
            ]
        );
        assert_eq!(
            errors("age contains \"1\""),
            vec!["line 1, column 5: `contains` does not apply to age, which is a number"]
        );
        assert_eq!(
            errors("count(purchase) exists"),
            vec![
                "line 1, column 17: count(purchase) always has a value: compare it instead (e.g. = 0)"
            ]
        );
        assert_eq!(
            errors("count(purchase where revenue > 5, 7d) > 1"),
            vec!["line 1, column 32: type mismatch: revenue is money, but 5 is a number"]
        );
        assert_eq!(
            errors("sum(purchase.revenue) between 1 EUR and 2 USD"),
            vec![
                "line 1, column 31: both ends of `between` use the same currency",
                "line 1, column 31: a sum of revenue is compared in one currency"
            ]
        );
        assert_eq!(
            errors("age within 7d or in_segment(\"segments/b\") or consent(marketing, \"e-mail\")"),
            vec![
                "line 1, column 5: `within` does not apply to age, which is a number",
                "line 1, column 18: unknown segment \"segments/b\"",
                "line 1, column 46: unknown consent consent(marketing, \"e-mail\")",
            ]
        );
    }

    #[test]
    fn trees_name_paths_and_become_violations() {
        let rule = Rule::And(vec![
            Rule::compare(Operand::Age, Test::Cmp(CmpOp::Gt, Value::Num(1.0))),
            Rule::not(Rule::compare(
                Operand::Count(TouchQuery {
                    touch: TouchType::kind(TouchpointKind::Purchase),
                    filter: vec![],
                    window: Some(TimeDelta::zero()),
                }),
                Test::Cmp(CmpOp::Gt, Value::Num(f64::NAN)),
            )),
            Rule::Or(vec![]),
        ]);
        let e = check(&rule, &catalog()).unwrap_err();
        let v = e.to_violations("segment.rule");
        let got: Vec<String> = v.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            vec![
                "segment.rule.all.rules[1].negate.condition.compare.operand.count.window: window must be longer than zero, got 0s",
                "segment.rule.all.rules[1].negate.condition.compare.test.compare.value: numbers must be finite",
                "segment.rule.all.rules[2]: `any` needs at least two operands, got 0",
            ]
        );
        let text = compile("age = \"x\"", &catalog()).unwrap_err();
        assert_eq!(
            text.to_violations("rule").0[0],
            crate::Violation::new(
                "rule",
                "line 1, column 7: type mismatch: age is a number, but \"x\" is a string"
            )
        );
    }

    #[test]
    fn touch_queries_check_on_their_own() {
        assert!(
            compile_touch_query(
                r#"custom("survey_answer") where properties.nps <= "6""#,
                &catalog()
            )
            .is_ok()
        );
        let e = compile_touch_query("purchase where revenue > 5, 0s", &catalog()).unwrap_err();
        let got: Vec<String> = e.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            vec![
                "line 1, column 29: window must be longer than zero, got 0s",
                "line 1, column 26: type mismatch: revenue is money, but 5 is a number",
            ]
        );
        let q = TouchQuery {
            touch: TouchType::custom("nope"),
            filter: vec![],
            window: None,
        };
        let e = check_touch_query(&q, &catalog()).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"custom_type: unknown touchpoint type custom("nope")"#
        );
    }

    #[test]
    fn schemaless_attributes_are_typed_by_their_literal() {
        let open = FieldCatalog {
            infer_unknown_attributes: true,
            ..FieldCatalog::new()
        };
        assert!(compile("attributes.anything = 3 and attributes.other exists", &open).is_ok());
        assert!(compile("attributes.anything between 3 and \"x\"", &open).is_err());
        assert!(compile("attributes.Bad = 3", &open).is_err());
    }

    #[test]
    fn error_count_is_bounded() {
        let text = vec!["age = \"x\""; 50].join(" or ");
        let e = compile(&text, &catalog()).unwrap_err();
        assert_eq!(e.0.len(), MAX_ERRORS);
        assert!(
            e.0[MAX_ERRORS - 1]
                .message
                .ends_with("(and 30 more errors)"),
            "{e}"
        );
    }
}
