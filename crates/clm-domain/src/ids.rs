//! Resource ids and names (`customers/{id}`).

use crate::Violation;

/// Re-exported so ids declared with [`resource_id!`] outside this crate
/// need no `uuid` dependency of their own.
pub use uuid::Uuid;

/// Declares a resource id: a UUIDv7 newtype (ids sort roughly by creation
/// time) named `{collection}/{uuid}`, with `new`, `parse_name`, `parse_id`,
/// `name`, `Display` (the bare UUID) and `Default` (a new id). Every
/// resource of every service declares its id this way, once:
///
/// ```
/// clm_domain::resource_id!(
///     /// Id of a segment.
///     SegmentId, "segments", "segment"
/// );
/// let id = SegmentId::new();
/// assert_eq!(SegmentId::parse_name("name", &id.name()), Ok(id));
/// assert!(SegmentId::parse_name("name", "customers/1").is_err());
/// ```
#[macro_export]
macro_rules! resource_id {
    ($(#[$meta:meta])* $name:ident, $collection:literal, $noun:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub $crate::ids::Uuid);

        impl $name {
            /// Collection segment of the resource name.
            pub const COLLECTION: &'static str = $collection;

            /// A new, time-ordered id.
            pub fn new() -> Self {
                Self($crate::ids::Uuid::now_v7())
            }

            #[doc = concat!("Parses a resource name `", $collection, "/{uuid}`; `field` names the request field.")]
            pub fn parse_name(field: &str, name: &str) -> Result<Self, $crate::Violation> {
                let rest = name
                    .strip_prefix(concat!($collection, "/"))
                    .ok_or_else(|| $crate::Violation::new(field, Self::EXPECTED))?;
                Self::parse_id(field, rest)
            }

            /// Parses the bare id.
            pub fn parse_id(field: &str, id: &str) -> Result<Self, $crate::Violation> {
                $crate::ids::Uuid::parse_str(id)
                    .map(Self)
                    .map_err(|_| $crate::Violation::new(field, Self::EXPECTED))
            }

            #[doc = concat!("The resource name, `", $collection, "/{uuid}`.")]
            pub fn name(&self) -> String {
                format!(concat!($collection, "/{}"), self.0)
            }

            const EXPECTED: &'static str = concat!(
                "must be a ", $noun, " name like ", $collection, "/{id} with a UUID id"
            );
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

resource_id!(
    /// Id of a customer: `customers/{uuid}`.
    CustomerId,
    "customers",
    "customer"
);

resource_id!(
    /// Id of a marketing campaign: `campaigns/{uuid}`.
    CampaignId,
    "campaigns",
    "campaign"
);

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
