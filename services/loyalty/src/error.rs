//! Failures specific to loyalty, mapped once to the platform error: each
//! refusal of a redemption is its own clear error (insufficient points is
//! FAILED_PRECONDITION with balance and cost; out of stock, a per-member
//! limit or a budget reached are RESOURCE_EXHAUSTED with a QuotaFailure).

use clm_platform::Error;

/// What can go wrong in loyalty logic beyond bad input and storage.
#[derive(Debug, thiserror::Error)]
pub enum LoyaltyError {
    /// A create with the id of an existing resource.
    #[error("{0} already exists")]
    Exists(String),
    /// A spend larger than the spendable balance.
    #[error("insufficient points: balance {balance}, cost {cost}")]
    InsufficientPoints {
        /// The spendable balance.
        balance: i64,
        /// What was asked.
        cost: i64,
    },
    /// The reward's stock is gone.
    #[error("{0} is out of stock")]
    OutOfStock(String),
    /// The member redeemed the reward as often as allowed.
    #[error("the per-member limit of {reward} ({limit}) is reached for {member}")]
    LimitReached {
        /// The reward.
        reward: String,
        /// The member.
        member: String,
        /// The limit.
        limit: i64,
    },
    /// A campaign budget (total or per member) would be exceeded.
    #[error("the {which} budget of campaign {campaign} ({limit} minor units) is reached")]
    BudgetReached {
        /// `total` or `per-member`.
        which: &'static str,
        /// The campaign.
        campaign: String,
        /// Its subject (`programs/p/campaigns/c` or the member).
        subject: String,
        /// The limit.
        limit: i64,
    },
    /// The member may not redeem the reward (tier, segment, validity).
    #[error("{0}")]
    NotEligible(String),
    /// The code was used.
    #[error("coupon {0} was already used")]
    CouponUsed(String),
    /// The code expired.
    #[error("coupon {0} has expired")]
    CouponExpired(String),
    /// The code's redemption was cancelled.
    #[error("coupon {0} is void (its redemption was cancelled)")]
    CouponVoid(String),
    /// A referral that is not allowed.
    #[error("{message}")]
    Referral {
        /// Machine-readable reason.
        reason: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The redemption cannot be cancelled.
    #[error("{0}")]
    NotCancellable(String),
}

impl From<LoyaltyError> for Error {
    fn from(e: LoyaltyError) -> Self {
        let message = e.to_string();
        let failed = |reason| Error::FailedPrecondition {
            reason,
            message: message.clone(),
        };
        match &e {
            LoyaltyError::Exists(_) => Error::AlreadyExists {
                reason: "ALREADY_EXISTS",
                message,
            },
            LoyaltyError::InsufficientPoints { .. } => failed("INSUFFICIENT_POINTS"),
            LoyaltyError::OutOfStock(reward) => Error::ResourceExhausted {
                reason: "OUT_OF_STOCK",
                subject: reward.clone(),
                limit: "stock".into(),
                message,
            },
            LoyaltyError::LimitReached {
                reward,
                member,
                limit,
            } => Error::ResourceExhausted {
                reason: "PER_MEMBER_LIMIT_REACHED",
                subject: format!("{reward}:{member}"),
                limit: format!("{limit} per member"),
                message,
            },
            LoyaltyError::BudgetReached { subject, limit, .. } => Error::ResourceExhausted {
                reason: "BUDGET_REACHED",
                subject: subject.clone(),
                limit: format!("{limit} minor units"),
                message,
            },
            LoyaltyError::NotEligible(_) => failed("NOT_ELIGIBLE"),
            LoyaltyError::CouponUsed(_) => failed("COUPON_USED"),
            LoyaltyError::CouponExpired(_) => failed("COUPON_EXPIRED"),
            LoyaltyError::CouponVoid(_) => failed("COUPON_VOID"),
            LoyaltyError::Referral { reason, .. } => failed(reason),
            LoyaltyError::NotCancellable(_) => failed("NOT_CANCELLABLE"),
        }
    }
}
