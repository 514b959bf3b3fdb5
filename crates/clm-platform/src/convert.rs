//! Conversions between proto well-known types and domain types that every
//! service needs, with errors naming the field.

use chrono::{DateTime, Utc};
use clm_domain::Violation;

/// `DateTime` → `google.protobuf.Timestamp`.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// `google.protobuf.Timestamp` → `DateTime`, or a violation of `field`.
pub fn from_timestamp(field: &str, t: &prost_types::Timestamp) -> Result<DateTime<Utc>, Violation> {
    u32::try_from(t.nanos)
        .ok()
        .and_then(|n| DateTime::from_timestamp(t.seconds, n))
        .ok_or_else(|| Violation::new(field, "is not a valid timestamp"))
}

/// A required timestamp.
pub fn required_timestamp(
    field: &str,
    t: Option<&prost_types::Timestamp>,
) -> Result<DateTime<Utc>, Violation> {
    from_timestamp(
        field,
        t.ok_or_else(|| Violation::new(field, "is required"))?,
    )
}

/// Milliseconds → `google.protobuf.Duration`.
pub fn duration_from_millis(ms: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// `google.protobuf.Duration` → milliseconds, or a violation of `field`.
pub fn duration_millis(field: &str, d: &prost_types::Duration) -> Result<i64, Violation> {
    if d.nanos.abs() >= 1_000_000_000
        || (d.seconds > 0 && d.nanos < 0)
        || (d.seconds < 0 && d.nanos > 0)
    {
        return Err(Violation::new(field, "is not a valid duration"));
    }
    d.seconds
        .checked_mul(1000)
        .and_then(|s| s.checked_add(i64::from(d.nanos) / 1_000_000))
        .ok_or_else(|| Violation::new(field, "is out of range"))
}

/// Parses an RFC 3339 time written in a filter or a token.
pub fn parse_rfc3339(field: &str, s: &str) -> Result<DateTime<Utc>, Violation> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| Violation::new(field, format!("{s:?} is not an RFC 3339 time")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let t = DateTime::from_timestamp(1_700_000_000, 123_000_000).expect("valid");
        assert_eq!(from_timestamp("t", &timestamp(t)), Ok(t));
        assert_eq!(duration_millis("d", &duration_from_millis(1500)), Ok(1500));
        assert!(
            from_timestamp(
                "t",
                &prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1
                }
            )
            .is_err()
        );
        assert_eq!(required_timestamp("x.t", None).unwrap_err().field, "x.t");
    }
}
