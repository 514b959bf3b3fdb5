//! `answer_choices`: a choice picked, with the response's filter columns.

use sea_orm::entity::prelude::*;

/// A row of `answer_choices`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "answer_choices")]
pub struct Model {
    /// The survey.
    #[sea_orm(primary_key, auto_increment = false)]
    pub survey_id: String,
    /// The response.
    #[sea_orm(primary_key, auto_increment = false)]
    pub response_id: String,
    /// The question id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub question: String,
    /// The choice id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub choice: String,
    /// Copied from the response.
    pub survey_version: i64,
    /// Copied from the response.
    pub completed: bool,
    /// Copied from the response.
    pub stage: i16,
    /// The response's last submission (µs).
    pub at_us: i64,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
