//! Rollups the KPI reports read instead of re-deriving them from the whole
//! stage history, kept in the same transaction as every stage move (the
//! one writer of `stage_history` is [`stages::insert_many`](super::stages::insert_many),
//! which calls [`on_moves`] first):
//!
//! * `stage_history.left_us` / `next_stage`: when the stay that row opened
//!   ended, and where the customer went (null while it is the current stay).
//!   Time in stage and stage-to-stage conversion become per-row arithmetic,
//!   with no window over each customer's history.
//! * `customers.first_conversion_us`: the customer's first move into
//!   CONVERSION; `customers.first_churn_us`: its first move into CHURNED
//!   after that. Acquisition, CLV and retention cohorts select by an index
//!   range on the first instead of grouping all moves by customer.
//!
//! These columns are not part of the sea-orm entities on purpose: the
//! entity writes (create, update, merge) never touch them.

use super::n;
use clm_domain::lifecycle::Stage;
use clm_platform::Error;
use clm_platform::db::to_micros;
use sea_orm::ConnectionTrait;
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use std::collections::BTreeMap;

use super::stages::StageChangeRecord;

/// Updates the rollups for `changes`, which are about to be inserted: one
/// statement per distinct (time, stage) of the batch (a batch usually has
/// one), for all its customers at once.
pub async fn on_moves(
    db: &impl ConnectionTrait,
    changes: &[StageChangeRecord],
) -> Result<(), Error> {
    let mut groups: BTreeMap<(i64, i16), Vec<String>> = BTreeMap::new();
    for c in changes {
        groups
            .entry((to_micros(c.change_time), c.to.code()))
            .or_default()
            .push(c.customer.to_string());
    }
    for ((at, to), ids) in groups {
        let mut close = Query::update();
        close
            .table(n("stage_history"))
            .values([(n("left_us"), at.into()), (n("next_stage"), to.into())])
            .and_where(Expr::col(n("customer_id")).is_in(ids.clone()))
            .and_where(Expr::col(n("left_us")).is_null());
        db.execute(&close).await?;
        if to == Stage::Conversion.code() {
            let mut first = Query::update();
            first
                .table(n("customers"))
                .value(n("first_conversion_us"), at)
                .and_where(Expr::col(n("id")).is_in(ids))
                .and_where(Expr::col(n("first_conversion_us")).is_null());
            db.execute(&first).await?;
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
    Ok(())
}
