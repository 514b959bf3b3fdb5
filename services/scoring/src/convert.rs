//! Proto ↔ domain: model validation and compilation (violations name the
//! rule and field: `scoring_model.rules[2].cap.points`), touchpoints and
//! profiles from the customer stream, ledger entries back to proto.

use crate::store::ledger::Row;
use chrono::{DateTime, TimeDelta, Utc};
use clm_domain::lifecycle::Stage;
use clm_domain::rules::{Fact, FactSet, FieldCatalog, compile, compile_touch_query, reads};
use clm_domain::scoring::{
    Bands, Cap, ConsentRule, Decay, ENGAGEMENT, EventRule, FIT, Inactivity, Model, Period,
    ProfileRule, ScoreSpec, Threshold, ThresholdKind,
};
use clm_domain::{Violation, Violations};
use clm_platform::convert::timestamp;
use clm_platform::customer_events::profile_facts;
pub use clm_platform::customer_events::{stage, stage_to_proto, touchpoint};
use clm_proto::customer as cpb;
use clm_proto::scoring as pb;
use std::collections::BTreeSet;

/// Most rules in one model.
pub const MAX_RULES: usize = 500;
/// Most thresholds in one model.
pub const MAX_THRESHOLDS: usize = 100;
/// Most scores in one model.
pub const MAX_SCORES: usize = 50;

fn identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A positive duration in a proto field.
fn positive(field: &str, d: &prost_types::Duration) -> Result<TimeDelta, Violation> {
    let ms = clm_platform::convert::duration_millis(field, d)?;
    if ms <= 0 {
        return Err(Violation::new(field, "must be longer than zero"));
    }
    if TimeDelta::milliseconds(ms) > clm_domain::rules::MAX_DURATION {
        return Err(Violation::new(field, "must be at most 100 years"));
    }
    Ok(TimeDelta::milliseconds(ms))
}

fn decay(field: &str, d: Option<&pb::Decay>) -> Result<Decay, Violation> {
    use pb::decay::Kind;
    match d.and_then(|d| d.kind.as_ref()) {
        None => Ok(Decay::None),
        Some(Kind::HalfLife(h)) => Ok(Decay::Exponential {
            half_life: positive(&format!("{field}.half_life"), h)?,
        }),
        Some(Kind::LinearOver(o)) => Ok(Decay::Linear {
            over: positive(&format!("{field}.linear_over"), o)?,
        }),
    }
}

/// Decay back to proto.
pub fn decay_to_proto(d: Decay) -> Option<pb::Decay> {
    use pb::decay::Kind;
    let dur = |t: TimeDelta| prost_types::Duration {
        seconds: t.num_seconds(),
        nanos: t.subsec_nanos(),
    };
    match d {
        Decay::None => None,
        Decay::Exponential { half_life } => Some(pb::Decay {
            kind: Some(Kind::HalfLife(dur(half_life))),
        }),
        Decay::Linear { over } => Some(pb::Decay {
            kind: Some(Kind::LinearOver(dur(over))),
        }),
    }
}

/// A score's curve as `ScoreChanged` carries it.
pub fn curve_to_proto(c: &clm_domain::scoring::Curve) -> pb::ScoreCurve {
    let at = |us: i64| clm_platform::convert::timestamp(clm_platform::db::from_micros(us));
    pb::ScoreCurve {
        terms: c
            .terms
            .iter()
            .map(|t| pb::ScoreTerm {
                coefficient: t.coef,
                since: Some(at(t.since_us)),
                decay: decay_to_proto(t.decay),
            })
            .collect(),
        inactivity: c.inactivity.map(|(i, _)| pb::InactivityDecay {
            points: i.points,
            every: Some(prost_types::Duration {
                seconds: i.every.num_seconds(),
                nanos: i.every.subsec_nanos(),
            }),
        }),
        last_activity_time: c.inactivity.map(|(_, last)| at(last)),
        floor: c.floor,
        ceiling: c.ceiling,
    }
}

