//! Pure CLM domain logic shared by every service: ids, the lifecycle state
//! machine, demographics, typed custom attributes, touchpoints, money,
//! list filters and the clock. No I/O, no prost, no tonic: services convert
//! their proto messages into these types (`convert.rs`) and back.
//!
//! Validation failures are [`Violation`]s naming the offending field, so a
//! service can turn them into a `BadRequest` detail without guessing.
#![forbid(unsafe_code)]

pub mod attributes;
pub mod clock;
pub mod consent;
pub mod contact;
pub mod demographics;
pub mod filter;
pub mod ids;
pub mod kpi;
pub mod lifecycle;
pub mod loyalty;
pub mod money;
pub mod rules;
pub mod scoring;
pub mod survey;
pub mod touchpoint;
pub mod validation;

pub use clock::{Clock, ManualClock, SystemClock};
pub use validation::{Violation, Violations};
