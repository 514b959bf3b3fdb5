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

/// How a merge picks an attribute value present on several profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MergePolicy {
    /// The survivor's value when it has one, else the newest duplicate's.
    #[default]
    SurvivorWins,
    /// The value of the most recently updated profile that has one.
    NewestWins,
    /// The survivor's value unless empty (absent or an empty string), else
    /// the newest non-empty duplicate value.
    KeepNonEmpty,
}

fn is_empty(v: &AttributeValue) -> bool {
    matches!(v, AttributeValue::String(s) if s.is_empty())
}

/// Merges attribute sets: `survivor` first, then `others` newest first
/// (each with when its profile was last updated), picking per key with the
/// policy `policy_of(key)`.
pub fn merge(
    survivor: (&Attributes, DateTime<Utc>),
    others: &[(&Attributes, DateTime<Utc>)],
    policy_of: impl Fn(&str) -> MergePolicy,
) -> Attributes {
    let mut keys: Vec<&String> = survivor
        .0
        .keys()
        .chain(others.iter().flat_map(|o| o.0.keys()))
        .collect();
    keys.sort();
    keys.dedup();
    let mut out = Attributes::new();
    for k in keys {
        let mut newest_first: Vec<(&AttributeValue, DateTime<Utc>)> = others
            .iter()
            .filter_map(|(a, t)| a.get(k).map(|v| (v, *t)))
            .collect();
        newest_first.sort_by_key(|v| std::cmp::Reverse(v.1));
        let own = survivor.0.get(k);
        let pick = match policy_of(k) {
            MergePolicy::SurvivorWins => own.or(newest_first.first().map(|v| v.0)),
            MergePolicy::NewestWins => {
                let mut all = newest_first.clone();
                if let Some(v) = own {
                    all.push((v, survivor.1));
                }
                all.sort_by_key(|v| std::cmp::Reverse(v.1));
                all.first().map(|v| v.0)
            }
            MergePolicy::KeepNonEmpty => own
                .filter(|v| !is_empty(v))
                .or(newest_first.iter().map(|v| v.0).find(|v| !is_empty(v)))
                .or(own),
        };
        if let Some(v) = pick {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_policies_pick_per_key() {
        let t = |h: i64| DateTime::<Utc>::from_timestamp(h * 3600, 0).unwrap();
        let s = |v: &str| AttributeValue::String(v.into());
        let survivor: Attributes = [("plan".into(), s("free")), ("nick".into(), s(""))].into();
        let old: Attributes = [("plan".into(), s("pro")), ("city".into(), s("Oslo"))].into();
        let new: Attributes = [("plan".into(), s("team")), ("nick".into(), s("Ada"))].into();
        let others = [(&new, t(3)), (&old, t(1))];
        let merged = merge((&survivor, t(2)), &others, |_| MergePolicy::SurvivorWins);
        assert_eq!(merged["plan"], s("free"));
        assert_eq!(merged["nick"], s(""));
        assert_eq!(merged["city"], s("Oslo"));
        let merged = merge((&survivor, t(2)), &others, |_| MergePolicy::NewestWins);
        assert_eq!(merged["plan"], s("team"));
        assert_eq!(merged["nick"], s("Ada"));
        let merged = merge((&survivor, t(2)), &others, |k| {
            if k == "nick" {
                MergePolicy::KeepNonEmpty
            } else {
                MergePolicy::SurvivorWins
            }
        });
        assert_eq!(merged["nick"], s("Ada"));
        assert_eq!(merged["plan"], s("free"));
    }

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
