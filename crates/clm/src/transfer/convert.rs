//! An import row → the public API's messages. Only what the file must get
//! right to be sent is checked here (dates, numbers, enum names); the
//! service checks the rest and names the field, and its answer becomes the
//! row's reason in the rejects file.

use super::rows::Row;
use chrono::{DateTime, NaiveDate, Utc};
use clm_proto::clm::common::v1::{Date, Money};
use clm_proto::clm::customer::v1::{
    AttributeValue, CreateCustomerRequest, Customer, CustomerIdentifier, Demographics, Gender,
    IdentifierType, Touchpoint, TouchpointType, attribute_value,
};
use prost_types::{Duration, Timestamp};
use serde_json::Value;

/// The fields a customers file may name (besides `attributes.<key>`).
const CUSTOMER_FIELDS: &[&str] = &[
    "email",
    "external_id",
    "display_name",
    "birth_date",
    "gender",
    "occupation",
    "annual_income_minor",
    "annual_income_currency",
    "acquisition_campaign",
];

/// The fields a touchpoints file may name (besides `properties.<key>`).
const TOUCHPOINT_FIELDS: &[&str] = &[
    "customer",
    "email",
    "external_id",
    "phone",
    "event_id",
    "type",
    "custom_type",
    "occurred_time",
    "usage_seconds",
    "product",
    "feature",
    "revenue_minor",
    "currency",
    "campaign",
    "channel",
];

pub fn is_customer_field(f: &str) -> bool {
    CUSTOMER_FIELDS.contains(&f) || f.strip_prefix("attributes.").is_some_and(|k| !k.is_empty())
}

pub fn is_touchpoint_field(f: &str) -> bool {
    TOUCHPOINT_FIELDS.contains(&f) || f.strip_prefix("properties.").is_some_and(|k| !k.is_empty())
}

/// The creation a customers row asks for.
pub fn customer(row: &Row) -> Result<CreateCustomerRequest, String> {
    let birth_date = row
        .text("birth_date")
        .map(|d| {
            NaiveDate::parse_from_str(&d, "%Y-%m-%d")
                .map(|d| {
                    use chrono::Datelike;
                    Date {
                        year: d.year(),
                        month: d.month() as i32,
                        day: d.day() as i32,
                    }
                })
                .map_err(|_| format!("birth_date: {d:?} is not a date (YYYY-MM-DD)"))
        })
        .transpose()?;
    let gender = row.text("gender").map(|g| gender(&g)).transpose()?;
    let annual_income = match (
        row.text("annual_income_minor"),
        row.text("annual_income_currency"),
    ) {
        (None, None) => None,
        (Some(amount), Some(currency)) => Some(Money {
            currency_code: currency,
            amount_minor: integer("annual_income_minor", &amount)?,
        }),
        _ => {
            return Err("annual_income_minor and annual_income_currency go together".to_owned());
        }
    };
    let occupation = row.text("occupation");
    let demographics = (birth_date.is_some()
        || gender.is_some()
        || annual_income.is_some()
        || occupation.is_some())
    .then(|| Demographics {
        birth_date,
        gender: gender.unwrap_or(Gender::Unspecified) as i32,
        annual_income,
        occupation: occupation.unwrap_or_default(),
        age: 0,
    });
    let attributes = row
        .fields
        .iter()
        .filter_map(|(f, v)| Some((f.strip_prefix("attributes.")?, v)))
        .filter_map(|(k, v)| attribute(v).map(|a| (k.to_owned(), a)))
        .collect();
    Ok(CreateCustomerRequest {
        customer: Some(Customer {
            email: row.text("email").unwrap_or_default(),
            external_id: row.text("external_id").unwrap_or_default(),
            display_name: row.text("display_name").unwrap_or_default(),
            acquisition_campaign: row.text("acquisition_campaign").unwrap_or_default(),
            demographics,
            attributes,
            ..Default::default()
        }),
        request_id: String::new(),
    })
}

