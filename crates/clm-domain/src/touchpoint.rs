//! Touchpoints: what a customer did or was sent.

use crate::{Violation, Violations, money::Money};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

/// Most touchpoints in one RecordTouchpoints call.
pub const MAX_BATCH: usize = 1000;
/// How far in the future an `occurred_time` may be (clock skew).
pub const MAX_FUTURE_SKEW: Duration = Duration::minutes(5);
/// Most free-form properties on one touchpoint.
pub const MAX_PROPERTIES: usize = 50;

/// Kind of touchpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TouchpointKind {
    /// Time spent in a product.
    UsageTime,
    /// Opened a product.
    ProductAccess,
    /// Used a feature.
    FeatureUse,
    /// Bought something.
    Purchase,
    /// Reached by a campaign.
    CampaignTouch,
    /// Contacted support.
    SupportContact,
    /// Caller-defined, see `custom_type`.
    Custom,
    /// An answer to a survey question, from the feedback service's stream
    /// (never recorded by callers).
    SurveyAnswer,
}

impl TouchpointKind {
    /// Every kind.
    pub const ALL: [TouchpointKind; 8] = [
        TouchpointKind::UsageTime,
        TouchpointKind::ProductAccess,
        TouchpointKind::FeatureUse,
        TouchpointKind::Purchase,
        TouchpointKind::CampaignTouch,
        TouchpointKind::SupportContact,
        TouchpointKind::Custom,
        TouchpointKind::SurveyAnswer,
    ];

    /// Stable small-integer code for storage.
    pub fn code(self) -> i16 {
        match self {
            TouchpointKind::UsageTime => 1,
            TouchpointKind::ProductAccess => 2,
            TouchpointKind::FeatureUse => 3,
            TouchpointKind::Purchase => 4,
            TouchpointKind::CampaignTouch => 5,
            TouchpointKind::SupportContact => 6,
            TouchpointKind::Custom => 7,
            TouchpointKind::SurveyAnswer => 8,
        }
    }

    /// Inverse of [`TouchpointKind::code`].
    pub fn from_code(code: i16) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }

    /// Upper-case API name (`FEATURE_USE`).
    pub fn as_str(self) -> &'static str {
        match self {
            TouchpointKind::UsageTime => "USAGE_TIME",
            TouchpointKind::ProductAccess => "PRODUCT_ACCESS",
            TouchpointKind::FeatureUse => "FEATURE_USE",
            TouchpointKind::Purchase => "PURCHASE",
            TouchpointKind::CampaignTouch => "CAMPAIGN_TOUCH",
            TouchpointKind::SupportContact => "SUPPORT_CONTACT",
            TouchpointKind::Custom => "CUSTOM",
            TouchpointKind::SurveyAnswer => "SURVEY_ANSWER",
        }
    }

    /// Parses an API name, with or without the `TOUCHPOINT_TYPE_` prefix.
    pub fn parse(field: &str, s: &str) -> Result<Self, Violation> {
        let upper = s.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("TOUCHPOINT_TYPE_").unwrap_or(&upper);
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == bare)
            .ok_or_else(|| {
                Violation::new(
                    field,
                    format!("unknown touchpoint type {}", crate::validation::echo(s)),
                )
            })
    }
}

