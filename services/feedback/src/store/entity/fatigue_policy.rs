//! `fatigue_policy`: the fatigue policy (one row, id 1).

use sea_orm::entity::prelude::*;

/// A row of `fatigue_policy`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "fatigue_policy")]
pub struct Model {
    /// Always 1.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: i32,
    /// Most invitations per customer per period; 0 = no cap.
    pub max_invitations: i32,
    /// The sliding period (µs).
    pub period_us: i64,
    /// Bumped by every change (the etag).
    pub revision: i64,
    /// Last change (µs).
    pub update_us: i64,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
