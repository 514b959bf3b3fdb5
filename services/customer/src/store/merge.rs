//! What MergeCustomers changes besides the survivor's own row: children of
//! the duplicates move to the survivor (one UPDATE per table), the
//! duplicates become redirects, and their rows go.

use super::entity::customer_redirects as redirects;
use super::entity::customers;
use super::n;
use chrono::{DateTime, Utc};
use clm_domain::ids::CustomerId;
use clm_platform::Error;
use clm_platform::db::to_micros;
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{ActiveValue, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};

fn ids(dups: &[CustomerId]) -> Vec<String> {
    dups.iter().map(ToString::to_string).collect()
}

/// Moves the duplicates' touchpoints, stage history, consent history and
/// identifiers (no longer the profile's) to `survivor`, re-points
/// redirects to a duplicate at `survivor`. The report rollups the moved
/// rows feed are folded into the survivor's by the report projection when
/// it reaches the `CustomersMerged` event ([`super::projection::fold`]).
pub async fn move_children(
    db: &impl ConnectionTrait,
    survivor: CustomerId,
    dups: &[CustomerId],
) -> Result<(), Error> {
    let to = survivor.to_string();
    for (table, col) in [
        ("touchpoints", "customer_id"),
        ("stage_history", "customer_id"),
        ("consent_history", "customer_id"),
        ("customer_redirects", "survivor_id"),
    ] {
        let mut up = Query::update();
        up.table(n(table))
            .value(n(col), to.clone())
            .and_where(Expr::col(n(col)).is_in(ids(dups)));
        db.execute(&up).await?;
    }
    let mut up = Query::update();
    up.table(n("customer_identifiers"))
        .value(n("customer_id"), to)
        .value(n("profile"), false)
        .and_where(Expr::col(n("customer_id")).is_in(ids(dups)));
    db.execute(&up).await?;
    Ok(())
}

/// Turns the duplicates into redirects to `survivor` and deletes their
/// rows (their attributes and consent go with them).
pub async fn redirect(
    db: &impl ConnectionTrait,
    survivor: CustomerId,
    dups: &[CustomerId],
    now: DateTime<Utc>,
) -> Result<(), Error> {
    redirects::Entity::insert_many(dups.iter().map(|d| redirects::ActiveModel {
        id: ActiveValue::Set(d.to_string()),
        survivor_id: ActiveValue::Set(survivor.to_string()),
        merge_us: ActiveValue::Set(to_micros(now)),
    }))
    .exec_without_returning(db)
    .await?;
    // Explicit rather than by cascade: SQLite enforces foreign keys only
    // when a connection turns them on.
    for table in ["customer_attributes", "customer_consent"] {
        let mut del = Query::delete();
        del.from_table(n(table))
            .and_where(Expr::col(n("customer_id")).is_in(ids(dups)));
        db.execute(&del).await?;
    }
    customers::Entity::delete_many()
        .filter(customers::Column::Id.is_in(ids(dups)))
        .exec(db)
        .await?;
    Ok(())
}
