//! `campaign_spend`: one row per amount booked on a campaign.

use sea_orm::entity::prelude::*;

/// A row of `campaign_spend`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "campaign_spend")]
pub struct Model {
    /// Row id.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The campaign's id.
    pub campaign_id: String,
    /// Amount, minor units (not negative).
    pub amount_minor: i64,
    /// ISO 4217 code (the campaign's).
    pub currency: String,
    /// When the cost is booked (µs).
    pub book_us: i64,
    /// What it was for.
    #[sea_orm(column_type = "Text")]
    pub description: String,
    /// When it was recorded (µs).
    pub create_us: i64,
}

/// `campaign_spend` has no relations the service navigates.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