/// A touchpoint as recorded, already validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touchpoint {
    /// Caller-chosen unique id.
    pub event_id: String,
    /// Kind.
    pub kind: TouchpointKind,
    /// Name of a custom kind.
    pub custom_type: Option<String>,
    /// When it happened.
    pub occurred_time: DateTime<Utc>,
    /// Usage duration in milliseconds (USAGE_TIME).
    pub usage_millis: Option<i64>,
    /// Product.
    pub product: Option<String>,
    /// Feature (FEATURE_USE).
    pub feature: Option<String>,
    /// Revenue (PURCHASE).
    pub revenue: Option<Money>,
    /// Campaign (CAMPAIGN_TOUCH).
    pub campaign: Option<String>,
    /// Channel.
    pub channel: Option<String>,
    /// Free-form properties.
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Touchpoint {
    /// Checks the rules that tie fields to the kind, and the time, against
    /// `now`. Field paths are relative to the touchpoint.
    pub fn check(&self, now: DateTime<Utc>) -> Result<(), Violations> {
        let mut v = Violations::new();
        if self.occurred_time > now + MAX_FUTURE_SKEW {
            v.push(Violation::new(
                "occurred_time",
                "must not be more than 5 minutes in the future",
            ));
        }
        match self.kind {
            TouchpointKind::UsageTime if self.usage_millis.is_none_or(|ms| ms <= 0) => {
                v.push(Violation::new(
                    "usage_duration",
                    "is required and must be positive for USAGE_TIME",
                ));
            }
            TouchpointKind::FeatureUse if self.feature.is_none() => {
                v.push(Violation::new("feature", "is required for FEATURE_USE"));
            }
            TouchpointKind::Purchase if self.revenue.is_none() => {
                v.push(Violation::new("revenue", "is required for PURCHASE"));
            }
            TouchpointKind::CampaignTouch if self.campaign.is_none() => {
                v.push(Violation::new("campaign", "is required for CAMPAIGN_TOUCH"));
            }
            TouchpointKind::Custom => match &self.custom_type {
                None => v.push(Violation::new("custom_type", "is required for CUSTOM")),
                Some(t) if !valid_custom_type(t) => {
                    v.push(Violation::new(
                        "custom_type",
                        "must be 1..64 characters of [a-z0-9_.-]",
                    ));
                }
                Some(_) => {}
            },
            _ => {}
        }
        if self.properties.len() > MAX_PROPERTIES {
            v.push(Violation::new(
                "properties",
                format!("at most {MAX_PROPERTIES} properties"),
            ));
        }
        for (k, val) in &self.properties {
            let ok = !k.is_empty()
                && k.len() <= 64
                && val.chars().count() <= 1024
                && !k.contains('\0')
                && !val.contains('\0');
            if !ok {
                v.push(Violation::new(
                    format!("properties[{}]", crate::validation::echo(k)),
                    "keys are 1..64 bytes and values at most 1,024 characters, without NUL",
                ));
            }
        }
        v.into_result()
    }
}

fn valid_custom_type(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
}

/// Checks a batch size.
pub fn batch_size(field: &str, n: usize) -> Result<(), Violation> {
    if n == 0 {
        return Err(Violation::new(
            field,
            "must contain at least one touchpoint",
        ));
    }
    if n > MAX_BATCH {
        return Err(Violation::new(
            field,
            format!("at most {MAX_BATCH} touchpoints per call, got {n}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(kind: TouchpointKind) -> Touchpoint {
        Touchpoint {
            event_id: "e1".into(),
            kind,
            custom_type: None,
            occurred_time: DateTime::from_timestamp(1_700_000_000, 0).expect("valid"),
            usage_millis: None,
            product: None,
            feature: None,
            revenue: None,
            campaign: None,
            channel: None,
            properties: Default::default(),
        }
    }

    #[test]
    fn kind_specific_fields() {
        let now = Utc::now();
        assert_eq!(
            tp(TouchpointKind::Purchase).check(now).unwrap_err().0[0].field,
            "revenue"
        );
        assert_eq!(
            tp(TouchpointKind::FeatureUse).check(now).unwrap_err().0[0].field,
            "feature"
        );
        assert_eq!(
            tp(TouchpointKind::UsageTime).check(now).unwrap_err().0[0].field,
            "usage_duration"
        );
        assert_eq!(
            tp(TouchpointKind::Custom).check(now).unwrap_err().0[0].field,
            "custom_type"
        );
        assert!(tp(TouchpointKind::SupportContact).check(now).is_ok());
    }

    #[test]
    fn future_is_refused_past_is_fine() {
        let now = Utc::now();
        let mut t = tp(TouchpointKind::ProductAccess);
        t.occurred_time = now + Duration::hours(1);
        assert_eq!(t.check(now).unwrap_err().0[0].field, "occurred_time");
        t.occurred_time = now - Duration::days(400);
        assert!(t.check(now).is_ok());
    }

    #[test]
    fn batch_limits() {
        assert!(batch_size("touchpoints", 1000).is_ok());
        assert!(batch_size("touchpoints", 1001).is_err());
        assert!(batch_size("touchpoints", 0).is_err());
    }
}
