//! The customer service's messages in domain form, for every service that
//! follows the customer stream (scoring, segmentation, and the services
//! after them): one decoding of touchpoints, profiles and stages, so each
//! consumer's handlers only say what they do with them.

use chrono::{DateTime, NaiveDate, Utc};
use clm_domain::Violation;
use clm_domain::attributes::AttributeValue;
use clm_domain::demographics::Gender;
use clm_domain::lifecycle::Stage;
use clm_domain::money::Money;
use clm_domain::rules::FactSet;
use clm_domain::touchpoint::{Touchpoint, TouchpointKind};
use clm_proto::customer as cpb;

/// The bare id of a `customers/{id}` name.
pub fn bare_id(name: &str) -> Option<String> {
    name.strip_prefix("customers/")
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
}

/// A stream message's timestamp, if set and in range.
pub fn time(t: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    t.and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?))
}

fn text(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// A `clm.common.v1.Money` in domain form.
pub fn money(m: Option<&clm_proto::common::Money>) -> Option<Money> {
    m.map(|m| Money {
        currency: m.currency_code.clone(),
        amount_minor: m.amount_minor,
    })
}

/// A proto stage in domain form: `field` names it in the error.
pub fn stage(field: &str, value: i32) -> Result<Stage, Violation> {
    match cpb::Stage::try_from(value) {
        Ok(cpb::Stage::Approach) => Ok(Stage::Approach),
        Ok(cpb::Stage::Acquisition) => Ok(Stage::Acquisition),
        Ok(cpb::Stage::Conversion) => Ok(Stage::Conversion),
        Ok(cpb::Stage::Retention) => Ok(Stage::Retention),
        Ok(cpb::Stage::Loyalty) => Ok(Stage::Loyalty),
        Ok(cpb::Stage::Churned) => Ok(Stage::Churned),
        Ok(cpb::Stage::Unspecified) => Err(Violation::new(field, "is required")),
        Err(_) => Err(Violation::new(field, format!("unknown stage {value}"))),
    }
}

/// A domain stage as proto.
pub fn stage_to_proto(s: Stage) -> cpb::Stage {
    match s {
        Stage::Approach => cpb::Stage::Approach,
        Stage::Acquisition => cpb::Stage::Acquisition,
        Stage::Conversion => cpb::Stage::Conversion,
        Stage::Retention => cpb::Stage::Retention,
        Stage::Loyalty => cpb::Stage::Loyalty,
        Stage::Churned => cpb::Stage::Churned,
    }
}

/// A touchpoint of the stream in domain form; `None` without an occurred
/// time (the customer service always sets one). An unknown type is custom.
pub fn touchpoint(t: &cpb::Touchpoint) -> Option<Touchpoint> {
    let kind = i16::try_from(t.r#type)
        .ok()
        .and_then(TouchpointKind::from_code)
        .unwrap_or(TouchpointKind::Custom);
    Some(Touchpoint {
        event_id: t.event_id.clone(),
        kind,
        custom_type: text(&t.custom_type),
        occurred_time: time(t.occurred_time.as_ref())?,
        usage_millis: t
            .usage_duration
            .as_ref()
            .map(|d| d.seconds.saturating_mul(1000) + i64::from(d.nanos / 1_000_000)),
        product: text(&t.product),
        feature: text(&t.feature),
        revenue: money(t.revenue.as_ref()),
        campaign: text(&t.campaign),
        channel: text(&t.channel),
        properties: t.properties.clone(),
    })
}

/// What a customer message says about the customer, as rule facts:
/// e-mail, display name, demographics, custom attributes and stage (the
/// rest of the fact set is empty).
pub fn profile_facts(c: &cpb::Customer) -> FactSet {
    let mut f = FactSet {
        email: text(&c.email),
        display_name: text(&c.display_name),
        stage: i16::try_from(c.stage)
            .ok()
            .and_then(Stage::from_code)
            .zip(time(c.stage_change_time.as_ref())),
        ..FactSet::default()
    };
    if let Some(d) = &c.demographics {
        f.demographics.birth_date = d.birth_date.as_ref().and_then(|b| {
            NaiveDate::from_ymd_opt(
                b.year,
                u32::try_from(b.month).ok()?,
                u32::try_from(b.day).ok()?,
            )
        });
        f.demographics.gender = i16::try_from(d.gender).ok().and_then(Gender::from_code);
        f.demographics.annual_income = money(d.annual_income.as_ref());
        f.demographics.occupation = text(&d.occupation);
    }
    for (k, a) in &c.attributes {
        use cpb::attribute_value::Value;
        let v = match &a.value {
            Some(Value::StringValue(s)) => AttributeValue::String(s.clone()),
            Some(Value::NumberValue(n)) => AttributeValue::Number(*n),
            Some(Value::BoolValue(b)) => AttributeValue::Bool(*b),
            Some(Value::TimestampValue(t)) => match time(Some(t)) {
                Some(t) => AttributeValue::Timestamp(t),
                None => continue,
            },
            None => continue,
        };
        f.attributes.insert(k.clone(), v);
    }
    f
}

/// The touchpoints a completed survey response stands for: one
/// `SURVEY_ANSWER` per answered question except open text (personal data
/// stays in the feedback service), so scoring and segmentation count and
/// score answers with the rules, caps, decay and windows they use for any
/// touchpoint. Event ids are `{response}#{question}`: a replayed response
/// is the same touchpoints again. Properties: `survey`, `question`, `kind`
/// (`nps`, `csat`, `ces`, `rating`, `single_choice`, `multiple_choice`),
/// `value` (numbers), `category` (NPS: `detractor`, `passive`,
/// `promoter`), `satisfaction` (CSAT: `unsatisfied`, `neutral`,
/// `satisfied`), `choices` (comma-separated ids).
pub fn survey_answers(m: &clm_proto::feedback::ResponseCompleted) -> Vec<cpb::Touchpoint> {
    use clm_proto::feedback::{NpsCategory, QuestionKind, Satisfaction};
    m.answers
        .iter()
        .filter_map(|a| {
            let kind = match QuestionKind::try_from(a.kind).ok()? {
                QuestionKind::Nps => "nps",
                QuestionKind::Csat => "csat",
                QuestionKind::Ces => "ces",
                QuestionKind::Rating => "rating",
                QuestionKind::SingleChoice => "single_choice",
                QuestionKind::MultipleChoice => "multiple_choice",
                QuestionKind::OpenText | QuestionKind::Unspecified => return None,
            };
            let mut properties = std::collections::BTreeMap::from([
                ("survey".to_owned(), m.survey.clone()),
                ("question".to_owned(), a.question.clone()),
                ("kind".to_owned(), kind.to_owned()),
            ]);
            if let Some(n) = a.number {
                properties.insert("value".into(), n.to_string());
            }
            let category = match NpsCategory::try_from(a.nps_category) {
                Ok(NpsCategory::Detractor) => Some("detractor"),
                Ok(NpsCategory::Passive) => Some("passive"),
                Ok(NpsCategory::Promoter) => Some("promoter"),
                _ => None,
            };
            if let Some(c) = category {
                properties.insert("category".into(), c.into());
            }
            let satisfaction = match Satisfaction::try_from(a.satisfaction) {
                Ok(Satisfaction::Unsatisfied) => Some("unsatisfied"),
                Ok(Satisfaction::Neutral) => Some("neutral"),
                Ok(Satisfaction::Satisfied) => Some("satisfied"),
                _ => None,
            };
            if let Some(s) = satisfaction {
                properties.insert("satisfaction".into(), s.into());
            }
            if !a.choices.is_empty() {
                properties.insert("choices".into(), a.choices.join(","));
            }
            Some(cpb::Touchpoint {
                name: String::new(),
                customer: m.customer.clone(),
                event_id: format!("{}#{}", m.response, a.question),
                r#type: cpb::TouchpointType::SurveyAnswer as i32,
                occurred_time: m.completed_time,
                properties,
                ..Default::default()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_customer_message_becomes_facts() {
        let c = cpb::Customer {
            name: "customers/1".into(),
            email: "a@b.c".into(),
            stage: cpb::Stage::Retention as i32,
            stage_change_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            demographics: Some(cpb::Demographics {
                occupation: "engineer".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let f = profile_facts(&c);
        assert_eq!(f.email.as_deref(), Some("a@b.c"));
        assert_eq!(f.stage.map(|s| s.0), Some(Stage::Retention));
        assert_eq!(f.demographics.occupation.as_deref(), Some("engineer"));
        assert!(f.display_name.is_none());
        assert_eq!(bare_id(&c.name).as_deref(), Some("1"));
        for s in [Stage::Approach, Stage::Loyalty, Stage::Churned] {
            assert_eq!(stage("s", stage_to_proto(s) as i32), Ok(s));
        }
        assert!(stage("s", 0).is_err());
    }
}
