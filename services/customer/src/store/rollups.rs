//! Rollups the KPI reports read instead of re-deriving them from the whole
//! stage history, kept by the report projection ([`crate::projection`], a
//! consumer of this service's own change stream) from each
//! `StageChanged` event, after the move's row was written:
//!
//! * `stage_history.left_us` / `next_stage`: when the stay that row opened
//!   ended, and where the customer went (null while it is the current stay).
//!   Time in stage and stage-to-stage conversion become per-row arithmetic,
//!   with no window over each customer's history.
//! * `customers.first_conversion_us`: the customer's first move into
//!   CONVERSION (and `first_conversion_month`, its UTC month index, the
//!   cohort of CLV and retention); `customers.first_churn_us`: its first move into CHURNED
//!   after that. Acquisition, CLV and retention cohorts select by an index
//!   range on the first instead of grouping all moves by customer.
//!
//! * `attribution_touches` ([`super::activity`]): a first conversion
//!   drops the customer's campaign touches after it; `touch_months` and
//!   `purchase_months` take its time and month (`conv_us`, `conv_month`).
//!
//! These columns are not part of the sea-orm entities on purpose: the
//! entity writes (create, update, merge) never touch them.

use super::n;
use clm_domain::lifecycle::Stage;
use clm_platform::{Error, bulk};
use sea_orm::ConnectionTrait;
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use std::collections::BTreeMap;

/// A move the projection applies: customer id, time (µs), stage it went to.
pub type Move = (String, i64, Stage);

/// Updates the rollups for `moves`, whose rows are written already: per
/// distinct (time, stage) of the conversions and churns, for all their
/// customers at once, the customers' rows first (the lock order of
/// erasure and merge, which lock them before their other rows), then one
/// statement closing the stays the customers left (each open row that has
/// a later row gets that row's time and stage: the same on a replay).
pub async fn on_moves(db: &impl ConnectionTrait, moves: &[Move]) -> Result<(), Error> {
    if moves.is_empty() {
        return Ok(());
    }
    let mut groups: BTreeMap<(i64, i16), Vec<String>> = BTreeMap::new();
    for (customer, at, to) in moves {
        if matches!(to, Stage::Conversion | Stage::Churned) {
            groups
                .entry((*at, to.code()))
                .or_default()
                .push(customer.clone());
        }
    }
    for ((at, to), ids) in groups {
        if to == Stage::Conversion.code() {
            let month = clm_domain::kpi::month_of(clm_platform::db::from_micros(at));
            let mut first = Query::update();
            first
                .table(n("customers"))
                .value(n("first_conversion_us"), at)
                .value(n("first_conversion_month"), month)
                .and_where(Expr::col(n("id")).is_in(ids.clone()))
                .and_where(Expr::col(n("first_conversion_us")).is_null());
            db.execute(&first).await?;
            // Campaign touches after a first conversion never credit it;
            // a later conversion (first_conversion_us already set, and
            // earlier) finds none to drop.
            let mut late = Query::delete();
            late.from_table(n("attribution_touches"))
                .and_where(Expr::col(n("customer_id")).is_in(ids.clone()))
                .and_where(Expr::col(n("occurred_us")).gt(at));
            db.execute(&late).await?;
            for table in ["touch_months", "purchase_months"] {
                let mut copy = Query::update();
                copy.table(n(table))
                    .values([(n("conv_us"), at.into()), (n("conv_month"), month.into())])
                    .and_where(Expr::col(n("customer_id")).is_in(ids.clone()))
                    .and_where(Expr::col(n("conv_us")).is_null());
                db.execute(&copy).await?;
            }
        } else if to == Stage::Churned.code() {
            let mut churn = Query::update();
            churn
                .table(n("customers"))
                .value(n("first_churn_us"), at)
                .and_where(Expr::col(n("id")).is_in(ids))
                .and_where(Expr::col(n("first_conversion_us")).is_not_null())
                .and_where(Expr::col(n("first_churn_us")).is_null());
            db.execute(&churn).await?;
        }
    }
    let mut customers: Vec<String> = moves.iter().map(|m| m.0.clone()).collect();
    customers.sort_unstable();
    customers.dedup();
    let postgres = clm_platform::db::is_postgres(db);
    for chunk in customers.chunks(1_000) {
        let (of, values) = bulk::any_text(postgres, "customer_id", 1, chunk);
        let next = |col: &str| {
            format!(
                "(SELECT x.{col} FROM stage_history x WHERE x.customer_id = stage_history.customer_id \
                 AND x.id > stage_history.id ORDER BY x.id LIMIT 1)"
            )
        };
        let sql = format!(
            "UPDATE stage_history SET left_us = {}, next_stage = {} \
             WHERE {of} AND left_us IS NULL AND EXISTS (SELECT 1 FROM stage_history x \
             WHERE x.customer_id = stage_history.customer_id AND x.id > stage_history.id)",
            next("change_us"),
            next("to_stage"),
        );
        db.execute_raw(sea_orm::Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            values,
        ))
        .await?;
    }
    Ok(())
}

/// Recomputes `customer`'s first conversion (and its month) and first
/// churn after it from its stage history (after a merge moved other
/// customers' moves to it): two statements.
pub async fn recompute_firsts(db: &impl ConnectionTrait, customer: &str) -> Result<(), Error> {
    let conv = Stage::Conversion.code();
    let churn = Stage::Churned.code();
    let sql = format!(
        "UPDATE customers SET \
         first_conversion_us = (SELECT MIN(h.change_us) FROM stage_history h \
           WHERE h.customer_id = customers.id AND h.to_stage = {conv}), \
         first_churn_us = (SELECT MIN(h.change_us) FROM stage_history h \
           WHERE h.customer_id = customers.id AND h.to_stage = {churn} AND h.change_us > \
           (SELECT MIN(h2.change_us) FROM stage_history h2 \
            WHERE h2.customer_id = customers.id AND h2.to_stage = {conv})) \
         WHERE id = $1"
    );
    let month = format!(
        "UPDATE customers SET first_conversion_month = {} WHERE id = $1",
        super::reports::month_sql("first_conversion_us")
    );
    for sql in [sql, month] {
        db.execute_raw(sea_orm::Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            [customer.into()],
        ))
        .await?;
    }
    Ok(())
}