/// The lower-case name of a consent purpose (`marketing`).
pub fn purpose_name(p: i32) -> Option<&'static str> {
    match cpb::ConsentPurpose::try_from(p).ok()? {
        cpb::ConsentPurpose::Marketing => Some("marketing"),
        cpb::ConsentPurpose::Profiling => Some("profiling"),
        cpb::ConsentPurpose::Surveys => Some("surveys"),
        cpb::ConsentPurpose::Personalisation => Some("personalisation"),
        cpb::ConsentPurpose::Unspecified => None,
    }
}

/// Validates a model definition and compiles it; every problem is a
/// violation under `prefix` naming the rule and field.
pub fn compile_model(prefix: &str, m: &pb::ScoringModel) -> Result<Model, Violations> {
    let mut v = Violations::new();
    let f = |s: &str| format!("{prefix}.{s}");
    if m.display_name.chars().count() > 200 {
        v.push(Violation::new(
            f("display_name"),
            "must be at most 200 characters",
        ));
    }
    if m.rules.is_empty() {
        v.push(Violation::new(
            f("rules"),
            "a model needs at least one rule",
        ));
    }
    if m.rules.len() > MAX_RULES {
        v.push(Violation::new(
            f("rules"),
            format!("at most {MAX_RULES} rules"),
        ));
    }
    if m.thresholds.len() > MAX_THRESHOLDS || m.scores.len() > MAX_SCORES {
        v.push(Violation::new(
            f("thresholds"),
            "too many thresholds or scores",
        ));
    }
    let mut scores = vec![
        ScoreSpec {
            name: FIT.into(),
            floor: None,
            ceiling: None,
            inactivity: None,
        },
        ScoreSpec {
            name: ENGAGEMENT.into(),
            floor: None,
            ceiling: None,
            inactivity: None,
        },
    ];
    for (i, s) in m.scores.iter().enumerate() {
        let p = f(&format!("scores[{i}]"));
        if !identifier(&s.name) {
            v.push(Violation::new(
                format!("{p}.name"),
                "must be a lower-case identifier",
            ));
            continue;
        }
        if let (Some(lo), Some(hi)) = (s.floor, s.ceiling)
            && lo > hi
        {
            v.push(Violation::new(
                format!("{p}.ceiling"),
                "must not be below the floor",
            ));
        }
        let inactivity = match &s.inactivity {
            None => None,
            Some(i) => {
                let every = i
                    .every
                    .as_ref()
                    .ok_or_else(|| Violation::new(format!("{p}.inactivity.every"), "is required"))
                    .and_then(|e| positive(&format!("{p}.inactivity.every"), e));
                if i.points >= 0 {
                    v.push(Violation::new(
                        format!("{p}.inactivity.points"),
                        "must be negative",
                    ));
                }
                v.check("", every).map(|every| Inactivity {
                    points: i.points,
                    every,
                })
            }
        };
        let spec = ScoreSpec {
            name: s.name.clone(),
            floor: s.floor,
            ceiling: s.ceiling,
            inactivity,
        };
        match scores.iter_mut().find(|x| x.name == s.name) {
            Some(x) if x.floor.is_none() && x.ceiling.is_none() && x.inactivity.is_none() => {
                *x = spec
            }
            Some(_) => v.push(Violation::new(format!("{p}.name"), "is defined twice")),
            None => scores.push(spec),
        }
    }
    let known: BTreeSet<&str> = scores.iter().map(|s| s.name.as_str()).collect();
    let mut catalog = FieldCatalog::new();
    catalog.infer_unknown_attributes = true;
    let mut model = Model {
        bands: Bands::default(),
        ..Model::default()
    };
    let mut ids = BTreeSet::new();
    for (i, r) in m.rules.iter().enumerate() {
        let p = f(&format!("rules[{i}]"));
        if !identifier(&r.id) {
            v.push(Violation::new(
                format!("{p}.id"),
                "must be a lower-case identifier",
            ));
        } else if !ids.insert(r.id.as_str()) || r.id == "manual" {
            v.push(Violation::new(
                format!("{p}.id"),
                "is used by another rule (or is `manual`)",
            ));
        }
        if !known.contains(r.score.as_str()) {
            v.push(Violation::new(
                format!("{p}.score"),
                format!(
                    "unknown score {:?}: define it in scores",
                    clm_domain::validation::shorten(&r.score, 64)
                ),
            ));
        }
        if r.points == 0 {
            v.push(Violation::new(format!("{p}.points"), "must not be zero"));
        }
        let d = v.check("", decay(&format!("{p}.decay"), r.decay.as_ref()));
        use pb::scoring_rule::Trigger;
        // Event rules: a touchpoint query, written or made from a survey trigger.
        let event_query = match &r.trigger {
            Some(Trigger::Touchpoint(q)) => Some((q.clone(), format!("{p}.touchpoint"))),
            Some(Trigger::SurveyAnswer(t)) => {
                let f = format!("{p}.survey_answer");
                v.check("", survey_query(&f, t)).map(|q| (q, f))
            }
            _ => None,
        };
        match &r.trigger {
            None => v.push(Violation::new(
                format!("{p}.trigger"),
                "set one of touchpoint, profile_condition, consent_denied, survey_answer",
            )),
            Some(Trigger::Touchpoint(_) | Trigger::SurveyAnswer(_)) => {
                let Some((q, qfield)) = &event_query else {
                    continue;
                };
                let cap = match &r.cap {
                    None => None,
                    Some(c) => {
                        if c.points < 0 {
                            v.push(Violation::new(
                                format!("{p}.cap.points"),
                                "must not be negative",
                            ));
                        }
                        let period = match pb::CapPeriod::try_from(c.period) {
                            Ok(pb::CapPeriod::Day) => Some(Period::Day),
                            Ok(pb::CapPeriod::IsoWeek) => Some(Period::IsoWeek),
                            Ok(pb::CapPeriod::Rolling) => {
                                let w = c
                                    .rolling_window
                                    .as_ref()
                                    .ok_or_else(|| {
                                        Violation::new(
                                            format!("{p}.cap.rolling_window"),
                                            "is required",
                                        )
                                    })
                                    .and_then(|w| positive(&format!("{p}.cap.rolling_window"), w));
                                v.check("", w).map(Period::Rolling)
                            }
                            _ => {
                                v.push(Violation::new(format!("{p}.cap.period"), "is required"));
                                None
                            }
                        };
                        period.map(|period| Cap {
                            points: c.points,
                            period,
                        })
                    }
                };
                match compile_touch_query(q, &catalog) {
                    Ok(trigger) => {
                        if trigger.window.is_some() {
                            v.push(Violation::new(
                                qfield.clone(),
                                "an event rule takes no window",
                            ));
                        }
                        if let Some(d) = d {
                            model.event_rules.push(EventRule {
                                id: r.id.clone(),
                                score: r.score.clone(),
                                trigger,
                                points: r.points,
                                once_per_customer: r.once_per_customer,
                                cap,
                                decay: d,
                            });
                        }
                    }
                    Err(e) => v.0.extend(e.to_violations(qfield).0),
                }
            }
            Some(Trigger::ProfileCondition(text)) => {
                if r.cap.is_some() || r.once_per_customer || r.decay.is_some() {
                    v.push(Violation::new(
                        format!("{p}.profile_condition"),
                        "a profile rule takes no cap, once_per_customer or decay",
                    ));
                }
                match compile(text, &catalog) {
                    Ok(condition) => {
                        let profile_only = reads(&condition).iter().all(|f| {
                            matches!(
                                f,
                                Fact::BirthDate
                                    | Fact::Gender
                                    | Fact::Income
                                    | Fact::Occupation
                                    | Fact::Email
                                    | Fact::DisplayName
                                    | Fact::Attribute(_)
                                    | Fact::Stage
                            )
                        });
                        if profile_only {
                            model.profile_rules.push(ProfileRule {
                                id: r.id.clone(),
                                score: r.score.clone(),
                                condition,
                                points: r.points,
                            });
                        } else {
                            v.push(Violation::new(
                                format!("{p}.profile_condition"),
                                "a profile rule reads demographics, attributes and stage only (no touchpoints, scores, consent, feedback, loyalty or segments)",
                            ));
                        }
                    }
                    Err(e) => {
                        v.0.extend(e.to_violations(&format!("{p}.profile_condition")).0)
                    }
                }
            }
            Some(Trigger::ConsentDenied(c)) => {
                if let Some(d) = d {
                    model.consent_rules.push(ConsentRule {
                        id: r.id.clone(),
                        score: r.score.clone(),
                        purpose: purpose_name(c.purpose).map(str::to_owned),
                        points: r.points,
                        decay: d,
                    });
                }
            }
        }
    }
    let mut tids = BTreeSet::new();
    for (i, t) in m.thresholds.iter().enumerate() {
        let p = f(&format!("thresholds[{i}]"));
        if !identifier(&t.id) || !tids.insert(t.id.as_str()) {
            v.push(Violation::new(
                format!("{p}.id"),
                "must be a unique lower-case identifier",
            ));
        }
        if !known.contains(t.score.as_str()) {
            v.push(Violation::new(format!("{p}.score"), "unknown score"));
        }
        if !t.value.is_finite() {
            v.push(Violation::new(
                format!("{p}.value"),
                "must be a finite number",
            ));
        }
        let to = v.check("", stage(&format!("{p}.to_stage"), t.to_stage));
        let kind = match pb::ThresholdDirection::try_from(t.direction) {
            Ok(pb::ThresholdDirection::AtOrAbove) => {
                to.map(|to| ThresholdKind::AtLeast { value: t.value, to })
            }
            Ok(pb::ThresholdDirection::Below) => {
                let w = v.check("", stage(&format!("{p}.while_in_stage"), t.while_in_stage));
                match (to, w) {
                    (Some(to), Some(while_in)) => Some(ThresholdKind::Below {
                        value: t.value,
                        while_in,
                        to,
                    }),
                    _ => None,
                }
            }
            _ => {
                v.push(Violation::new(format!("{p}.direction"), "is required"));
                None
            }
        };
        if let Some(kind) = kind {
            model.thresholds.push(Threshold {
                id: t.id.clone(),
                score: t.score.clone(),
                kind,
            });
        }
    }
    if let Some(b) = &m.grade_bands {
        let mut three = |name: &str, xs: &[f64]| -> Option<[f64; 3]> {
            if xs.is_empty() {
                return None;
            }
            if xs.len() != 3
                || xs.windows(2).any(|w| w[0] < w[1])
                || xs.iter().any(|x| !x.is_finite())
            {
                v.push(Violation::new(
                    format!("{prefix}.grade_bands.{name}"),
                    "must be three descending finite numbers",
                ));
                return None;
            }
            Some([xs[0], xs[1], xs[2]])
        };
        if let Some(fit) = three("fit", &b.fit) {
            model.bands.fit = fit;
        }
        if let Some(e) = three("engagement", &b.engagement) {
            model.bands.engagement = e;
        }
    }
    model.scores = scores;
    v.into_result().map(|()| model)
}

