//! `score_timers`: the threshold timer queue. A row per customer, model and
//! threshold holds the side of the threshold the score was last seen on
//! and `due_us`, when to look again: the next decay crossing, or "now"
//! after an award. Kept in the database, so it survives restarts.

use super::{chunk, n};
use clm_platform::Result;
use clm_platform::bulk::is_in_texts;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Order, Query};
use sea_orm::{ConnectionTrait, FromQueryResult};

/// A timer row.
#[derive(Debug, Clone, FromQueryResult)]
pub struct Timer {
    /// `customers/{id}`.
    pub customer: String,
    /// Model id.
    pub model: String,
    /// Threshold id.
    pub threshold: String,
    /// Whether the score was at or above the threshold when last seen.
    pub above: bool,
    /// When to look again (µs).
    pub due_us: Option<i64>,
}

/// Asks for `(customer, model, threshold)` to be looked at at `due_us`
/// (creating the timer, below the threshold, if new). One statement per chunk.
pub async fn touch(
    db: &impl ConnectionTrait,
    keys: &[(String, String, String)],
    due_us: i64,
) -> Result<()> {
    for part in keys.chunks(chunk(5)) {
        let mut q = Query::insert();
        q.into_table(n("score_timers"))
            .columns(["customer", "model", "threshold", "above", "due_us"].map(n));
        for (c, m, t) in part {
            q.values_panic([
                c.clone().into(),
                m.clone().into(),
                t.clone().into(),
                false.into(),
                due_us.into(),
            ]);
        }
        q.on_conflict(
            OnConflict::columns(["customer", "model", "threshold"].map(n))
                .update_column(n("due_us"))
                .to_owned(),
        );
        db.execute(&q).await?;
    }
    Ok(())
}

/// Re-arms every timer of `model` to `due_us` (a version was activated).
pub async fn touch_model(db: &impl ConnectionTrait, model: &str, due_us: i64) -> Result<()> {
    let q = Query::update()
        .table(n("score_timers"))
        .value(n("due_us"), due_us)
        .and_where(Expr::col(n("model")).eq(model))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

/// Timers due at or before `now_us`, soonest first, at most `limit`.
pub async fn due(db: &impl ConnectionTrait, now_us: i64, limit: u64) -> Result<Vec<Timer>> {
    let q = Query::select()
        .columns(["customer", "model", "threshold", "above", "due_us"].map(n))
        .from(n("score_timers"))
        .and_where(Expr::col(n("due_us")).lte(now_us))
        .order_by(n("due_us"), Order::Asc)
        .limit(limit)
        .to_owned();
    Ok(
        Timer::find_by_statement(db.get_database_backend().build(&q))
            .all(db)
            .await?,
    )
}

/// Stores what a look at a timer found, unless it was re-armed meanwhile
/// (its `due_us` no longer `seen_due`).
pub async fn settle(
    db: &impl ConnectionTrait,
    t: &Timer,
    seen_due: i64,
    above: bool,
    next_due: Option<i64>,
) -> Result<()> {
    let q = Query::update()
        .table(n("score_timers"))
        .value(n("above"), above)
        .value(n("due_us"), next_due)
        .and_where(Expr::col(n("customer")).eq(t.customer.clone()))
        .and_where(Expr::col(n("model")).eq(t.model.clone()))
        .and_where(Expr::col(n("threshold")).eq(t.threshold.clone()))
        .and_where(Expr::col(n("due_us")).eq(seen_due))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

/// Records the side of the threshold a timer's score is on.
pub async fn record_side(db: &impl ConnectionTrait, t: &Timer, above: bool) -> Result<()> {
    let q = Query::update()
        .table(n("score_timers"))
        .value(n("above"), above)
        .and_where(Expr::col(n("customer")).eq(t.customer.clone()))
        .and_where(Expr::col(n("model")).eq(t.model.clone()))
        .and_where(Expr::col(n("threshold")).eq(t.threshold.clone()))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

/// Moves timers of `from` customers away (a merge drops them; the
/// survivor's are re-armed by the caller) or deletes them (erasure).
pub async fn delete(db: &impl ConnectionTrait, customers: &[String]) -> Result<()> {
    let q = Query::delete()
        .from_table(n("score_timers"))
        .and_where(is_in_texts(db, "customer", customers))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}
