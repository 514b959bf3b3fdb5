//! The CLM loyalty service (`clm.loyalty.v1.LoyaltyService`, port 50055):
//! programs, a points ledger of lots with exact expiry, tiers on points
//! earned, rewards with stock, limits and budgets, atomic redemption,
//! coupons and vouchers, referrals.
//!
//! Layout: [`DESCRIPTOR`] (what the platform runs) → [`api`] (rpcs) →
//! [`convert`] (proto ↔ domain, validation) → [`ledger`] (earning,
//! spending, refunds, expiry, tiers) → [`store`] (SQL, migrations);
//! [`events`] follows the customer and feedback streams, [`timers`] fires
//! expiries and tier reviews. The arithmetic is `clm_domain::loyalty`.
//!
//! # Decisions
//!
//! * **Lots.** Every earning or positive adjustment is a lot (amount,
//!   remaining, earned, spendable and expiry instants). The balance is
//!   computed, never stored: the sum of the remaining lots that are
//!   spendable and not expired at the read time, so it is exact at every
//!   instant even before an expiry timer has fired. A spend draws from the
//!   spendable lots that expire first (then spendable first, then oldest)
//!   and records each draw; a cancellation gives exactly those draws back
//!   to the same lots, and what returns into a lot already expired expires
//!   at once (an EXPIRE transaction in the same write).
//! * **Expiry** is a timer per lot at its instant (`loyalty.lot_expiry`),
//!   fired in a transaction that writes the EXPIRE transaction with draws.
//!   Policies: N calendar months after earning, or a fixed instant (points
//!   earned after it do not expire).
//! * **Pending.** Points from PURCHASE rules become spendable after the
//!   program's pending period (the return window). They count towards
//!   tiers only once spendable (until then the purchase may still be
//!   returned): a `loyalty.points_spendable` timer at that instant emits a
//!   PointsChanged without a transaction (the balance moved) and reviews
//!   the tier, so followers' balance and tier are never stale.
//! * **Tiers** qualify on points *earned* (EARN transactions, in the
//!   rolling `tier_window` or lifetime, earned at or before now and
//!   spendable), never on the balance; adjustments and refunds do not
//!   count. Up at once; down only when the member has stayed below its
//!   tier for `downgrade_grace` (a `loyalty.tier_review` timer at the grace
//!   end and when the window's oldest earning leaves it). Each change is a
//!   `TierChanged` event, and so is enrolment into the starting tier;
//!   changing a program's tiers takes effect at each member's next review.
//! * **Primary program.** Segmentation's plain `loyalty.tier` and
//!   `loyalty.balance` hold one program's values: the program marked
//!   `primary` (at most one, a unique partial index), else the oldest.
//!   TierChanged and PointsChanged of the other programs carry
//!   `secondary` and segmentation skips them. (A fact per program, with
//!   the rule language naming the program, would be the full answer; it
//!   reaches into the shared rule language and was left out.)
//! * **Earning rules**: points per whole unit of revenue in one currency
//!   (integers, rounded down), fixed points per touchpoint type, survey and
//!   referral bonuses; the tier's multiplier (percent, rounded down) then
//!   the daily (UTC day) and rolling-period caps per rule and member. A
//!   touchpoint earns at its `occurred_time` (not after now). Every
//!   earning has a unique source per program (`tp/{event}/{rule}`), so a
//!   replayed event or a retried activity earns once.
//! * **Locks.** Every change of a member's points locks its member row
//!   first (`FOR UPDATE` on PostgreSQL; SQLite has one writer), several in
//!   (program, customer) order. Same-member API calls first queue in the
//!   service's lanes (`clm_platform::lanes`), so they wait in memory, not
//!   on the row lock holding a pool connection. A redemption checks validity, tier,
//!   per-member limit and per-member budget under that lock, spends, and
//!   then takes a unit of the reward's stock and its value from the
//!   campaign's total budget (conditional UPDATEs on their slots,
//!   `value >= amount`) last, so those shared rows are held only until
//!   the commit. On PostgreSQL that is three statements ([`redeem`]):
//!   the key's claim with the member's lock, the reads after it, and
//!   every row at once. Segment eligibility
//!   is asked of segmentation before the transaction opens (a membership
//!   change between the answer and the commit is not seen).
//! * **Stock and budget slots.** A limited stock is spread over
//!   `Reward.stock_slots` counter rows (default 16), and what is left of a
//!   campaign's total budget over 16, so concurrent redemptions do not
//!   queue on one row; the value read is the sum ([`store::slots`]). A
//!   take uses a random free slot (`FOR UPDATE SKIP LOCKED`); when all are
//!   held it waits once for a random one (in a savepoint, rolled back if
//!   the units went), then locks every slot in order and takes across
//!   them: never below zero, no slot deadlock, and a unit a rolled-back
//!   redemption held is never refused. A cancellation returns into the
//!   emptiest slot; a new stock or total replaces the slots under their
//!   locks (a total moves what is left by the change), so it is exact.
//! * **Stream earning** is set-based per run of events ([`earning`]):
//!   one statement per step for the whole batch, caps and multipliers
//!   exactly as one event at a time.
//! * **Coupons**: a UUIDv4 (122 random bits) per redemption; UseCoupon is
//!   one conditional UPDATE (`ISSUED` and not expired), so of concurrent
//!   uses exactly one wins; a `loyalty.coupon_expiry` timer marks unused
//!   codes EXPIRED at their instant (reads compare the instant anyway). A
//!   redemption whose code was used cannot be cancelled.
//! * **Budgets** are per reward campaign (`Program.campaign_budgets`):
//!   a total and a per-member amount of `Reward.value`.
//! * **Referrals**: ClaimReferral enrols the referee; a customer who is
//!   already a member cannot claim (that covers a second claim), nor can a
//!   member use its own code. The first StageChanged to CONVERSION of the
//!   referee rewards both by the REFERRAL rules, once (the claim moves
//!   from pending to rewarded in the same transaction).
//! * **Merges** move member rows (where the survivor is not a member of
//!   that program), lots, transactions, redemptions, codes and referrals
//!   to the survivor; rows move, so nothing is counted twice. The
//!   survivor's tiers are reviewed on the merged ledger.
//! * **Erasure** deletes every row of the customer and the customers
//!   merged into it, disarms its timers, and emits
//!   `clm.common.v1.CustomerDataErased` (service `loyalty`).
//! * **SimulateEvent** runs the real earning or redemption in a
//!   transaction that is rolled back; a refusal is the real call's error.

