//! `backfill_seen`: the customers an evaluation decided for a segment
//! while its backfill computed its diff (see [`super::backfill_diffs`]):
//! the backfill leaves their membership as that newer decision made it.

use sea_orm::entity::prelude::*;

/// A row of `backfill_seen`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "backfill_seen")]
pub struct Model {
    /// Bare segment id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub segment_id: String,
    /// Bare customer id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer_id: String,
    /// The membership version of the last evaluation that decided it.
    pub version: i64,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