/// A JSON value as a custom attribute: numbers and booleans keep their
/// type (JSON Lines), text stays text (every CSV value); empty is no value.
fn attribute(v: &Value) -> Option<AttributeValue> {
    let value = match v {
        Value::Null => return None,
        Value::String(s) if s.is_empty() => return None,
        Value::String(s) => attribute_value::Value::StringValue(s.clone()),
        Value::Number(n) => attribute_value::Value::NumberValue(n.as_f64()?),
        Value::Bool(b) => attribute_value::Value::BoolValue(*b),
        other => attribute_value::Value::StringValue(other.to_string()),
    };
    Some(AttributeValue { value: Some(value) })
}

fn gender(g: &str) -> Result<Gender, String> {
    let name = g.trim().to_ascii_uppercase().replace(['-', ' '], "_");
    let name = name.strip_prefix("GENDER_").unwrap_or(&name).to_owned();
    Gender::from_str_name(&format!("GENDER_{name}"))
        .filter(|g| *g != Gender::Unspecified)
        .ok_or_else(|| format!("gender: {g:?} is not female, male, non_binary or other"))
}

fn integer(field: &str, text: &str) -> Result<i64, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("{field}: {text:?} is not a whole number"))
}

/// How a touchpoints row names its customer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CustomerRef {
    /// `customers/{id}` (a bare id is given the prefix).
    Name(String),
    /// An identifier the customer service resolves (BatchLookupCustomers).
    Identifier(IdentifierType, String),
}

impl CustomerRef {
    pub fn identifier(&self) -> Option<CustomerIdentifier> {
        match self {
            CustomerRef::Name(_) => None,
            CustomerRef::Identifier(kind, value) => Some(CustomerIdentifier {
                r#type: *kind as i32,
                value: value.clone(),
                ..Default::default()
            }),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            CustomerRef::Name(n) => n.clone(),
            CustomerRef::Identifier(kind, value) => {
                let kind = match kind {
                    IdentifierType::Email => "email",
                    IdentifierType::Phone => "phone",
                    _ => "external_id",
                };
                format!("{kind} {value:?}")
            }
        }
    }
}

