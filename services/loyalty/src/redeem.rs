//! RedeemReward: read under the member's lock, decide in memory, write.
//!
//! Both backends take the same decision ([`decide`]) from the same reads
//! ([`Reads`]) and write the same rows; they differ in round trips only:
//!
//! * the general path ([`general`]: SQLite, and SimulateEvent's dry run on
//!   either backend) reads and writes one table per statement, its key
//!   claimed by `clm_platform::idempotency::write`;
//! * PostgreSQL ([`on_postgres`]) runs three statements in the
//!   transaction ([`store::redeem`]): the key's claim with the member's
//!   lock; then, in a snapshot taken after the lock, the program, the
//!   reward, the member's open lots, its usage and the spend's id; then
//!   every row at once (the spend, its draws and the lots it lowers, the
//!   redemption, the coupon timer, the audit entry, the events, the stored
//!   response) with a unit from a free stock slot. Only a stock whose
//!   free slots were all busy, and a campaign's total budget, take one
//!   more statement each ([`take_shared`]).
//!
//! Every guard is inside the transaction: the key (claimed first), the
//! balance and the per-member limit and budget (read under the member's
//! lock), the stock and the total budget (conditional UPDATEs). A refusal
//! found after rows were written (out of stock, budget reached) rolls the
//! whole transaction back.

use crate::convert::{self, member_of};
use crate::error::LoyaltyError;
use crate::ledger::{self, Program, Spent, Who};
use crate::store::entity::{members, redemptions, rewards};
use crate::store::{self, kind};
use clm_domain::loyalty::Lot;
use clm_platform::audit::{self, Change};
use clm_platform::convert::from_timestamp;
use clm_platform::db::{from_micros, to_micros};
use clm_platform::idempotency;
use clm_platform::outbox::NewEvent;
use clm_platform::timers::{self, Arm};
use clm_platform::{Error, Result, Runtime};
use clm_proto::loyalty as pb;
use sea_orm::ConnectionTrait;

/// Coupons of programs and rewards that name no validity: 90 days.
const DEFAULT_COUPON_VALIDITY_US: i64 = 90 * 86_400_000_000;
/// The idempotency scope of the rpc.
pub const SCOPE: &str = "RedeemReward";

/// What a redemption reads, the member's row locked first.
#[derive(Debug)]
pub struct Reads {
    /// The program.
    pub program: Program,
    /// The member (locked).
    pub member: members::Model,
    /// The reward (its stock: what remains).
    pub reward: rewards::Model,
    /// The member's open lots, soonest-expiring first.
    pub lots: Vec<Lot>,
    /// The member's active redemptions of the reward, and the value of
    /// those of its campaign (read only when a limit or budget applies).
    pub usage: (i64, i64),
}

/// What a redemption writes, decided before anything is written.
#[derive(Debug)]
pub struct Decided {
    /// The spend (its transaction's id is set once known).
    pub spent: Spent,
    /// The redemption row (its `spend_txn` likewise).
    pub row: redemptions::Model,
    /// The reward's body, as read.
    body: pb::Reward,
    /// The campaign's total budget to take `row.value_minor` from, if any.
    total: Option<i64>,
}

impl Decided {
    /// Sets the spend's transaction id.
    pub fn spend_txn(&mut self, id: i64) {
        self.spent.txn.id = id;
        self.row.spend_txn = id;
    }

    /// The answer, its events and its audit entry.
    pub fn answer(&self, p: &Program) -> (pb::Redemption, Vec<NewEvent>, Change) {
        let spend = convert::transaction(&self.spent.txn, self.spent.lot_draws());
        let out = convert::redemption(&self.row, Some(spend), self.spent.balance);
        let events = vec![
            ledger::points_changed(p, &self.spent.txn, &self.spent.draws, self.spent.balance),
            NewEvent::new(
                &self.row.customer,
                &pb::RewardRedeemed {
                    customer: self.row.customer.clone(),
                    redemption: Some(out.clone()),
                },
            ),
        ];
        let change = Change::create(&out.name, &out).customer(&self.row.customer);
        (out, events, change)
    }

    /// The coupon's expiry timer.
    pub fn coupon_timer(&self) -> Arm {
        Arm::new(
            format!("coupon/{}", self.row.code),
            &self.row.customer,
            self.row.coupon_expire_us,
        )
    }
}

