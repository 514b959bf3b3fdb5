//! `members`: current members with their entry time.

use sea_orm::entity::prelude::*;

/// A row of `members`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "members")]
pub struct Model {
    /// Bare segment id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub segment_id: String,
    /// Bare customer id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer_id: String,
    /// When the customer entered (µs).
    pub enter_us: i64,
    /// Membership version of the entry.
    pub version: i64,
    /// The segment's rule version that decided the entry.
    pub rule_version: Option<i64>,
    /// Why (`MembershipReason` code).
    pub reason: Option<i16>,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
