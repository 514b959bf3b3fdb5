//! `response_segments`: a segment the customer was in when a response completed.

use sea_orm::entity::prelude::*;

/// A row of `response_segments`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "response_segments")]
pub struct Model {
    /// The survey.
    #[sea_orm(primary_key, auto_increment = false)]
    pub survey_id: String,
    /// `segments/{id}`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub segment: String,
    /// The response.
    #[sea_orm(primary_key, auto_increment = false)]
    pub response_id: String,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
