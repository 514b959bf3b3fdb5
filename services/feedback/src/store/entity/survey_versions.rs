//! `survey_versions`: one version of a survey.

use sea_orm::entity::prelude::*;

/// A row of `survey_versions`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "survey_versions")]
pub struct Model {
    /// The survey.
    #[sea_orm(primary_key, auto_increment = false)]
    pub survey_id: String,
    /// The version.
    #[sea_orm(primary_key, auto_increment = false)]
    pub version: i64,
    /// Encoded `clm.feedback.v1.Survey` as of this version.
    pub body: Vec<u8>,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
