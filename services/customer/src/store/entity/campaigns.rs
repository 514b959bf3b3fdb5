//! `campaigns`: one row per marketing campaign.

use sea_orm::entity::prelude::*;

/// A row of `campaigns`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "campaigns")]
pub struct Model {
    /// Campaign id (UUID v7 text).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// Resource name `campaigns/{id}`: what touchpoints and customers
    /// reference (unique).
    pub name: String,
    /// Name to show.
    pub display_name: String,
    /// `CampaignChannel` code (1..=7).
    pub channel: i16,
    /// Start (µs since the epoch).
    pub start_us: i64,
    /// End (µs), none while open-ended.
    pub end_us: Option<i64>,
    /// ISO 4217 code of every spend entry.
    pub currency: String,
    /// Sum of the spend entries, minor units.
    pub total_spend_minor: i64,
    /// Creation time (µs).
    pub create_us: i64,
    /// Last update (µs).
    pub update_us: i64,
    /// Optimistic-concurrency version (the etag).
    pub version: i64,
}

/// `campaigns` has no relations the service navigates.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
