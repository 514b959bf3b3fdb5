//! Storage of the customer service. Every statement runs on PostgreSQL and
//! SQLite, and is set-based: one statement per batch, never a query per row.
//!
//! # Conventions (every service's `store/` follows them)
//!
//! * **CRUD tables are sea-orm entities** ([`entity`]): one module per
//!   table, named after it, `DeriveEntityModel` with typed columns and
//!   relations. Queries go through the entity API (`find_by_id`,
//!   `find_with_related`, `insert_many`, `update_many`, `delete_many`,
//!   `into_model` / `into_tuple` for partial rows with `FromQueryResult`):
//!   no string column lists, no hand mapping of rows. Each aggregate module
//!   ([`customers`], [`stages`]) converts between its entity models and
//!   the domain record in one place (`to_model` / `from_model`).
//! * **Hot paths use sea-query over the entity columns** where the entity
//!   API cannot express the set-based statement (batch upserts that report
//!   which rows were new, `UNNEST`/`json_to_recordset` bulk paths with a
//!   SQLite fallback, filters compiled from a request): build with
//!   `Expr::col((Entity, Column::X))`, still never a string column list.
//!   [`touchpoints`] is the ingest path.
//! * **One round trip per read.** A resource and its children are read in
//!   one statement (`find_with_related`: a LEFT JOIN), a page too (the page
//!   as an `IN (subquery … LIMIT n)`, joined with the children).
//! * **Stable SQL text.** Values are always bound, never formatted into the
//!   SQL, so sqlx reuses each connection's prepared statement.
//! * **Reads outside a transaction use `Runtime::read`** (on SQLite a pool
//!   of read-only connections that never wait behind the writer);
//!   everything in a transaction uses the transaction.
//! * Times are `*_us` integer microseconds, money is minor units plus a
//!   currency code (see [`migration`]).

pub mod activity;
pub mod campaigns;
pub mod consent;
pub mod create;
pub mod customers;
pub mod entity;
pub mod erasure;
pub mod identifiers;
pub mod journeys;
pub mod kpi_migration;
pub mod merge;
pub mod migration;
pub mod projection;
pub mod projection_migration;
pub mod reports;
pub mod rollup_migration;
pub mod rollups;
pub mod stages;
pub mod touchpoints;

pub use migration::Migrator;

use sea_orm::sea_query::Alias;

/// Shorthand for a table or column name.
pub(crate) fn n(s: &str) -> Alias {
    Alias::new(s)
}
