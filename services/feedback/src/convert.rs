//! Proto ↔ domain for the feedback service: a survey's questions checked
//! and turned into `clm_domain::survey` questions (errors name the proto
//! field path), defaults filled in, answers checked against their question.

use clm_domain::survey::{self, Condition, Kind, Question, Value};
use clm_domain::{Violation, Violations};
use clm_platform::convert::duration_millis;
use clm_proto::customer as cpb;
use clm_proto::feedback as pb;
use std::collections::BTreeMap;

/// Default language of a survey's texts.
pub const DEFAULT_LANGUAGE: &str = "en";
/// Default lifetime of an invitation (14 days, ms).
pub const DEFAULT_TTL_MS: i64 = 14 * DAY_MS;
/// Default recontact cadence (90 days, ms).
pub const DEFAULT_RECONTACT_MS: i64 = 90 * DAY_MS;
/// Shortest invitation lifetime (1 minute).
pub const MIN_TTL_MS: i64 = 60_000;
/// Longest invitation lifetime, purchase delay and fatigue period.
pub const MAX_SPAN_MS: i64 = 365 * DAY_MS;
/// A day in ms.
pub const DAY_MS: i64 = 86_400_000;
const MAX_TEXT: usize = 2_000;
const MAX_NAME: usize = 200;

/// The survey's id from `surveys/{id}`.
pub fn survey_id(field: &str, name: &str) -> Result<String, Violation> {
    name.strip_prefix("surveys/")
        .filter(|id| valid_survey_id(id))
        .map(str::to_owned)
        .ok_or_else(|| Violation::new(field, "must be surveys/{survey_id}"))
}

/// Whether `id` is a valid survey id (1..64 of [a-z0-9-]).
pub fn valid_survey_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Whether `id` is a valid client-chosen response id, or a generated
/// invitation id (1..64 of [A-Za-z0-9_-]).
pub fn valid_child_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `(survey_id, child_id)` from `surveys/{survey_id}/{collection}/{child_id}`.
pub fn child(field: &str, name: &str, collection: &str) -> Result<(String, String), Violation> {
    let bad = || {
        Violation::new(
            field,
            format!("must be surveys/{{survey_id}}/{collection}/{{id}}"),
        )
    };
    let rest = name.strip_prefix("surveys/").ok_or_else(bad)?;
    let (survey, rest) = rest.split_once('/').ok_or_else(bad)?;
    let id = rest
        .strip_prefix(collection)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(bad)?;
    if !valid_survey_id(survey) || !valid_child_id(id) {
        return Err(bad());
    }
    Ok((survey.to_owned(), id.to_owned()))
}

/// `customers/{id}` checked.
pub fn customer_name(field: &str, name: &str) -> Result<String, Violation> {
    clm_domain::ids::CustomerId::parse_name(field, name)?;
    Ok(name.to_owned())
}

fn valid_language(tag: &str) -> bool {
    (2..=35).contains(&tag.len())
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && tag.as_bytes()[0].is_ascii_alphabetic()
}

fn check_texts(
    v: &mut Violations,
    field: &str,
    texts: &BTreeMap<String, String>,
    default_language: &str,
) {
    if !texts.contains_key(default_language) {
        v.push(Violation::new(
            field,
            format!("must hold a text in the default language {default_language:?}"),
        ));
    }
    if texts.len() > 50 {
        v.push(Violation::new(field, "must hold at most 50 languages"));
    }
    for (lang, text) in texts {
        if !valid_language(lang) {
            v.push(Violation::new(
                format!("{field}[{}]", clm_domain::validation::echo(lang)),
                "is not a language tag (BCP 47, e.g. \"en\" or \"pt-BR\")",
            ));
        } else if text.trim().is_empty() || text.chars().count() > MAX_TEXT {
            v.push(Violation::new(
                format!("{field}[{lang}]"),
                format!("must be 1 to {MAX_TEXT} characters"),
            ));
        }
    }
}

fn kind(k: i32) -> Option<Kind> {
    match pb::QuestionKind::try_from(k).ok()? {
        pb::QuestionKind::Unspecified => None,
        pb::QuestionKind::Nps => Some(Kind::Nps),
        pb::QuestionKind::Csat => Some(Kind::Csat),
        pb::QuestionKind::Ces => Some(Kind::Ces),
        pb::QuestionKind::Rating => Some(Kind::Rating),
        pb::QuestionKind::SingleChoice => Some(Kind::SingleChoice),
        pb::QuestionKind::MultipleChoice => Some(Kind::MultipleChoice),
        pb::QuestionKind::OpenText => Some(Kind::OpenText),
    }
}

/// The proto kind of a domain kind.
pub fn kind_to_proto(k: Kind) -> pb::QuestionKind {
    match k {
        Kind::Nps => pb::QuestionKind::Nps,
        Kind::Csat => pb::QuestionKind::Csat,
        Kind::Ces => pb::QuestionKind::Ces,
        Kind::Rating => pb::QuestionKind::Rating,
        Kind::SingleChoice => pb::QuestionKind::SingleChoice,
        Kind::MultipleChoice => pb::QuestionKind::MultipleChoice,
        Kind::OpenText => pb::QuestionKind::OpenText,
    }
}