pub mod api;
pub mod convert;
pub mod earning;
pub mod error;
pub mod events;
pub mod ledger;
pub mod redeem;
pub mod store;
pub mod timers;

use clm_platform::Runtime;
use clm_platform::service::{Parts, ServiceDescriptor, migrate_with};
use clm_proto::loyalty::loyalty_service_server::LoyaltyServiceServer;
use std::sync::Arc;

/// The service's name in config, logs and change events.
pub const SERVICE: &str = "loyalty";

/// The loyalty service, as the platform runs it.
pub static DESCRIPTOR: ServiceDescriptor = ServiceDescriptor {
    name: SERVICE,
    about: "loyalty programs, points ledger, tiers, rewards, coupons and referrals",
    migrate: migrate_with::<store::Migrator>,
    policy: &api::POLICY,
    build,
};

fn build(rt: &Runtime) -> anyhow::Result<Parts> {
    Ok(Parts::new()
        .timer(ledger::LOT_EXPIRY, Arc::new(timers::LotExpiry))
        .timer(ledger::TIER_REVIEW, Arc::new(timers::TierReview))
        .timer(ledger::POINTS_SPENDABLE, Arc::new(timers::PointsSpendable))
        .timer(ledger::COUPON_EXPIRY, Arc::new(timers::CouponExpiry))
        .grpc(LoyaltyServiceServer::new(api::LoyaltyApi::new(rt.clone())))
        .follow("customer", events::customer_handlers())
        .follow_if_configured("feedback", events::feedback_handlers()))
}
