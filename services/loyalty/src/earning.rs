//! Set-based earning for a batch of activities from the streams (the
//! customer stream's touchpoints, the feedback stream's completed
//! surveys): whatever the number of events, the batch reads its programs,
//! locks its members, finds replays and the capped rules' past earnings,
//! and reads tier points in one statement each (per program where the
//! statement is about one program), then writes its enrolments,
//! transactions, lots and timers in set-based INSERTs. The arithmetic is
//! the same as one activity at a time ([`crate::ledger::earn_by_rules`]):
//! events are taken in stream order, each rule's daily and period caps
//! count the earnings before it (stored or earlier in the batch), and a
//! member whose immediately spendable points lift it a tier earns the
//! next activity at the new tier's multiplier. Every earning's source is
//! `{activity}/{rule}` under a unique index, so a replayed event earns
//! nothing.
//!
//! The members whose qualifying points rose have their tiers reviewed
//! together ([`crate::ledger::review_tiers`]: one grouped query for the
//! window exits, one statement each to arm and disarm timers); only a
//! member whose stored tier state changes gets its own UPDATE. Purchase
//! points, pending, are reviewed by their `loyalty.points_spendable`
//! timer instead.

use crate::convert;
use crate::ledger::{self, Program, Trigger, Who};
use crate::store::entity::members;
use crate::store::{self, NewLot, kind};
use clm_domain::loyalty::{self as dl, NEVER};
use clm_platform::Result;
use clm_platform::outbox::NewEvent;
use clm_platform::timers::{self, Arm};
use sea_orm::ConnectionTrait;
use std::collections::{BTreeSet, HashMap, HashSet};

/// One activity to earn on.
#[derive(Debug, Clone)]
pub struct Activity {
    /// `customers/{id}`.
    pub customer: String,
    /// What happened.
    pub trigger: Trigger,
    /// Unique per activity (`tp/{event}`, `survey/{response}`).
    pub source: String,
    /// When it happened (µs; not after now).
    pub at_us: i64,
    /// Whether it may enrol the customer where the program auto-enrols.
    pub enroll: bool,
}

/// A member's tier state while the batch is applied.
#[derive(Debug, Clone)]
struct TierState {
    tier: String,
    below_us: Option<i64>,
    qualifying: i64,
    rose: bool,
}

/// An earning decided in memory, written with the others.
#[derive(Debug, Clone)]
struct Planned {
    program: usize,
    customer: String,
    rule: String,
    points: i64,
    source: String,
    at_us: i64,
    spendable_us: i64,
    expire_us: i64,
    /// The activity's source, kept as the transaction's reason.
    reason: String,
}

type Key = (String, String);