/// The facts profile rules read, from a customer's profile and stage.
pub fn facts(profile: Option<&cpb::Customer>, stage: Option<(Stage, DateTime<Utc>)>) -> FactSet {
    let mut f = profile.map(profile_facts).unwrap_or_default();
    f.stage = stage;
    f
}

/// A ledger row to proto, its value read at `at_us`.
pub fn ledger_entry(r: &Row, at_us: i64) -> pb::LedgerEntry {
    pb::LedgerEntry {
        name: format!("{}/ledger/{}", r.customer, r.id),
        customer: r.customer.clone(),
        scoring_model: format!("scoringModels/{}", r.model),
        model_version: r.model_version,
        score: r.score.clone(),
        rule: r.rule.clone(),
        points: r.points,
        current_value: clm_domain::scoring::round(r.entry().value_at(at_us)),
        source_event: r.source_event.clone(),
        award_time: Some(timestamp(clm_platform::db::from_micros(r.award_us))),
        decay: decay_to_proto(r.decay()),
        reason: r.reason.clone(),
        actor: r.actor.clone(),
    }
}

/// The touchpoint query a survey trigger stands for:
/// `survey_answer where properties.kind = "nps" and ...`, the value bounds
/// as the list of values they allow (properties are text).
pub fn survey_query(field: &str, t: &pb::SurveyAnswerTrigger) -> Result<String, Violation> {
    use clm_proto::feedback::{NpsCategory, QuestionKind, Satisfaction};
    let (kind, scale) = match QuestionKind::try_from(t.kind) {
        Ok(QuestionKind::Nps) => ("nps", Some((0, 10))),
        Ok(QuestionKind::Csat) => ("csat", Some((1, 5))),
        Ok(QuestionKind::Ces) => ("ces", Some((1, 7))),
        Ok(QuestionKind::Rating) => ("rating", None),
        _ => {
            return Err(Violation::new(
                format!("{field}.kind"),
                "must be NPS, CSAT, CES or RATING",
            ));
        }
    };
    let mut text = format!("survey_answer where properties.kind = \"{kind}\"");
    match NpsCategory::try_from(t.nps_category) {
        Ok(NpsCategory::Unspecified) => {}
        Ok(c) if kind == "nps" => {
            let c = match c {
                NpsCategory::Detractor => "detractor",
                NpsCategory::Passive => "passive",
                _ => "promoter",
            };
            text.push_str(&format!(" and properties.category = \"{c}\""));
        }
        _ => {
            return Err(Violation::new(
                format!("{field}.nps_category"),
                "applies to NPS answers only",
            ));
        }
    }
    match Satisfaction::try_from(t.satisfaction) {
        Ok(Satisfaction::Unspecified) => {}
        Ok(s) if kind == "csat" => {
            let s = match s {
                Satisfaction::Unsatisfied => "unsatisfied",
                Satisfaction::Neutral => "neutral",
                _ => "satisfied",
            };
            text.push_str(&format!(" and properties.satisfaction = \"{s}\""));
        }
        _ => {
            return Err(Violation::new(
                format!("{field}.satisfaction"),
                "applies to CSAT answers only",
            ));
        }
    }
    if t.min_value.is_some() || t.max_value.is_some() {
        let (lo, hi) = match scale {
            Some((lo, hi)) => (
                t.min_value.unwrap_or(lo).max(lo),
                t.max_value.unwrap_or(hi).min(hi),
            ),
            None => match (t.min_value, t.max_value) {
                (Some(lo), Some(hi)) if hi >= lo && hi - lo <= 100 => (lo, hi),
                _ => {
                    return Err(Violation::new(
                        format!("{field}.max_value"),
                        "a RATING trigger needs min_value and max_value, at most 100 apart",
                    ));
                }
            },
        };
        if hi < lo {
            return Err(Violation::new(
                format!("{field}.max_value"),
                "leaves no value of the scale",
            ));
        }
        let values: Vec<String> = (lo..=hi).map(|n| format!("\"{n}\"")).collect();
        text.push_str(&format!(" and properties.value in ({})", values.join(", ")));
    }
    if !t.survey.is_empty() {
        let ok = t.survey.strip_prefix("surveys/").is_some_and(|id| {
            !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
        if !ok {
            return Err(Violation::new(
                format!("{field}.survey"),
                "must be surveys/{survey_id}",
            ));
        }
        text.push_str(&format!(" and properties.survey = \"{}\"", t.survey));
    }
    Ok(text)
}
