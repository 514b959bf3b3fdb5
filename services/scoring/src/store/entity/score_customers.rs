//! `score_customers`: what scoring knows of each customer (see `store::customers`).

use sea_orm::entity::prelude::*;

/// A row of `score_customers`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "score_customers")]
pub struct Model {
    /// `customers/{id}`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer: String,
    /// `Stage::code`.
    pub stage: Option<i16>,
    /// When the stage was entered (µs).
    pub stage_us: Option<i64>,
    /// Encoded `clm.customer.v1.Customer`.
    pub profile: Option<Vec<u8>>,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
