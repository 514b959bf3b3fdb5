//! Stage history: one row per move, the first one written at creation.

use super::n;
use chrono::{DateTime, Utc};
use clm_domain::ids::CustomerId;
use clm_domain::lifecycle::Stage;
use clm_platform::Error;
use clm_platform::db::{from_micros, to_micros};
use sea_orm::ConnectionTrait;
use sea_orm::sea_query::{Expr, ExprTrait, Order, Query};

/// A recorded move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageChangeRecord {
    /// Row id (orders moves of a customer).
    pub id: i64,
    /// The customer.
    pub customer: CustomerId,
    /// Stage before (None for the entry at creation).
    pub from: Option<Stage>,
    /// Stage after.
    pub to: Stage,
    /// Why.
    pub reason: String,
    /// Who.
    pub actor: String,
    /// When.
    pub change_time: DateTime<Utc>,
}

/// Inserts moves (one statement).
pub async fn insert_many(
    db: &impl ConnectionTrait,
    changes: &[StageChangeRecord],
) -> Result<(), Error> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut insert = Query::insert();
    insert.into_table(n("stage_history")).columns(
        [
            "customer_id",
            "from_stage",
            "to_stage",
            "reason",
            "actor",
            "change_us",
        ]
        .map(n),
    );
    for c in changes {
        insert.values_panic([
            c.customer.to_string().into(),
            c.from.map(Stage::code).into(),
            c.to.code().into(),
            c.reason.clone().into(),
            c.actor.clone().into(),
            to_micros(c.change_time).into(),
        ]);
    }
    db.execute(&insert).await?;
    Ok(())
}

/// Up to `limit` moves of `customer` with id greater than `after`, oldest first.
pub async fn list(
    db: &impl ConnectionTrait,
    customer: CustomerId,
    after: i64,
    limit: u64,
) -> Result<Vec<StageChangeRecord>, Error> {
    let rows = db
        .query_all(
            Query::select()
                .columns(
                    [
                        "id",
                        "from_stage",
                        "to_stage",
                        "reason",
                        "actor",
                        "change_us",
                    ]
                    .map(n),
                )
                .from(n("stage_history"))
                .and_where(Expr::col(n("customer_id")).eq(customer.to_string()))
                .and_where(Expr::col(n("id")).gt(after))
                .order_by(n("id"), Order::Asc)
                .limit(limit),
        )
        .await?;
    rows.iter()
        .map(|r| {
            let from: Option<i16> = r.try_get("", "from_stage")?;
            let to: i16 = r.try_get("", "to_stage")?;
            Ok(StageChangeRecord {
                id: r.try_get("", "id")?,
                customer,
                from: from.and_then(Stage::from_code),
                to: Stage::from_code(to)
                    .ok_or_else(|| Error::internal(format!("stored stage code {to}")))?,
                reason: r.try_get("", "reason")?,
                actor: r.try_get("", "actor")?,
                change_time: from_micros(r.try_get("", "change_us")?),
            })
        })
        .collect()
}
