//! Resource ids and names (`customers/{id}`).

use crate::Violation;
use std::fmt;
use uuid::Uuid;

/// Id of a customer: a UUIDv7, so ids sort roughly by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CustomerId(pub Uuid);

impl CustomerId {
    /// Collection segment of the resource name.
    pub const COLLECTION: &'static str = "customers";

    /// A new, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses a resource name `customers/{uuid}`; `field` names the request field.
    pub fn parse_name(field: &str, name: &str) -> Result<Self, Violation> {
        let rest = name
            .strip_prefix("customers/")
            .ok_or_else(|| Violation::new(field, "must be a customer name like customers/{id}"))?;
        Self::parse_id(field, rest)
    }

    /// Parses the bare id.
    pub fn parse_id(field: &str, id: &str) -> Result<Self, Violation> {
        Uuid::parse_str(id).map(Self).map_err(|_| {
            Violation::new(
                field,
                "must be a customer name like customers/{id} with a UUID id",
            )
        })
    }

    /// The resource name, `customers/{id}`.
    pub fn name(&self) -> String {
        format!("customers/{}", self.0)
    }
}

impl Default for CustomerId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for CustomerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Checks a caller-chosen event id: 1..=128 visible ASCII characters.
pub fn event_id(field: &str, value: &str) -> Result<String, Violation> {
    if value.is_empty() {
        return Err(Violation::new(field, "is required"));
    }
    if value.len() > 128 || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Violation::new(
            field,
            "must be 1..128 visible ASCII characters",
        ));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_round_trip() {
        let id = CustomerId::new();
        assert_eq!(CustomerId::parse_name("name", &id.name()), Ok(id));
    }

    #[test]
    fn bad_names_name_the_field() {
        assert_eq!(
            CustomerId::parse_name("name", "users/1").unwrap_err().field,
            "name"
        );
        assert_eq!(
            CustomerId::parse_name("parent", "customers/xyz")
                .unwrap_err()
                .field,
            "parent"
        );
    }
}
