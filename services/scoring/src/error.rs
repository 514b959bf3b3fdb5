//! Failures specific to the scoring service, mapped once to the platform
//! error. Bad input names its field (`scoring_model.rules[2].cap.points`)
//! through [`clm_platform::Error::InvalidArgument`]; unknown models are
//! NOT_FOUND and stale etags ABORTED, as everywhere.

use clm_platform::Error;

/// What can go wrong in scoring logic beyond bad input and storage.
#[derive(Debug, thiserror::Error)]
pub enum ScoringError {
    /// CreateScoringModel with the id of an existing model.
    #[error("scoringModels/{0} already exists")]
    ModelExists(String),
}

impl From<ScoringError> for Error {
    fn from(e: ScoringError) -> Self {
        match e {
            ScoringError::ModelExists(_) => Error::AlreadyExists {
                reason: "SCORING_MODEL_EXISTS",
                message: e.to_string(),
            },
        }
    }
}
