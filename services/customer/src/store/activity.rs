//! Rollups of touchpoints the KPI reports read instead of the raw
//! `touchpoints` table, kept by the report projection
//! ([`crate::projection`]) from the `TouchpointRecorded` events (one or two
//! set-based statements per table per batch, never one per row):
//!
//! * `touch_months(customer_id, month, kinds, conv_us, conv_month)`: per
//!   customer and calendar month (UTC month index,
//!   [`clm_domain::kpi::month_of`]) the bitmask of the touchpoint kinds it
//!   had (`1 << kind code`). OR-ing is idempotent and order-free, so
//!   replays and out-of-order touchpoints need nothing special. Retention
//!   reads it alone, without a join.
//! * `purchase_months(customer_id, month, currency, orders, revenue_minor,
//!   conv_us, conv_month)`:
//!   PURCHASE count and revenue per customer, month and currency, added to
//!   only for the touchpoints a batch actually inserted (a replayed event
//!   id inserts nothing, so it never counts twice). CLV reads it for the
//!   whole months before its period's end and the raw table for the rest.
//! * `attribution_touches(customer_id, occurred_us, event_id, campaign)`:
//!   the CAMPAIGN_TOUCH touchpoints at or before the customer's first
//!   conversion (all of them while it has none); a conversion drops the
//!   later ones ([`super::rollups::on_moves`]). Attribution reads it
//!   instead of probing `touchpoints` once per acquired customer.
//!
//! `conv_us` / `conv_month` on the first two are copies of the customer's
//! `first_conversion_us` / `first_conversion_month` ([`super::rollups`]),
//! taken from `customers` when a row is written and set by the first
//! conversion, so that a report selects a cohort's rows by an index range
//! instead of joining a million customers.
//!
//! A merge folds the duplicates' rows into the survivor's
//! ([`super::projection::fold`]); an erasure deletes them
//! ([`super::erasure::forget`], [`super::projection::forget`]). A row is
//! written even when the customer's row is gone (merged while its events
//! waited for the projection): the merge's fold then moves it. The same SQL backfills the migration
//! ([`rebuild_sql`]) and `scripts/seed-kpi.sql`.

use super::touchpoints::TouchpointRecord;
use clm_domain::kpi::month_of;
use clm_domain::touchpoint::TouchpointKind;
use clm_platform::db::to_micros;
use clm_platform::{Error, bulk};
use sea_orm::{ConnectionTrait, Statement, Value};
use std::collections::{BTreeMap, HashSet};

/// Rows per upsert statement (well under both backends' bind limits).
const CHUNK: usize = 2_000;

