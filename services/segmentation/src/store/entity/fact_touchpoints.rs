//! `fact_touchpoints`: the touchpoints behavioural rules read.

use sea_orm::entity::prelude::*;

/// A row of `fact_touchpoints`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "fact_touchpoints")]
pub struct Model {
    /// Event id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub event_id: String,
    /// Bare customer id.
    pub customer_id: String,
    /// `TouchpointKind::code`.
    pub kind: i16,
    /// Custom type.
    pub custom_type: Option<String>,
    /// When it happened (µs).
    pub occurred_us: i64,
    /// Product.
    pub product: Option<String>,
    /// Feature.
    pub feature: Option<String>,
    /// Campaign.
    pub campaign: Option<String>,
    /// Channel.
    pub channel: Option<String>,
    /// Revenue, minor units.
    pub revenue_minor: Option<i64>,
    /// Its currency.
    pub revenue_currency: Option<String>,
    /// Usage time (ms).
    pub usage_ms: Option<i64>,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
