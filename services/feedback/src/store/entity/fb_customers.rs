//! `fb_customers`: what feedback knows of a customer, from the customer stream.

use sea_orm::entity::prelude::*;

/// A row of `fb_customers`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "fb_customers")]
pub struct Model {
    /// `customers/{id}`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer: String,
    /// `Stage::code`, 0 unknown.
    pub stage: i16,
    /// The `language` attribute.
    pub language: Option<String>,
    /// Bit `1 << channel` set while survey consent is granted on that channel.
    pub consent: i32,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
