//! `segment_change_requests`: proposed changes of segments; the request
//! itself is kept as its API message (`body`), with the columns lists
//! filter on.

use sea_orm::entity::prelude::*;

/// A change request row.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "segment_change_requests")]
pub struct Model {
    /// Change request id (UUID v7: ids grow with time).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// Bare segment id.
    pub segment_id: String,
    /// `ChangeRequestState` code.
    pub state: i16,
    /// When it was made, µs.
    pub create_us: i64,
    /// The `SegmentChangeRequest` message, encoded.
    pub body: Vec<u8>,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
