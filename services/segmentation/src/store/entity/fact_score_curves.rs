//! `fact_score_curves`: each customer's scores per scoring model and name
//! (from the scoring stream), as curves in time: the row holds what applies
//! to the whole score (inactivity, floor, ceiling), `fact_score_terms` its
//! terms (see `clm_domain::scoring::Curve`). A row may name a customer the
//! projection does not hold yet (the scoring stream ran ahead): rules read
//! it once the customer arrives.

use sea_orm::entity::prelude::*;

/// A row of `fact_score_curves`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "fact_score_curves")]
pub struct Model {
    /// Bare customer id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer_id: String,
    /// Scoring model id (bare); empty for scores streamed before models
    /// were named.
    #[sea_orm(primary_key, auto_increment = false)]
    pub model: String,
    /// Score name.
    #[sea_orm(primary_key, auto_increment = false)]
    pub name: String,
    /// When the score last changed (µs): the plain form `score.<name>`
    /// reads the customer's most recently changed score of that name.
    pub changed_us: i64,
    /// The value at `changed_us`.
    pub value: f64,
    /// The customer's grade under the model at `changed_us`.
    pub grade: String,
    /// Inactivity decay: points per idle period.
    pub idle_points: Option<i64>,
    /// Inactivity decay: length of one idle period (µs).
    pub idle_every_us: Option<i64>,
    /// The last activity inactivity counts from (µs).
    pub last_us: Option<i64>,
    /// Lowest value.
    pub floor: Option<i64>,
    /// Highest value.
    pub ceiling: Option<i64>,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
