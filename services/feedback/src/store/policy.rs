//! `fatigue_policy`: the one row of the fatigue cap.

use super::entity::fatigue_policy::{self, Column as PC, Entity as Policy};
use clm_platform::Result;
use sea_orm::sea_query::OnConflict;
use sea_orm::{ConnectionTrait, EntityTrait, QuerySelect};

pub use fatigue_policy::Model as Row;

/// Default cap: 3 invitations ...
pub const DEFAULT_MAX: i32 = 3;
/// ... per 30 days (µs).
pub const DEFAULT_PERIOD_US: i64 = 30 * 86_400_000_000;

/// The policy (the default until someone changes it).
pub async fn get(db: &impl ConnectionTrait) -> Result<Row> {
    Ok(Policy::find_by_id(1).one(db).await?.unwrap_or(Row {
        id: 1,
        max_invitations: DEFAULT_MAX,
        period_us: DEFAULT_PERIOD_US,
        revision: 0,
        update_us: 0,
    }))
}

/// The policy, locked for update on PostgreSQL (its writers take turns;
/// invitations read it without a lock).
pub async fn lock(db: &impl ConnectionTrait) -> Result<Row> {
    let mut q = Policy::find_by_id(1);
    if clm_platform::db::is_postgres(db) {
        q = q.lock(sea_orm::sea_query::LockType::Update);
    }
    Ok(q.one(db).await?.unwrap_or(Row {
        id: 1,
        max_invitations: DEFAULT_MAX,
        period_us: DEFAULT_PERIOD_US,
        revision: 0,
        update_us: 0,
    }))
}

/// Writes the policy.
pub async fn put(db: &impl ConnectionTrait, row: Row) -> Result<()> {
    Policy::insert(fatigue_policy::ActiveModel::from(row))
        .on_conflict(
            OnConflict::column(PC::Id)
                .update_columns([PC::MaxInvitations, PC::PeriodUs, PC::Revision, PC::UpdateUs])
                .to_owned(),
        )
        .exec(db)
        .await?;
    Ok(())
}
