//! Demographics: birth date (→ age), gender, income, occupation.

use crate::{Violation, money::Money, validation::optional_text};
use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};

/// Declared gender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gender {
    /// Female.
    Female,
    /// Male.
    Male,
    /// Non-binary.
    NonBinary,
    /// Another gender.
    Other,
    /// Chose not to say.
    Undisclosed,
}

impl Gender {
    /// Stable small-integer code for storage.
    pub fn code(self) -> i16 {
        match self {
            Gender::Female => 1,
            Gender::Male => 2,
            Gender::NonBinary => 3,
            Gender::Other => 4,
            Gender::Undisclosed => 5,
        }
    }

    /// Inverse of [`Gender::code`].
    pub fn from_code(code: i16) -> Option<Gender> {
        [
            Gender::Female,
            Gender::Male,
            Gender::NonBinary,
            Gender::Other,
            Gender::Undisclosed,
        ]
        .into_iter()
        .find(|g| g.code() == code)
    }
}

/// Who a customer is. Every part is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demographics {
    /// Date of birth.
    pub birth_date: Option<NaiveDate>,
    /// Declared gender.
    pub gender: Option<Gender>,
    /// Yearly income.
    pub annual_income: Option<Money>,
    /// Occupation.
    pub occupation: Option<String>,
}

/// Oldest plausible age; earlier birth dates are refused.
pub const MAX_AGE_YEARS: i32 = 150;

/// Builds and checks a birth date given as year/month/day against `today`.
pub fn birth_date(
    field: &str,
    year: i32,
    month: i32,
    day: i32,
    today: NaiveDate,
) -> Result<NaiveDate, Violation> {
    let date = u32::try_from(month)
        .ok()
        .zip(u32::try_from(day).ok())
        .and_then(|(m, d)| NaiveDate::from_ymd_opt(year, m, d))
        .ok_or_else(|| {
            Violation::new(
                field,
                format!("{year:04}-{month:02}-{day:02} is not a valid date"),
            )
        })?;
    if date > today {
        return Err(Violation::new(field, "must not be in the future"));
    }
    if age_on(date, today) > MAX_AGE_YEARS {
        return Err(Violation::new(
            field,
            format!("must be less than {MAX_AGE_YEARS} years ago"),
        ));
    }
    Ok(date)
}

/// Age in whole years on `today` of someone born on `birth`.
pub fn age_on(birth: NaiveDate, today: NaiveDate) -> i32 {
    let mut age = today.year() - birth.year();
    if (today.month(), today.day()) < (birth.month(), birth.day()) {
        age -= 1;
    }
    age
}

/// Checks an occupation (up to 200 characters; empty = none).
pub fn occupation(field: &str, value: &str) -> Result<Option<String>, Violation> {
    optional_text(field, value, 200)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).expect("valid date")
    }

    #[test]
    fn age_counts_birthdays() {
        assert_eq!(age_on(d(2000, 6, 15), d(2026, 6, 14)), 25);
        assert_eq!(age_on(d(2000, 6, 15), d(2026, 6, 15)), 26);
        assert_eq!(age_on(d(2000, 2, 29), d(2026, 2, 28)), 25);
    }

    #[test]
    fn birth_date_rules() {
        let today = d(2026, 11, 24);
        assert!(birth_date("b", 2026, 11, 25, today).is_err());
        assert!(birth_date("b", 2026, 2, 30, today).is_err());
        assert!(birth_date("b", 1800, 1, 1, today).is_err());
        assert_eq!(birth_date("b", 1990, 1, 1, today), Ok(d(1990, 1, 1)));
        assert_eq!(
            birth_date("x.y", 2030, 1, 1, today).unwrap_err().field,
            "x.y"
        );
    }

    proptest! {
        #[test]
        fn age_is_never_negative_for_valid_dates(y in 1900i32..2026, m in 1u32..=12, day in 1u32..=28) {
            let today = d(2026, 11, 24);
            let b = d(y, m, day);
            prop_assert!(age_on(b, today) >= 0);
            prop_assert!(age_on(b, today) <= 2026 - y);
        }
    }
}
