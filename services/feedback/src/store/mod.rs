//! Storage of the feedback service. Every statement runs on PostgreSQL and
//! SQLite; summaries are grouped queries over the answer rows.
//!
//! * [`surveys`]: survey rows (state, counters) and their versions.
//! * [`customers`]: what feedback keeps of each customer (stage, language,
//!   survey consent), locked by invitations.
//! * [`invitations`]: invitations, and the counts the fatigue cap and the
//!   recontact cadence are checked against.
//! * [`responses`]: responses and their answer rows.
//! * [`summary`]: the summary queries.
//! * [`policy`]: the fatigue policy.

pub mod customers;
pub mod entity;
pub mod invitations;
pub mod migration;
pub mod policy;
pub mod responses;
pub mod summary;
pub mod surveys;

pub use migration::Migrator;

use sea_orm::sea_query::Alias;

/// A name that is not a table's column: a computed column's alias.
pub(crate) fn n(s: &str) -> Alias {
    Alias::new(s)
}

/// Rows per multi-row INSERT, under PostgreSQL's 65,535 bind parameters.
pub(crate) fn chunk(columns: usize) -> usize {
    clm_platform::db::rows_per_statement(columns)
}
