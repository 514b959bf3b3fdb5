//! KPI formulas: the pure arithmetic of the customer service's reports.
//! The database computes counts and sums set-based; these functions turn
//! them into rates, percentiles, costs and values, exactly as docs/customer.md
//! writes them.

use crate::Violation;
use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};

/// Microseconds in the average Gregorian month (30.436875 days), the unit
/// of customer-months in CLV.
pub const MONTH_US: f64 = 30.436_875 * 86_400.0 * 1_000_000.0;

/// `part / whole`, 0 when `whole` is 0.
pub fn ratio(part: f64, whole: f64) -> f64 {
    if whole == 0.0 { 0.0 } else { part / whole }
}

/// The 1-based nearest rank of percentile `pct` (1..=100) among `n`
/// values: `ceil(pct × n / 100)`, at least 1. The SQL picks the value of
/// that rank in ascending order (`(n * pct + 99) / 100` in integers).
pub fn nearest_rank(n: i64, pct: i64) -> i64 {
    ((n * pct + 99) / 100).max(1)
}

/// `amount_minor / customers` rounded half away from zero to a minor unit,
/// `None` when `customers` is not positive (cost per acquired customer,
/// revenue per customer).
pub fn per_customer(amount_minor: i64, customers: f64) -> Option<i64> {
    if customers <= 0.0 || !customers.is_finite() {
        return None;
    }
    // Exact for integer counts below 2^53; shares (linear attribution) are
    // sums of fractions anyway.
    let v = amount_minor as f64 / customers;
    Some(v.round() as i64)
}

/// Inputs of the predictive CLV of one cohort, all as measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClvInputs {
    /// Revenue in minor units.
    pub revenue_minor: i64,
    /// Purchases.
    pub orders: i64,
    /// Customer-months observed.
    pub customer_months: f64,
    /// Customers who churned after converting.
    pub churned: i64,
    /// Gross margin in basis points (0..=10,000).
    pub margin_bps: i32,
}

/// The derived figures of a predictive CLV.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clv {
    /// revenue / orders (minor units).
    pub average_order_value: f64,
    /// orders / customer-months.
    pub purchase_frequency: f64,
    /// churned / customer-months.
    pub monthly_churn_rate: f64,
    /// 1 / monthly churn rate; 0 when nobody churned.
    pub expected_lifetime_months: f64,
    /// AOV × frequency × margin × lifetime, rounded half away from zero;
    /// `None` without churn or without orders.
    pub predicted_minor: Option<i64>,
}

/// Predictive CLV = AOV × purchase frequency × gross margin × expected
/// lifetime, where AOV = revenue / orders, frequency = orders /
/// customer-months, lifetime = 1 / (churned / customer-months).
pub fn predictive_clv(i: ClvInputs) -> Clv {
    let aov = ratio(i.revenue_minor as f64, i.orders as f64);
    let frequency = ratio(i.orders as f64, i.customer_months);
    let churn = ratio(i.churned as f64, i.customer_months);
    let lifetime = if churn > 0.0 { 1.0 / churn } else { 0.0 };
    let margin = f64::from(i.margin_bps) / 10_000.0;
    let predicted_minor =
        (churn > 0.0 && i.orders > 0).then(|| (aov * frequency * margin * lifetime).round() as i64);
    Clv {
        average_order_value: aov,
        purchase_frequency: frequency,
        monthly_churn_rate: churn,
        expected_lifetime_months: lifetime,
        predicted_minor,
    }
}

/// Pain-point lift: leaving share / staying share; when no stayer had the
/// type, the staying share is smoothed to 1 / (stayers + 1).
pub fn lift(leaving_with: i64, leaving: i64, staying_with: i64, staying: i64) -> f64 {
    let l = ratio(leaving_with as f64, leaving as f64);
    let s = if staying_with > 0 {
        ratio(staying_with as f64, staying as f64)
    } else {
        1.0 / (staying as f64 + 1.0)
    };
    ratio(l, s)
}

/// A calendar month (UTC) as a count of months since year 0: `year × 12 +
/// month − 1`.
pub type MonthIndex = i32;

