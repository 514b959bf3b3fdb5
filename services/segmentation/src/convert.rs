//! Proto ↔ domain: the rule tree (both directions; conversion errors name
//! the field), segments to proto.

use crate::store::segments::{Segment, State};
use chrono::{DateTime, TimeDelta, Utc};
use clm_domain::demographics::Gender;
use clm_domain::lifecycle::Stage;
use clm_domain::money::Money;
use clm_domain::rules::{
    CmpOp, Condition, NpsCategory, Operand, Predicate, Rule, ScoreRef, SumField, Test, TouchField,
    TouchQuery, TouchType, Value,
};
use clm_domain::touchpoint::TouchpointKind;
use clm_domain::{Violation, Violations};
use clm_platform::convert::timestamp;
use clm_platform::db::from_micros;
use clm_proto::segmentation as pb;

/// Deepest rule tree accepted from a message.
const MAX_DEPTH: usize = 64;

fn duration(field: &str, d: &prost_types::Duration) -> Result<TimeDelta, Violation> {
    TimeDelta::new(d.seconds, u32::try_from(d.nanos).unwrap_or(0))
        .filter(|_| d.nanos >= 0)
        .ok_or_else(|| Violation::new(field, "is not a valid duration"))
}

fn duration_to_proto(d: TimeDelta) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.num_seconds(),
        nanos: d.subsec_nanos(),
    }
}

fn time(field: &str, t: &prost_types::Timestamp) -> Result<DateTime<Utc>, Violation> {
    clm_platform::convert::from_timestamp(field, t)
}

/// A rule message as a rule tree (not yet type-checked: see `rules::check`).
pub fn rule(field: &str, r: &pb::Rule) -> Result<Rule, Violations> {
    rule_at(field, r, 0).map_err(|v| Violations(vec![v]))
}

fn rule_at(field: &str, r: &pb::Rule, depth: usize) -> Result<Rule, Violation> {
    use pb::rule::Kind;
    if depth > MAX_DEPTH {
        return Err(Violation::new(
            field,
            format!("nests deeper than {MAX_DEPTH} levels"),
        ));
    }
    let list = |name: &str, l: &pb::RuleList| -> Result<Vec<Rule>, Violation> {
        l.rules
            .iter()
            .enumerate()
            .map(|(i, r)| rule_at(&format!("{field}.{name}.rules[{i}]"), r, depth + 1))
            .collect()
    };
    match r.kind.as_ref() {
        None => Err(Violation::new(
            field,
            "is required: set all, any, negate or condition",
        )),
        Some(Kind::All(l)) => Ok(Rule::And(list("all", l)?)),
        Some(Kind::Any(l)) => Ok(Rule::Or(list("any", l)?)),
        Some(Kind::Negate(inner)) => Ok(Rule::not(rule_at(
            &format!("{field}.negate"),
            inner,
            depth + 1,
        )?)),
        Some(Kind::Condition(c)) => Ok(Rule::Cond(condition(&format!("{field}.condition"), c)?)),
    }
}

fn condition(field: &str, c: &pb::Condition) -> Result<Condition, Violation> {
    use pb::condition::Kind;
    match c.kind.as_ref() {
        None => Err(Violation::new(
            field,
            "is required: set compare, consent or in_segment",
        )),
        Some(Kind::Consent(k)) => Ok(Condition::Consent {
            purpose: k.purpose.clone(),
            channel: k.channel.clone(),
        }),
        Some(Kind::InSegment(s)) => Ok(Condition::InSegment(s.clone())),
        Some(Kind::Compare(cmp)) => {
            let f = format!("{field}.compare");
            let operand = operand(
                &format!("{f}.operand"),
                cmp.operand
                    .as_ref()
                    .ok_or_else(|| Violation::new(format!("{f}.operand"), "is required"))?,
            )?;
            let test = test(
                &format!("{f}.test"),
                cmp.test
                    .as_ref()
                    .ok_or_else(|| Violation::new(format!("{f}.test"), "is required"))?,
            )?;
            Ok(Condition::Compare { operand, test })
        }
    }
}

