//! `erasure_receipts`: one row per service that erased a customer's data.

use sea_orm::entity::prelude::*;

/// A row of `erasure_receipts`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "erasure_receipts")]
pub struct Model {
    /// The erasure request.
    #[sea_orm(primary_key, auto_increment = false)]
    pub erasure_id: String,
    /// The service that erased.
    #[sea_orm(primary_key, auto_increment = false)]
    pub service: String,
    /// When (µs since the epoch).
    pub erase_us: i64,
}

/// Relations of `erasure_receipts`.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    /// The request it answers.
    #[sea_orm(
        belongs_to = "super::erasure_requests::Entity",
        from = "Column::ErasureId",
        to = "super::erasure_requests::Column::Id"
    )]
    Request,
}

impl Related<super::erasure_requests::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Request.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