/// Whether the member may redeem the reward at `now_us` (validity and tier).
pub(crate) fn eligible(body: &pb::Reward, m: &members::Model, now_us: i64) -> Result<()> {
    let at = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .and_then(|t| from_timestamp("", t).ok())
            .map(to_micros)
    };
    if at(&body.valid_from_time).is_some_and(|f| f > now_us)
        || at(&body.valid_until_time).is_some_and(|u| u <= now_us)
    {
        return Err(LoyaltyError::NotEligible(format!("{} is not valid now", body.name)).into());
    }
    if !body.eligible_tiers.is_empty() && !body.eligible_tiers.contains(&m.tier) {
        return Err(LoyaltyError::NotEligible(format!(
            "{} is only for the tiers {}",
            body.name,
            body.eligible_tiers.join(", ")
        ))
        .into());
    }
    Ok(())
}

/// Whether the usage must be read: the reward has a per-member limit, or
/// its campaign a per-member budget.
pub fn needs_usage(p: &Program, r: &rewards::Model) -> bool {
    r.per_member_limit > 0
        || (!r.campaign.is_empty()
            && p.body
                .campaign_budgets
                .iter()
                .any(|b| b.campaign == r.campaign && b.per_member.is_some()))
}

/// The redemption the reads allow at `now_us`, or its refusal (not
/// eligible, limit or per-member budget reached, insufficient points).
pub fn decide(reads: &Reads, now_us: i64) -> Result<Decided> {
    let Reads {
        program: p,
        member: m,
        reward: r,
        lots,
        usage: (count, value),
    } = reads;
    let (program, customer) = (p.id.as_str(), m.customer.as_str());
    let body = convert::reward(r)?;
    eligible(&body, m, now_us)?;
    let budget = p
        .body
        .campaign_budgets
        .iter()
        .find(|b| !r.campaign.is_empty() && b.campaign == r.campaign);
    if r.per_member_limit > 0 && *count >= r.per_member_limit {
        return Err(LoyaltyError::LimitReached {
            reward: body.name.clone(),
            member: member_of(program, customer),
            limit: r.per_member_limit,
        }
        .into());
    }
    if let Some(pm) = budget.and_then(|b| b.per_member.as_ref())
        && value + r.value_minor > pm.amount_minor
    {
        return Err(LoyaltyError::BudgetReached {
            which: "per-member",
            campaign: r.campaign.clone(),
            subject: format!("programs/{program}/campaigns/{}:{customer}", r.campaign),
            limit: pm.amount_minor,
        }
        .into());
    }
    let id = uuid::Uuid::now_v7().simple().to_string();
    let spent = ledger::plan_spend(
        lots,
        program,
        customer,
        r.cost,
        kind::SPEND,
        format!("redemption/{id}"),
        now_us,
        &Who::current("redemption"),
    )?;
    let validity = match convert::us(body.coupon_validity.as_ref()) {
        0 => match convert::us(p.body.coupon_validity.as_ref()) {
            0 => DEFAULT_COUPON_VALIDITY_US,
            v => v,
        },
        v => v,
    };
    let total = budget
        .and_then(|b| b.total.as_ref())
        .map(|t| t.amount_minor);
    let row = redemptions::Model {
        id,
        program: program.to_owned(),
        customer: customer.to_owned(),
        reward: r.id.clone(),
        campaign: r.campaign.clone(),
        cost: r.cost,
        value_minor: r.value_minor,
        spend_txn: 0,
        state: store::ACTIVE,
        code: new_code(),
        code_kind: i16::try_from(body.code_kind).unwrap_or(0).max(1),
        coupon_state: store::ISSUED,
        coupon_expire_us: now_us.saturating_add(validity),
        use_us: None,
        create_us: now_us,
        cancel_us: None,
        // Taken from the campaign's total (or the write fails).
        budget_minor: if total.is_some() {
            r.value_minor.max(0)
        } else {
            0
        },
    };
    Ok(Decided {
        spent,
        row,
        body,
        total,
    })
}

/// An unguessable code: 122 random bits (UUIDv4) in upper-case hex.
pub(crate) fn new_code() -> String {
    uuid::Uuid::new_v4().simple().to_string().to_uppercase()
}

