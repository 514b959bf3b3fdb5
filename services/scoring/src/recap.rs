//! Order-independent caps and once-per-customer rules.
//!
//! A limited rule (a cap, or once per customer) gives each matching
//! touchpoint what [`EventRule::replay`] gives it when the customer's
//! touchpoints are taken in (time, event id) order: the definition
//! `RescoreCustomers` replays. Touchpoints that arrive in that order are
//! scored on the fast path (their rule's earlier awards are all before
//! them). One that arrives *late* (earlier than its rule's newest award for
//! the customer), or a merge that brings two customers' awards together,
//! makes the rule's awards from that instant on be evaluated again here:
//! each touchpoint whose award differs from what it should be gets a
//! correcting ledger entry at the touchpoint's own time and with the rule's
//! decay (so it cancels or completes the first award exactly), sourced
//! `"{event} recap {cause}"` (event ids are visible ASCII, so the space
//! cannot be part of one and a replay of the cause writes nothing twice).
//! A calendar cap is evaluated again only up to the end of the windows the
//! batch's touchpoints fall in (later windows cannot change), and a late
//! touchpoint of a once-only or calendar-capped rule replays the rule's
//! awarded touchpoints and the batch's new ones only (`from_entries`).

use crate::convert;
use crate::scorer::Version;
use crate::store::customers;
use crate::store::ledger::{self, NewRow};
use crate::store::limited;
use clm_domain::scoring::{Award, EventRule, Period};
use clm_domain::touchpoint::Touchpoint;
use clm_platform::Result;
use clm_proto::customer as cpb;
use prost::Message;
use sea_orm::ConnectionTrait;
use std::collections::{BTreeMap, HashMap};

/// A limited rule to evaluate again for a customer from an instant on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Late {
    /// `customers/{id}`.
    pub customer: String,
    /// Rule id.
    pub rule: String,
    /// The earliest touchpoint time to evaluate again (µs).
    pub from_us: i64,
    /// Touchpoints from here on are not evaluated again (µs, exclusive):
    /// the end of the latest calendar cap window (day, ISO week) the
    /// customer's new touchpoints of the rule fall in, whose awards no
    /// earlier change can move; `None` for every later touchpoint (a
    /// once-only or rolling-capped rule, where a change carries on).
    pub until_us: Option<i64>,
    /// The event that caused it (the late touchpoint, or the merge).
    pub cause: String,
}

/// The event an entry's source names (a correction names its event first).
pub fn event_of(source: &str) -> &str {
    source.split(' ').next().unwrap_or(source)
}

/// Whether `l` can be evaluated again from its rule's entries and the
/// batch's new touchpoints alone: a late touchpoint (not a merge) of a
/// once-only rule or of one capped per day or ISO week. Adding a touchpoint
/// to such a rule's history never raises the award of a later one (a
/// calendar cap is filled greedily with the rule's fixed points, so the
/// award of the k-th touchpoint in its window, `min(cap, used + k·p) −
/// min(cap, used + (k−1)·p)`, only shrinks as k grows; a once-only rule
/// gives its points to the first only), so a kept touchpoint that has no
/// points now has none after it either, and only those with points (in
/// the ledger) and the new ones can change. A rolling window has no such
/// bound (a cut award frees room for a later one), nor has a merge (two
/// histories, each with its own zeros): those replay the kept touchpoints.
fn from_entries(rule: &EventRule, l: &Late) -> bool {
    l.from_us != i64::MIN
        && (rule.once_per_customer
            || matches!(
                rule.cap.map(|c| c.period),
                Some(Period::Day | Period::IsoWeek)
            ))
}

