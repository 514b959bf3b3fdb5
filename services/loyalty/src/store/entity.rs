//! sea-orm entities of the loyalty tables: the SQL of `store` names tables
//! and columns through them (`lots::Column::Remaining`), never through strings.
#![allow(missing_docs)]

/// `loyalty_programs`: one row per program.
pub mod programs {
    use sea_orm::entity::prelude::*;

    /// A program.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "loyalty_programs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// Encoded `clm.loyalty.v1.Program` without name and etag.
        pub body: Vec<u8>,
        pub version: i64,
        pub create_us: i64,
        pub update_us: i64,
        /// 1 when `Program.primary` is set (at most one program).
        pub is_primary: i16,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `loyalty_members`: one row per (program, customer).
pub mod members {
    use sea_orm::entity::prelude::*;

    /// A member.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "loyalty_members")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub program: String,
        /// `customers/{id}`.
        #[sea_orm(primary_key, auto_increment = false)]
        pub customer: String,
        /// `Tier.id`, empty for none.
        pub tier: String,
        pub tier_us: i64,
        /// Below the tier's threshold since (the grace period runs from then).
        pub below_us: Option<i64>,
        pub enroll_us: i64,
        pub referral_code: Option<String>,
        pub referred_by: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `loyalty_lots`: points, by lot.
pub mod lots {
    use sea_orm::entity::prelude::*;

    /// A lot.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "loyalty_lots")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub program: String,
        pub customer: String,
        pub amount: i64,
        pub remaining: i64,
        pub earn_us: i64,
        pub spendable_us: i64,
        pub expire_us: i64,
        /// The transaction that created it.
        pub txn: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `loyalty_transactions`: the immutable ledger.
pub mod transactions {
    use sea_orm::entity::prelude::*;

    /// A transaction.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "loyalty_transactions")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub program: String,
        pub customer: String,
        /// `TransactionKind` number.
        pub kind: i16,
        pub points: i64,
        pub rule: String,
        pub reason: String,
        pub actor: String,
        pub request_id: String,
        /// Unique per program: what made it.
        pub source: String,
        pub at_us: i64,
        /// The lot an earn or positive adjustment created (0: none).
        pub lot: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `loyalty_draws`: what a transaction took from or gave to each lot.
pub mod draws {
    use sea_orm::entity::prelude::*;

    /// A draw.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "loyalty_draws")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub txn: i64,
        #[sea_orm(primary_key, auto_increment = false)]
        pub lot: i64,
        pub amount: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `loyalty_rewards`: the catalogue.
pub mod rewards {
    use sea_orm::entity::prelude::*;

    /// A reward.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "loyalty_rewards")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub program: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// Encoded `clm.loyalty.v1.Reward` without name, etag and stock.
        pub body: Vec<u8>,
        pub cost: i64,
        /// Read: units left, the sum of its slots (`reward_slots`), `None`
        /// when unlimited (it has no slots). Stored: the stock last set by
        /// Create/UpdateReward (history only).
        pub stock: Option<i64>,
        pub per_member_limit: i64,
        pub campaign: String,
        pub value_minor: i64,
        pub version: i64,
        pub create_us: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `loyalty_reward_slots`: a limited reward's stock, spread over counter rows.
pub mod reward_slots {
    use sea_orm::entity::prelude::*;

    /// A slot.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "loyalty_reward_slots")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub program: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub reward: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub slot: i16,
        /// Units in this slot.
        pub stock: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `loyalty_budget_slots`: what is left of a campaign's total budget,
/// spread over counter rows (campaigns with a total only).
pub mod budget_slots {
    use sea_orm::entity::prelude::*;

    /// A slot.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "loyalty_budget_slots")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub program: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub campaign: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub slot: i16,
        /// Minor units left in this slot (slot 0 may be negative: a total
        /// lowered below what was spent).
        pub left_minor: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `loyalty_budgets`: what each campaign's redemptions cost, up to
/// m0007 (history: [`budget_slots`] holds what is left since).
pub mod budgets {
    use sea_orm::entity::prelude::*;

    /// A campaign's spending.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "loyalty_budgets")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub program: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub campaign: String,
        pub spent_minor: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `loyalty_redemptions`: redemptions and the codes they issued.
pub mod redemptions {
    use sea_orm::entity::prelude::*;

    /// A redemption.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "loyalty_redemptions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub program: String,
        pub customer: String,
        pub reward: String,
        pub campaign: String,
        pub cost: i64,
        pub value_minor: i64,
        pub spend_txn: i64,
        /// `RedemptionState` number.
        pub state: i16,
        pub code: String,
        /// `CodeKind` number.
        pub code_kind: i16,
        /// `CouponState` number.
        pub coupon_state: i16,
        pub coupon_expire_us: i64,
        pub use_us: Option<i64>,
        pub create_us: i64,
        pub cancel_us: Option<i64>,
        /// What it took from its campaign's total budget (0: not counted,
        /// the campaign had no total then); a cancellation gives back this.
        pub budget_minor: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `loyalty_referral_codes`: each member's referral code.
pub mod referral_codes {
    use sea_orm::entity::prelude::*;

    /// A code.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "loyalty_referral_codes")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub code: String,
        pub program: String,
        pub customer: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `loyalty_referrals`: one claim per referee and program.
pub mod referrals {
    use sea_orm::entity::prelude::*;

    /// A claim.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "loyalty_referrals")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub program: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub referee: String,
        pub referrer: String,
        pub code: String,
        /// 1 pending, 2 rewarded.
        pub state: i16,
        pub claim_us: i64,
        pub reward_us: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
