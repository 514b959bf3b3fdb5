//! Stage history: one row per move, the first one written at creation.

use super::entity::stage_history::{self, Column};
use chrono::{DateTime, Utc};
use clm_domain::ids::CustomerId;
use clm_domain::lifecycle::Stage;
use clm_platform::Error;
use clm_platform::db::{from_micros, to_micros};
use sea_orm::{
    ActiveValue, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};

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

impl StageChangeRecord {
    /// The row to insert (its id is assigned by the database).
    /// The `stage_history` row of this record (`id` as held: 0 for a new
    /// one, which the table numbers).
    pub(crate) fn to_model(&self) -> stage_history::Model {
        stage_history::Model {
            id: self.id,
            customer_id: self.customer.to_string(),
            from_stage: self.from.map(Stage::code),
            to_stage: self.to.code(),
            reason: self.reason.clone(),
            actor: self.actor.clone(),
            change_us: to_micros(self.change_time),
        }
    }

    fn to_active_model(&self) -> stage_history::ActiveModel {
        stage_history::ActiveModel {
            id: ActiveValue::NotSet,
            customer_id: ActiveValue::Set(self.customer.to_string()),
            from_stage: ActiveValue::Set(self.from.map(Stage::code)),
            to_stage: ActiveValue::Set(self.to.code()),
            reason: ActiveValue::Set(self.reason.clone()),
            actor: ActiveValue::Set(self.actor.clone()),
            change_us: ActiveValue::Set(to_micros(self.change_time)),
        }
    }

    fn from_model(customer: CustomerId, m: stage_history::Model) -> Result<Self, Error> {
        Ok(Self {
            id: m.id,
            customer,
            from: m.from_stage.and_then(Stage::from_code),
            to: Stage::from_code(m.to_stage)
                .ok_or_else(|| Error::internal(format!("stored stage code {}", m.to_stage)))?,
            reason: m.reason,
            actor: m.actor,
            change_time: from_micros(m.change_us),
        })
    }
}

/// Inserts moves (one statement). The report rollups of the moves (the
/// stays they close, [`super::rollups`]; their journey rows,
/// [`super::journeys`]) are kept by the report projection
/// ([`crate::projection`]) from the `StageChanged` events the caller emits
/// in the same transaction.
pub async fn insert_many(
    db: &impl ConnectionTrait,
    changes: &[StageChangeRecord],
) -> Result<(), Error> {
    if changes.is_empty() {
        return Ok(());
    }
    stage_history::Entity::insert_many(changes.iter().map(StageChangeRecord::to_active_model))
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// The newest `limit` moves of `customer`, newest first.
pub async fn newest(
    db: &impl ConnectionTrait,
    customer: CustomerId,
    limit: u64,
) -> Result<Vec<StageChangeRecord>, Error> {
    stage_history::Entity::find()
        .filter(Column::CustomerId.eq(customer.to_string()))
        .order_by_desc(Column::Id)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(|m| StageChangeRecord::from_model(customer, m))
        .collect()
}

/// Up to `limit` moves of `customer` with id greater than `after`, oldest first.
pub async fn list(
    db: &impl ConnectionTrait,
    customer: CustomerId,
    after: i64,
    limit: u64,
) -> Result<Vec<StageChangeRecord>, Error> {
    stage_history::Entity::find()
        .filter(Column::CustomerId.eq(customer.to_string()))
        .filter(Column::Id.gt(after))
        .order_by_asc(Column::Id)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(|m| StageChangeRecord::from_model(customer, m))
        .collect()
}
