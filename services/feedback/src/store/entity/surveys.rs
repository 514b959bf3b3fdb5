//! `surveys`: a survey: its latest version and counters.

use sea_orm::entity::prelude::*;

/// A row of `surveys`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "surveys")]
pub struct Model {
    /// `{survey_id}`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// `SurveyState` number.
    pub state: i16,
    /// Latest version of the questions.
    pub version: i64,
    /// Bumped by every change (the etag).
    pub revision: i64,
    /// Most completed responses; 0 = no limit.
    pub response_limit: i64,
    /// Completed responses so far.
    pub completed: i64,
    /// Creation time (µs).
    pub create_us: i64,
    /// Last change (µs).
    pub update_us: i64,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