fn operand(field: &str, o: &pb::Operand) -> Result<Operand, Violation> {
    use pb::operand::Kind;
    Ok(match o.kind.as_ref() {
        None => return Err(Violation::new(field, "is required")),
        Some(Kind::Field(f)) => match pb::ProfileField::try_from(*f) {
            Ok(pb::ProfileField::Age) => Operand::Age,
            Ok(pb::ProfileField::Gender) => Operand::Gender,
            Ok(pb::ProfileField::Income) => Operand::Income,
            Ok(pb::ProfileField::Occupation) => Operand::Occupation,
            Ok(pb::ProfileField::Email) => Operand::Email,
            Ok(pb::ProfileField::DisplayName) => Operand::DisplayName,
            Ok(pb::ProfileField::Stage) => Operand::Stage,
            Ok(pb::ProfileField::TimeInStage) => Operand::TimeInStage,
            Ok(pb::ProfileField::Grade) => Operand::Grade,
            Ok(pb::ProfileField::NpsLast) => Operand::NpsLast,
            Ok(pb::ProfileField::NpsLastCategory) => Operand::NpsLastCategory,
            Ok(pb::ProfileField::CsatLast) => Operand::CsatLast,
            Ok(pb::ProfileField::LoyaltyTier) => Operand::LoyaltyTier,
            Ok(pb::ProfileField::LoyaltyBalance) => Operand::LoyaltyBalance,
            _ => {
                return Err(Violation::new(
                    format!("{field}.field"),
                    "is not a profile field",
                ));
            }
        },
        Some(Kind::Attribute(k)) => Operand::Attribute(k.clone()),
        Some(Kind::Score(s)) => Operand::Score(ScoreRef::plain(s)),
        Some(Kind::ModelScore(m)) => {
            if m.scoring_model.is_empty() {
                return Err(Violation::new(
                    format!("{field}.model_score.scoring_model"),
                    "is required",
                ));
            }
            Operand::Score(ScoreRef::of(
                m.scoring_model.trim_start_matches("scoringModels/"),
                &m.score,
            ))
        }
        Some(Kind::Count(q)) => Operand::Count(query(&format!("{field}.count"), q)?),
        Some(Kind::First(q)) => Operand::First(query(&format!("{field}.first"), q)?),
        Some(Kind::Last(q)) => Operand::Last(query(&format!("{field}.last"), q)?),
        Some(Kind::Sum(s)) => {
            let q = query(
                &format!("{field}.sum.query"),
                s.query
                    .as_ref()
                    .ok_or_else(|| Violation::new(format!("{field}.sum.query"), "is required"))?,
            )?;
            let what = match pb::SumField::try_from(s.field) {
                Ok(pb::SumField::Revenue) => SumField::Revenue,
                Ok(pb::SumField::Usage) => SumField::Usage,
                _ => {
                    return Err(Violation::new(
                        format!("{field}.sum.field"),
                        "must be SUM_FIELD_REVENUE or SUM_FIELD_USAGE",
                    ));
                }
            };
            Operand::Sum(q, what)
        }
    })
}

