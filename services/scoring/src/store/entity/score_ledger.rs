//! `score_ledger`: one row per award (see `store::ledger`).

use sea_orm::entity::prelude::*;

/// A row of `score_ledger`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "score_ledger")]
pub struct Model {
    /// Row id.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// `customers/{id}`.
    pub customer: String,
    /// Model id.
    pub model: String,
    /// Model version (0: manual).
    pub model_version: i64,
    /// Score name.
    pub score: String,
    /// Rule id (`manual` for adjustments).
    pub rule: String,
    /// Points awarded.
    pub points: i64,
    /// The causing event.
    pub source_event: String,
    /// Award time (µs).
    pub award_us: i64,
    /// `Decay::code` kind.
    pub decay_kind: i16,
    /// `Decay::code` parameter.
    pub decay_us: i64,
    /// Why (manual).
    pub reason: String,
    /// Who (manual).
    pub actor: String,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
