//! Storage of the report projection ([`crate::projection`]): the rollups of
//! [`super::activity`], [`super::rollups`] and [`super::journeys`] are kept
//! by a consumer of this service's own change stream, not by the writes.
//!
//! * `projection_marks(customer_id, position)`: the stream position of the
//!   last event of each customer the projection applied. The subscriber
//!   keeps its cursor in the same transaction as a batch's effect, so a
//!   batch is applied once; the marks make each *event* idempotent by its
//!   position as well, which is what lets the subscriber split a batch by
//!   customer into partitions committed side by side
//!   (`Handlers::on_batch_partitioned`: a crash after some partitions
//!   committed replays them, and the marks skip what they applied).
//! * [`fold`]: a merge's duplicates' rollup rows added into the survivor's,
//!   once, at the merge's position in the stream (every event of a
//!   duplicate precedes its merge: ingest and stage writes hold a share
//!   lock on the customer row that the merge's exclusive lock waits for).
//! * [`forget`]: every projected row of erased customers.

use super::{activity, journeys, rollups};
use clm_platform::{Error, bulk};
use sea_orm::{ConnectionTrait, Statement, Value};
use std::collections::{BTreeMap, HashMap};

fn marks(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
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

/// Rows per statement (well under both backends' bind limits).
const CHUNK: usize = 1_000;

/// Of `events` (customer id, stream position), those not applied yet: a
/// position after the customer's mark (one read per chunk of customers,
/// no lock: one consumer applies a customer's events). [`mark`] them once
/// applied.
pub async fn unapplied(
    db: &impl ConnectionTrait,
    events: &[(String, i64)],
) -> Result<Vec<bool>, Error> {
    let mut customers: Vec<&str> = events.iter().map(|(c, _)| c.as_str()).collect();
    customers.sort_unstable();
    customers.dedup();
    let postgres = clm_platform::db::is_postgres(db);
    let mut applied: HashMap<String, i64> = HashMap::new();
    for chunk in customers.chunks(CHUNK) {
        let (of, values) = bulk::any_text(postgres, "customer_id", 1, chunk);
        let rows = db
            .query_all_raw(Statement::from_sql_and_values(
                db.get_database_backend(),
                format!("SELECT customer_id, position FROM projection_marks WHERE {of}"),
                values,
            ))
            .await?;
        for r in rows {
            applied.insert(r.try_get("", "customer_id")?, r.try_get("", "position")?);
        }
    }
    Ok(events
        .iter()
        .map(|(c, p)| applied.get(c).is_none_or(|m| p > m))
        .collect())
}

/// Moves the marks of the customers of `events` (customer id, position)
/// to their last position: one upsert per chunk, the last write of a
/// batch (erasure deletes in the same order: rollups, journey rows, marks,
/// so the two never wait on each other in opposite orders).
pub async fn mark(db: &impl ConnectionTrait, events: &[(String, i64)]) -> Result<(), Error> {
    let mut last: BTreeMap<&str, i64> = BTreeMap::new();
    for (c, p) in events {
        let e = last.entry(c.as_str()).or_insert(*p);
        *e = Ord::max(*e, *p);
    }
    let last: Vec<(&str, i64)> = last.into_iter().collect();
    let postgres = clm_platform::db::is_postgres(db);
    for chunk in last.chunks(CHUNK) {
        let (rows, values) = bulk::rows(
            postgres,
            1,
            vec![
                ("text", chunk.iter().map(|(c, _)| Value::from(*c)).collect()),
                ("int8", chunk.iter().map(|(_, p)| Value::from(*p)).collect()),
            ],
        );
        exec(
            db,
            format!(
                "INSERT INTO projection_marks (customer_id, position) {rows} \
                 ON CONFLICT (customer_id) DO UPDATE SET position = excluded.position \
                 WHERE excluded.position > projection_marks.position"
            ),
            values,
        )
        .await?;
    }
    Ok(())
}

/// Folds the projected rows of `dups` (merged into `survivor`) into the
/// survivor's: its first conversion and first churn recomputed from the
/// merged stage history, `touch_months` OR-ed, `purchase_months` added,
/// `attribution_touches` re-keyed (those after the survivor's first
/// conversion dropped), the cohort copies (`conv_us`, `conv_month`) set
/// from the survivor, and the journey rows of all of them rebuilt from the
/// merged history and touchpoints. A handful of set-based statements.
pub async fn fold(db: &impl ConnectionTrait, survivor: &str, dups: &[String]) -> Result<(), Error> {
    if dups.is_empty() {
        return Ok(());
    }
    rollups::recompute_firsts(db, survivor).await?;
    let n = dups.len();
    let args = || -> Vec<Value> {
        std::iter::once(Value::from(survivor.to_owned()))
            .chain(dups.iter().map(|d| Value::from(d.clone())))
            .collect()
    };
    let of_dups = format!("customer_id IN ({})", marks(2, n));
    // The OR of the duplicates' kind masks (SQLite has no `bit_or`): per
    // bit, the largest of the masks' values of that bit, summed.
    let or_kinds = (0..16)
        .map(|b| format!("MAX(kinds & {})", 1 << b))
        .collect::<Vec<_>>()
        .join(" + ");
    let statements = [
        format!(
            "INSERT INTO touch_months (customer_id, month, kinds, conv_us, conv_month) \
             SELECT $1, month, {or_kinds}, NULL, NULL FROM touch_months \
             WHERE {of_dups} GROUP BY month \
             ON CONFLICT (customer_id, month) DO UPDATE SET kinds = touch_months.kinds | excluded.kinds"
        ),
        format!(
            "INSERT INTO purchase_months (customer_id, month, currency, orders, revenue_minor, conv_us, conv_month) \
             SELECT $1, month, currency, CAST(SUM(orders) AS BIGINT), CAST(SUM(revenue_minor) AS BIGINT), NULL, NULL \
             FROM purchase_months WHERE {of_dups} GROUP BY month, currency \
             ON CONFLICT (customer_id, month, currency) DO UPDATE SET \
             orders = purchase_months.orders + excluded.orders, \
             revenue_minor = purchase_months.revenue_minor + excluded.revenue_minor"
        ),
        format!(
            "INSERT INTO attribution_touches (customer_id, occurred_us, event_id, campaign) \
             SELECT $1, occurred_us, event_id, campaign FROM attribution_touches WHERE {of_dups} \
             ON CONFLICT DO NOTHING"
        ),
    ];
    for sql in statements {
        exec(db, sql, args()).await?;
    }
    forget_rollups(db, dups).await?;
    let conv = "(SELECT first_conversion_us FROM customers WHERE id = $1)";
    let month = "(SELECT first_conversion_month FROM customers WHERE id = $1)";
    for table in ["touch_months", "purchase_months"] {
        exec(
            db,
            format!(
                "UPDATE {table} SET conv_us = {conv}, conv_month = {month} WHERE customer_id = $1"
            ),
            vec![survivor.into()],
        )
        .await?;
    }
    exec(
        db,
        format!(
            "DELETE FROM attribution_touches WHERE customer_id = $1 AND occurred_us > \
             COALESCE({conv}, occurred_us)"
        ),
        vec![survivor.into()],
    )
    .await?;
    let mut all = dups.to_vec();
    all.push(survivor.to_owned());
    journeys::rebuild(db, &all).await?;
    forget_marks(db, dups).await
}

async fn forget_rollups(db: &impl ConnectionTrait, customers: &[String]) -> Result<(), Error> {
    activity::forget(db, customers).await
}

async fn forget_marks(db: &impl ConnectionTrait, customers: &[String]) -> Result<(), Error> {
    if customers.is_empty() {
        return Ok(());
    }
    exec(
        db,
        format!(
            "DELETE FROM projection_marks WHERE customer_id IN ({})",
            marks(1, customers.len())
        ),
        customers.iter().map(|c| Value::from(c.clone())).collect(),
    )
    .await
}

/// Deletes every projected row of `customers` (erased): rollups, journey
/// rows and marks.
pub async fn forget(db: &impl ConnectionTrait, customers: &[String]) -> Result<(), Error> {
    forget_rollups(db, customers).await?;
    journeys::forget(db, customers).await?;
    forget_marks(db, customers).await
}
