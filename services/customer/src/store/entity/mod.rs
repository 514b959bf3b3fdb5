//! sea-orm entities of the customer service's CRUD tables: typed columns,
//! one module per table, named after it. See the [store](super) docs for
//! when to use them and when sea-query.

pub mod campaign_spend;
pub mod campaigns;
pub mod consent_history;
pub mod customer_attributes;
pub mod customer_consent;
pub mod customer_identifiers;
pub mod customer_redirects;
pub mod customers;
pub mod erasure_receipts;
pub mod erasure_requests;
pub mod stage_history;
