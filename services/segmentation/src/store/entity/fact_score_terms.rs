//! `fact_score_terms`: the terms of each curve of `fact_score_curves`:
//! `coef × decay(t − since)`, summed in `seq` order.

use sea_orm::entity::prelude::*;

/// A row of `fact_score_terms`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "fact_score_terms")]
pub struct Model {
    /// Bare customer id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer_id: String,
    /// Scoring model id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub model: String,
    /// Score name.
    #[sea_orm(primary_key, auto_increment = false)]
    pub name: String,
    /// Position in the sum.
    #[sea_orm(primary_key, auto_increment = false)]
    pub seq: i32,
    /// The term's value at `since_us`.
    pub coef: f64,
    /// When it starts counting (µs).
    pub since_us: i64,
    /// Decay kind: 0 none, 1 exponential, 2 linear (`Decay::code`).
    pub kind: i16,
    /// Half-life or linear duration (µs).
    pub param_us: i64,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
