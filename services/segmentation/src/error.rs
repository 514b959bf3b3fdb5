//! Failures specific to the segmentation service, mapped once to the
//! platform error. Bad rules name their field in the rule language's paths
//! (`segment.rule.and[1].operand.window`) through
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
}

impl From<SegmentationError> for Error {
    fn from(e: SegmentationError) -> Self {
        match e {
            SegmentationError::InUse { .. } => Error::FailedPrecondition {
                reason: "SEGMENT_IN_USE",
                message: e.to_string(),
            },
            SegmentationError::PreviewTimeout(_) => Error::DeadlineExceeded(e.to_string()),
        }
    }
}
