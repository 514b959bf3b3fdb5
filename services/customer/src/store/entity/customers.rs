//! `customers`: one row per customer profile.

use sea_orm::entity::prelude::*;

/// A row of `customers`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "customers")]
pub struct Model {
    /// Customer id (UUID v7 text).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The caller's own id; unique when set.
    pub external_id: Option<String>,
    /// Lower-cased e-mail; unique when set.
    pub email: Option<String>,
    /// Name to show.
    pub display_name: String,
    /// Birth date as `YYYY-MM-DD`.
    pub birth_date: Option<String>,
    /// `Gender::code`.
    pub gender: Option<i16>,
    /// Annual income in minor units (with `income_currency`).
    pub income_minor: Option<i64>,
    /// ISO 4217 code of `income_minor`.
    pub income_currency: Option<String>,
    /// Occupation.
    pub occupation: Option<String>,
    /// `Stage::code` of the current stage.
    pub stage: i16,
    /// When the current stage was entered (µs since the epoch).
    pub stage_change_us: i64,
    /// Creation time (µs).
    pub create_us: i64,
    /// Last update (µs).
    pub update_us: i64,
    /// Optimistic-concurrency version (the etag).
    pub version: i64,
    /// Ids of the customers merged into this one, comma-separated.
    #[sea_orm(column_type = "Text", nullable)]
    pub merged_from: Option<String>,
    /// Created with, or given, an identifier of an erased customer (under
    /// `erased_identifier_policy = "flag"`).
    pub reimported_after_erasure: bool,
    /// The explicit acquisition campaign, `campaigns/{id}`.
    pub acquisition_campaign: Option<String>,
}

/// Relations of `customers`.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    /// Its custom attributes.
    #[sea_orm(has_many = "super::customer_attributes::Entity")]
    Attributes,
}

impl Related<super::customer_attributes::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Attributes.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
