//! `segment_snapshots`: a segment's size at its daily snapshot.

use sea_orm::entity::prelude::*;

/// A snapshot row.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "segment_snapshots")]
pub struct Model {
    /// Bare segment id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub segment_id: String,
    /// The day (00:00 UTC), µs.
    #[sea_orm(primary_key, auto_increment = false)]
    pub day_us: i64,
    /// Members at the snapshot.
    pub size: i64,
    /// When it was taken, µs.
    pub taken_us: i64,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
