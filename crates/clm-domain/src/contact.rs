//! Contact details: e-mail addresses and external ids.

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

#[cfg(test)]
mod tests {
    use super::*;

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
