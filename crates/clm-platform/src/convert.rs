//! Conversions between proto well-known types and domain types that every
//! service needs, with errors naming the field.
//!
//! Times come in as `google.protobuf.Timestamp` or RFC 3339 text and are
//! refused outside the range a Timestamp may hold (0001-01-01T00:00:00Z to
//! 9999-12-31T23:59:59.999999999Z: JSON clients cannot print anything
//! else), and truncated to microseconds, the precision they are stored
//! with, so what a write answers is what a read answers.

use chrono::{DateTime, Utc};
use clm_domain::Violation;
use clm_domain::validation::echo;

/// `0001-01-01T00:00:00Z`, the earliest `google.protobuf.Timestamp`.
pub const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
/// `9999-12-31T23:59:59Z`, the latest whole second of a `google.protobuf.Timestamp`.
pub const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// A time as stored (whole microseconds), if a `google.protobuf.Timestamp`
/// can hold it; the violation names `field`.
pub fn check_time(field: &str, t: DateTime<Utc>) -> Result<DateTime<Utc>, Violation> {
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&t.timestamp()) {
        return Err(out_of_range(field));
    }
    Ok(clm_domain::clock::micros(t))
}

fn out_of_range(field: &str) -> Violation {
    Violation::new(
        field,
        "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z",
    )
}

/// `DateTime` → `google.protobuf.Timestamp`.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// `google.protobuf.Timestamp` → `DateTime` truncated to microseconds, or
/// a violation of `field` (nanos outside 0..1e9, or outside the range of
/// a Timestamp).
pub fn from_timestamp(field: &str, t: &prost_types::Timestamp) -> Result<DateTime<Utc>, Violation> {
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&t.seconds) {
        return Err(out_of_range(field));
    }
    let time = u32::try_from(t.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .and_then(|n| DateTime::from_timestamp(t.seconds, n))
        .ok_or_else(|| Violation::new(field, "is not a valid timestamp"))?;
    check_time(field, time)
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

/// Parses an RFC 3339 time written in a filter or a token (within the range
/// of a Timestamp, truncated to microseconds).
pub fn parse_rfc3339(field: &str, s: &str) -> Result<DateTime<Utc>, Violation> {
    let t = DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| Violation::new(field, format!("{} is not an RFC 3339 time", echo(s))))?;
    check_time(field, t)
}

/// Checks the `event_types` of a change-stream filter: each must be the
/// full name of an event message (declared in an `events.proto`, e.g.
/// `clm.customer.v1.CustomerCreated`); a name that matches nothing would
/// stream nothing, forever. Violations name `{field}[i]`.
pub fn event_types(field: &str, types: &[String]) -> Result<(), clm_domain::Violations> {
    let mut v = clm_domain::Violations::new();
    for (i, t) in types.iter().enumerate() {
        if clm_proto::event_types::is_event_type(t) {
            continue;
        }
        let why = if clm_proto::event_types::is_message(t) {
            format!("{} is a message but not an event type", echo(t))
        } else {
            format!(
                "{} is not an event type: use a full name such as clm.customer.v1.CustomerCreated",
                echo(t)
            )
        };
        v.push(Violation::new(format!("{field}[{i}]"), why));
    }
    v.into_result()
}

/// The etag of a resource at `version` (a quoted number, as in HTTP).
pub fn etag(version: i64) -> String {
    format!("\"{version}\"")
}

/// Checks the etag a caller `sent` against the resource's current version:
/// empty means "no check"; any other mismatch is `ABORTED` (re-read and retry).
pub fn check_etag(sent: &str, current_version: i64) -> Result<(), crate::Error> {
    let current = etag(current_version);
    if sent.is_empty() || sent == current {
        return Ok(());
    }
    Err(crate::Error::Aborted(format!(
        "etag {} is stale (current {current}); re-read and retry",
        echo(sent)
    )))
}

/// A JSON value as a `google.protobuf.Value` (numbers become doubles, as
/// proto3 JSON has it).
pub fn json_to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map
                .into_iter()
                .map(|(k, v)| (k, json_to_value(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
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

    #[test]
    fn times_outside_a_timestamp_are_refused() {
        let ts = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        assert!(from_timestamp("t", &ts(MIN_TIMESTAMP_SECONDS, 0)).is_ok());
        assert!(from_timestamp("t", &ts(MAX_TIMESTAMP_SECONDS, 999_999_999)).is_ok());
        for bad in [
            ts(MIN_TIMESTAMP_SECONDS - 1, 999_999_999),
            ts(MAX_TIMESTAMP_SECONDS + 1, 0),
            ts(i64::MAX, 0),
            ts(i64::MIN, 0),
            ts(0, 1_000_000_000),
        ] {
            assert_eq!(
                from_timestamp("x.t", &bad).unwrap_err().field,
                "x.t",
                "{bad:?}"
            );
        }
        assert!(parse_rfc3339("filter", "0001-01-01T00:00:00Z").is_ok());
        assert!(parse_rfc3339("filter", "0000-12-31T23:59:59Z").is_err());
        assert!(parse_rfc3339("filter", "9999-12-31T23:59:59-01:00").is_err());
    }

    #[test]
    fn event_type_filters_name_known_events() {
        assert!(event_types("event_types", &[]).is_ok());
        assert!(event_types("event_types", &["clm.customer.v1.CustomerCreated".into()]).is_ok());
        let e = event_types(
            "event_types",
            &[
                "clm.customer.v1.CustomerCreated".into(),
                "clm.customer.v1.Nope".into(),
                "clm.customer.v1.Customer".into(),
            ],
        )
        .unwrap_err();
        let fields: Vec<&str> = e.0.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["event_types[1]", "event_types[2]"]);
        assert!(e.0[1].description.contains("not an event"), "{}", e.0[1]);
    }

    #[test]
    fn etags() {
        assert_eq!(etag(3), "\"3\"");
        assert!(check_etag("", 3).is_ok());
        assert!(check_etag("\"3\"", 3).is_ok());
        assert!(matches!(
            check_etag("\"2\"", 3),
            Err(crate::Error::Aborted(_))
        ));
    }

    #[test]
    fn times_are_truncated_to_what_is_stored() {
        let t = from_timestamp(
            "t",
            &prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_456_789,
            },
        )
        .expect("valid");
        assert_eq!(t.timestamp_subsec_nanos(), 123_456_000);
        let before_epoch = from_timestamp(
            "t",
            &prost_types::Timestamp {
                seconds: -1,
                nanos: 999_999_999,
            },
        )
        .expect("valid");
        assert_eq!(crate::db::to_micros(before_epoch), -1);
        assert_eq!(
            parse_rfc3339("f", "2026-01-01T00:00:00.123456789Z")
                .expect("valid")
                .timestamp_subsec_nanos(),
            123_456_000
        );
    }
}