fn query(field: &str, q: &pb::TouchQuery) -> Result<TouchQuery, Violation> {
    let kind = i16::try_from(q.r#type)
        .ok()
        .and_then(TouchpointKind::from_code)
        .ok_or_else(|| Violation::new(format!("{field}.type"), "unknown touchpoint type"))?;
    let touch = if kind == TouchpointKind::Custom && !q.custom_type.is_empty() {
        TouchType::custom(q.custom_type.clone())
    } else if !q.custom_type.is_empty() {
        return Err(Violation::new(
            format!("{field}.custom_type"),
            "is only for TOUCHPOINT_TYPE_CUSTOM",
        ));
    } else {
        TouchType::kind(kind)
    };
    let filter = q
        .filter
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let f = format!("{field}.filter[{i}]");
            let tf = match pb::TouchField::try_from(p.field) {
                Ok(pb::TouchField::Product) => TouchField::Product,
                Ok(pb::TouchField::Feature) => TouchField::Feature,
                Ok(pb::TouchField::Campaign) => TouchField::Campaign,
                Ok(pb::TouchField::Channel) => TouchField::Channel,
                Ok(pb::TouchField::Revenue) => TouchField::Revenue,
                Ok(pb::TouchField::Usage) => TouchField::Usage,
                Ok(pb::TouchField::Property) if !p.property.is_empty() => {
                    TouchField::Property(p.property.clone())
                }
                Ok(pb::TouchField::Property) => {
                    return Err(Violation::new(format!("{f}.property"), "is required"));
                }
                _ => {
                    return Err(Violation::new(
                        format!("{f}.field"),
                        "is not a touchpoint field",
                    ));
                }
            };
            let t = test(
                &format!("{f}.test"),
                p.test
                    .as_ref()
                    .ok_or_else(|| Violation::new(format!("{f}.test"), "is required"))?,
            )?;
            Ok(Predicate { field: tf, test: t })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let window = q
        .window
        .as_ref()
        .map(|w| duration(&format!("{field}.window"), w))
        .transpose()?;
    Ok(TouchQuery {
        touch,
        filter,
        window,
    })
}

fn test(field: &str, t: &pb::Test) -> Result<Test, Violation> {
    use pb::test::Kind;
    Ok(match t.kind.as_ref() {
        None => return Err(Violation::new(field, "is required")),
        Some(Kind::Compare(c)) => {
            let op = match pb::Operator::try_from(c.op) {
                Ok(pb::Operator::Eq) => CmpOp::Eq,
                Ok(pb::Operator::Ne) => CmpOp::Ne,
                Ok(pb::Operator::Lt) => CmpOp::Lt,
                Ok(pb::Operator::Lte) => CmpOp::Lte,
                Ok(pb::Operator::Gt) => CmpOp::Gt,
                Ok(pb::Operator::Gte) => CmpOp::Gte,
                _ => return Err(Violation::new(format!("{field}.compare.op"), "is required")),
            };
            Test::Cmp(
                op,
                value(&format!("{field}.compare.value"), c.value.as_ref())?,
            )
        }
        Some(Kind::Between(r)) => Test::Between(
            value(&format!("{field}.between.low"), r.low.as_ref())?,
            value(&format!("{field}.between.high"), r.high.as_ref())?,
        ),
        Some(Kind::In(l)) => Test::In(
            l.values
                .iter()
                .enumerate()
                .map(|(i, v)| value(&format!("{field}.in.values[{i}]"), Some(v)))
                .collect::<Result<_, _>>()?,
        ),
        Some(Kind::Contains(s)) => Test::Contains(s.clone()),
        Some(Kind::StartsWith(s)) => Test::StartsWith(s.clone()),
        Some(Kind::Exists(_)) => Test::Exists,
        Some(Kind::Within(d)) => Test::Within(duration(&format!("{field}.within"), d)?),
        Some(Kind::OlderThan(d)) => Test::OlderThan(duration(&format!("{field}.older_than"), d)?),
    })
}

fn value(field: &str, v: Option<&pb::Value>) -> Result<Value, Violation> {
    use pb::value::Kind;
    let v = v
        .and_then(|v| v.kind.as_ref())
        .ok_or_else(|| Violation::new(field, "is required"))?;
    Ok(match v {
        Kind::StringValue(s) => Value::Str(s.clone()),
        Kind::NumberValue(n) if n.is_finite() => Value::Num(*n),
        Kind::NumberValue(_) => return Err(Violation::new(field, "must be a finite number")),
        Kind::BoolValue(b) => Value::Bool(*b),
        Kind::TimeValue(t) => Value::Time(time(field, t)?),
        Kind::DurationValue(d) => Value::Duration(duration(field, d)?),
        Kind::MoneyValue(m) => Value::Money(Money::new(
            &format!("{field}.money_value"),
            &m.currency_code,
            m.amount_minor,
            false,
        )?),
        Kind::StageValue(s) => Value::Stage(
            i16::try_from(*s)
                .ok()
                .and_then(Stage::from_code)
                .ok_or_else(|| Violation::new(field, "is not a lifecycle stage"))?,
        ),
        Kind::GenderValue(g) => Value::Gender(
            i16::try_from(*g)
                .ok()
                .and_then(Gender::from_code)
                .ok_or_else(|| Violation::new(field, "is not a gender"))?,
        ),
        Kind::NpsValue(c) => Value::Nps(match pb::NpsCategory::try_from(*c) {
            Ok(pb::NpsCategory::Detractor) => NpsCategory::Detractor,
            Ok(pb::NpsCategory::Passive) => NpsCategory::Passive,
            Ok(pb::NpsCategory::Promoter) => NpsCategory::Promoter,
            _ => return Err(Violation::new(field, "is not an NPS category")),
        }),
    })
}

/// A rule tree as a message.
pub fn rule_to_proto(r: &Rule) -> pb::Rule {
    use pb::rule::Kind;
    let list = |rs: &[Rule]| pb::RuleList {
        rules: rs.iter().map(rule_to_proto).collect(),
    };
    pb::Rule {
        kind: Some(match r {
            Rule::And(rs) => Kind::All(list(rs)),
            Rule::Or(rs) => Kind::Any(list(rs)),
            Rule::Not(inner) => Kind::Negate(Box::new(rule_to_proto(inner))),
            Rule::Cond(c) => Kind::Condition(condition_to_proto(c)),
        }),
    }
}

fn condition_to_proto(c: &Condition) -> pb::Condition {
    use pb::condition::Kind;
    pb::Condition {
        kind: Some(match c {
            Condition::Consent { purpose, channel } => Kind::Consent(pb::ConsentCondition {
                purpose: purpose.clone(),
                channel: channel.clone(),
            }),
            Condition::InSegment(s) => Kind::InSegment(s.clone()),
            Condition::Compare { operand, test } => Kind::Compare(pb::Comparison {
                operand: Some(operand_to_proto(operand)),
                test: Some(test_to_proto(test)),
            }),
        }),
    }
}

fn operand_to_proto(o: &Operand) -> pb::Operand {
    use pb::operand::Kind;
    let field = |f: pb::ProfileField| Kind::Field(f as i32);
    pb::Operand {
        kind: Some(match o {
            Operand::Age => field(pb::ProfileField::Age),
            Operand::Gender => field(pb::ProfileField::Gender),
            Operand::Income => field(pb::ProfileField::Income),
            Operand::Occupation => field(pb::ProfileField::Occupation),
            Operand::Email => field(pb::ProfileField::Email),
            Operand::DisplayName => field(pb::ProfileField::DisplayName),
            Operand::Stage => field(pb::ProfileField::Stage),
            Operand::TimeInStage => field(pb::ProfileField::TimeInStage),
            Operand::Grade => field(pb::ProfileField::Grade),
            Operand::NpsLast => field(pb::ProfileField::NpsLast),
            Operand::NpsLastCategory => field(pb::ProfileField::NpsLastCategory),
            Operand::CsatLast => field(pb::ProfileField::CsatLast),
            Operand::LoyaltyTier => field(pb::ProfileField::LoyaltyTier),
            Operand::LoyaltyBalance => field(pb::ProfileField::LoyaltyBalance),
            Operand::Attribute(k) => Kind::Attribute(k.clone()),
            Operand::Score(ScoreRef { model: None, name }) => Kind::Score(name.clone()),
            Operand::Score(ScoreRef {
                model: Some(model),
                name,
            }) => Kind::ModelScore(pb::ModelScore {
                scoring_model: model.clone(),
                score: name.clone(),
            }),
            Operand::Count(q) => Kind::Count(query_to_proto(q)),
            Operand::First(q) => Kind::First(query_to_proto(q)),
            Operand::Last(q) => Kind::Last(query_to_proto(q)),
            Operand::Sum(q, f) => Kind::Sum(pb::TouchSum {
                query: Some(query_to_proto(q)),
                field: match f {
                    SumField::Revenue => pb::SumField::Revenue,
                    SumField::Usage => pb::SumField::Usage,
                } as i32,
            }),
        }),
    }
}

fn query_to_proto(q: &TouchQuery) -> pb::TouchQuery {
    pb::TouchQuery {
        r#type: i32::from(q.touch.kind.code()),
        custom_type: q.touch.custom_type.clone().unwrap_or_default(),
        filter: q
            .filter
            .iter()
            .map(|p| {
                let (field, property) = match &p.field {
                    TouchField::Product => (pb::TouchField::Product, String::new()),
                    TouchField::Feature => (pb::TouchField::Feature, String::new()),
                    TouchField::Campaign => (pb::TouchField::Campaign, String::new()),
                    TouchField::Channel => (pb::TouchField::Channel, String::new()),
                    TouchField::Revenue => (pb::TouchField::Revenue, String::new()),
                    TouchField::Usage => (pb::TouchField::Usage, String::new()),
                    TouchField::Property(k) => (pb::TouchField::Property, k.clone()),
                };
                pb::TouchPredicate {
                    field: field as i32,
                    property,
                    test: Some(test_to_proto(&p.test)),
                }
            })
            .collect(),
        window: q.window.map(duration_to_proto),
    }
}

fn test_to_proto(t: &Test) -> pb::Test {
    use pb::test::Kind;
    pb::Test {
        kind: Some(match t {
            Test::Cmp(op, v) => Kind::Compare(pb::ValueComparison {
                op: match op {
                    CmpOp::Eq => pb::Operator::Eq,
                    CmpOp::Ne => pb::Operator::Ne,
                    CmpOp::Lt => pb::Operator::Lt,
                    CmpOp::Lte => pb::Operator::Lte,
                    CmpOp::Gt => pb::Operator::Gt,
                    CmpOp::Gte => pb::Operator::Gte,
                } as i32,
                value: Some(value_to_proto(v)),
            }),
            Test::Between(lo, hi) => Kind::Between(pb::ValueRange {
                low: Some(value_to_proto(lo)),
                high: Some(value_to_proto(hi)),
            }),
            Test::In(vs) => Kind::In(pb::ValueList {
                values: vs.iter().map(value_to_proto).collect(),
            }),
            Test::Contains(s) => Kind::Contains(s.clone()),
            Test::StartsWith(s) => Kind::StartsWith(s.clone()),
            Test::Exists => Kind::Exists(()),
            Test::Within(d) => Kind::Within(duration_to_proto(*d)),
            Test::OlderThan(d) => Kind::OlderThan(duration_to_proto(*d)),
        }),
    }
}

fn value_to_proto(v: &Value) -> pb::Value {
    use pb::value::Kind;
    pb::Value {
        kind: Some(match v {
            Value::Str(s) => Kind::StringValue(s.clone()),
            Value::Num(n) => Kind::NumberValue(*n),
            Value::Bool(b) => Kind::BoolValue(*b),
            Value::Time(t) => Kind::TimeValue(timestamp(*t)),
            Value::Duration(d) => Kind::DurationValue(duration_to_proto(*d)),
            Value::Money(m) => Kind::MoneyValue(clm_proto::common::Money {
                currency_code: m.currency.clone(),
                amount_minor: m.amount_minor,
            }),
            Value::Stage(s) => Kind::StageValue(i32::from(s.code())),
            Value::Gender(g) => Kind::GenderValue(i32::from(g.code())),
            Value::Nps(c) => Kind::NpsValue(match c {
                NpsCategory::Detractor => pb::NpsCategory::Detractor,
                NpsCategory::Passive => pb::NpsCategory::Passive,
                NpsCategory::Promoter => pb::NpsCategory::Promoter,
            } as i32),
        }),
    }
}

/// What a segment answers beyond its row.
#[derive(Debug, Clone, Default)]
pub struct Live {
    /// Current members.
    pub member_count: i64,
    /// Backfill progress, while one runs here.
    pub progress: Option<f64>,
    /// Freshness lag of the facts, µs.
    pub lag_us: Option<i64>,
    /// The objectives (evaluated, or as defined for audit snapshots).
    pub objectives: Vec<pb::Objective>,
}

/// A stored segment as a message.
pub fn segment_to_proto(s: &Segment, live: &Live) -> pb::Segment {
    let state = State::from_code(s.state);
    let rule = clm_domain::rules::parse(&s.rule_text).ok();
    pb::Segment {
        name: format!("segments/{}", s.id),
        display_name: s.display_name.clone(),
        owner: s.owner.clone(),
        description: s.description.clone(),
        rule: rule.as_ref().map(rule_to_proto),
        rule_text: s.rule_text.clone(),
        version: s.version,
        state: match state {
            State::Ready => pb::SegmentState::Ready,
            State::Backfilling => pb::SegmentState::Backfilling,
            State::Failed => pb::SegmentState::Failed,
        } as i32,
        backfill_progress: match state {
            State::Backfilling => live.progress.unwrap_or(0.0),
            State::Ready => 1.0,
            State::Failed => 0.0,
        },
        failure_reason: s.failure_reason.clone().unwrap_or_default(),
        freshness_lag: live
            .lag_us
            .map(|us| duration_to_proto(TimeDelta::microseconds(us.max(0)))),
        member_count: live.member_count,
        create_time: Some(timestamp(from_micros(s.create_us))),
        update_time: Some(timestamp(from_micros(s.update_us))),
        evaluate_time: s.evaluate_us.map(|t| timestamp(from_micros(t))),
        etag: clm_platform::convert::etag(s.revision),
        operation: s.operation.clone().unwrap_or_default(),
        team: s.team.clone(),
        purpose: s.purpose.clone(),
        playbook: s.playbook.clone(),
        approval_required: s.approval_required,
        objectives: live.objectives.clone(),
    }
}

/// A `ScoreChanged` as the projection stores it: the curve it carries
/// (an event without one, written before curves existed, holds its new
/// value until the next event), `None` when it names no customer or score
/// or carries a value that is not a number.
pub fn score_row(m: &clm_proto::scoring::ScoreChanged) -> Option<crate::store::facts::ScoreRow> {
    use clm_domain::scoring::{Curve, Decay, Inactivity, Term};
    use clm_proto::scoring::decay::Kind;
    let customer = clm_platform::customer_events::bare_id(&m.customer)?;
    if m.score.is_empty() || !m.new_value.is_finite() {
        return None;
    }
    let micros = |t: &Option<prost_types::Timestamp>| -> Option<i64> {
        Some(time("", t.as_ref()?).ok()?.timestamp_micros())
    };
    let positive =
        |d: &prost_types::Duration| duration("", d).ok().filter(|d| *d > TimeDelta::zero());
    let changed_us = micros(&m.change_time).unwrap_or(0);
    let curve = match &m.curve {
        None => Curve {
            terms: vec![Term {
                coef: m.new_value,
                since_us: changed_us,
                decay: Decay::None,
            }],
            ..Curve::default()
        },
        Some(c) => {
            let mut terms = Vec::with_capacity(c.terms.len());
            for t in &c.terms {
                if !t.coefficient.is_finite() {
                    return None;
                }
                let decay = match t.decay.as_ref().and_then(|d| d.kind.as_ref()) {
                    None => Decay::None,
                    Some(Kind::HalfLife(h)) => Decay::Exponential {
                        half_life: positive(h)?,
                    },
                    Some(Kind::LinearOver(o)) => Decay::Linear { over: positive(o)? },
                };
                terms.push(Term {
                    coef: t.coefficient,
                    since_us: micros(&t.since)?,
                    decay,
                });
            }
            let inactivity = match (&c.inactivity, micros(&c.last_activity_time)) {
                (Some(i), Some(last)) => Some((
                    Inactivity {
                        points: i.points,
                        every: positive(i.every.as_ref()?)?,
                    },
                    last,
                )),
                _ => None,
            };
            Curve {
                terms,
                inactivity,
                floor: c.floor,
                ceiling: c.ceiling,
            }
        }
    };
    Some(crate::store::facts::ScoreRow {
        customer,
        model: m
            .scoring_model
            .strip_prefix("scoringModels/")
            .unwrap_or(&m.scoring_model)
            .to_owned(),
        name: m.score.clone(),
        changed_us,
        value: m.new_value,
        grade: m.grade.clone(),
        curve,
    })
}
