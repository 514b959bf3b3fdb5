//! Money: integer minor units plus an ISO 4217 currency code.

use crate::Violation;
use serde::{Deserialize, Serialize};

/// Active ISO 4217 currency codes (ISO 4217 list one, 2025), sorted, for
/// amounts in minor units: the national currencies, the fund codes (`BOV`,
/// `CHE`, `CLF`, `USN`...), the supranational `XAF`, `XCD`, `XCG`, `XDR`,
/// `XOF`, `XPF`, `XSU`, `XUA`. Left out on purpose: precious metals and bond
/// units (`XAU`, `XBA`...: no minor unit), the testing and "no currency"
/// codes `XTS` and `XXX`, and withdrawn codes (`HRK`, `SLL`, `ZWL`...).
/// Update it when ISO amends the list.
pub const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD",
    "CAD", "CDF", "CHE", "CHF", "CHW", "CLF", "CLP", "CNY", "COP", "COU", "CRC", "CUP", "CVE",
    "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL",
    "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR",
    "IQD", "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD",
    "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK",
    "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN", "NIO",
    "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON",
    "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD",
    "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD",
    "TZS", "UAH", "UGX", "USD", "USN", "UYI", "UYU", "UYW", "UZS", "VED", "VES", "VND", "VUV",
    "WST", "XAF", "XCD", "XCG", "XDR", "XOF", "XPF", "XSU", "XUA", "YER", "ZAR", "ZMW", "ZWG",
];

/// Whether `code` (upper case) is an active ISO 4217 code in [`ISO_4217`].
pub fn is_iso_4217(code: &str) -> bool {
    ISO_4217.binary_search(&code).is_ok()
}

/// An amount of money. Never a float.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    /// Three upper-case letters, e.g. `EUR`.
    pub currency: String,
    /// Amount in minor units (cents).
    pub amount_minor: i64,
}

impl Money {
    /// Checks the currency code (an active ISO 4217 code, any case) and, if
    /// `non_negative`, the sign. `field` is the path of the money field.
    pub fn new(
        field: &str,
        currency: &str,
        amount_minor: i64,
        non_negative: bool,
    ) -> Result<Self, Violation> {
        let code = currency.to_ascii_uppercase();
        if !is_iso_4217(&code) {
            return Err(Violation::new(
                format!("{field}.currency_code"),
                format!(
                    "{} is not an active ISO 4217 currency code such as EUR",
                    crate::validation::echo(currency)
                ),
            ));
        }
        if non_negative && amount_minor < 0 {
            return Err(Violation::new(
                format!("{field}.amount_minor"),
                "must not be negative",
            ));
        }
        Ok(Self {
            currency: code,
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
        for bad in ["ZZZ", "XXX", "XTS", "XAU", "HRK", "", "E", "€UR"] {
            assert_eq!(
                Money::new("m", bad, 5, true).unwrap_err().field,
                "m.currency_code",
                "{bad}"
            );
        }
        for good in ["USD", "jpy", "CHF", "XOF", "BOV"] {
            assert!(Money::new("m", good, 5, true).is_ok(), "{good}");
        }
        assert!(ISO_4217.len() > 150);
        assert!(
            ISO_4217.windows(2).all(|w| w[0] < w[1]),
            "sorted for binary_search"
        );
        assert!(
            ISO_4217
                .iter()
                .all(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()))
        );
    }
}
