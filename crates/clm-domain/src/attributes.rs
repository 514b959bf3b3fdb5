//! Typed custom attributes.

use crate::Violation;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most attributes one customer may carry.
pub const MAX_ATTRIBUTES: usize = 100;
/// Longest string attribute value, in characters.
pub const MAX_STRING_LEN: usize = 4096;

/// One attribute value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AttributeValue {
    /// A string.
    String(String),
    /// A finite number.
    Number(f64),
    /// A boolean.
    Bool(bool),
    /// A point in time.
    Timestamp(DateTime<Utc>),
}

/// Attributes by key, sorted.
pub type Attributes = BTreeMap<String, AttributeValue>;

/// Checks a key: 1..64 characters of `[a-z0-9_]`, starting with a letter.
pub fn key(field: &str, key: &str) -> Result<String, Violation> {
    let ok = !key.is_empty()
        && key.len() <= 64
        && key.starts_with(|c: char| c.is_ascii_lowercase())
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(key.to_owned())
    } else {
        Err(Violation::new(
            field,
            format!(
                "attribute key {} must be 1..64 characters of [a-z0-9_], starting with a letter",
                crate::validation::echo(key)
            ),
        ))
    }
}

/// Checks a value.
pub fn value(field: &str, v: AttributeValue) -> Result<AttributeValue, Violation> {
    match &v {
        AttributeValue::Number(n) if !n.is_finite() => {
            Err(Violation::new(field, "must be a finite number"))
        }
        AttributeValue::String(s) if s.contains('\0') => {
            Err(Violation::new(field, "must not contain NUL characters"))
        }
        AttributeValue::String(s) if s.chars().count() > MAX_STRING_LEN => Err(Violation::new(
            field,
            format!("must be at most {MAX_STRING_LEN} characters"),
        )),
        _ => Ok(v),
    }
}

/// Checks the size of a whole attribute map.
pub fn count(field: &str, n: usize) -> Result<(), Violation> {
    if n > MAX_ATTRIBUTES {
        return Err(Violation::new(
            field,
            format!("at most {MAX_ATTRIBUTES} attributes per customer"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert!(key("a", "plan").is_ok());
        assert!(key("a", "seat_count2").is_ok());
        assert!(key("a", "Plan").is_err());
        assert!(key("a", "2plan").is_err());
        assert!(key("a", "").is_err());
    }

    #[test]
    fn values() {
        assert!(value("v", AttributeValue::Number(f64::NAN)).is_err());
        assert!(value("v", AttributeValue::Number(1.5)).is_ok());
        assert!(value("v", AttributeValue::String("a\0b".into())).is_err());
        assert!(count("attributes", 101).is_err());
    }
}
