//! `gone_customers`: customers erased or merged into another, by a hash of
//! their id (an erased customer's id stays nowhere but in erasure records),
//! so a score the scoring stream still carries for one is not kept for a
//! customer that will never arrive (nor bring an erased one back).

use sea_orm::entity::prelude::*;

/// A row of `gone_customers`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "gone_customers")]
pub struct Model {
    /// `gone_hash` of the bare customer id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer_hash: String,
    /// When it went (µs).
    pub gone_us: i64,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
