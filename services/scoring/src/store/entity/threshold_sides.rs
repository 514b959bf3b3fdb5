//! `threshold_sides`: the side of each threshold a customer was last seen on (see `store::timers`).

use sea_orm::entity::prelude::*;

/// A row of `threshold_sides`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "threshold_sides")]
pub struct Model {
    /// `customers/{id}`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer: String,
    /// Model id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub model: String,
    /// Threshold id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub threshold: String,
    /// Whether the score was at or above the threshold.
    pub above: bool,
    /// The instant it was judged at (µs).
    pub seen_us: i64,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
