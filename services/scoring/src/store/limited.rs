//! What a touchpoint batch reads of its customers' limited rules (caps,
//! once per customer): asked per (customer, rule) pair, each with the award
//! times it needs, so a batch reads only the entries of the rules its
//! touchpoints match, inside their own cap windows.
//!
//! On PostgreSQL each read is one statement of fixed text: the pairs and
//! their bounds are array parameters joined (`unnest`) to the ledger's
//! `(customer, model, rule, award_us)` index, so the statement is planned
//! once per connection and each pair is one index range. SQLite asks
//! [`super::ledger`]'s list forms and keeps what each pair asked for.

use super::entity::score_ledger::{Column as C, Entity as Ledger};
use super::ledger::{self, RuleEntry, RuleWindows};
use clm_platform::Result;
use clm_platform::db::is_postgres;
use sea_orm::IdenStatic;
use sea_orm::{ConnectionTrait, DbBackend, EntityName, Statement};
use std::collections::{BTreeMap, HashMap};

/// How a limited rule's earlier awards count against a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// Once per customer: whether it ever scored.
    Once,
    /// Capped per UTC day: points used per day.
    Day,
    /// Capped per ISO week: points used per week.
    Week,
    /// Capped over a rolling window: each award.
    Rolling,
}

impl Bucket {
    fn code(self) -> i16 {
        match self {
            Bucket::Once => 0,
            Bucket::Day => 1,
            Bucket::Week => 2,
            Bucket::Rolling => 3,
        }
    }
}

/// One (customer, rule) a batch asks about: its earlier awards at or after
/// `lo` (the earliest cap window's start of the batch's matching
/// touchpoints; `i64::MIN` for a once-only rule) count, those at or after
/// `hi` (the latest window's end) only tell the newest award.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    /// `customers/{id}`.
    pub customer: String,
    /// Rule id.
    pub rule: String,
    /// How its awards count.
    pub bucket: Bucket,
    /// First award time that counts (µs).
    pub lo: i64,
    /// Award times from here on do not count (µs, exclusive).
    pub hi: i64,
}

/// What one (customer, rule) has used, and its newest award.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Used {
    /// `(bucket time, Σ |points|)` per bucket in `[lo, hi)` that nets to
    /// something: entries of a `clm_domain::scoring::RuleHistory` giving the
    /// same cap room and once-only answer as the awards themselves (see
    /// [`ledger::RuleUse`]).
    pub uses: Vec<(i64, i64)>,
    /// The newest award at or after `lo` (whatever it nets to): a
    /// touchpoint earlier than it arrived late. An award before `lo` is
    /// earlier than every touchpoint asked about, so it cannot make one late.
    pub newest: Option<i64>,
}

/// Each asked pair's [`Used`] (pairs without an award at or after `lo`
/// are left out): one statement on PostgreSQL.
pub async fn used(
    db: &impl ConnectionTrait,
    model: &str,
    version: i64,
    asks: &[Ask],
) -> Result<HashMap<(String, String), Used>> {
    if asks.is_empty() {
        return Ok(HashMap::new());
    }
    if !is_postgres(db) {
        return used_by_lists(db, model, version, asks).await;
    }
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        const DAY: i64 = 86_400_000_000;
        let award = format!("l.\"{}\"", C::AwardUs.as_str());
        // Floor division, as ledger::rule_usage buckets them.
        let day = format!("({award} - (({award} % {DAY}) + {DAY}) % {DAY})");
        let week = format!("(({day}) / {DAY} - ((({day}) / {DAY} + 3) % 7 + 7) % 7) * {DAY}");
        let points = format!("l.\"{}\"", C::Points.as_str());
        format!(
            "SELECT k.c, k.r, \
             CASE k.b WHEN 0 THEN 0 WHEN 1 THEN {day} WHEN 2 THEN {week} ELSE {award} END AS bucket, \
             CAST(SUM(CASE WHEN {award} < k.hi THEN {points} ELSE 0 END) AS BIGINT) AS net, \
             MAX({award}) AS newest \
             FROM unnest($1::text[], $2::text[], $3::int2[], $4::int8[], $5::int8[]) AS k(c, r, b, lo, hi) \
             JOIN \"{ledger}\" l ON l.\"{customer}\" = k.c AND l.\"{model}\" = $6 \
             AND l.\"{rule}\" = k.r AND l.\"{version}\" = $7 AND {award} >= k.lo \
             GROUP BY k.c, k.r, bucket",
            ledger = Ledger.table_name(),
            customer = C::Customer.as_str(),
            model = C::Model.as_str(),
            rule = C::Rule.as_str(),
            version = C::ModelVersion.as_str(),
        )
    });
    use super::column;
    let values: Vec<sea_orm::Value> = vec![
        column(asks, |a| a.customer.clone()),
        column(asks, |a| a.rule.clone()),
        column(asks, |a| a.bucket.code()),
        column(asks, |a| a.lo),
        column(asks, |a| a.hi),
        model.into(),
        version.into(),
    ];
    let mut out: HashMap<(String, String), Used> = HashMap::new();
    for r in db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            SQL.as_str(),
            values,
        ))
        .await?
    {
        let key: (String, String) = (r.try_get_by_index(0)?, r.try_get_by_index(1)?);
        let bucket: i64 = r.try_get_by_index(2)?;
        let net: i64 = r.try_get_by_index(3)?;
        let newest: i64 = r.try_get_by_index(4)?;
        let u = out.entry(key).or_default();
        if net != 0 {
            u.uses.push((bucket, net.saturating_abs()));
        }
        u.newest = Some(u.newest.map_or(newest, |n| n.max(newest)));
    }
    Ok(out)
}