/// A survey's questions as the domain sees them (the survey was checked
/// by [`normalize`] before it was stored).
pub fn questions(s: &pb::Survey) -> Vec<Question> {
    let index: BTreeMap<&str, usize> = s
        .questions
        .iter()
        .enumerate()
        .map(|(i, q)| (q.id.as_str(), i))
        .collect();
    s.questions
        .iter()
        .map(|q| {
            let k = kind(q.kind).unwrap_or(Kind::OpenText);
            Question {
                id: q.id.clone(),
                kind: k,
                required: q.required,
                scale: k.fixed_scale().unwrap_or((q.scale_min, q.scale_max)),
                choices: q.choices.iter().map(|c| c.id.clone()).collect(),
                show_if: q.show_if.as_ref().map(|c| Condition {
                    // An unknown id never happens after `normalize`; point
                    // past the end so the condition never holds.
                    question: index
                        .get(c.question.as_str())
                        .copied()
                        .unwrap_or(usize::MAX),
                    min: c.min_value,
                    max: c.max_value,
                    any_of: c.any_of_choices.clone(),
                }),
            }
        })
        .collect()
}

/// Checks a survey's writable fields under `field` and fills in defaults:
/// the default language, rating scales, targeting channel and ttl.
pub fn normalize(field: &str, s: &mut pb::Survey) -> Result<(), Violations> {
    let mut v = Violations::new();
    let display = s.display_name.trim();
    if display.is_empty() || display.chars().count() > MAX_NAME {
        v.push(Violation::new(
            format!("{field}.display_name"),
            format!("must be 1 to {MAX_NAME} characters"),
        ));
    }
    if s.default_language.is_empty() {
        s.default_language = DEFAULT_LANGUAGE.into();
    } else if !valid_language(&s.default_language) {
        v.push(Violation::new(
            format!("{field}.default_language"),
            "is not a language tag (BCP 47, e.g. \"en\" or \"pt-BR\")",
        ));
    }
    let lang = s.default_language.clone();
    let index: BTreeMap<String, usize> = s
        .questions
        .iter()
        .enumerate()
        .map(|(i, q)| (q.id.clone(), i))
        .collect();
    for (i, q) in s.questions.iter_mut().enumerate() {
        let f = format!("{field}.questions[{i}]");
        let Some(k) = kind(q.kind) else {
            v.push(Violation::new(format!("{f}.kind"), "must be set"));
            continue;
        };
        check_texts(&mut v, &format!("{f}.text"), &q.text, &lang);
        for (j, c) in q.choices.iter().enumerate() {
            check_texts(&mut v, &format!("{f}.choices[{j}].text"), &c.text, &lang);
        }
        match k.fixed_scale() {
            Some((lo, hi)) => {
                q.scale_min = lo;
                q.scale_max = hi;
            }
            None if k == Kind::Rating && q.scale_min == 0 && q.scale_max == 0 => {
                q.scale_min = 1;
                q.scale_max = 5;
            }
            None if k != Kind::Rating && (q.scale_min != 0 || q.scale_max != 0) => {
                v.push(Violation::new(
                    format!("{f}.scale_max"),
                    "only rating questions have a scale",
                ));
            }
            None => {}
        }
        if let Some(c) = &q.show_if
            && !index.contains_key(&c.question)
        {
            v.push(Violation::new(
                format!("{f}.show_if.question"),
                "is not a question of this survey",
            ));
        }
    }
    if v.is_empty() {
        v.0.extend(survey::check_questions(
            &format!("{field}.questions"),
            &questions(s),
        ));
    }
    if s.response_limit < 0 {
        v.push(Violation::new(
            format!("{field}.response_limit"),
            "must not be negative",
        ));
    }
    if let Some(p) = &s.recontact_period {
        match duration_millis(&format!("{field}.recontact_period"), p) {
            Ok(ms) if (0..=10 * MAX_SPAN_MS).contains(&ms) => {}
            Ok(_) => v.push(Violation::new(
                format!("{field}.recontact_period"),
                "must be 0 to 3650 days",
            )),
            Err(e) => v.push(e),
        }
    }
    let t = s.targeting.get_or_insert_with(Default::default);
    let tf = format!("{field}.targeting");
    if t.channel == 0 {
        t.channel = cpb::ConsentChannel::InApp as i32;
    } else if cpb::ConsentChannel::try_from(t.channel).is_err() {
        v.push(Violation::new(format!("{tf}.channel"), "is not a channel"));
    }
    match &t.invitation_ttl {
        None => {
            t.invitation_ttl = Some(clm_platform::convert::duration_from_millis(DEFAULT_TTL_MS))
        }
        Some(d) => {
            if let Err(e) = ttl_ms(&format!("{tf}.invitation_ttl"), d) {
                v.push(e);
            }
        }
    }
    use pb::targeting::Audience;
    match &t.audience {
        None => {}
        Some(Audience::Segment(name))
            if !name.strip_prefix("segments/").is_some_and(valid_child_id) =>
        {
            v.push(Violation::new(
                format!("{tf}.segment"),
                "must be segments/{segment_id}",
            ));
        }
        Some(Audience::Segment(_)) => {}
        Some(Audience::StageEntered(s)) => {
            if let Err(e) =
                clm_platform::customer_events::stage(&format!("{tf}.stage_entered.stage"), s.stage)
            {
                v.push(e);
            }
        }
        Some(Audience::AfterPurchase(p)) => {
            let f = format!("{tf}.after_purchase.delay");
            match p.delay.as_ref().map(|d| duration_millis(&f, d)) {
                None => v.push(Violation::new(f, "is required")),
                Some(Ok(ms)) if (0..=MAX_SPAN_MS).contains(&ms) => {}
                Some(Ok(_)) => v.push(Violation::new(f, "must be 0 to 365 days")),
                Some(Err(e)) => v.push(e),
            }
        }
    }
    v.into_result()
}

