//! The journey rollup `move_paths`: for every stage move (a
//! `stage_history` row) the customer's last [`STEPS`] touchpoints at or
//! before it, newest first, as columns `s1..s10` (the step: the kind code,
//! or `c:{custom type}` for CUSTOM) and `u1..u10` (their times), plus
//! `prev_same_us`, the customer's previous move into the same stage, and
//! the move's `from_stage` / `to_stage`. The
//! journey report then reads one row per entry, with no touchpoint join:
//! the path of window `w` and length `l` is the first `min(l, m)` steps,
//! `m` the number with `u_i ≥ t − w` (a prefix, times descending), and a
//! move is the first entry of the period `[S, E)` when
//! `prev_same_us < S` or there is none. Pain points read the rows of
//! leaving moves (backward or to CHURNED, [`LEAVING`], with a partial
//! index on it) the same way.
//!
//! Kept by the report projection ([`crate::projection`]), one or two
//! set-based statements per batch of events: new moves get their row
//! ([`fill`], for `StageChanged`); touchpoints inserted at or before
//! existing moves of their customer (out of order) recompute those moves'
//! rows from their few candidates ([`on_touchpoints`], for
//! `TouchpointRecorded`). Both read the current tables, so applying them
//! again changes nothing. A merge rebuilds the survivor's ([`rebuild`],
//! from [`super::projection::fold`]); an erasure deletes them
//! ([`super::projection::forget`]).

use clm_platform::{Error, bulk};
use sea_orm::{ConnectionTrait, Statement, Value};
use std::collections::BTreeMap;

/// A leaving move: from a funnel stage backward, or to CHURNED (the text
/// of the partial index `move_paths_leaving`, which a query must repeat
/// word for word for the planner to use it).
pub const LEAVING: &str =
    "from_stage IS NOT NULL AND from_stage <= 5 AND (to_stage = 6 OR to_stage < from_stage)";

/// Touchpoints kept per move: the largest `max_path_length` of the report.
pub const STEPS: usize = 10;

/// The step of touchpoint row `t`, as in the journey report.
const STEP: &str =
    "CASE WHEN t.kind = 7 THEN 'c:' || COALESCE(t.custom_type, '') ELSE CAST(t.kind AS TEXT) END";

fn marks(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The statement that gives every move without a row its row: for every
/// customer (`None`), or for those the two conditions name (`Some`), on
/// `customer_id` and on `h2.customer_id` ([`bulk::any_text`]).
pub fn fill_sql(filters: Option<(&str, &str)>) -> String {
    let (f, f2) = filters.unwrap_or(("1 = 1", "1 = 1"));
    let cols: Vec<String> = (1..=STEPS)
        .map(|i| format!("s{i}"))
        .chain((1..=STEPS).map(|i| format!("u{i}")))
        .collect();
    let picks: Vec<String> = (1..=STEPS)
        .map(|i| format!("MAX(CASE WHEN x.rn = {i} THEN x.step END)"))
        .chain((1..=STEPS).map(|i| format!("MAX(CASE WHEN x.rn = {i} THEN x.occurred_us END)")))
        .collect();
    format!(
        "INSERT INTO move_paths (history_id, customer_id, from_stage, to_stage, change_us, prev_same_us, {cols}) \
         SELECT h.id, h.customer_id, h.from_stage, h.to_stage, h.change_us, h.prev_same_us, {picks} \
         FROM (SELECT id, customer_id, from_stage, to_stage, change_us, \
           LAG(change_us) OVER (PARTITION BY customer_id, to_stage ORDER BY change_us, id) AS prev_same_us \
           FROM stage_history WHERE {f}) h \
         LEFT JOIN (SELECT h2.id AS hid, {STEP} AS step, t.occurred_us, \
           ROW_NUMBER() OVER (PARTITION BY h2.id ORDER BY t.occurred_us DESC, t.event_id DESC) AS rn \
           FROM stage_history h2 JOIN touchpoints t ON t.customer_id = h2.customer_id \
           AND t.occurred_us <= h2.change_us \
           WHERE {f2} AND NOT EXISTS (SELECT 1 FROM move_paths p WHERE p.history_id = h2.id)) x \
           ON x.hid = h.id AND x.rn <= {STEPS} \
         WHERE NOT EXISTS (SELECT 1 FROM move_paths p WHERE p.history_id = h.id) \
         GROUP BY h.id, h.customer_id, h.from_stage, h.to_stage, h.change_us, h.prev_same_us",
        cols = cols.join(", "),
        picks = picks.join(", "),
    )
}

async fn exec(db: &impl ConnectionTrait, sql: String, values: Vec<Value>) -> Result<u64, Error> {
    Ok(db
        .execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            values,
        ))
        .await?
        .rows_affected())
}