/// The shared rows, last (held the shortest time): a unit of the stock
/// (unless `taken` already), then the campaign's total budget.
async fn take_shared(
    db: &impl ConnectionTrait,
    r: &rewards::Model,
    d: &Decided,
    taken: bool,
) -> Result<()> {
    let (program, reward) = (d.row.program.as_str(), d.row.reward.as_str());
    if r.stock.is_some() && !taken && !store::stock(program, reward).take(db, 1).await? {
        return Err(LoyaltyError::OutOfStock(d.body.name.clone()).into());
    }
    if let Some(limit) = d.total
        && d.row.value_minor > 0
        && !store::budget(program, &d.row.campaign)
            .take(db, d.row.value_minor)
            .await?
    {
        return Err(LoyaltyError::BudgetReached {
            which: "total",
            campaign: d.row.campaign.clone(),
            subject: format!("programs/{program}/campaigns/{}", d.row.campaign),
            limit,
        }
        .into());
    }
    Ok(())
}

fn not_member(program: &str, customer: &str) -> Error {
    Error::NotFound(member_of(program, customer))
}

fn no_reward(program: &str, reward: &str) -> Error {
    Error::NotFound(format!("programs/{program}/rewards/{reward}"))
}

/// The redemption in `txn`, one table per statement (SQLite, and the dry
/// run): the answer and its events.
pub async fn general(
    txn: &impl ConnectionTrait,
    program: &str,
    customer: &str,
    reward_id: &str,
    now_us: i64,
) -> Result<(pb::Redemption, Vec<NewEvent>)> {
    let p = Program::load(txn, program).await?;
    let member = store::lock_members(txn, program, &[customer])
        .await?
        .pop()
        .ok_or_else(|| not_member(program, customer))?;
    let reward = store::reward(txn, program, reward_id)
        .await?
        .ok_or_else(|| no_reward(program, reward_id))?;
    // Limits under the member's lock: its redemptions take turns.
    let usage = if needs_usage(&p, &reward) {
        store::member_usage(txn, program, customer, reward_id, &reward.campaign).await?
    } else {
        (0, 0)
    };
    let lots = store::open_lots(txn, program, customer, now_us).await?;
    let reads = Reads {
        program: p,
        member,
        reward,
        lots,
        usage,
    };
    let mut d = decide(&reads, now_us)?;
    let id = store::insert_spend(txn, &d.spent.txn, &d.spent.draws)
        .await?
        .ok_or_else(raced)?;
    d.spend_txn(id);
    store::insert_redemption(txn, &d.row).await?;
    timers::arm(txn, ledger::COUPON_EXPIRY, &[d.coupon_timer()]).await?;
    let (out, events, change) = d.answer(&reads.program);
    audit::record(txn, crate::SERVICE, from_micros(now_us), change).await?;
    take_shared(txn, &reads.reward, &d, false).await?;
    Ok((out, events))
}

fn raced() -> Error {
    Error::Aborted("a concurrent request made the same transaction; retry".into())
}

/// RedeemReward on PostgreSQL in three statements (see the module docs):
/// the answer, committed (or a retry's stored answer).
pub async fn on_postgres(
    rt: &Runtime,
    req: &pb::RedeemRewardRequest,
    request_id: String,
    program: &str,
    customer: &str,
    reward_id: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<pb::Redemption> {
    let now_us = to_micros(now);
    let w = idempotency::begin_inline(&rt.db, SCOPE, request_id.clone(), req, now).await?;
    clm_platform::call::with_request_id(Some(request_id), async move {
        let (claimed, member) = store::redeem::claim_and_lock(&w, program, customer).await?;
        if !claimed {
            return w.replay().await;
        }
        let read = store::redeem::read(w.txn(), program, customer, reward_id, now_us).await?;
        let p = read
            .program
            .ok_or_else(|| Error::NotFound(format!("programs/{program}")))?;
        let member = member.ok_or_else(|| not_member(program, customer))?;
        let reward = read.reward.ok_or_else(|| no_reward(program, reward_id))?;
        let reads = Reads {
            usage: if needs_usage(&p, &reward) {
                read.usage
            } else {
                (0, 0)
            },
            program: p,
            member,
            reward,
            lots: read.lots,
        };
        let mut d = decide(&reads, now_us)?;
        d.spend_txn(read.next_txn);
        let (out, events, change) = d.answer(&reads.program);
        let wrote = store::redeem::write(&w, &d, &events, &change, &out, now).await?;
        if !wrote.made {
            return Err(raced());
        }
        take_shared(w.txn(), &reads.reward, &d, wrote.taken).await?;
        w.commit(&rt.outbox).await?;
        Ok(out)
    })
    .await
}
