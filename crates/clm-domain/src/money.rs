//! Money: integer minor units plus an ISO 4217 currency code.

use crate::Violation;
use serde::{Deserialize, Serialize};

/// An amount of money. Never a float.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    /// Three upper-case letters, e.g. `EUR`.
    pub currency: String,
    /// Amount in minor units (cents).
    pub amount_minor: i64,
}

impl Money {
    /// Checks the currency code (three ASCII letters, upper-cased) and, if
    /// `non_negative`, the sign. `field` is the path of the money field.
    pub fn new(
        field: &str,
        currency: &str,
        amount_minor: i64,
        non_negative: bool,
    ) -> Result<Self, Violation> {
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(Violation::new(
                format!("{field}.currency_code"),
                "must be a three-letter ISO 4217 code such as EUR",
            ));
        }
        if non_negative && amount_minor < 0 {
            return Err(Violation::new(
                format!("{field}.amount_minor"),
                "must not be negative",
            ));
        }
        Ok(Self {
            currency: currency.to_ascii_uppercase(),
            amount_minor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates() {
        assert_eq!(
            Money::new("m", "eur", 5, true).map(|m| m.currency),
            Ok("EUR".to_owned())
        );
        assert_eq!(
            Money::new("m", "EURO", 5, true).unwrap_err().field,
            "m.currency_code"
        );
        assert_eq!(
            Money::new("m", "EUR", -5, true).unwrap_err().field,
            "m.amount_minor"
        );
        assert!(Money::new("m", "EUR", -5, false).is_ok());
    }
}
