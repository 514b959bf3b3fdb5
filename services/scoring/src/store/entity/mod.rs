//! sea-orm entities of the scoring tables: the hot-path SQL of `store`
//! names tables and columns through them (`score_ledger::Column::Customer`),
//! never through strings.

pub mod score_customers;
pub mod score_ledger;
pub mod score_sums;
pub mod score_touchpoints;
pub mod threshold_sides;
