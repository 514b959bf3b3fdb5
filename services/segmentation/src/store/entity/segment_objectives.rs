//! `segment_objectives`: what each segment must achieve, and the status
//! its last snapshot gave each objective (to tell a change for alerts).

use sea_orm::entity::prelude::*;

/// An objective row.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "segment_objectives")]
pub struct Model {
    /// Bare segment id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub segment_id: String,
    /// Objective id within the segment.
    #[sea_orm(primary_key, auto_increment = false)]
    pub objective_id: String,
    /// Order within the segment.
    pub position: i16,
    /// `ObjectiveMetric` code.
    pub metric: i16,
    /// For conversion rates: the stage code.
    pub stage: Option<i16>,
    /// Target value.
    pub target: f64,
    /// `ObjectiveDirection` code.
    pub direction: i16,
    /// Deadline, µs.
    pub deadline_us: i64,
    /// For revenue metrics: the currency.
    pub currency: Option<String>,
    /// For revenue: the trailing window, µs.
    pub window_us: Option<i64>,
    /// `ObjectiveStatus` code at the last evaluation that stored it (a
    /// daily snapshot or the deadline; 0: none yet).
    pub status: i16,
    /// The value at the deadline, once the deadline has passed.
    pub final_value: Option<f64>,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
