//! `segments`: one row per segment, its current rule and state.

use sea_orm::entity::prelude::*;

/// A segment row.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "segments")]
pub struct Model {
    /// Bare segment id (UUID).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// Display name.
    pub display_name: String,
    /// Owner.
    pub owner: String,
    /// Description.
    pub description: String,
    /// Canonical rule text.
    pub rule_text: String,
    /// Rule version.
    pub version: i64,
    /// Row revision (the etag).
    pub revision: i64,
    /// State code (see `store::segments::State`).
    pub state: i16,
    /// Why the last evaluation failed.
    pub failure_reason: Option<String>,
    /// Creation time, µs.
    pub create_us: i64,
    /// Last change, µs.
    pub update_us: i64,
    /// Last completed backfill, µs.
    pub evaluate_us: Option<i64>,
    /// The operation of the latest backfill (`operations/{id}`).
    pub operation: Option<String>,
    /// The team that answers for it with the owner ('' for none).
    pub team: String,
    /// What it is meant to achieve.
    pub purpose: String,
    /// How to work it.
    pub playbook: String,
    /// Whether rule, objectives and this flag change only by approved
    /// change requests.
    pub approval_required: bool,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