/// Adds the touchpoints of `records` whose event id is in `inserted` to the
/// rollups: an insert and an update of `touch_months`, an upsert into
/// `purchase_months` when the batch has purchases, an insert into
/// `attribution_touches` when it has campaign touches.
pub async fn on_touchpoints(
    db: &impl ConnectionTrait,
    records: &[TouchpointRecord],
    inserted: &HashSet<String>,
) -> Result<(), Error> {
    let mut months: BTreeMap<(String, i32), i32> = BTreeMap::new();
    let mut buys: BTreeMap<(String, i32, String), (i64, i64)> = BTreeMap::new();
    let mut touches: Vec<(String, i64, String, String)> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for r in records {
        let t = &r.touchpoint;
        if !inserted.contains(&t.event_id) || !seen.insert(t.event_id.as_str()) {
            continue;
        }
        let month = month_of(t.occurred_time);
        let customer = r.customer.to_string();
        *months.entry((customer.clone(), month)).or_default() |= 1 << t.kind.code();
        if t.kind == TouchpointKind::CampaignTouch
            && let Some(c) = &t.campaign
        {
            touches.push((
                customer.clone(),
                to_micros(t.occurred_time),
                t.event_id.clone(),
                c.clone(),
            ));
        }
        if t.kind == TouchpointKind::Purchase
            && let Some(m) = &t.revenue
        {
            let e = buys
                .entry((customer, month, m.currency.clone()))
                .or_default();
            e.0 += 1;
            e.1 += m.amount_minor;
        }
    }
    let postgres = clm_platform::db::is_postgres(db);
    let months: Vec<_> = months.into_iter().collect();
    for chunk in months.chunks(CHUNK) {
        let (rows, values) = bulk::rows(
            postgres,
            1,
            vec![
                (
                    "text",
                    chunk
                        .iter()
                        .map(|((c, _), _)| Value::from(c.clone()))
                        .collect(),
                ),
                (
                    "int4",
                    chunk.iter().map(|((_, m), _)| Value::from(*m)).collect(),
                ),
                ("int4", chunk.iter().map(|(_, k)| Value::from(*k)).collect()),
            ],
        );
        // New (customer, month) rows, then the bits missing from existing
        // ones: a month already holding the batch's kinds is neither
        // written nor locked, so concurrent batches of the same customers
        // do not queue behind each other.
        let insert = format!(
            "WITH v (customer_id, month, kinds) AS ({rows}) \
             INSERT INTO touch_months (customer_id, month, kinds, conv_us, conv_month) \
             SELECT v.customer_id, v.month, v.kinds, c.first_conversion_us, c.first_conversion_month \
             FROM v LEFT JOIN customers c ON c.id = v.customer_id WHERE 1 = 1 \
             ON CONFLICT (customer_id, month) DO NOTHING"
        );
        exec(db, insert, values.clone()).await?;
        let update = format!(
            "WITH v (customer_id, month, kinds) AS ({rows}) \
             UPDATE touch_months SET kinds = touch_months.kinds | v.kinds FROM v \
             WHERE touch_months.customer_id = v.customer_id AND touch_months.month = v.month \
             AND (touch_months.kinds & v.kinds) <> v.kinds"
        );
        exec(db, update, values).await?;
    }
    let buys: Vec<_> = buys.into_iter().collect();
    for chunk in buys.chunks(CHUNK) {
        let (rows, values) = bulk::rows(
            postgres,
            1,
            vec![
                (
                    "text",
                    chunk
                        .iter()
                        .map(|((c, _, _), _)| Value::from(c.clone()))
                        .collect(),
                ),
                (
                    "int4",
                    chunk.iter().map(|((_, m, _), _)| Value::from(*m)).collect(),
                ),
                (
                    "text",
                    chunk
                        .iter()
                        .map(|((_, _, cur), _)| Value::from(cur.clone()))
                        .collect(),
                ),
                (
                    "int8",
                    chunk.iter().map(|(_, (o, _))| Value::from(*o)).collect(),
                ),
                (
                    "int8",
                    chunk.iter().map(|(_, (_, r))| Value::from(*r)).collect(),
                ),
            ],
        );
        let sql = format!(
            "WITH v (customer_id, month, currency, orders, revenue_minor) AS ({rows}) \
             INSERT INTO purchase_months (customer_id, month, currency, orders, revenue_minor, conv_us, conv_month) \
             SELECT v.customer_id, v.month, v.currency, v.orders, v.revenue_minor, \
             c.first_conversion_us, c.first_conversion_month \
             FROM v LEFT JOIN customers c ON c.id = v.customer_id WHERE 1 = 1 \
             ON CONFLICT (customer_id, month, currency) DO UPDATE SET \
             orders = purchase_months.orders + excluded.orders, \
             revenue_minor = purchase_months.revenue_minor + excluded.revenue_minor"
        );
        exec(db, sql, values).await?;
    }
    for chunk in touches.chunks(CHUNK) {
        let (rows, values) = bulk::rows(
            postgres,
            1,
            vec![
                (
                    "text",
                    chunk
                        .iter()
                        .map(|(c, _, _, _)| Value::from(c.clone()))
                        .collect(),
                ),
                (
                    "int8",
                    chunk.iter().map(|(_, at, _, _)| Value::from(*at)).collect(),
                ),
                (
                    "text",
                    chunk
                        .iter()
                        .map(|(_, _, e, _)| Value::from(e.clone()))
                        .collect(),
                ),
                (
                    "text",
                    chunk
                        .iter()
                        .map(|(_, _, _, k)| Value::from(k.clone()))
                        .collect(),
                ),
            ],
        );
        let sql = format!(
            "WITH v (customer_id, occurred_us, event_id, campaign) AS ({rows}) \
             INSERT INTO attribution_touches (customer_id, occurred_us, event_id, campaign) \
             SELECT v.customer_id, v.occurred_us, v.event_id, v.campaign FROM v \
             LEFT JOIN customers c ON c.id = v.customer_id \
             WHERE c.first_conversion_us IS NULL OR v.occurred_us <= c.first_conversion_us \
             ON CONFLICT DO NOTHING"
        );
        exec(db, sql, values).await?;
    }
    Ok(())
}

