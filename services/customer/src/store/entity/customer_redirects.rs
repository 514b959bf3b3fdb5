//! `customer_redirects`: a customer merged into another (the survivor).
//! Reads of a merged id answer the survivor; writes are refused naming it.

use sea_orm::entity::prelude::*;

/// A row of `customer_redirects`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "customer_redirects")]
pub struct Model {
    /// The merged customer's id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The customer it was merged into (kept current when the survivor is
    /// itself merged later).
    pub survivor_id: String,
    /// When (µs since the epoch).
    pub merge_us: i64,
}

/// `customer_redirects` has no relations the service navigates.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
