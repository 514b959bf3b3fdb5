//! `backfill_diffs`: the backfills computing their diff outside the
//! membership lock, each with the membership version it started after.
//! While a segment has a row, every evaluation of it records the
//! customers it decided in [`super::backfill_seen`].

use sea_orm::entity::prelude::*;

/// A row of `backfill_diffs`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "backfill_diffs")]
pub struct Model {
    /// Bare segment id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub segment_id: String,
    /// The membership version taken when the diff started: every
    /// membership write after it has a higher one.
    pub since_version: i64,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
