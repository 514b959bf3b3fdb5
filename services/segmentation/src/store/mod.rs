//! Storage of the segmentation service. Every statement runs on PostgreSQL
//! and SQLite and is set-based (one statement per batch, never a query per
//! row): [`segments`] (sea-orm entities), [`facts`] (the projection of the
//! customer stream), [`members`] (membership, history, timers),
//! [`backfill_diffs`] (a backfill's diff taken outside the lock),
//! [`history`] (membership history, daily sizes), [`metrics`] (what
//! objectives measure), [`objectives`], [`change_requests`]; every
//! table and column is named through [`entity`].

pub mod backfill_diffs;
pub mod change_requests;
pub mod entity;
pub mod facts;
pub mod history;
pub mod members;
pub mod metrics;
pub mod migration;
pub mod objectives;
pub mod segments;

pub use migration::Migrator;

use sea_orm::sea_query::Alias;

/// A name that is not a table's column: a computed column's alias
/// (tables and columns are named through [`entity`]).
pub(crate) fn n(s: &str) -> Alias {
    Alias::new(s)
}

/// `ids` in chunks small enough for one `IN (...)` list on both backends.
pub(crate) fn chunks(ids: &[String]) -> std::slice::Chunks<'_, String> {
    ids.chunks(500)
}
