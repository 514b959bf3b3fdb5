//! `stage_history`: one row per lifecycle move, the first at creation.

use sea_orm::entity::prelude::*;

/// A row of `stage_history`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "stage_history")]
pub struct Model {
    /// Row id; orders the moves of a customer.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The customer.
    pub customer_id: String,
    /// `Stage::code` before the move (none for the entry at creation).
    pub from_stage: Option<i16>,
    /// `Stage::code` after the move.
    pub to_stage: i16,
    /// Why.
    #[sea_orm(column_type = "Text")]
    pub reason: String,
    /// Who.
    pub actor: String,
    /// When (µs since the epoch).
    pub change_us: i64,
}

/// `stage_history` has no relations the service navigates.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
