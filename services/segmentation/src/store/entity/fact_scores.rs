//! `fact_scores`: scores per customer and name (from the scoring stream).

use sea_orm::entity::prelude::*;

/// A row of `fact_scores`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "fact_scores")]
pub struct Model {
    /// Bare customer id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer_id: String,
    /// Score name.
    #[sea_orm(primary_key, auto_increment = false)]
    pub name: String,
    /// Its value.
    pub value: f64,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
