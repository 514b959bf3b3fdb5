//! sea-orm entities of the CRUD tables.

pub mod segment_versions;
pub mod segments;
