//! `member_history`: closed membership intervals.

use sea_orm::entity::prelude::*;

/// A row of `member_history`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "member_history")]
pub struct Model {
    /// Row id.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Bare segment id.
    pub segment_id: String,
    /// Bare customer id.
    pub customer_id: String,
    /// When the customer entered (µs).
    pub enter_us: i64,
    /// When the customer left (µs).
    pub exit_us: i64,
    /// The rule version that decided the entry.
    pub enter_version: Option<i64>,
    /// Why the customer entered (`MembershipReason` code).
    pub enter_reason: Option<i16>,
    /// The rule version that decided the exit.
    pub exit_version: Option<i64>,
    /// Why the customer left.
    pub exit_reason: Option<i16>,
    /// Membership version of the exit (none before m0007).
    pub exit_membership_version: Option<i64>,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
