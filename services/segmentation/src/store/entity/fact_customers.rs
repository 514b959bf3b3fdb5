//! `fact_customers`: the profile facts of each customer.

use sea_orm::entity::prelude::*;

/// A row of `fact_customers`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "fact_customers")]
pub struct Model {
    /// Bare customer id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer_id: String,
    /// E-mail.
    pub email: Option<String>,
    /// Display name.
    pub display_name: Option<String>,
    /// Birth date (ISO).
    pub birth_date: Option<String>,
    /// `Gender::code`.
    pub gender: Option<i16>,
    /// Yearly income, minor units.
    pub income_minor: Option<i64>,
    /// Its currency.
    pub income_currency: Option<String>,
    /// Occupation.
    pub occupation: Option<String>,
    /// `Stage::code`.
    pub stage: Option<i16>,
    /// When the stage was entered (µs).
    pub stage_us: Option<i64>,
    /// Scoring grade.
    pub grade: Option<String>,
    /// Last NPS answer.
    pub nps_last: Option<i16>,
    /// Last CSAT answer.
    pub csat_last: Option<f64>,
    /// Loyalty tier.
    pub loyalty_tier: Option<String>,
    /// Loyalty points balance.
    pub loyalty_balance: Option<i64>,
    /// Whether the customer's profile has arrived: a row can come first
    /// from another stream (loyalty, feedback) and waits, unevaluated and
    /// out of every rule's query, for the profile.
    pub profiled: bool,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
