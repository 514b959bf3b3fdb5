//! Contact details and identifiers: e-mail addresses, phone numbers
//! (E.164), external ids per source system (`crm:123`).

use crate::Violation;
use crate::validation::{echo, optional_text};

/// Checks and normalises an e-mail address (trimmed, lower-cased); empty = none.
///
/// Deliberately pragmatic, not RFC 5322: one `@`, a non-empty local part
/// without spaces, a domain with a dot and no empty labels, at most 254 bytes.
pub fn email(field: &str, value: &str) -> Result<Option<String>, Violation> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let bad = || Violation::new(field, format!("{} is not a valid e-mail address", echo(v)));
    if v.len() > 254 || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let (local, domain) = v.split_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || domain.contains('@')
        || !domain.contains('.')
        || domain.split('.').any(str::is_empty)
    {
        return Err(bad());
    }
    Ok(Some(v.to_lowercase()))
}

/// Checks an external id (up to 200 characters; empty = none).
pub fn external_id(field: &str, value: &str) -> Result<Option<String>, Violation> {
    optional_text(field, value, 200)
}

/// Checks and normalises a phone number to E.164 (`+` and 7..15 digits,
/// the first not 0).
///
/// Spaces, dots, dashes and parentheses are dropped; an international
/// `00` prefix becomes `+`. A number without its country code cannot be
/// normalised (there is no default region) and is refused, as is anything
/// with letters or other signs.
pub fn phone(field: &str, value: &str) -> Result<String, Violation> {
    let v = value.trim();
    if v.is_empty() {
        return Err(Violation::new(field, "is required"));
    }
    let bad = |why: &str| Violation::new(field, format!("{} {why}", echo(v)));
    let rest = if let Some(r) = v.strip_prefix('+') {
        r
    } else if let Some(r) = v.strip_prefix("00") {
        r
    } else {
        return Err(bad(
            "needs its country code (+ or 00 first) to be normalised to E.164",
        ));
    };
    let mut digits = String::with_capacity(15);
    for c in rest.chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '-' | '.' | '(' | ')' => {}
            _ => return Err(bad("is not a phone number")),
        }
    }
    if !(7..=15).contains(&digits.len()) || digits.starts_with('0') {
        return Err(bad("is not a valid E.164 phone number (7..15 digits)"));
    }
    Ok(format!("+{digits}"))
}

/// Checks and normalises an external id of a source system, `source:id`:
/// a source of 1..32 characters of `[a-z0-9_.-]` (lower-cased), a colon, and
/// an id of 1..200 visible characters (kept as is: ids may be case-sensitive).
pub fn external_ref(field: &str, value: &str) -> Result<String, Violation> {
    let v = value.trim();
    if v.is_empty() {
        return Err(Violation::new(field, "is required"));
    }
    let bad = || {
        Violation::new(
            field,
            format!(
                "{} must be `source:id` (source: 1..32 of [a-z0-9_.-], id: 1..200 characters)",
                echo(v)
            ),
        )
    };
    let (source, id) = v.split_once(':').ok_or_else(bad)?;
    let source = source.to_ascii_lowercase();
    if source.is_empty()
        || source.len() > 32
        || !source
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        || id.is_empty()
        || id.chars().count() > 200
        || id.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(bad());
    }
    Ok(format!("{source}:{id}"))
}

/// The identifier key of a profile's `external_id` (or of a looked-up
/// external id): normalised as [`external_ref`] when it has that form,
/// otherwise kept as given (trimmed), so a profile id without a source still
/// has one holder and can be looked up.
pub fn external_key(value: &str) -> String {
    external_ref("", value).unwrap_or_else(|_| value.trim().to_owned())
}

/// What kind of identifier a value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentifierKind {
    /// An e-mail address (lower-cased).
    Email,
    /// A phone number (E.164).
    Phone,
    /// An id in another system (`source:id`).
    External,
}

impl IdentifierKind {
    /// Stable storage code.
    pub fn code(self) -> i16 {
        match self {
            Self::Email => 1,
            Self::Phone => 2,
            Self::External => 3,
        }
    }

    /// The kind of a storage code.
    pub fn from_code(code: i16) -> Option<Self> {
        [Self::Email, Self::Phone, Self::External]
            .into_iter()
            .find(|k| k.code() == code)
    }
}

/// A normalised identifier: the same person always gives the same value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identifier {
    /// Its kind.
    pub kind: IdentifierKind,
    /// Its normalised value.
    pub value: String,
}

/// Checks and normalises an identifier of `kind` (violations name `field`).
pub fn identifier(field: &str, kind: IdentifierKind, value: &str) -> Result<Identifier, Violation> {
    let value = match kind {
        IdentifierKind::Email => {
            email(field, value)?.ok_or_else(|| Violation::new(field, "is required"))?
        }
        IdentifierKind::Phone => phone(field, value)?,
        IdentifierKind::External => external_ref(field, value)?,
    };
    Ok(Identifier { kind, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_normalise_to_e164() {
        for (raw, want) in [
            ("+49 30 1234567", "+49301234567"),
            ("0049 (30) 123-45.67", "+49301234567"),
            (" +1 415 555 0100 ", "+14155550100"),
        ] {
            assert_eq!(phone("p", raw), Ok(want.to_owned()), "{raw}");
        }
        for bad in [
            "",
            "030 1234567",
            "+49 30 CALL-ME",
            "+0 123 4567",
            "+123",
            "+1234567890123456",
            "+49/301234567",
        ] {
            assert_eq!(phone("phone", bad).unwrap_err().field, "phone", "{bad}");
        }
    }

    #[test]
    fn external_refs_name_their_source() {
        assert_eq!(external_ref("x", "CRM:AbC-1"), Ok("crm:AbC-1".to_owned()));
        assert_eq!(external_ref("x", "shop:abc"), Ok("shop:abc".to_owned()));
        for bad in ["", "abc", ":1", "crm:", "c rm:1", "crm:a b"] {
            assert!(external_ref("x", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn identifiers_normalise_by_kind() {
        assert_eq!(
            identifier("i", IdentifierKind::Email, "Ada@Example.COM")
                .unwrap()
                .value,
            "ada@example.com"
        );
        assert!(identifier("i", IdentifierKind::Email, "").is_err());
        assert_eq!(
            IdentifierKind::from_code(IdentifierKind::Phone.code()),
            Some(IdentifierKind::Phone)
        );
    }

    #[test]
    fn emails() {
        assert_eq!(
            email("e", " Ada@Example.COM "),
            Ok(Some("ada@example.com".into()))
        );
        assert_eq!(email("e", ""), Ok(None));
        for bad in [
            "ada", "ada@", "@x.com", "a@b", "a@b..c", "a b@c.d", "a@b@c.d",
        ] {
            assert_eq!(
                email("customer.email", bad).unwrap_err().field,
                "customer.email",
                "{bad}"
            );
        }
    }
}
