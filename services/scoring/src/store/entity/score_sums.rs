//! `score_sums`: running sums of the ledger (see `store::sums`).

use sea_orm::entity::prelude::*;

/// A row of `score_sums`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "score_sums")]
pub struct Model {
    /// `customers/{id}`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer: String,
    /// Model id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub model: String,
    /// Score name.
    #[sea_orm(primary_key, auto_increment = false)]
    pub score: String,
    /// `Decay::code` kind.
    #[sea_orm(primary_key, auto_increment = false)]
    pub decay_kind: i16,
    /// `Decay::code` parameter.
    #[sea_orm(primary_key, auto_increment = false)]
    pub decay_us: i64,
    /// See `Sum::anchor_us`.
    pub anchor_us: i64,
    /// See `Sum::total`.
    pub total: f64,
    /// See `Sum::entries`.
    pub entries: i64,
    /// See `Sum::newest_us`.
    pub newest_us: i64,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
