//! `score_touchpoints`: every touchpoint seen (see `store::customers`).

use sea_orm::entity::prelude::*;

/// A row of `score_touchpoints`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "score_touchpoints")]
pub struct Model {
    /// Event id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub event_id: String,
    /// `customers/{id}`.
    pub customer: String,
    /// When it happened (µs).
    pub occurred_us: i64,
    /// Encoded `clm.customer.v1.Touchpoint`.
    pub body: Vec<u8>,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