/// An invitation lifetime in ms, checked.
pub fn ttl_ms(field: &str, d: &prost_types::Duration) -> Result<i64, Violation> {
    let ms = duration_millis(field, d)?;
    if (MIN_TTL_MS..=MAX_SPAN_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(Violation::new(field, "must be 1 minute to 365 days"))
    }
}

/// The recontact cadence of a survey, ms (0 = none).
pub fn recontact_ms(s: &pb::Survey) -> i64 {
    s.recontact_period
        .as_ref()
        .and_then(|d| duration_millis("", d).ok())
        .unwrap_or(DEFAULT_RECONTACT_MS)
}

/// The survey's invitation lifetime, ms.
pub fn survey_ttl_ms(s: &pb::Survey) -> i64 {
    s.targeting
        .as_ref()
        .and_then(|t| t.invitation_ttl.as_ref())
        .and_then(|d| duration_millis("", d).ok())
        .unwrap_or(DEFAULT_TTL_MS)
}

/// An answer's value, or a violation of `field`.
pub fn value(field: &str, a: &pb::Answer) -> Result<Value, Violation> {
    use pb::answer::Value as V;
    match &a.value {
        None => Err(Violation::new(field, "must be set")),
        Some(V::Number(n)) => Ok(Value::Number(*n)),
        Some(V::Choices(c)) => Ok(Value::Choices(c.ids.clone())),
        Some(V::Text(t)) => Ok(Value::Text(t.clone())),
    }
}

/// An answer as answered: value, and the class of NPS and CSAT answers.
pub fn answer_to_proto(q: &Question, value: &Value) -> pb::Answer {
    use pb::answer::Value as V;
    let mut a = pb::Answer {
        question: q.id.clone(),
        value: Some(match value {
            Value::Number(n) => V::Number(*n),
            Value::Choices(c) => V::Choices(pb::ChoiceIds { ids: c.clone() }),
            Value::Text(t) => V::Text(t.clone()),
        }),
        ..Default::default()
    };
    if let Value::Number(n) = value {
        a.nps_category = nps_category(q.kind, *n) as i32;
        a.satisfaction = satisfaction(q.kind, *n) as i32;
    }
    a
}

/// The NPS class of a numeric answer to a question of kind `k`.
pub fn nps_category(k: Kind, n: i64) -> pb::NpsCategory {
    if k != Kind::Nps {
        return pb::NpsCategory::Unspecified;
    }
    match survey::nps_class(n) {
        survey::NpsClass::Detractor => pb::NpsCategory::Detractor,
        survey::NpsClass::Passive => pb::NpsCategory::Passive,
        survey::NpsClass::Promoter => pb::NpsCategory::Promoter,
    }
}

/// The satisfaction class of a numeric answer to a question of kind `k`.
pub fn satisfaction(k: Kind, n: i64) -> pb::Satisfaction {
    if k != Kind::Csat {
        return pb::Satisfaction::Unspecified;
    }
    match survey::satisfaction(n) {
        survey::Satisfaction::Unsatisfied => pb::Satisfaction::Unsatisfied,
        survey::Satisfaction::Neutral => pb::Satisfaction::Neutral,
        survey::Satisfaction::Satisfied => pb::Satisfaction::Satisfied,
    }
}

/// The language to show a customer: theirs when every text of the survey
/// offers it, else the survey's default.
pub fn language_for(s: &pb::Survey, customer_language: Option<&str>) -> String {
    customer_language
        .filter(|l| {
            s.questions.iter().all(|q| {
                q.text.contains_key(*l) && q.choices.iter().all(|c| c.text.contains_key(*l))
            })
        })
        .map_or_else(|| s.default_language.clone(), str::to_owned)
}