/// The awards and corrections that make `v`'s limited rules in `late` give
/// each customer's touchpoints what a replay in (time, event id) order
/// gives, `new` being the touchpoints this transaction kept (per customer,
/// in (time, event id) order): one statement for the whole set, and a
/// second to read kept touchpoints when a rule needs them (see
/// [`from_entries`]).
pub async fn corrections(
    db: &impl ConnectionTrait,
    v: &Version,
    late: &[Late],
    new: &[(String, Touchpoint)],
) -> Result<Vec<NewRow>> {
    let rules: HashMap<&str, &EventRule> = v
        .model
        .event_rules
        .iter()
        .filter(|r| r.limited())
        .map(|r| (r.id.as_str(), r))
        .collect();
    let late: Vec<&Late> = late
        .iter()
        .filter(|l| rules.contains_key(l.rule.as_str()))
        .collect();
    if late.is_empty() {
        return Ok(Vec::new());
    }
    // Each late rule's earlier awards that still limit it start here.
    let lower = |l: &Late| {
        let r = rules[l.rule.as_str()];
        if l.from_us == i64::MIN {
            return i64::MIN;
        }
        match r.cap {
            Some(cap) if !r.once_per_customer => cap.window(l.from_us).0,
            _ => i64::MIN,
        }
    };
    // The last touchpoint time each late rule evaluates again (inclusive).
    let last = |l: &Late| l.until_us.map_or(i64::MAX, |u| u.saturating_sub(1));
    // Each (customer, rule)'s entries from its earliest window on, and each
    // customer's touchpoints from its earliest late instant on, up to the
    // last instant evaluated again.
    let mut ranges: BTreeMap<(&str, &str), (i64, i64)> = BTreeMap::new();
    let mut spans: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for l in &late {
        let r = ranges
            .entry((l.customer.as_str(), l.rule.as_str()))
            .or_insert((i64::MAX, i64::MIN));
        *r = (r.0.min(lower(l)), r.1.max(last(l)));
        if !from_entries(rules[l.rule.as_str()], l) {
            let s = spans
                .entry(l.customer.as_str())
                .or_insert((i64::MAX, i64::MIN));
            *s = (s.0.min(l.from_us), s.1.max(last(l)));
        }
    }
    let ranges: Vec<limited::Range> = ranges
        .into_iter()
        .map(|((customer, rule), (lo, hi))| limited::Range {
            customer: customer.to_owned(),
            rule: rule.to_owned(),
            lo,
            hi,
        })
        .collect();
    let entries = limited::entries(db, &v.id, v.version, &ranges).await?;
    let mut by_key: HashMap<(&str, &str), Vec<&ledger::RuleEntry>> = HashMap::new();
    for e in &entries {
        by_key
            .entry((e.customer.as_str(), e.rule.as_str()))
            .or_default()
            .push(e);
    }
    // Kept touchpoints, decoded once per customer (those outside its span
    // are never replayed), for the rules that need them.
    let spans: Vec<(String, i64, i64)> = spans
        .into_iter()
        .map(|(c, (from, to))| (c.to_owned(), from, to))
        .collect();
    let mut touchpoints: BTreeMap<&str, Vec<(i64, String, Touchpoint)>> = BTreeMap::new();
    let kept = customers::touchpoints_in(db, &spans).await?;
    for (customer, at, id, body) in &kept {
        let Some(tp) = cpb::Touchpoint::decode(body.as_slice())
            .ok()
            .as_ref()
            .and_then(convert::touchpoint)
        else {
            continue;
        };
        touchpoints
            .entry(customer.as_str())
            .or_default()
            .push((*at, id.clone(), tp));
    }
    let mut fresh: BTreeMap<&str, Vec<(i64, &str, &Touchpoint)>> = BTreeMap::new();
    for (customer, tp) in new {
        fresh.entry(customer.as_str()).or_default().push((
            tp.occurred_time.timestamp_micros(),
            tp.event_id.as_str(),
            tp,
        ));
    }
    let mut out = Vec::new();
    for l in late {
        let rule = rules[l.rule.as_str()];
        let (lo, hi) = (lower(l), last(l));
        // Net points per event of this customer and rule, and when.
        let mut net: HashMap<&str, (i64, i64)> = HashMap::new();
        for e in by_key
            .get(&(l.customer.as_str(), l.rule.as_str()))
            .into_iter()
            .flatten()
            .filter(|e| e.award_us >= lo && e.award_us <= hi)
        {
            let n = net
                .entry(event_of(&e.source_event))
                .or_insert((e.award_us, 0));
            n.1 += e.points;
        }
        let before: Vec<(i64, i64)> = net
            .values()
            .filter(|(at, p)| *at < l.from_us && *p != 0)
            .copied()
            .collect();
        let within = |at: i64| at >= l.from_us && at <= hi;
        // The touchpoints evaluated again, in (time, event id) order.
        let mut events: Vec<(i64, &str)> = if from_entries(rule, l) {
            net.iter()
                .filter(|(_, (at, p))| *p != 0 && within(*at))
                .map(|(id, (at, _))| (*at, *id))
                .chain(
                    fresh
                        .get(l.customer.as_str())
                        .into_iter()
                        .flatten()
                        .filter(|(at, _, tp)| within(*at) && rule.trigger.matches(tp))
                        .map(|(at, id, _)| (*at, *id)),
                )
                .collect()
        } else {
            touchpoints
                .get(l.customer.as_str())
                .into_iter()
                .flatten()
                .filter(|(at, _, tp)| within(*at) && rule.trigger.matches(tp))
                .map(|(at, id, _)| (*at, id.as_str()))
                .collect()
        };
        events.sort_unstable();
        events.dedup();
        let times: HashMap<&str, i64> = events.iter().map(|(at, id)| (*id, *at)).collect();
        for (id, want) in rule.replay(&before, events.iter().copied()) {
            let have = net.get(id).map(|n| n.1);
            if have.unwrap_or(0) == want {
                continue;
            }
            let source = match have {
                None => id.to_owned(),
                Some(_) => format!("{id} recap {}", l.cause),
            };
            out.push(NewRow {
                customer: l.customer.clone(),
                model: v.id.clone(),
                model_version: v.version,
                award: Award {
                    rule: rule.id.clone(),
                    score: rule.score.clone(),
                    points: want - have.unwrap_or(0),
                    source_event: source,
                    award_us: times[id],
                    decay: rule.decay,
                },
                reason: String::new(),
                actor: String::new(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clm_domain::rules::{TouchQuery, TouchType};
    use clm_domain::scoring::{Cap, Decay};
    use clm_domain::touchpoint::TouchpointKind;
    use proptest::prelude::*;

    fn rule(kind: u8, cap: i64, points: i64) -> EventRule {
        EventRule {
            id: "r".into(),
            score: "engagement".into(),
            trigger: TouchQuery {
                touch: TouchType {
                    kind: TouchpointKind::FeatureUse,
                    custom_type: None,
                },
                filter: Vec::new(),
                window: None,
            },
            points,
            once_per_customer: kind == 0,
            cap: (kind != 0).then_some(Cap {
                points: cap,
                period: if kind == 1 {
                    Period::Day
                } else {
                    Period::IsoWeek
                },
            }),
            decay: Decay::None,
        }
    }

    proptest! {
        /// What [`from_entries`] relies on: for a once-only rule or one
        /// capped per day or ISO week, adding a touchpoint (anywhere in
        /// (time, event id) order) to a customer's history leaves every
        /// touchpoint that had no points without points, and never raises
        /// another's points.
        #[test]
        fn an_added_touchpoint_never_gives_points_to_one_without(
            kind in 0u8..3,
            cap in 0i64..12,
            points in prop_oneof![-4i64..=-1, 1i64..=4],
            hours in proptest::collection::vec(0i64..24 * 20, 1..40),
            added in 0i64..24 * 20,
            before_in_window in 0i64..6,
        ) {
            const HOUR: i64 = 3_600_000_000;
            let rule = rule(kind, cap, points);
            let ids: Vec<String> = (0..=hours.len()).map(|i| format!("e{i:03}")).collect();
            let mut events: Vec<(i64, &str)> = hours
                .iter()
                .zip(&ids)
                .map(|(h, id)| ((h + 1) * HOUR, id.as_str()))
                .collect();
            events.sort_unstable();
            // An earlier award in the first window (and the first day).
            let before = [(0, before_in_window)];
            let without: HashMap<&str, i64> =
                rule.replay(&before, events.iter().copied()).into_iter().collect();
            let mut with_added = events.clone();
            with_added.push(((added + 1) * HOUR, ids[hours.len()].as_str()));
            with_added.sort_unstable();
            for (id, p) in rule.replay(&before, with_added.iter().copied()) {
                let Some(old) = without.get(id) else { continue };
                prop_assert!(p.abs() <= old.abs(), "{id}: {old} became {p}");
                prop_assert!(p == 0 || p.signum() == old.signum());
            }
        }
    }
}
