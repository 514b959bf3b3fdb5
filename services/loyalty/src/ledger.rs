//! The loyalty engine, shared by the api, the stream handlers and the
//! timers: earning (rules, multipliers, caps, pending period, expiry),
//! spending from the soonest-expiring lots with recorded draws, refunds
//! into the same lots, expiry, tier reviews and the member view. Every
//! function runs inside the caller's transaction, after the caller locked
//! the members it changes (`store::lock_members`); the arithmetic is
//! `clm_domain::loyalty`.

use crate::convert;
use crate::error::LoyaltyError;
use crate::store::entity::{members, programs, transactions};
use crate::store::{self, kind};
use clm_domain::loyalty::{self as dl, Draw, NEVER};
use clm_platform::outbox::NewEvent;
use clm_platform::timers::{self, Arm};
use clm_platform::{Error, Result};
use clm_proto::loyalty as pb;
use sea_orm::ConnectionTrait;
use std::collections::HashMap;

/// Timer kind: what remains of a lot expires (key `lot/{id}`).
pub const LOT_EXPIRY: &str = "loyalty.lot_expiry";
/// Timer kind: a member's tier is looked at again (grace end, window exit).
pub const TIER_REVIEW: &str = "loyalty.tier_review";
/// Timer kind: a lot's pending points become spendable (key `spendable/{id}`):
/// the balance moves and the tier is reviewed.
pub const POINTS_SPENDABLE: &str = "loyalty.points_spendable";
/// Timer kind: an issued coupon expires (key `coupon/{code}`).
pub const COUPON_EXPIRY: &str = "loyalty.coupon_expiry";
/// "Expiring soon" in GetMember: the next 30 days.
pub const SOON_US: i64 = 30 * 86_400_000_000;

/// A program as the engine uses it.
#[derive(Debug, Clone)]
pub struct Program {
    /// Its id.
    pub id: String,
    /// Its body.
    pub body: pb::Program,
    /// Its version.
    pub version: i64,
    /// Whether it is the primary program now (marked, or the oldest when
    /// none is): segmentation's plain loyalty facts follow its events.
    pub primary: bool,
}

impl Program {
    /// Decodes a stored program (`primary`: whether it is the primary one now).
    pub fn from_row(row: &programs::Model, primary: bool) -> Result<Self> {
        let mut body = <pb::Program as prost::Message>::decode(row.body.as_slice())
            .map_err(Error::internal)?;
        body.name = format!("programs/{}", row.id);
        body.etag = clm_platform::convert::etag(row.version);
        body.create_time = Some(clm_platform::convert::timestamp(
            clm_platform::db::from_micros(row.create_us),
        ));
        body.update_time = Some(clm_platform::convert::timestamp(
            clm_platform::db::from_micros(row.update_us),
        ));
        Ok(Self {
            id: row.id.clone(),
            body,
            version: row.version,
            primary,
        })
    }

    /// Loads a program, NOT_FOUND if there is none.
    pub async fn load(db: &impl ConnectionTrait, id: &str) -> Result<Self> {
        let (row, primary) = store::program(db, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("programs/{id}")))?;
        Self::from_row(&row, primary)
    }

    /// The thresholds of the tiers, ascending.
    pub fn thresholds(&self) -> Vec<i64> {
        self.body.tiers.iter().map(|t| t.threshold).collect()
    }

    /// The index of tier `id`.
    pub fn tier_index(&self, id: &str) -> Option<usize> {
        self.body.tiers.iter().position(|t| t.id == id)
    }

    /// The earning multiplier (percent) of tier `id`.
    pub fn multiplier(&self, id: &str) -> i64 {
        self.tier_index(id)
            .map(|i| i64::from(self.body.tiers[i].earn_multiplier_percent))
            .filter(|m| *m > 0)
            .unwrap_or(100)
    }

    /// When points earned at `earn_us` expire.
    pub fn expiry(&self, earn_us: i64) -> i64 {
        match self.body.expiry.as_ref().and_then(|e| e.policy.as_ref()) {
            Some(pb::expiry_policy::Policy::MonthsAfterEarning(m)) => u32::try_from(*m)
                .ok()
                .and_then(|m| dl::add_months(earn_us, m))
                .unwrap_or(NEVER),
            Some(pb::expiry_policy::Policy::FixedTime(t)) => {
                match clm_platform::convert::from_timestamp("", t) {
                    Ok(at) if clm_platform::db::to_micros(at) > earn_us => {
                        clm_platform::db::to_micros(at)
                    }
                    _ => NEVER,
                }
            }
            None => NEVER,
        }
    }

    /// Tier window (µs; 0: lifetime).
    pub fn window_us(&self) -> i64 {
        convert::us(self.body.tier_window.as_ref())
    }

    /// Whether tier index `i` is at or above the program's loyalty tier.
    pub fn loyal(&self, i: Option<usize>) -> bool {
        match (i, self.tier_index(&self.body.loyalty_tier)) {
            (Some(i), Some(l)) => i >= l,
            _ => false,
        }
    }
}

