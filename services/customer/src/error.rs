//! Failures specific to the customer service, mapped once to the platform error.

use clm_domain::lifecycle::TransitionError;
use clm_platform::Error;

/// What can go wrong in customer logic beyond bad input and storage.
#[derive(Debug, thiserror::Error)]
pub enum CustomerError {
    /// The lifecycle refuses the move.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// Another writer changed the customer between read and write.
    #[error("the customer was changed concurrently; re-read and retry")]
    Concurrent,
}

impl From<CustomerError> for Error {
    fn from(e: CustomerError) -> Self {
        match e {
            CustomerError::Transition(t) => {
                let reason = match t {
                    TransitionError::SameStage(_) => "ALREADY_IN_STAGE",
                    TransitionError::NotAllowed { .. } => "STAGE_TRANSITION_NOT_ALLOWED",
                };
                Error::FailedPrecondition {
                    reason,
                    message: t.to_string(),
                }
            }
            e @ CustomerError::Concurrent => Error::Aborted(e.to_string()),
        }
    }
}
