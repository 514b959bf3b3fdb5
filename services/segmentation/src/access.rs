//! Who may change which segment: the segmentation half of the platform's
//! resource-level authorization ([`clm_platform::auth::authorize_owned`]).
//!
//! The role table ([`crate::api::POLICY`]) says which roles may call an
//! rpc at all. For rpcs that change one existing segment, marketer and
//! segment_owner are then *owner-scoped*: the caller must own the segment
//! (`owner` = their `sub`) or be in its team (the token's `teams` claim).
//! Only admin changes any segment. The check runs inside the write's
//! transaction on the segment row read there.

use crate::store::segments::Segment;
use clm_platform::Result;
use clm_platform::auth::{Owned, Principal, authorize_owned};

/// Change a segment's fields (UpdateSegment).
pub const UPDATE: &str = "segments.update";
/// Delete a segment.
pub const DELETE: &str = "segments.delete";
/// Re-evaluate a segment.
pub const REFRESH: &str = "segments.refresh";
/// Give a segment a new owner.
pub const TRANSFER: &str = "segments.transferOwnership";
/// Propose a change (a change request).
pub const PROPOSE: &str = "segments.proposeChange";
/// Approve or reject another principal's change request.
pub const APPROVE: &str = "segments.approveChange";

/// Checks that `principal` may use `permission` on `segment` (see the
/// module docs): PERMISSION_DENIED naming the permission otherwise.
pub fn check(principal: &Principal, permission: &str, segment: &Segment) -> Result<()> {
    let name = format!("segments/{}", segment.id);
    authorize_owned(
        principal,
        permission,
        &[],
        Owned {
            name: &name,
            owner: &segment.owner,
            team: &segment.team,
        },
    )
}
