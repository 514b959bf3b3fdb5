//! Storage of the scoring service. Every statement runs on PostgreSQL and
//! SQLite and is set-based: one statement per batch of events or customers.
//!
//! * [`scoring_models`]: model versions (a sea-orm entity).
//! * [`ledger`]: the score ledger, awards idempotent by (source event,
//!   rule, model, model version) with `INSERT .. ON CONFLICT DO NOTHING`.
//! * [`limited`]: what a touchpoint batch reads of its limited rules'
//!   earlier awards, per (customer, rule) and inside its cap windows.
//! * [`customers`]: what scoring keeps of each customer (profile, stage)
//!   and of its touchpoints (for inactivity and re-scoring).
//! * [`sums`]: running sums of the ledger per (customer, model, score,
//!   decay), so a stream batch reads a few rows per customer, not the ledger.
//! * [`timers`]: threshold timers on the platform queue and the side each
//!   threshold was last seen on.

pub mod customers;
pub mod entity;
pub mod ledger;
pub mod limited;
pub mod migration;
pub mod scoring_models;
pub mod sums;
pub mod timers;

pub use migration::Migrator;

use clm_platform::bulk;
pub(crate) use clm_platform::bulk::column;
use sea_orm::sea_query::Alias;

/// A name that is not a table's column: a computed column's alias
/// (tables and columns are named through [`entity`]).
pub(crate) fn n(s: &str) -> Alias {
    Alias::new(s)
}

/// PostgreSQL: `INSERT INTO table (cols) SELECT * FROM unnest($1::type[],
/// …) tail`, one array parameter per column (binary binds, each a
/// [`column`]): the same SQL text for any number of rows, so the statement
/// is parsed and planned once per connection (a multi-row `VALUES` has a
/// new text, and a new plan, for every row count), with no bind-parameter
/// limit and no JSON to parse.
pub(crate) fn unnest_insert(table: &str, cols: &[(&str, &str)], tail: &str) -> String {
    let names: Vec<String> = cols.iter().map(|(c, _)| format!("\"{c}\"")).collect();
    format!(
        "INSERT INTO \"{table}\" ({}) SELECT * FROM {} {tail}",
        names.join(", "),
        bulk::unnest(1, cols.iter().map(|(_, ty)| *ty))
    )
}

/// Rows per multi-row INSERT, under PostgreSQL's 65,535 bind parameters.
pub(crate) fn chunk(columns: usize) -> usize {
    clm_platform::db::rows_per_statement(columns)
}
