//! Failures specific to the segmentation service, mapped once to the
//! platform error. Bad rules name their field by its proto field path
//! (`segment.rule.any.rules[1].condition.compare.operand.count.window`) through
//! [`clm_platform::Error::InvalidArgument`].

use clm_platform::Error;

/// What can go wrong in segmentation logic beyond bad input and storage.
#[derive(Debug, thiserror::Error)]
pub enum SegmentationError {
    /// DeleteSegment of a segment other segments' rules name.
    #[error("{segment} is named by in_segment in {}", users.join(", "))]
    InUse {
        /// The segment to delete.
        segment: String,
        /// The segments naming it.
        users: Vec<String>,
    },
    /// PreviewSegment ran past its time bound.
    #[error("the preview did not finish within {0:?}")]
    PreviewTimeout(std::time::Duration),
    /// A direct edit of a guarded field of a segment that requires
    /// approval.
    #[error(
        "{segment} requires approval (policy approval_required): {fields} change only through an approved change request; propose it with CreateSegmentChangeRequest"
    )]
    ApprovalRequired {
        /// The segment.
        segment: String,
        /// The guarded fields the edit named.
        fields: String,
    },
    /// A review of a change request that is no longer pending.
    #[error("{name} is {state}, not pending: it cannot be reviewed again")]
    NotPending {
        /// The change request.
        name: String,
        /// Its state.
        state: String,
    },
    /// Approval of a change request made against an older revision.
    #[error(
        "{name} was made against etag {base} of the segment, which is now at {current}: reject it and propose the change again"
    )]
    StaleChangeRequest {
        /// The change request.
        name: String,
        /// The etag it was made against.
        base: String,
        /// The segment's etag now.
        current: String,
    },
}

impl From<SegmentationError> for Error {
    fn from(e: SegmentationError) -> Self {
        match e {
            SegmentationError::InUse { .. } => Error::FailedPrecondition {
                reason: "SEGMENT_IN_USE",
                message: e.to_string(),
            },
            SegmentationError::PreviewTimeout(_) => Error::DeadlineExceeded(e.to_string()),
            SegmentationError::ApprovalRequired { .. } => Error::FailedPrecondition {
                reason: "APPROVAL_REQUIRED",
                message: e.to_string(),
            },
            SegmentationError::NotPending { .. } => Error::FailedPrecondition {
                reason: "CHANGE_REQUEST_NOT_PENDING",
                message: e.to_string(),
            },
            SegmentationError::StaleChangeRequest { .. } => Error::FailedPrecondition {
                reason: "CHANGE_REQUEST_STALE",
                message: e.to_string(),
            },
        }
    }
}
