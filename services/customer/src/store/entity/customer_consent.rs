//! `customer_consent`: the current consent of a customer, one row per
//! purpose and channel ever stated (an absent row is unset).

use sea_orm::entity::prelude::*;

/// A row of `customer_consent`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "customer_consent")]
pub struct Model {
    /// The customer.
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer_id: String,
    /// `Purpose::code`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub purpose: i16,
    /// `Channel::code`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub channel: i16,
    /// `ConsentState::code`.
    pub state: i16,
    /// `ConsentSource::code`.
    pub source: i16,
    /// Who recorded it.
    pub actor: String,
    /// When it was recorded (µs since the epoch).
    pub update_us: i64,
}

/// `customer_consent` has no relations the service navigates.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