/// Earns `activities` (in stream order) in every program with a matching
/// rule; returns the events to emit.
pub async fn earn_batch(
    db: &impl ConnectionTrait,
    activities: &[Activity],
    now_us: i64,
    who: &Who,
) -> Result<Vec<NewEvent>> {
    let programs = store::all_programs(db)
        .await?
        .iter()
        .map(|(row, primary)| Program::from_row(row, *primary))
        .collect::<Result<Vec<_>>>()?;
    // (program, activity) pairs whose rules react, in activity order.
    let mut wanted: Vec<(usize, usize)> = Vec::new();
    for (ai, a) in activities.iter().enumerate() {
        for (pi, p) in programs.iter().enumerate() {
            if p.body
                .earning_rules
                .iter()
                .any(|r| ledger::rule_matches(r, &a.trigger))
            {
                wanted.push((pi, ai));
            }
        }
    }
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let customers: Vec<String> = wanted
        .iter()
        .map(|(_, ai)| activities[*ai].customer.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // Every member row of these customers, locked in (program, customer) order.
    let mut members: HashMap<Key, members::Model> = store::lock_customers(db, &customers)
        .await?
        .into_iter()
        .map(|m| ((m.program.clone(), m.customer.clone()), m))
        .collect();
    let mut events = enrol(db, &programs, activities, &wanted, &mut members, now_us).await?;

    // What earned before: replayed sources, and the capped rules' earnings.
    let mut sources = Vec::new();
    let mut capped_rules = BTreeSet::new();
    let mut since = i64::MAX;
    for (pi, ai) in &wanted {
        let (p, a) = (&programs[*pi], &activities[*ai]);
        if !members.contains_key(&(p.id.clone(), a.customer.clone())) {
            continue;
        }
        let at = a.at_us.min(now_us);
        for r in &p.body.earning_rules {
            if ledger::base_points(r, &a.trigger).0 <= 0 {
                continue;
            }
            sources.push((p.id.clone(), format!("{}/{}", a.source, r.id)));
            let period = convert::us(r.cap_period.as_ref());
            if r.daily_cap > 0 {
                capped_rules.insert(r.id.clone());
                since = since.min(dl::day_start(at) - 1);
            }
            if r.period_cap > 0 && period > 0 {
                capped_rules.insert(r.id.clone());
                since = since.min(at.saturating_sub(period));
            }
        }
    }
    let taken = store::sources_taken(db, &sources).await?;
    let program_ids: Vec<String> = programs.iter().map(|p| p.id.clone()).collect();
    let capped_rules: Vec<String> = capped_rules.into_iter().collect();
    let mut history: HashMap<(String, String, String), Vec<(i64, i64)>> = HashMap::new();
    for (program, customer, rule, at, points) in
        store::earnings_of(db, &program_ids, &customers, &capped_rules, since).await?
    {
        history
            .entry((program, customer, rule))
            .or_default()
            .push((at, points));
    }
    // Tier points now, per program (one grouped query each).
    let mut tiers: HashMap<Key, TierState> = HashMap::new();
    for (pi, p) in programs.iter().enumerate() {
        let mine: Vec<String> = members
            .values()
            .filter(|m| m.program == p.id && wanted.iter().any(|(w, _)| *w == pi))
            .map(|m| m.customer.clone())
            .collect();
        if mine.is_empty() {
            continue;
        }
        let earned =
            store::earned_totals(db, &p.id, &mine, ledger::window_start(p, now_us), now_us).await?;
        for c in mine {
            let m = &members[&(p.id.clone(), c.clone())];
            tiers.insert(
                (p.id.clone(), c.clone()),
                TierState {
                    tier: m.tier.clone(),
                    below_us: m.below_us,
                    qualifying: earned.get(&c).map_or(0, |e| e.1),
                    rose: false,
                },
            );
        }
    }

    // The earnings, in stream order, with multipliers and caps.
    let mut planned: Vec<Planned> = Vec::new();
    let mut seen: HashSet<(String, String)> = HashSet::new();
    for (pi, ai) in &wanted {
        let (p, a) = (&programs[*pi], &activities[*ai]);
        let key = (p.id.clone(), a.customer.clone());
        let Some(state) = tiers.get_mut(&key) else {
            continue;
        };
        let at = a.at_us.min(now_us);
        for r in &p.body.earning_rules {
            let (base, pending) = ledger::base_points(r, &a.trigger);
            if base <= 0 {
                continue;
            }
            let source = format!("{}/{}", a.source, r.id);
            let pair = (p.id.clone(), source.clone());
            if taken.contains(&pair) || !seen.insert(pair) {
                continue;
            }
            let mut points = dl::with_multiplier(base, p.multiplier(&state.tier));
            let past = history
                .entry((p.id.clone(), a.customer.clone(), r.id.clone()))
                .or_default();
            let used_since = |from: i64| -> i64 {
                past.iter()
                    .filter(|(t, _)| *t > from)
                    .map(|(_, n)| *n)
                    .sum()
            };
            if r.daily_cap > 0 {
                points = dl::capped(points, r.daily_cap, used_since(dl::day_start(at) - 1));
            }
            let period = convert::us(r.cap_period.as_ref());
            if r.period_cap > 0 && period > 0 {
                points = dl::capped(points, r.period_cap, used_since(at.saturating_sub(period)));
            }
            if points <= 0 {
                continue;
            }
            past.push((at, points));
            let spendable_us = if pending {
                at.saturating_add(convert::us(p.body.pending_period.as_ref()))
            } else {
                at
            };
            // Points spendable now and inside the tier window lift the tier at once.
            if spendable_us <= now_us && at > ledger::window_start(p, now_us) {
                state.qualifying += points;
                state.rose = true;
                let q = dl::qualifying_tier(&p.thresholds(), state.qualifying);
                let grace = convert::us(p.body.downgrade_grace.as_ref());
                if let dl::TierMove::Up(i) =
                    dl::tier_move(p.tier_index(&state.tier), q, state.below_us, grace, now_us)
                {
                    state.tier = p.body.tiers[i].id.clone();
                }
            }
            planned.push(Planned {
                program: *pi,
                customer: a.customer.clone(),
                rule: r.id.clone(),
                points,
                source,
                at_us: at,
                spendable_us,
                expire_us: p.expiry(at),
                reason: a.source.clone(),
            });
        }
    }
    if planned.is_empty() {
        return Ok(events);
    }

    // Transactions, lots and their link, in set-based statements.
    let txns: Vec<_> = planned
        .iter()
        .map(|n| {
            ledger::new_txn(
                &programs[n.program].id,
                &n.customer,
                kind::EARN,
                n.points,
                &n.rule,
                n.source.clone(),
                n.at_us,
                &Who {
                    reason: n.reason.clone(),
                    ..who.clone()
                },
            )
        })
        .collect();
    let ids = store::insert_txns(db, &txns).await?;
    let mut made = Vec::new();
    let mut new_lots = Vec::new();
    for (n, mut t) in planned.iter().zip(txns) {
        // A concurrent writer of the same source (not expected: the stream
        // is applied by one subscriber) leaves that earning out.
        let Some(id) = ids.get(&(t.program.clone(), t.source.clone())) else {
            continue;
        };
        t.id = *id;
        new_lots.push(NewLot {
            program: t.program.clone(),
            customer: t.customer.clone(),
            amount: n.points,
            earn_us: n.at_us,
            spendable_us: n.spendable_us,
            expire_us: n.expire_us,
            txn: t.id,
        });
        made.push((n, t));
    }
    let lot_ids = store::insert_lots(db, &new_lots).await?;
    let mut links = Vec::new();
    let mut expiries = Vec::new();
    let mut spendables = Vec::new();
    for (n, t) in &mut made {
        let Some(lot) = lot_ids.get(&t.id) else {
            continue;
        };
        t.lot = *lot;
        links.push((t.id, *lot));
        if n.expire_us != NEVER {
            expiries.push(Arm::new(format!("lot/{lot}"), &t.customer, n.expire_us));
        }
        if n.spendable_us > n.at_us && n.spendable_us < n.expire_us {
            spendables.push(Arm::new(
                format!("spendable/{lot}"),
                &t.customer,
                n.spendable_us,
            ));
        }
    }
    store::set_txn_lots(db, &links).await?;
    timers::arm(db, ledger::LOT_EXPIRY, &expiries).await?;
    timers::arm(db, ledger::POINTS_SPENDABLE, &spendables).await?;

    // Events: each transaction with its member's balance after the batch,
    // then the tier moves.
    let mut balances: HashMap<Key, i64> = HashMap::new();
    for p in &programs {
        let mine: Vec<String> = made
            .iter()
            .filter(|(_, t)| t.program == p.id)
            .map(|(_, t)| t.customer.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if mine.is_empty() {
            continue;
        }
        for (c, lots) in store::open_lots_of(db, &p.id, &mine, now_us).await? {
            balances.insert((p.id.clone(), c), dl::balance(&lots, now_us));
        }
    }
    for (n, t) in &made {
        let p = &programs[n.program];
        let balance = balances
            .get(&(p.id.clone(), t.customer.clone()))
            .copied()
            .unwrap_or(0);
        events.push(ledger::points_changed(p, t, &[], balance));
    }
    // Tier reviews of the members whose qualifying points rose, per
    // program, set-based; their points are known here, no need to re-read.
    for p in &programs {
        let mut rose: Vec<(&members::Model, i64)> = tiers
            .iter()
            .filter(|((program, _), s)| *program == p.id && s.rose)
            .filter_map(|(k, s)| Some((members.get(k)?, s.qualifying)))
            .collect();
        if rose.is_empty() {
            continue;
        }
        rose.sort_by(|a, b| a.0.customer.cmp(&b.0.customer));
        for tc in ledger::review_tiers(db, p, &rose, now_us).await? {
            events.push(NewEvent::new(&tc.customer, &tc));
        }
    }
    Ok(events)
}

/// Enrols, in one INSERT, the customers of `wanted` who are not members of
/// a program that auto-enrols (where the activity allows it), then locks
/// the new rows into `members`; returns their events.
async fn enrol(
    db: &impl ConnectionTrait,
    programs: &[Program],
    activities: &[Activity],
    wanted: &[(usize, usize)],
    members: &mut HashMap<Key, members::Model>,
    now_us: i64,
) -> Result<Vec<NewEvent>> {
    let mut rows: Vec<(usize, members::Model)> = Vec::new();
    let mut seen: HashSet<Key> = HashSet::new();
    for (pi, ai) in wanted {
        let (p, a) = (&programs[*pi], &activities[*ai]);
        let key = (p.id.clone(), a.customer.clone());
        if a.enroll && p.body.auto_enroll && !members.contains_key(&key) && seen.insert(key) {
            rows.push((*pi, ledger::new_member(p, &a.customer, None, now_us)));
        }
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let plain: Vec<members::Model> = rows.iter().map(|(_, m)| m.clone()).collect();
    let created: HashSet<Key> = store::insert_members(db, &plain)
        .await?
        .into_iter()
        .collect();
    let mut events = Vec::new();
    for (pi, m) in &rows {
        if created.contains(&(m.program.clone(), m.customer.clone())) {
            events.extend(ledger::enrolled_events(&programs[*pi], m));
        }
    }
    let again: Vec<String> = plain
        .iter()
        .map(|m| m.customer.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for m in store::lock_customers(db, &again).await? {
        members
            .entry((m.program.clone(), m.customer.clone()))
            .or_insert(m);
    }
    Ok(events)
}
