//! `fact_consents`: consent per customer, purpose and channel.

use sea_orm::entity::prelude::*;

/// A row of `fact_consents`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "fact_consents")]
pub struct Model {
    /// Bare customer id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer_id: String,
    /// Purpose.
    #[sea_orm(primary_key, auto_increment = false)]
    pub purpose: String,
    /// Channel.
    #[sea_orm(primary_key, auto_increment = false)]
    pub channel: String,
    /// Whether it is granted.
    pub granted: bool,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
