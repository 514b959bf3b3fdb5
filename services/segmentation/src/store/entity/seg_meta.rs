//! `seg_meta`: the one row of registry generation, membership version and freshness.

use sea_orm::entity::prelude::*;

/// A row of `seg_meta`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "seg_meta")]
pub struct Model {
    /// Always 1.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: i16,
    /// Registry generation (bumped by every segment change).
    pub generation: i64,
    /// Membership version (its row lock serialises membership writers).
    pub membership_version: i64,
    /// Occurrence of the newest applied customer event (µs).
    pub fresh_event_us: Option<i64>,
    /// When it was applied (µs).
    pub fresh_apply_us: Option<i64>,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