async fn exec(db: &impl ConnectionTrait, sql: String, values: Vec<Value>) -> Result<(), Error> {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        sql,
        values,
    ))
    .await?;
    Ok(())
}

/// The statements that fill the rollups from `touchpoints`, for every
/// customer (`customers = None`) or for those bound as `$1..$n`
/// (`Some(n)`): set-based, the same text on both backends.
/// `SUM(DISTINCT 1 << kind)` is the OR of the kinds' bits (SQLite has no
/// `bit_or`).
pub fn rebuild_sql(customers: Option<usize>) -> [String; 3] {
    let filter = |col: &str| match customers {
        None => "1 = 1".to_owned(),
        Some(n) => {
            let marks: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
            format!("{col} IN ({})", marks.join(", "))
        }
    };
    let month = super::reports::month_sql("occurred_us");
    let (f, tf) = (filter("customer_id"), filter("t.customer_id"));
    [
        format!(
            "INSERT INTO touch_months (customer_id, month, kinds, conv_us, conv_month) \
             SELECT m.customer_id, m.month, m.kinds, c.first_conversion_us, c.first_conversion_month \
             FROM (SELECT customer_id, {month} AS month, CAST(SUM(DISTINCT 1 << kind) AS INTEGER) AS kinds \
             FROM touchpoints WHERE {f} GROUP BY customer_id, {month}) m \
             JOIN customers c ON c.id = m.customer_id"
        ),
        format!(
            "INSERT INTO purchase_months (customer_id, month, currency, orders, revenue_minor, conv_us, conv_month) \
             SELECT m.customer_id, m.month, m.currency, m.orders, m.revenue, \
             c.first_conversion_us, c.first_conversion_month \
             FROM (SELECT customer_id, {month} AS month, currency, COUNT(*) AS orders, \
             CAST(SUM(revenue_minor) AS BIGINT) AS revenue \
             FROM touchpoints WHERE kind = {} AND currency IS NOT NULL AND {f} \
             GROUP BY customer_id, {month}, currency) m JOIN customers c ON c.id = m.customer_id",
            TouchpointKind::Purchase.code()
        ),
        format!(
            "INSERT INTO attribution_touches (customer_id, occurred_us, event_id, campaign) \
             SELECT t.customer_id, t.occurred_us, t.event_id, t.campaign FROM touchpoints t \
             JOIN customers c ON c.id = t.customer_id \
             WHERE t.kind = {} AND t.campaign IS NOT NULL \
             AND (c.first_conversion_us IS NULL OR t.occurred_us <= c.first_conversion_us) AND {tf}",
            TouchpointKind::CampaignTouch.code()
        ),
    ]
}

/// Rebuilds the rollups of `customers` from their touchpoints, dropping
/// whatever rows they had (after a merge moved touchpoints to a survivor
/// and recomputed its first conversion, with the survivor and the
/// duplicates): a delete and an insert per rollup table.
pub async fn rebuild(db: &impl ConnectionTrait, customers: &[String]) -> Result<(), Error> {
    if customers.is_empty() {
        return Ok(());
    }
    forget(db, customers).await?;
    for sql in rebuild_sql(Some(customers.len())) {
        let values = customers.iter().map(|c| Value::from(c.clone())).collect();
        exec(db, sql, values).await?;
    }
    Ok(())
}

/// Deletes the rollup rows of `customers`.
pub async fn forget(db: &impl ConnectionTrait, customers: &[String]) -> Result<(), Error> {
    if customers.is_empty() {
        return Ok(());
    }
    let marks: Vec<String> = (1..=customers.len()).map(|i| format!("${i}")).collect();
    for table in TABLES {
        let values = customers.iter().map(|c| Value::from(c.clone())).collect();
        let sql = format!(
            "DELETE FROM {table} WHERE customer_id IN ({})",
            marks.join(", ")
        );
        exec(db, sql, values).await?;
    }
    Ok(())
}

/// The rollup tables of this module.
pub const TABLES: [&str; 3] = ["touch_months", "purchase_months", "attribution_touches"];
