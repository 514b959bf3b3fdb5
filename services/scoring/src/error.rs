//! Failures of the scoring service are the platform's: bad input names its
//! field (`scoring_model.rules[2].cap.points`), unknown models are
//! NOT_FOUND, stale etags ABORTED; see [`clm_platform::Error`].

pub use clm_platform::Error;
