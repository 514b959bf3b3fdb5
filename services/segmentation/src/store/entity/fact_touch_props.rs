//! `fact_touch_props`: touchpoint properties.

use sea_orm::entity::prelude::*;

/// A row of `fact_touch_props`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "fact_touch_props")]
pub struct Model {
    /// Event id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub event_id: String,
    /// Property key.
    #[sea_orm(primary_key, auto_increment = false)]
    pub key: String,
    /// Property value.
    pub value: String,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
