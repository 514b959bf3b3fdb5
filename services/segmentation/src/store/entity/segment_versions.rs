//! `segment_versions`: every rule version of every segment, with who made it.

use sea_orm::entity::prelude::*;

/// A rule version.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "segment_versions")]
pub struct Model {
    /// Bare segment id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub segment_id: String,
    /// Version.
    #[sea_orm(primary_key, auto_increment = false)]
    pub version: i64,
    /// Canonical rule text of that version.
    pub rule_text: String,
    /// Who made it.
    pub actor: String,
    /// When, µs.
    pub create_us: i64,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
