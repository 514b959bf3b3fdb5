//! sea-orm entities of the segmentation tables: the CRUD tables, and the
//! fact and membership tables whose hot-path SQL names its tables and
//! columns through them (`members::Column::CustomerId`), never strings.

pub mod backfill_diffs;
pub mod backfill_seen;
pub mod fact_attributes;
pub mod fact_consents;
pub mod fact_customers;
pub mod fact_score_curves;
pub mod fact_score_terms;
pub mod fact_touch_props;
pub mod fact_touchpoints;
pub mod gone_customers;
pub mod member_history;
pub mod members;
pub mod objective_snapshots;
pub mod seg_meta;
pub mod segment_change_requests;
pub mod segment_objectives;
pub mod segment_snapshots;
pub mod segment_versions;
pub mod segments;
