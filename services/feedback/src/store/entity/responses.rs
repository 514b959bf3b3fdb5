//! `responses`: a response.

use sea_orm::entity::prelude::*;

/// A row of `responses`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "responses")]
pub struct Model {
    /// The survey.
    #[sea_orm(primary_key, auto_increment = false)]
    pub survey_id: String,
    /// The client's response id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The invitation.
    pub invitation_id: String,
    /// `customers/{id}`; none once erased.
    pub customer: Option<String>,
    /// Version answered.
    pub survey_version: i64,
    /// Completed.
    pub completed: bool,
    /// Stage at the last submission.
    pub stage: i16,
    /// First submission (µs).
    pub create_us: i64,
    /// Last submission (µs).
    pub update_us: i64,
    /// Completion (µs).
    pub complete_us: Option<i64>,
    /// Hash of the last submission.
    pub last_request: Option<Vec<u8>>,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