/// Who makes a change and why.
#[derive(Debug, Clone, Default)]
pub struct Who {
    /// The caller's subject, or `system:loyalty`.
    pub actor: String,
    /// The rpc's request id, if any.
    pub request_id: String,
    /// Why.
    pub reason: String,
}

impl Who {
    /// The current call's actor and request id, with `reason`.
    pub fn current(reason: &str) -> Self {
        Self {
            actor: clm_platform::call::current()
                .map(|c| c.principal.subject)
                .unwrap_or_else(|| format!("system:{}", crate::SERVICE)),
            request_id: clm_platform::call::request_id().unwrap_or_default(),
            reason: reason.to_owned(),
        }
    }
}

/// A new, unique source for a transaction nothing else makes idempotent.
pub fn fresh_source(what: &str) -> String {
    format!("{what}/{}", uuid::Uuid::now_v7().simple())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn new_txn(
    program: &str,
    customer: &str,
    kind: i16,
    points: i64,
    rule: &str,
    source: String,
    at_us: i64,
    who: &Who,
) -> transactions::Model {
    transactions::Model {
        id: 0,
        program: program.to_owned(),
        customer: customer.to_owned(),
        kind,
        points,
        rule: rule.to_owned(),
        reason: who.reason.clone(),
        actor: who.actor.clone(),
        request_id: who.request_id.clone(),
        source,
        at_us,
        lot: 0,
    }
}

/// Earns `points` (> 0) as a new lot earned at `earn_us` (pending for the
/// program's pending period when `pending`), expiring by the program's
/// policy; `None` when `source` already earned (a replay).
#[allow(clippy::too_many_arguments)]
pub async fn earn(
    db: &impl ConnectionTrait,
    p: &Program,
    customer: &str,
    points: i64,
    txn_kind: i16,
    rule: &str,
    source: String,
    earn_us: i64,
    pending: bool,
    who: &Who,
) -> Result<Option<transactions::Model>> {
    if points <= 0 {
        return Ok(None);
    }
    let mut t = new_txn(
        &p.id, customer, txn_kind, points, rule, source, earn_us, who,
    );
    let Some(id) = store::insert_txn(db, &t).await? else {
        return Ok(None);
    };
    t.id = id;
    let spendable_us = if pending {
        earn_us.saturating_add(convert::us(p.body.pending_period.as_ref()))
    } else {
        earn_us
    };
    let expire_us = p.expiry(earn_us);
    let lot = store::insert_lot(
        db,
        &store::NewLot {
            program: p.id.clone(),
            customer: customer.to_owned(),
            amount: points,
            earn_us,
            spendable_us,
            expire_us,
            txn: id,
        },
    )
    .await?;
    store::set_txn_lot(db, id, lot).await?;
    t.lot = lot;
    if expire_us != NEVER {
        timers::arm(
            db,
            LOT_EXPIRY,
            &[Arm::new(format!("lot/{lot}"), customer, expire_us)],
        )
        .await?;
    }
    if spendable_us > earn_us && spendable_us < expire_us {
        timers::arm(
            db,
            POINTS_SPENDABLE,
            &[Arm::new(format!("spendable/{lot}"), customer, spendable_us)],
        )
        .await?;
    }
    Ok(Some(t))
}

/// What [`spend`] did.
#[derive(Debug)]
pub struct Spent {
    /// The spend transaction.
    pub txn: transactions::Model,
    /// The lots it drew from.
    pub draws: Vec<Draw>,
    /// The member's balance after it.
    pub balance: i64,
    /// The expiry of each lot drawn from (read with the lots, so the answer
    /// needs no second query).
    expiry: HashMap<i64, i64>,
}

impl Spent {
    /// The draws as the API shows them, each with its lot's expiry.
    pub fn lot_draws(&self) -> Vec<pb::LotDraw> {
        self.draws
            .iter()
            .map(|d| pb::LotDraw {
                lot: d.lot,
                points: d.amount,
                lot_expire_time: self.expiry.get(&d.lot).copied().and_then(convert::ts),
            })
            .collect()
    }
}

/// Spends `amount` from the member's soonest-expiring spendable lots at
/// `now_us`: the lots' remainders, the transaction and its draws.
#[allow(clippy::too_many_arguments)]
pub async fn spend(
    db: &impl ConnectionTrait,
    program: &str,
    customer: &str,
    amount: i64,
    txn_kind: i16,
    source: String,
    now_us: i64,
    who: &Who,
) -> Result<Spent> {
    let lots = store::open_lots(db, program, customer, now_us).await?;
    let mut spent = plan_spend(
        &lots, program, customer, amount, txn_kind, source, now_us, who,
    )?;
    spent.txn.id = store::insert_spend(db, &spent.txn, &spent.draws)
        .await?
        .ok_or_else(|| {
            Error::Aborted("a concurrent request made the same transaction; retry".into())
        })?;
    Ok(spent)
}

/// The spend of `amount` from the member's open `lots` (soonest-expiring
/// first) at `now_us`, decided and not yet written: its transaction (id
/// 0 until written), draws and the balance after it; INSUFFICIENT_POINTS
/// when the spendable lots hold less.
#[allow(clippy::too_many_arguments)]
pub fn plan_spend(
    lots: &[dl::Lot],
    program: &str,
    customer: &str,
    amount: i64,
    txn_kind: i16,
    source: String,
    now_us: i64,
    who: &Who,
) -> Result<Spent> {
    let draws =
        dl::plan_spend(lots, amount, now_us).map_err(|e| LoyaltyError::InsufficientPoints {
            balance: e.balance,
            cost: amount,
        })?;
    let balance = dl::balance(lots, now_us) - amount;
    let t = new_txn(
        program, customer, txn_kind, -amount, "", source, now_us, who,
    );
    let expiry = lots
        .iter()
        .filter(|l| draws.iter().any(|d| d.lot == l.id))
        .map(|l| (l.id, l.expire_us))
        .collect();
    Ok(Spent {
        txn: t,
        draws,
        balance,
        expiry,
    })
}

/// Gives spend `spend_txn` back to the lots it drew from, with their own
/// expiry: what returns into a lot already expired expires at once.
/// Returns the refund and any expiry it caused.
pub async fn refund(
    db: &impl ConnectionTrait,
    program: &str,
    customer: &str,
    spend_txn: i64,
    now_us: i64,
    who: &Who,
) -> Result<Vec<(transactions::Model, Vec<Draw>)>> {
    let draws: Vec<Draw> = store::draws_of(db, &[spend_txn])
        .await?
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    let back: i64 = draws.iter().map(|d| d.amount).sum();
    if back == 0 {
        return Ok(Vec::new());
    }
    store::move_points(db, &draws, 1).await?;
    let mut t = new_txn(
        program,
        customer,
        kind::REFUND,
        back,
        "",
        format!("refund/{spend_txn}"),
        now_us,
        who,
    );
    t.id = store::insert_txn(db, &t)
        .await?
        .ok_or_else(|| Error::Aborted("the spend was already refunded".into()))?;
    store::insert_draws(db, t.id, &draws).await?;
    let mut out = vec![(t, draws.clone())];
    let lots: Vec<i64> = draws.iter().map(|d| d.lot).collect();
    out.extend(expire_lots(db, &lots, now_us).await?);
    Ok(out)
}

/// Expires what remains of each lot of `lots` whose instant is at or
/// before `now_us`: one expire transaction per member with its draws.
pub async fn expire_lots(
    db: &impl ConnectionTrait,
    lots: &[i64],
    now_us: i64,
) -> Result<Vec<(transactions::Model, Vec<Draw>)>> {
    let due = store::expired_lots(db, lots, now_us).await?;
    let mut by_member: std::collections::BTreeMap<(String, String), Vec<Draw>> = Default::default();
    for l in &due {
        by_member
            .entry((l.program.clone(), l.customer.clone()))
            .or_default()
            .push(Draw {
                lot: l.id,
                amount: l.remaining,
            });
    }
    let who = Who {
        actor: format!("system:{}", crate::SERVICE),
        reason: "expired".into(),
        ..Who::default()
    };
    let mut out = Vec::new();
    for ((program, customer), draws) in by_member {
        store::move_points(db, &draws, -1).await?;
        let gone: i64 = draws.iter().map(|d| d.amount).sum();
        let at = due
            .iter()
            .filter(|l| l.program == program && l.customer == customer)
            .map(|l| l.expire_us)
            .max()
            .unwrap_or(now_us);
        let mut t = new_txn(
            &program,
            &customer,
            kind::EXPIRE,
            -gone,
            "",
            fresh_source("expire"),
            at,
            &who,
        );
        t.id = store::insert_txn(db, &t)
            .await?
            .ok_or_else(|| Error::internal("expire source taken"))?;
        store::insert_draws(db, t.id, &draws).await?;
        out.push((t, draws));
    }
    Ok(out)
}

/// Points that count towards tiers at `now_us`: those earned (EARN
/// transactions) in the program's tier window (lifetime without one) whose
/// lot is spendable by then; pending purchase points count once their
/// return window has passed.
pub async fn tier_points(
    db: &impl ConnectionTrait,
    p: &Program,
    customer: &str,
    now_us: i64,
) -> Result<i64> {
    store::qualifying_earned(db, &p.id, customer, window_start(p, now_us), now_us).await
}

/// Looks at a (locked) member's tier at `now_us`: up at once, down only
/// after the grace period; stores the result, arms the next review, and
/// returns the TierChanged event if the tier changed.
pub async fn review_tier(
    db: &impl ConnectionTrait,
    p: &Program,
    m: &members::Model,
    now_us: i64,
) -> Result<Option<pb::TierChanged>> {
    let earned = tier_points(db, p, &m.customer, now_us).await?;
    Ok(review_tiers(db, p, &[(m, earned)], now_us).await?.pop())
}

/// [`review_tier`] for many (locked) members of one program at once, each
/// with its tier points at `now_us`: the decisions are made in memory;
/// the window exits are one grouped query, the timers one statement each
/// way, the balances of the members that moved one query; only a member
/// whose stored tier state changes gets its own UPDATE. Returns the
/// TierChanged events.
pub async fn review_tiers(
    db: &impl ConnectionTrait,
    p: &Program,
    reviews: &[(&members::Model, i64)],
    now_us: i64,
) -> Result<Vec<pb::TierChanged>> {
    let thresholds = p.thresholds();
    let grace = convert::us(p.body.downgrade_grace.as_ref());
    let mut next_review: HashMap<&str, i64> = HashMap::new();
    let mut moved: Vec<(&members::Model, String)> = Vec::new();
    for (m, earned) in reviews {
        let qualifying = dl::qualifying_tier(&thresholds, *earned);
        let current = p.tier_index(&m.tier);
        match dl::tier_move(current, qualifying, m.below_us, grace, now_us) {
            dl::TierMove::Stay => {
                if m.below_us.is_some() {
                    store::set_tier(db, &p.id, &m.customer, &m.tier, m.tier_us, None).await?;
                }
            }
            dl::TierMove::Up(i) | dl::TierMove::Down(i) => {
                let id = if qualifying.is_some() {
                    p.body.tiers[i].id.clone()
                } else {
                    String::new()
                };
                store::set_tier(db, &p.id, &m.customer, &id, now_us, None).await?;
                if id != m.tier {
                    moved.push((m, id));
                }
            }
            dl::TierMove::Grace { since_us, until_us } => {
                if m.below_us != Some(since_us) {
                    store::set_tier(db, &p.id, &m.customer, &m.tier, m.tier_us, Some(since_us))
                        .await?;
                }
                next_review.insert(&m.customer, until_us);
            }
        }
    }
    // A rolling window changes when its oldest earning leaves it.
    let w = p.window_us();
    let customers: Vec<String> = reviews.iter().map(|(m, _)| m.customer.clone()).collect();
    if w > 0 {
        for (c, first) in
            store::first_earns_after(db, &p.id, &customers, now_us.saturating_sub(w)).await?
        {
            let leaves = first.saturating_add(w);
            if let Some((m, _)) = reviews.iter().find(|(m, _)| m.customer == c) {
                let due = next_review.entry(&m.customer).or_insert(leaves);
                *due = (*due).min(leaves);
            }
        }
    }
    let key = |c: &str| format!("tier/{}/{c}", p.id);
    let arm: Vec<Arm> = next_review
        .iter()
        .map(|(c, due)| Arm::new(key(c), *c, (*due).max(now_us)))
        .collect();
    let disarm: Vec<String> = customers
        .iter()
        .filter(|c| !next_review.contains_key(c.as_str()))
        .map(|c| key(c))
        .collect();
    timers::arm(db, TIER_REVIEW, &arm).await?;
    timers::disarm(db, TIER_REVIEW, &disarm).await?;
    if moved.is_empty() {
        return Ok(Vec::new());
    }
    let who: Vec<String> = moved.iter().map(|(m, _)| m.customer.clone()).collect();
    let lots = store::open_lots_of(db, &p.id, &who, now_us).await?;
    Ok(moved
        .into_iter()
        .map(|(m, new_tier)| pb::TierChanged {
            customer: m.customer.clone(),
            program: format!("programs/{}", p.id),
            old_tier: m.tier.clone(),
            loyal: p.loyal(p.tier_index(&new_tier)),
            new_tier,
            change_time: Some(clm_platform::convert::timestamp(
                clm_platform::db::from_micros(now_us),
            )),
            balance: lots.get(&m.customer).map_or(0, |l| dl::balance(l, now_us)),
            secondary: !p.primary,
        })
        .collect())
}

/// The member with its ledger figures at `now_us` (see [`member_views`]).
pub async fn member_view(
    db: &impl ConnectionTrait,
    p: &Program,
    m: &members::Model,
    now_us: i64,
) -> Result<pb::Member> {
    member_views(db, p, std::slice::from_ref(m), now_us)
        .await?
        .pop()
        .ok_or_else(|| Error::internal("member view missing"))
}

/// The start of the program's tier window at `now_us` (lifetime: none).
pub(crate) fn window_start(p: &Program, now_us: i64) -> i64 {
    match p.window_us() {
        w if w > 0 => now_us.saturating_sub(w),
        _ => i64::MIN,
    }
}

/// Members of one program with their ledger figures at `now_us`, in
/// order: two queries for all of them (their open lots; their earnings,
/// grouped), whatever their number.
pub async fn member_views(
    db: &impl ConnectionTrait,
    p: &Program,
    members: &[members::Model],
    now_us: i64,
) -> Result<Vec<pb::Member>> {
    let customers: Vec<String> = members.iter().map(|m| m.customer.clone()).collect();
    let lots = store::open_lots_of(db, &p.id, &customers, now_us).await?;
    let earned =
        store::earned_totals(db, &p.id, &customers, window_start(p, now_us), now_us).await?;
    let none = Vec::new();
    Ok(members
        .iter()
        .map(|m| {
            let lots = lots.get(&m.customer).unwrap_or(&none);
            let (lifetime, qualifying) = earned.get(&m.customer).copied().unwrap_or((0, 0));
            let mut out = convert::member_base(m);
            out.balance = dl::balance(lots, now_us);
            out.pending = dl::pending(lots, now_us);
            out.expiring_soon = lots
                .iter()
                .filter(|l| l.expire_us <= now_us.saturating_add(SOON_US))
                .map(|l| l.remaining)
                .sum();
            out.lifetime_earned = lifetime;
            out.tier_points = qualifying;
            let next = p.tier_index(&m.tier).map_or(0, |i| i + 1);
            if let Some(t) = p.body.tiers.get(next) {
                out.next_tier = t.id.clone();
                out.points_to_next_tier = (t.threshold - out.tier_points).max(0);
            }
            out
        })
        .collect())
}

/// The PointsChanged event of a transaction of program `p`.
pub fn points_changed(
    p: &Program,
    t: &transactions::Model,
    draws: &[Draw],
    balance: i64,
) -> NewEvent {
    NewEvent::new(
        &t.customer,
        &pb::PointsChanged {
            member: convert::member_of(&t.program, &t.customer),
            customer: t.customer.clone(),
            program: format!("programs/{}", t.program),
            transaction: Some(convert::transaction(t, lot_draws(draws))),
            balance,
            secondary: !p.primary,
        },
    )
}

/// The PointsChanged event of pending points that became spendable: no
/// transaction changes the ledger then, only the balance moves.
pub fn points_spendable(p: &Program, customer: &str, balance: i64) -> NewEvent {
    NewEvent::new(
        customer,
        &pb::PointsChanged {
            member: convert::member_of(&p.id, customer),
            customer: customer.to_owned(),
            program: format!("programs/{}", p.id),
            transaction: None,
            balance,
            secondary: !p.primary,
        },
    )
}

/// Draws as proto (without expiry; `with_expiry` adds it).
pub fn lot_draws(draws: &[Draw]) -> Vec<pb::LotDraw> {
    draws
        .iter()
        .map(|d| pb::LotDraw {
            lot: d.lot,
            points: d.amount,
            lot_expire_time: None,
        })
        .collect()
}

/// The earning of an activity by the program's rules.
#[derive(Debug, Clone)]
pub enum Trigger {
    /// A touchpoint (a purchase with its revenue).
    Touchpoint {
        /// `clm.customer.v1.TouchpointType` number.
        kind: i32,
        /// Purchase revenue.
        revenue: Option<clm_proto::common::Money>,
    },
    /// A completed survey.
    Survey,
    /// The referrer of a converted referee.
    Referrer,
    /// A converted referee.
    Referee,
}

/// What rule `r` gives for `trigger` before multiplier and caps, and
/// whether those points are pending (PURCHASE rules: the return window).
pub fn base_points(r: &pb::EarningRule, trigger: &Trigger) -> (i64, bool) {
    use pb::EarningTrigger as T;
    let purchase = clm_proto::customer::TouchpointType::Purchase as i32;
    let rule_trigger = T::try_from(r.trigger).unwrap_or(T::Unspecified);
    let base = match (trigger, rule_trigger) {
        (
            Trigger::Touchpoint {
                kind,
                revenue: Some(m),
            },
            T::Purchase,
        ) if *kind == purchase && m.currency_code == r.currency_code => {
            dl::purchase_points(m.amount_minor, r.unit_minor, r.points_per_unit)
        }
        (Trigger::Touchpoint { kind, .. }, T::Touchpoint) if *kind == r.touchpoint_type => r.points,
        (Trigger::Survey, T::SurveyCompleted)
        | (Trigger::Referrer, T::ReferralReferrer)
        | (Trigger::Referee, T::ReferralReferee) => r.points,
        _ => 0,
    };
    (base, rule_trigger == T::Purchase)
}

/// Whether rule `r` reacts to `trigger` at all (whatever it is worth):
/// such an activity enrols where the program auto-enrols.
pub fn rule_matches(r: &pb::EarningRule, trigger: &Trigger) -> bool {
    use pb::EarningTrigger as T;
    let t = T::try_from(r.trigger).unwrap_or(T::Unspecified);
    match trigger {
        Trigger::Touchpoint { kind, .. } => {
            (t == T::Purchase && *kind == clm_proto::customer::TouchpointType::Purchase as i32)
                || (t == T::Touchpoint && *kind == r.touchpoint_type)
        }
        Trigger::Survey => t == T::SurveyCompleted,
        Trigger::Referrer => t == T::ReferralReferrer,
        Trigger::Referee => t == T::ReferralReferee,
    }
}

/// Earns what `trigger` at `at_us` is worth to a (locked) member by the
/// program's rules, with its tier's multiplier and under each rule's caps;
/// `source` makes each rule's earning once. Returns the transactions.
pub async fn earn_by_rules(
    db: &impl ConnectionTrait,
    p: &Program,
    m: &members::Model,
    trigger: &Trigger,
    source: &str,
    at_us: i64,
    who: &Who,
) -> Result<Vec<transactions::Model>> {
    let mut out = Vec::new();
    for r in &p.body.earning_rules {
        let (base, pending) = base_points(r, trigger);
        if base <= 0 {
            continue;
        }
        let mut points = dl::with_multiplier(base, p.multiplier(&m.tier));
        if r.daily_cap > 0 {
            let used = store::earned_since(
                db,
                &p.id,
                &m.customer,
                Some(&r.id),
                dl::day_start(at_us) - 1,
            )
            .await?;
            points = dl::capped(points, r.daily_cap, used);
        }
        let period = convert::us(r.cap_period.as_ref());
        if r.period_cap > 0 && period > 0 {
            let used = store::earned_since(
                db,
                &p.id,
                &m.customer,
                Some(&r.id),
                at_us.saturating_sub(period),
            )
            .await?;
            points = dl::capped(points, r.period_cap, used);
        }
        if let Some(t) = earn(
            db,
            p,
            &m.customer,
            points,
            kind::EARN,
            &r.id,
            format!("{source}/{}", r.id),
            at_us,
            pending,
            who,
        )
        .await?
        {
            out.push(t);
        }
    }
    Ok(out)
}

/// Earns by the rules and reviews the tier: the events to emit.
#[allow(clippy::too_many_arguments)]
pub async fn earn_and_review(
    db: &impl ConnectionTrait,
    p: &Program,
    m: &members::Model,
    trigger: &Trigger,
    source: &str,
    at_us: i64,
    now_us: i64,
    who: &Who,
) -> Result<(Vec<transactions::Model>, Vec<NewEvent>)> {
    let made = earn_by_rules(db, p, m, trigger, source, at_us, who).await?;
    let mut events = Vec::new();
    if made.is_empty() {
        return Ok((made, events));
    }
    let balance = dl::balance(
        &store::open_lots(db, &p.id, &m.customer, now_us).await?,
        now_us,
    );
    for t in &made {
        events.push(points_changed(p, t, &[], balance));
    }
    if let Some(tc) = review_tier(db, p, m, now_us).await? {
        events.push(NewEvent::new(&m.customer, &tc));
    }
    Ok((made, events))
}

/// A new member row: the lowest tier whose threshold is 0 is where every
/// member starts.
pub fn new_member(
    p: &Program,
    customer: &str,
    referred_by: Option<String>,
    now_us: i64,
) -> members::Model {
    let tier = p
        .body
        .tiers
        .first()
        .filter(|t| t.threshold <= 0)
        .map(|t| t.id.clone())
        .unwrap_or_default();
    members::Model {
        program: p.id.clone(),
        customer: customer.to_owned(),
        tier,
        tier_us: now_us,
        below_us: None,
        enroll_us: now_us,
        referral_code: None,
        referred_by,
    }
}

/// The events of a new member: MemberEnrolled, and TierChanged into its
/// starting tier (if any) so followers know the tier from the start.
pub fn enrolled_events(p: &Program, m: &members::Model) -> Vec<NewEvent> {
    let at = Some(clm_platform::convert::timestamp(
        clm_platform::db::from_micros(m.enroll_us),
    ));
    let mut events = vec![NewEvent::new(
        &m.customer,
        &pb::MemberEnrolled {
            member: convert::member_of(&p.id, &m.customer),
            customer: m.customer.clone(),
            program: format!("programs/{}", p.id),
            enroll_time: at,
        },
    )];
    if !m.tier.is_empty() {
        events.push(NewEvent::new(
            &m.customer,
            &pb::TierChanged {
                customer: m.customer.clone(),
                program: format!("programs/{}", p.id),
                old_tier: String::new(),
                new_tier: m.tier.clone(),
                loyal: p.loyal(p.tier_index(&m.tier)),
                change_time: at,
                balance: 0,
                secondary: !p.primary,
            },
        ));
    }
    events
}

/// Enrols `customer` (no-op if a member): the (locked) member row, whether
/// it was created, and its events ([`enrolled_events`]).
pub async fn enroll(
    db: &impl ConnectionTrait,
    p: &Program,
    customer: &str,
    referred_by: Option<String>,
    now_us: i64,
) -> Result<(members::Model, bool, Vec<NewEvent>)> {
    let row = new_member(p, customer, referred_by, now_us);
    let created = store::insert_member(db, &row).await?;
    let locked = store::lock_members(db, &p.id, &[customer])
        .await?
        .pop()
        .ok_or_else(|| Error::internal("member vanished"))?;
    let events = if created {
        enrolled_events(p, &row)
    } else {
        Vec::new()
    };
    Ok((locked, created, events))
}