/// [`used`] on SQLite: the rules' usage over the union of the windows and
/// their newest awards (two statements), narrowed to what each pair asked.
async fn used_by_lists(
    db: &impl ConnectionTrait,
    model: &str,
    version: i64,
    asks: &[Ask],
) -> Result<HashMap<(String, String), Used>> {
    let mut rules = RuleWindows::default();
    let mut custs: Vec<String> = Vec::new();
    let mut window = (i64::MAX, i64::MIN);
    let mut by_key: HashMap<(&str, &str), &Ask> = HashMap::new();
    for a in asks {
        let list = match a.bucket {
            Bucket::Once => &mut rules.once,
            Bucket::Day => &mut rules.day,
            Bucket::Week => &mut rules.week,
            Bucket::Rolling => &mut rules.rolling,
        };
        list.push(a.rule.clone());
        custs.push(a.customer.clone());
        if a.bucket != Bucket::Once {
            window = (window.0.min(a.lo), window.1.max(a.hi));
        }
        by_key.insert((&a.customer, &a.rule), a);
    }
    for list in [
        &mut rules.once,
        &mut rules.day,
        &mut rules.week,
        &mut rules.rolling,
        &mut custs,
    ] {
        list.sort();
        list.dedup();
    }
    let mut out: HashMap<(String, String), Used> = HashMap::new();
    for u in ledger::rule_usage(db, model, version, &custs, &rules, window).await? {
        let Some(a) = by_key.get(&(u.customer.as_str(), u.rule.as_str())) else {
            continue;
        };
        if a.bucket != Bucket::Once && (u.at_us < a.lo || u.at_us >= a.hi) {
            continue;
        }
        out.entry((u.customer, u.rule))
            .or_default()
            .uses
            .push((u.at_us, u.used));
    }
    let mut all_rules: Vec<String> = asks.iter().map(|a| a.rule.clone()).collect();
    all_rules.sort();
    all_rules.dedup();
    for ((customer, rule), newest) in
        ledger::newest_awards(db, model, version, &custs, &all_rules).await?
    {
        let Some(a) = by_key.get(&(customer.as_str(), rule.as_str())) else {
            continue;
        };
        if newest >= a.lo {
            out.entry((customer, rule)).or_default().newest = Some(newest);
        }
    }
    Ok(out)
}

/// One (customer, rule) whose entries a re-evaluation reads: those awarded
/// in `[lo, hi]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// `customers/{id}`.
    pub customer: String,
    /// Rule id.
    pub rule: String,
    /// First award time (µs).
    pub lo: i64,
    /// Last award time (µs, inclusive).
    pub hi: i64,
}

/// The entries of each range's (customer, rule) under `model` version
/// `version` awarded inside it (one statement on PostgreSQL).
pub async fn entries(
    db: &impl ConnectionTrait,
    model: &str,
    version: i64,
    ranges: &[Range],
) -> Result<Vec<RuleEntry>> {
    if ranges.is_empty() {
        return Ok(Vec::new());
    }
    if !is_postgres(db) {
        let mut custs: Vec<String> = ranges.iter().map(|r| r.customer.clone()).collect();
        let mut rules: Vec<String> = ranges.iter().map(|r| r.rule.clone()).collect();
        for list in [&mut custs, &mut rules] {
            list.sort();
            list.dedup();
        }
        let since = ranges.iter().map(|r| r.lo).min().unwrap_or(i64::MIN);
        let wanted: BTreeMap<(&str, &str), (i64, i64)> = ranges
            .iter()
            .map(|r| ((r.customer.as_str(), r.rule.as_str()), (r.lo, r.hi)))
            .collect();
        let all = ledger::rule_entries(db, model, version, &custs, &rules, since).await?;
        return Ok(all
            .into_iter()
            .filter(|e| {
                wanted
                    .get(&(e.customer.as_str(), e.rule.as_str()))
                    .is_some_and(|(lo, hi)| e.award_us >= *lo && e.award_us <= *hi)
            })
            .collect());
    }
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT l.\"{customer}\", l.\"{rule}\", l.\"{source}\", l.\"{points}\", l.\"{award}\" \
             FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) AS k(c, r, lo, hi) \
             JOIN \"{ledger}\" l ON l.\"{customer}\" = k.c AND l.\"{model}\" = $5 \
             AND l.\"{rule}\" = k.r AND l.\"{version}\" = $6 \
             AND l.\"{award}\" >= k.lo AND l.\"{award}\" <= k.hi",
            ledger = Ledger.table_name(),
            customer = C::Customer.as_str(),
            model = C::Model.as_str(),
            rule = C::Rule.as_str(),
            version = C::ModelVersion.as_str(),
            source = C::SourceEvent.as_str(),
            points = C::Points.as_str(),
            award = C::AwardUs.as_str(),
        )
    });
    use super::column;
    let values: Vec<sea_orm::Value> = vec![
        column(ranges, |r| r.customer.clone()),
        column(ranges, |r| r.rule.clone()),
        column(ranges, |r| r.lo),
        column(ranges, |r| r.hi),
        model.into(),
        version.into(),
    ];
    db.query_all_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        SQL.as_str(),
        values,
    ))
    .await?
    .iter()
    .map(RuleEntry::from_row)
    .collect()
}
