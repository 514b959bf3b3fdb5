//! `consent_history`: one row per change of a customer's consent.

use sea_orm::entity::prelude::*;

/// A row of `consent_history`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "consent_history")]
pub struct Model {
    /// Row id; orders the changes of a customer.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The customer.
    pub customer_id: String,
    /// `Purpose::code`.
    pub purpose: i16,
    /// `Channel::code`.
    pub channel: i16,
    /// `ConsentState::code` before.
    pub from_state: i16,
    /// `ConsentState::code` after.
    pub to_state: i16,
    /// `ConsentSource::code`.
    pub source: i16,
    /// Who recorded it.
    pub actor: String,
    /// When (µs since the epoch).
    pub change_us: i64,
}

/// `consent_history` has no relations the service navigates.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
