//! Threshold timers on the platform's timer queue, and the side of each
//! threshold a customer's score was last seen on (`threshold_sides`).
//!
//! A timer of kind [`THRESHOLD`], keyed `{model}|{threshold}|{customer}`,
//! says when to look at that threshold again: the next decay crossing, or
//! "now" after an award (which judged its own crossing in its transaction;
//! the look finds the next decay crossing). A timer of kind [`STAGE_MOVE`] carries a
//! TransitionStage call to deliver to the customer service, keyed by its
//! request id. Both are the customer's (their subject), so a merge or an
//! erasure removes them with the customer.

use super::chunk;
use super::entity::threshold_sides::{Column as C, Entity as Sides};
use clm_platform::Result;
use clm_platform::bulk::is_in_texts;
use clm_platform::timers::{self, Arm};
use sea_orm::ConnectionTrait;
use sea_orm::IdenStatic;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use std::collections::HashMap;

/// Timer kind: look at a threshold again.
pub const THRESHOLD: &str = "scoring.threshold";
/// Timer kind: deliver a stage move to the customer service.
pub const STAGE_MOVE: &str = "scoring.stage_move";

/// (customer, model, threshold).
pub type Key = (String, String, String);

/// The timer key of `(customer, model, threshold)`: model first, so a
/// model's timers share a prefix (model and threshold ids are identifiers
/// without `|`).
pub fn key((customer, model, threshold): &Key) -> String {
    format!("{model}|{threshold}|{customer}")
}

/// The `(customer, model, threshold)` of a timer key.
pub fn parse(key: &str) -> Option<Key> {
    let mut parts = key.splitn(3, '|');
    let (model, threshold, customer) = (parts.next()?, parts.next()?, parts.next()?);
    Some((customer.to_owned(), model.to_owned(), threshold.to_owned()))
}

/// Asks for `keys` to be looked at at `due_us` (in the writer's transaction).
pub async fn touch(db: &impl ConnectionTrait, keys: &[Key], due_us: i64) -> Result<()> {
    let arms: Vec<Arm> = keys
        .iter()
        .map(|k| Arm::new(key(k), k.0.clone(), due_us))
        .collect();
    timers::arm(db, THRESHOLD, &arms).await?;
    Ok(())
}

/// Re-arms every threshold of `model` seen so far to `due_us` (a version
/// was activated).
pub async fn touch_model(db: &impl ConnectionTrait, model: &str, due_us: i64) -> Result<()> {
    let q = Query::select()
        .columns([C::Customer, C::Threshold])
        .from(Sides)
        .and_where(Expr::col(C::Model).eq(model))
        .to_owned();
    let mut keys = Vec::new();
    for r in db.query_all(&q).await? {
        keys.push((
            r.try_get("", C::Customer.as_str())?,
            model.to_owned(),
            r.try_get("", C::Threshold.as_str())?,
        ));
    }
    touch(db, &keys, due_us).await?;
    timers::rearm_prefix(db, THRESHOLD, &format!("{model}|"), due_us).await?;
    Ok(())
}

/// A threshold's side as last judged: at or above it, and when (µs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Side {
    /// The score was at or above the threshold.
    pub above: bool,
    /// The instant it was judged at.
    pub seen_us: i64,
}

/// The side each of `keys` was last seen on (absent: below, never seen).
pub async fn sides(db: &impl ConnectionTrait, keys: &[Key]) -> Result<HashMap<Key, Side>> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let customers: Vec<String> = keys.iter().map(|k| k.0.clone()).collect();
    let q = Query::select()
        .columns([C::Customer, C::Model, C::Threshold, C::Above, C::SeenUs])
        .from(Sides)
        .and_where(is_in_texts(db, C::Customer.as_str(), &customers))
        .to_owned();
    let mut out = HashMap::new();
    for r in db.query_all(&q).await? {
        out.insert(
            (
                r.try_get("", C::Customer.as_str())?,
                r.try_get("", C::Model.as_str())?,
                r.try_get("", C::Threshold.as_str())?,
            ),
            Side {
                above: r.try_get("", C::Above.as_str())?,
                seen_us: r.try_get("", C::SeenUs.as_str())?,
            },
        );
    }
    Ok(out)
}

/// Records the side of the threshold each key's score is on.
pub async fn record_sides(db: &impl ConnectionTrait, sides: &[(Key, Side)]) -> Result<()> {
    for part in sides.chunks(chunk(5)) {
        let mut q = Query::insert();
        q.into_table(Sides)
            .columns([C::Customer, C::Model, C::Threshold, C::Above, C::SeenUs]);
        for ((c, m, t), side) in part {
            q.values_panic([
                c.clone().into(),
                m.clone().into(),
                t.clone().into(),
                side.above.into(),
                side.seen_us.into(),
            ]);
        }
        q.on_conflict(
            OnConflict::columns([C::Customer, C::Model, C::Threshold])
                .update_columns([C::Above, C::SeenUs])
                .to_owned(),
        );
        db.execute(&q).await?;
    }
    Ok(())
}

/// Deletes the sides and timers of `customers` (the duplicates of a merge,
/// whose survivor's thresholds the caller re-arms; an erasure).
pub async fn delete(db: &impl ConnectionTrait, customers: &[String]) -> Result<()> {
    let q = Query::delete()
        .from_table(Sides)
        .and_where(is_in_texts(db, C::Customer.as_str(), customers))
        .to_owned();
    db.execute(&q).await?;
    timers::disarm_subjects(db, None, customers).await?;
    Ok(())
}
