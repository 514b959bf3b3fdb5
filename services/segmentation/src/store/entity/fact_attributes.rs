//! `fact_attributes`: custom attributes, one row per customer and key.

use sea_orm::entity::prelude::*;

/// A row of `fact_attributes`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "fact_attributes")]
pub struct Model {
    /// Bare customer id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer_id: String,
    /// Attribute key.
    #[sea_orm(primary_key, auto_increment = false)]
    pub key: String,
    /// Value kind.
    pub kind: i16,
    /// String value.
    pub str_value: Option<String>,
    /// Number value.
    pub num_value: Option<f64>,
    /// Boolean value.
    pub bool_value: Option<bool>,
    /// Timestamp value (µs).
    pub time_us: Option<i64>,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
