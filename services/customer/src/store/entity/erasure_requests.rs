//! `erasure_requests`: one right-to-be-forgotten request per customer.

use sea_orm::entity::prelude::*;

/// A row of `erasure_requests`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "erasure_requests")]
pub struct Model {
    /// Request id (UUID v7 text).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The erased customer's id (only the id remains); unique.
    pub customer_id: String,
    /// Who asked.
    pub requester: String,
    /// When (µs since the epoch).
    pub create_us: i64,
    /// When the last receipt arrived (µs), if all have.
    pub complete_us: Option<i64>,
    /// The services whose receipts complete it, comma-separated.
    pub expected_services: String,
}

/// Relations of `erasure_requests`.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    /// Its receipts.
    #[sea_orm(has_many = "super::erasure_receipts::Entity")]
    Receipts,
}

impl Related<super::erasure_receipts::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Receipts.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
