//! Storage of the customer service, written with sea-query so every
//! statement runs on PostgreSQL and SQLite, and set-based: one statement
//! per batch, never a query per row.

pub mod customers;
pub mod migration;
pub mod stages;
pub mod touchpoints;

pub use migration::Migrator;

use sea_orm::sea_query::Alias;

/// Shorthand for a table or column name.
pub(crate) fn n(s: &str) -> Alias {
    Alias::new(s)
}
