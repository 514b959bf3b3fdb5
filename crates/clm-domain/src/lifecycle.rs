//! The lifecycle state machine.
//!
//! The funnel is APPROACH → ACQUISITION → CONVERSION → RETENTION → LOYALTY,
//! plus CHURNED. The rules:
//!
//! * **Forward** moves may skip stages (a lead that buys at once goes
//!   straight from APPROACH to CONVERSION).
//! * **Backward** moves stay on their side of the purchase: before it,
//!   ACQUISITION may fall back to APPROACH; after it, LOYALTY may fall back
//!   to RETENTION or CONVERSION and RETENTION to CONVERSION. A customer who
//!   bought never becomes a lead again: that is churn plus reactivation.
//! * **Churn** is allowed from every stage but CHURNED.
//! * **Reactivation** leaves CHURNED for APPROACH or ACQUISITION (win-back
//!   of a lead) or RETENTION (a former customer buying again).
//! * Moving to the stage the customer is already in is refused.

use crate::Violation;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A lifecycle stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Stage {
    /// A lead we are reaching.
    Approach,
    /// Engaged, being won.
    Acquisition,
    /// Bought or signed up.
    Conversion,
    /// Active customer we keep.
    Retention,
    /// Repeat buyer, referrer, ambassador.
    Loyalty,
    /// Gone.
    Churned,
}

/// Every stage, in funnel order.
pub const ALL_STAGES: [Stage; 6] = [
    Stage::Approach,
    Stage::Acquisition,
    Stage::Conversion,
    Stage::Retention,
    Stage::Loyalty,
    Stage::Churned,
];

/// What kind of move a transition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveKind {
    /// Deeper into the funnel.
    Forward,
    /// Back towards the start, staying on the same side of the purchase.
    Backward,
    /// Into CHURNED.
    Churn,
    /// Out of CHURNED.
    Reactivation,
}

/// Why a transition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// Already in the target stage.
    #[error("customer is already in stage {0}")]
    SameStage(Stage),
    /// The lifecycle does not allow this move.
    #[error("moving from {from} to {to} is not allowed: {why}")]
    NotAllowed {
        /// Current stage.
        from: Stage,
        /// Requested stage.
        to: Stage,
        /// Which rule forbids it.
        why: &'static str,
    },
}

impl Stage {
    /// The furthest of `stages` in the funnel, as a merge of duplicate
    /// profiles keeps it: any funnel stage beats CHURNED (the person is
    /// still active under another profile); CHURNED only if all are.
    pub fn furthest(stages: impl IntoIterator<Item = Stage>) -> Option<Stage> {
        stages
            .into_iter()
            .max_by_key(|s| s.rank().map_or(0, |r| r + 1))
    }

    /// Position in the funnel (CHURNED is outside it).
    fn rank(self) -> Option<u8> {
        match self {
            Stage::Approach => Some(0),
            Stage::Acquisition => Some(1),
            Stage::Conversion => Some(2),
            Stage::Retention => Some(3),
            Stage::Loyalty => Some(4),
            Stage::Churned => None,
        }
    }

    /// Whether the customer has bought (CONVERSION or later in the funnel).
    pub fn is_customer(self) -> bool {
        self.rank().is_some_and(|r| r >= 2)
    }

    /// Checks a move from `self` to `to` and says what kind of move it is.
    pub fn transition(self, to: Stage) -> Result<MoveKind, TransitionError> {
        if self == to {
            return Err(TransitionError::SameStage(to));
        }
        match (self.rank(), to.rank()) {
            (Some(_), None) => Ok(MoveKind::Churn),
            (None, Some(_)) => match to {
                Stage::Approach | Stage::Acquisition | Stage::Retention => {
                    Ok(MoveKind::Reactivation)
                }
                _ => Err(TransitionError::NotAllowed {
                    from: self,
                    to,
                    why: "a churned customer is reactivated to APPROACH, ACQUISITION or RETENTION",
                }),
            },
            (Some(a), Some(b)) if b > a => Ok(MoveKind::Forward),
            (Some(_), Some(_)) => {
                if self.is_customer() == to.is_customer() {
                    Ok(MoveKind::Backward)
                } else {
                    Err(TransitionError::NotAllowed {
                        from: self,
                        to,
                        why: "a customer who converted cannot move back before conversion; churn and reactivate instead",
                    })
                }
            }
            (None, None) => Err(TransitionError::SameStage(to)),
        }
    }