/// The touchpoint a row records (without its customer, resolved per batch)
/// and how it names the customer. `derived_event_id` is used when the row
/// has no `event_id`.
pub fn touchpoint(
    row: &Row,
    derived_event_id: String,
) -> Result<(CustomerRef, Touchpoint), String> {
    let who = if let Some(c) = row.text("customer") {
        CustomerRef::Name(if c.starts_with("customers/") {
            c
        } else {
            format!("customers/{c}")
        })
    } else if let Some(e) = row.text("email") {
        CustomerRef::Identifier(IdentifierType::Email, e)
    } else if let Some(x) = row.text("external_id") {
        CustomerRef::Identifier(IdentifierType::ExternalId, x)
    } else if let Some(p) = row.text("phone") {
        CustomerRef::Identifier(IdentifierType::Phone, p)
    } else {
        return Err("names no customer (customer, email, external_id or phone)".into());
    };
    let kind = row.text("type").ok_or("type: is required")?;
    let name = kind.trim().to_ascii_uppercase();
    let name = name
        .strip_prefix("TOUCHPOINT_TYPE_")
        .unwrap_or(&name)
        .to_owned();
    let kind = TouchpointType::from_str_name(&format!("TOUCHPOINT_TYPE_{name}"))
        .filter(|t| *t != TouchpointType::Unspecified)
        .ok_or_else(|| format!("type: {kind:?} is not a touchpoint type"))?;
    let occurred = row
        .text("occurred_time")
        .ok_or("occurred_time: is required")?;
    let occurred = DateTime::parse_from_rfc3339(&occurred)
        .map_err(|_| format!("occurred_time: {occurred:?} is not an RFC 3339 time"))?
        .with_timezone(&Utc);
    let revenue = match (row.text("revenue_minor"), row.text("currency")) {
        (None, None) => None,
        (Some(amount), Some(currency)) => Some(Money {
            currency_code: currency,
            amount_minor: integer("revenue_minor", &amount)?,
        }),
        _ => return Err("revenue_minor and currency go together".into()),
    };
    let usage_duration = row
        .text("usage_seconds")
        .map(|s| integer("usage_seconds", &s))
        .transpose()?
        .map(|seconds| Duration { seconds, nanos: 0 });
    let properties: std::collections::BTreeMap<String, String> = row
        .fields
        .iter()
        .filter_map(|(f, v)| Some((f.strip_prefix("properties.")?.to_owned(), v)))
        .filter_map(|(k, v)| match v {
            Value::Null => None,
            Value::String(s) => Some((k, s.clone())),
            other => Some((k, other.to_string())),
        })
        .collect();
    Ok((
        who,
        Touchpoint {
            event_id: row.text("event_id").unwrap_or(derived_event_id),
            r#type: kind as i32,
            custom_type: row.text("custom_type").unwrap_or_default(),
            occurred_time: Some(Timestamp {
                seconds: occurred.timestamp(),
                nanos: occurred.timestamp_subsec_nanos() as i32,
            }),
            usage_duration,
            product: row.text("product").unwrap_or_default(),
            feature: row.text("feature").unwrap_or_default(),
            revenue,
            campaign: row.text("campaign").unwrap_or_default(),
            channel: row.text("channel").unwrap_or_default(),
            properties,
            ..Default::default()
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn row(pairs: &[(&str, Value)]) -> Row {
        Row {
            number: 1,
            fields: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
            original: String::new(),
            end_offset: 0,
        }
    }

    #[test]
    fn a_customer_row_becomes_a_creation_with_typed_attributes() {
        let r = row(&[
            ("email", "ada@example.com".into()),
            ("birth_date", "1990-12-10".into()),
            ("gender", "non-binary".into()),
            ("attributes.plan", "pro".into()),
            ("attributes.seats", 12.into()),
            ("attributes.empty", "".into()),
        ]);
        let c = customer(&r).expect("valid").customer.expect("customer");
        assert_eq!(c.email, "ada@example.com");
        let d = c.demographics.expect("demographics");
        assert_eq!(d.gender, Gender::NonBinary as i32);
        assert_eq!(
            d.birth_date.map(|d| (d.year, d.month, d.day)),
            Some((1990, 12, 10))
        );
        assert_eq!(
            c.attributes["seats"].value,
            Some(attribute_value::Value::NumberValue(12.0))
        );
        assert!(!c.attributes.contains_key("empty"));
    }

    #[test]
    fn bad_dates_and_genders_are_reasons() {
        let e = customer(&row(&[("birth_date", "10/12/1990".into())])).expect_err("date");
        assert!(e.starts_with("birth_date"));
        let e = customer(&row(&[("gender", "x".into())])).expect_err("gender");
        assert!(e.starts_with("gender"));
    }

    #[test]
    fn a_touchpoint_row_names_its_customer_by_identifier_or_name() {
        let r = row(&[
            ("email", "ada@example.com".into()),
            ("type", "purchase".into()),
            ("occurred_time", "2026-01-05T10:00:00Z".into()),
            ("revenue_minor", "4999".into()),
            ("currency", "EUR".into()),
        ]);
        let (who, t) = touchpoint(&r, "derived".into()).expect("valid");
        assert_eq!(
            who,
            CustomerRef::Identifier(IdentifierType::Email, "ada@example.com".into())
        );
        assert_eq!(t.r#type, TouchpointType::Purchase as i32);
        assert_eq!(t.event_id, "derived");
        assert_eq!(t.revenue.map(|m| m.amount_minor), Some(4999));
        let r = row(&[
            ("customer", "0190".into()),
            ("type", "TOUCHPOINT_TYPE_FEATURE_USE".into()),
            ("occurred_time", "2026-01-05T10:00:00+01:00".into()),
            ("event_id", "e-1".into()),
        ]);
        let (who, t) = touchpoint(&r, "derived".into()).expect("valid");
        assert_eq!(who, CustomerRef::Name("customers/0190".into()));
        assert_eq!(t.event_id, "e-1");
        assert_eq!(t.occurred_time.map(|t| t.seconds), Some(1_767_603_600));
        let e = touchpoint(
            &row(&[("email", "a@b.c".into()), ("type", "visit".into())]),
            String::new(),
        );
        assert!(e.expect_err("type").starts_with("type"));
    }
}
