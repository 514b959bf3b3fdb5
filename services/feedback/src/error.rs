//! Failures specific to the feedback service, mapped once to the platform
//! error. Bad input names its field through
//! [`clm_platform::Error::InvalidArgument`]; unknown surveys, invitations
//! and responses are NOT_FOUND and stale etags ABORTED, as everywhere.

use clm_platform::Error;

/// What can go wrong in feedback logic beyond bad input and storage.
#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    /// CreateSurvey with the id of an existing survey.
    #[error("surveys/{0} already exists")]
    SurveyExists(String),
    /// A change the survey's state does not allow.
    #[error("surveys/{survey} is {state}: {what}")]
    WrongState {
        /// The survey id.
        survey: String,
        /// Its state, in words.
        state: &'static str,
        /// What was refused.
        what: &'static str,
    },
    /// The survey took its limit of completed responses.
    #[error("surveys/{survey} has its {limit} completed responses")]
    ResponseLimit {
        /// The survey id.
        survey: String,
        /// The limit.
        limit: i64,
    },
    /// An answer after the invitation's expiry.
    #[error("{invitation} expired; late answers are refused")]
    InvitationExpired {
        /// The invitation's name.
        invitation: String,
    },
    /// A response id already used for another invitation, or an invitation
    /// that already has another response.
    #[error("{0}")]
    ResponseTaken(String),
    /// More answers, or different ones, for a completed response.
    #[error("{0} is completed; its answers cannot change")]
    ResponseCompleted(String),
}

impl From<FeedbackError> for Error {
    fn from(e: FeedbackError) -> Self {
        let message = e.to_string();
        match e {
            FeedbackError::SurveyExists(_) => Error::AlreadyExists {
                reason: "SURVEY_EXISTS",
                message,
            },
            FeedbackError::WrongState { .. } => Error::FailedPrecondition {
                reason: "SURVEY_STATE",
                message,
            },
            FeedbackError::ResponseLimit { survey, limit } => Error::ResourceExhausted {
                reason: "RESPONSE_LIMIT",
                subject: format!("surveys/{survey}"),
                limit: format!("{limit} completed responses"),
                message,
            },
            FeedbackError::InvitationExpired { .. } => Error::FailedPrecondition {
                reason: "INVITATION_EXPIRED",
                message,
            },
            FeedbackError::ResponseTaken(_) => Error::AlreadyExists {
                reason: "RESPONSE_TAKEN",
                message,
            },
            FeedbackError::ResponseCompleted(_) => Error::FailedPrecondition {
                reason: "RESPONSE_COMPLETED",
                message,
            },
        }
    }
}

/// A survey state in words.
pub fn state_name(state: i16) -> &'static str {
    match state {
        1 => "a draft",
        2 => "published",
        3 => "closed",
        _ => "in an unknown state",
    }
}
