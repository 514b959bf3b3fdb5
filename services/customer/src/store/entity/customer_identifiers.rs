//! `customer_identifiers`: every identifier (e-mail, phone, external id)
//! and the one customer holding it. The profile's own `email` and
//! `external_id` are mirrored here (`profile = true`), so this table alone
//! decides who holds what.

use sea_orm::entity::prelude::*;

/// A row of `customer_identifiers`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "customer_identifiers")]
pub struct Model {
    /// `IdentifierKind::code`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub kind: i16,
    /// Normalised value.
    #[sea_orm(primary_key, auto_increment = false)]
    pub value: String,
    /// The holder.
    pub customer_id: String,
    /// Whether it mirrors the profile's `email` or `external_id`.
    pub profile: bool,
    /// When the customer got it (µs since the epoch).
    pub create_us: i64,
}

/// `customer_identifiers` has no relations the service navigates.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
