//! `objective_snapshots`: an objective's value and status at its
//! segment's daily snapshot (the trend its projection reads).

use sea_orm::entity::prelude::*;

/// A snapshot row.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "objective_snapshots")]
pub struct Model {
    /// Bare segment id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub segment_id: String,
    /// Objective id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub objective_id: String,
    /// The day (00:00 UTC), µs.
    #[sea_orm(primary_key, auto_increment = false)]
    pub day_us: i64,
    /// When it was taken, µs.
    pub taken_us: i64,
    /// The value.
    pub value: f64,
    /// `ObjectiveStatus` code.
    pub status: i16,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
