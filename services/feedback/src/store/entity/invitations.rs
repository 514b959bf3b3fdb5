//! `invitations`: an invitation.

use sea_orm::entity::prelude::*;

/// A row of `invitations`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "invitations")]
pub struct Model {
    /// `{invitation_id}`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The survey.
    pub survey_id: String,
    /// `customers/{id}`.
    pub customer: String,
    /// `ConsentChannel` number.
    pub channel: i16,
    /// Language of the texts.
    pub language: String,
    /// `InvitationState` number.
    pub state: i16,
    /// Version invited to.
    pub survey_version: i64,
    /// When made (µs).
    pub create_us: i64,
    /// When it expires (µs).
    pub expire_us: i64,
    /// The response, once submitted.
    pub response_id: Option<String>,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