/// The month holding `t`.
pub fn month_of(t: DateTime<Utc>) -> MonthIndex {
    t.year() * 12 + t.month0() as i32
}

/// First instant of month `m` (µs since the epoch).
pub fn month_start_us(m: MonthIndex) -> i64 {
    let (y, mo) = (m.div_euclid(12), m.rem_euclid(12) as u32 + 1);
    NaiveDate::from_ymd_opt(y, mo, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|dt| Utc.from_utc_datetime(&dt).timestamp_micros())
        .unwrap_or(i64::MAX)
}

/// `YYYY-MM` of month `m`.
pub fn month_label(m: MonthIndex) -> String {
    format!("{:04}-{:02}", m.div_euclid(12), m.rem_euclid(12) + 1)
}

/// Parses `YYYY-MM` (`field` names the request field).
pub fn parse_month(field: &str, s: &str) -> Result<MonthIndex, Violation> {
    let bad = || Violation::new(field, "must be a month like 2026-01");
    let (y, m) = s.split_once('-').ok_or_else(bad)?;
    if y.len() != 4 || m.len() != 2 {
        return Err(bad());
    }
    let y: i32 = y.parse().map_err(|_| bad())?;
    let m: i32 = m.parse().map_err(|_| bad())?;
    if !(1..=12).contains(&m) || y < 1970 {
        return Err(bad());
    }
    Ok(y * 12 + m - 1)
}

/// A report period `[start, end)`, checked: end after start, at most ten
/// years long.
pub fn period(
    field: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), Violation> {
    if end <= start {
        return Err(Violation::new(
            format!("{field}.end_time"),
            "must be after start_time",
        ));
    }
    if end - start > chrono::Duration::days(3653) {
        return Err(Violation::new(
            format!("{field}.end_time"),
            "must be at most 10 years after start_time",
        ));
    }
    Ok((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_is_ceil() {
        assert_eq!(nearest_rank(4, 50), 2);
        assert_eq!(nearest_rank(5, 50), 3);
        assert_eq!(nearest_rank(10, 90), 9);
        assert_eq!(nearest_rank(11, 90), 10);
        assert_eq!(nearest_rank(1, 90), 1);
    }

    #[test]
    fn cac_rounds_half_away() {
        assert_eq!(per_customer(100_000, 3.0), Some(33_333));
        assert_eq!(per_customer(5, 2.0), Some(3));
        assert_eq!(per_customer(5, 0.0), None);
    }

    #[test]
    fn predictive_clv_formula() {
        let c = predictive_clv(ClvInputs {
            revenue_minor: 60_000,
            orders: 6,
            customer_months: 12.0,
            churned: 1,
            margin_bps: 5_000,
        });
        assert_eq!(c.average_order_value, 10_000.0);
        assert_eq!(c.purchase_frequency, 0.5);
        assert_eq!(c.expected_lifetime_months, 12.0);
        // 10,000 × 0.5 × 0.5 × 12
        assert_eq!(c.predicted_minor, Some(30_000));
        let none = predictive_clv(ClvInputs {
            churned: 0,
            ..ClvInputs {
                revenue_minor: 1,
                orders: 1,
                customer_months: 1.0,
                churned: 0,
                margin_bps: 1,
            }
        });
        assert_eq!(none.predicted_minor, None);
    }

    #[test]
    fn months() {
        let m = parse_month("m", "2026-01").unwrap();
        assert_eq!(month_label(m), "2026-01");
        assert_eq!(month_label(m + 12), "2027-01");
        let t = DateTime::parse_from_rfc3339("2026-01-31T23:59:59Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(month_of(t), m);
        assert!(month_start_us(m) <= t.timestamp_micros());
        assert!(month_start_us(m + 1) > t.timestamp_micros());
        for bad in ["2026-13", "26-01", "2026/01", "x", "2026-1"] {
            assert!(parse_month("m", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lift_smooths() {
        assert_eq!(lift(2, 4, 1, 4), 2.0);
        assert_eq!(lift(1, 2, 0, 3), 2.0);
    }
}