/// Gives the moves of `customers` that have no row theirs (after new moves
/// were inserted): one statement.
pub async fn fill(db: &impl ConnectionTrait, customers: &[String]) -> Result<(), Error> {
    if customers.is_empty() {
        return Ok(());
    }
    let postgres = clm_platform::db::is_postgres(db);
    let (f, mut values) = bulk::any_text(postgres, "customer_id", 1, customers);
    let (f2, more) = bulk::any_text(postgres, "h2.customer_id", 1 + values.len(), customers);
    values.extend(more);
    exec(db, fill_sql(Some((&f, &f2))), values).await?;
    Ok(())
}

/// After touchpoints were inserted, `earliest` holding each customer's
/// earliest new time: recomputes the rows of that customer's moves at or
/// after it, in one statement (none matches in the usual case, touchpoints
/// recorded after the moves they follow). Only touchpoints from a row's
/// 10th kept time on can be among its new last 10 (the kept ones are still
/// there and rank above anything older), so each row reads its few
/// candidates by the `(customer_id, occurred_us, event_id)` index, however
/// long the customer's history.
pub async fn on_touchpoints(
    db: &impl ConnectionTrait,
    earliest: &BTreeMap<String, i64>,
) -> Result<(), Error> {
    let pairs: Vec<_> = earliest.iter().collect();
    let sets: Vec<String> = (1..=STEPS)
        .map(|i| format!("s{i} = n.s{i}"))
        .chain((1..=STEPS).map(|i| format!("u{i} = n.u{i}")))
        .collect();
    let picks: Vec<String> = (1..=STEPS)
        .map(|i| format!("MAX(CASE WHEN x.rn = {i} THEN x.step END) AS s{i}"))
        .chain(
            (1..=STEPS)
                .map(|i| format!("MAX(CASE WHEN x.rn = {i} THEN x.occurred_us END) AS u{i}")),
        )
        .collect();
    let postgres = clm_platform::db::is_postgres(db);
    for chunk in pairs.chunks(1_000) {
        let (rows, values) = bulk::rows(
            postgres,
            1,
            vec![
                (
                    "text",
                    chunk
                        .iter()
                        .map(|(c, _)| Value::from((*c).clone()))
                        .collect(),
                ),
                (
                    "int8",
                    chunk.iter().map(|(_, at)| Value::from(**at)).collect(),
                ),
            ],
        );
        let sql = format!(
            "WITH v (customer_id, at_us) AS ({rows}) \
             UPDATE move_paths SET {sets} FROM \
             (SELECT x.hid, {picks} FROM \
               (SELECT p.history_id AS hid, {STEP} AS step, t.occurred_us, \
                 ROW_NUMBER() OVER (PARTITION BY p.history_id ORDER BY t.occurred_us DESC, t.event_id DESC) AS rn \
                 FROM v JOIN move_paths p ON p.customer_id = v.customer_id AND p.change_us >= v.at_us \
                 JOIN touchpoints t ON t.customer_id = p.customer_id AND t.occurred_us <= p.change_us \
                 AND t.occurred_us >= COALESCE(p.u{STEPS}, t.occurred_us)) AS x \
               WHERE x.rn <= {STEPS} GROUP BY x.hid) AS n \
             WHERE move_paths.history_id = n.hid",
            sets = sets.join(", "),
            picks = picks.join(", "),
        );
        exec(db, sql, values).await?;
    }
    Ok(())
}

/// Drops and refills the rows of `customers` (after a merge).
pub async fn rebuild(db: &impl ConnectionTrait, customers: &[String]) -> Result<(), Error> {
    forget(db, customers).await?;
    fill(db, customers).await
}

/// Deletes the rows of `customers`.
pub async fn forget(db: &impl ConnectionTrait, customers: &[String]) -> Result<(), Error> {
    if customers.is_empty() {
        return Ok(());
    }
    let values = customers.iter().map(|c| Value::from(c.clone())).collect();
    let sql = format!(
        "DELETE FROM move_paths WHERE customer_id IN ({})",
        marks(1, customers.len())
    );
    exec(db, sql, values).await?;
    Ok(())
}
