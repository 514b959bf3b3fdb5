//! `answers`: a question a response was shown, answered or not, with the response's filter columns.

use sea_orm::entity::prelude::*;

/// A row of `answers`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "answers")]
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
    /// Index of the question in the version.
    pub position: i32,
    /// `survey::Kind::code`.
    pub kind: i16,
    /// Answered.
    pub answered: bool,
    /// The response stopped here.
    pub dropped: bool,
    /// Numeric answer.
    pub number: Option<i64>,
    /// Open-text answer.
    #[sea_orm(column_type = "Text", nullable)]
    pub answer_text: Option<String>,
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