    /// Upper-case name as used in the API (`RETENTION`).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Approach => "APPROACH",
            Stage::Acquisition => "ACQUISITION",
            Stage::Conversion => "CONVERSION",
            Stage::Retention => "RETENTION",
            Stage::Loyalty => "LOYALTY",
            Stage::Churned => "CHURNED",
        }
    }

    /// Parses a name, with or without the `STAGE_` prefix, any case.
    pub fn parse(field: &str, s: &str) -> Result<Stage, Violation> {
        let upper = s.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("STAGE_").unwrap_or(&upper);
        ALL_STAGES
            .into_iter()
            .find(|st| st.as_str() == bare)
            .ok_or_else(|| {
                Violation::new(
                    field,
                    format!("unknown stage {}", crate::validation::echo(s)),
                )
            })
    }

    /// Stable small-integer code for storage.
    pub fn code(self) -> i16 {
        match self {
            Stage::Approach => 1,
            Stage::Acquisition => 2,
            Stage::Conversion => 3,
            Stage::Retention => 4,
            Stage::Loyalty => 5,
            Stage::Churned => 6,
        }
    }

    /// Inverse of [`Stage::code`].
    pub fn from_code(code: i16) -> Option<Stage> {
        ALL_STAGES.into_iter().find(|s| s.code() == code)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A requested move with its justification, checked against the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Stage before.
    pub from: Stage,
    /// Stage after.
    pub to: Stage,
    /// What kind of move.
    pub kind: MoveKind,
    /// Why (non-empty).
    pub reason: String,
    /// Who (non-empty).
    pub actor: String,
}

impl Transition {
    /// Checks the move and builds the record.
    pub fn new(
        from: Stage,
        to: Stage,
        reason: String,
        actor: String,
    ) -> Result<Self, TransitionError> {
        let kind = from.transition(to)?;
        Ok(Self {
            from,
            to,
            kind,
            reason,
            actor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_furthest_stage_of_a_merge() {
        use Stage::*;
        assert_eq!(
            Stage::furthest([Approach, Loyalty, Retention]),
            Some(Loyalty)
        );
        assert_eq!(Stage::furthest([Churned, Acquisition]), Some(Acquisition));
        assert_eq!(Stage::furthest([Churned, Churned]), Some(Churned));
        assert_eq!(Stage::furthest([]), None);
    }
    use Stage::*;
    use proptest::prelude::*;

    #[test]
    fn funnel_moves() {
        assert_eq!(Approach.transition(Acquisition), Ok(MoveKind::Forward));
        assert_eq!(Approach.transition(Conversion), Ok(MoveKind::Forward));
        assert_eq!(Loyalty.transition(Retention), Ok(MoveKind::Backward));
        assert_eq!(Acquisition.transition(Approach), Ok(MoveKind::Backward));
        assert_eq!(Retention.transition(Churned), Ok(MoveKind::Churn));
        assert_eq!(Approach.transition(Churned), Ok(MoveKind::Churn));
        assert_eq!(Churned.transition(Retention), Ok(MoveKind::Reactivation));
        assert_eq!(Churned.transition(Acquisition), Ok(MoveKind::Reactivation));
    }

    #[test]
    fn refused_moves() {
        assert_eq!(
            Retention.transition(Retention),
            Err(TransitionError::SameStage(Retention))
        );
        assert!(matches!(
            Conversion.transition(Approach),
            Err(TransitionError::NotAllowed { .. })
        ));
        assert!(matches!(
            Loyalty.transition(Acquisition),
            Err(TransitionError::NotAllowed { .. })
        ));
        assert!(matches!(
            Churned.transition(Loyalty),
            Err(TransitionError::NotAllowed { .. })
        ));
        assert!(matches!(
            Churned.transition(Conversion),
            Err(TransitionError::NotAllowed { .. })
        ));
    }

    #[test]
    fn parse_accepts_prefix_and_case() {
        assert_eq!(Stage::parse("stage", "retention"), Ok(Retention));
        assert_eq!(Stage::parse("stage", "STAGE_LOYALTY"), Ok(Loyalty));
        assert_eq!(Stage::parse("stage", "GOLD").unwrap_err().field, "stage");
    }

    fn any_stage() -> impl Strategy<Value = Stage> {
        prop::sample::select(ALL_STAGES.to_vec())
    }

    proptest! {
        #[test]
        fn codes_round_trip(s in any_stage()) {
            prop_assert_eq!(Stage::from_code(s.code()), Some(s));
        }

        #[test]
        fn churn_always_possible_and_reversible(s in any_stage()) {
            prop_assume!(s != Churned);
            prop_assert_eq!(s.transition(Churned), Ok(MoveKind::Churn));
            // Whatever happened, a churned customer can always come back.
            prop_assert!(Churned.transition(Approach).is_ok() || Churned.transition(Retention).is_ok());
        }

        #[test]
        fn every_stage_reachable_from_every_other(a in any_stage(), b in any_stage()) {
            // Within at most three legal moves (via churn and reactivation).
            prop_assume!(a != b);
            let reachable = a.transition(b).is_ok()
                || ALL_STAGES.iter().any(|&m| a.transition(m).is_ok() && m.transition(b).is_ok())
                || ALL_STAGES.iter().any(|&m| ALL_STAGES.iter().any(|&n| a.transition(m).is_ok() && m.transition(n).is_ok() && n.transition(b).is_ok()));
            prop_assert!(reachable, "{} cannot reach {}", a, b);
        }

        #[test]
        fn a_buyer_never_becomes_a_lead_directly(a in any_stage(), b in any_stage()) {
            if a.is_customer() && !b.is_customer() && b != Churned {
                prop_assert!(a.transition(b).is_err());
            }
        }
    }
}
