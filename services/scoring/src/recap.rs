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

use crate::convert;
use crate::scorer::Version;
use crate::store::customers;
use crate::store::ledger::{self, NewRow};
use clm_domain::scoring::{Award, EventRule};
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
    /// The event that caused it (the late touchpoint, or the merge).
    pub cause: String,
}

/// The event an entry's source names (a correction names its event first).
pub fn event_of(source: &str) -> &str {
    source.split(' ').next().unwrap_or(source)
}

/// The awards and corrections that make `v`'s limited rules in `late` give
/// each customer's touchpoints (kept already) what a replay in (time, event
/// id) order gives: two statements for the whole set.
pub async fn corrections(
    db: &impl ConnectionTrait,
    v: &Version,
    late: &[Late],
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
    let mut custs: Vec<String> = late.iter().map(|l| l.customer.clone()).collect();
    custs.sort();
    custs.dedup();
    let mut rule_ids: Vec<String> = late.iter().map(|l| l.rule.clone()).collect();
    rule_ids.sort();
    rule_ids.dedup();
    let since = late.iter().map(|l| lower(l)).min().unwrap_or(i64::MIN);
    let from = late.iter().map(|l| l.from_us).min().unwrap_or(i64::MIN);
    let entries = ledger::rule_entries(db, &v.id, v.version, &custs, &rule_ids, since).await?;
    let mut by_key: HashMap<(&str, &str), Vec<&ledger::RuleEntry>> = HashMap::new();
    for e in &entries {
        by_key
            .entry((e.customer.as_str(), e.rule.as_str()))
            .or_default()
            .push(e);
    }
    // Each customer's touchpoints from its earliest late instant on, decoded
    // once (those before it are never replayed).
    let mut earliest: HashMap<&str, i64> = HashMap::new();
    for l in &late {
        let e = earliest.entry(l.customer.as_str()).or_insert(l.from_us);
        *e = (*e).min(l.from_us);
    }
    let mut touchpoints: BTreeMap<&str, Vec<(i64, String, clm_domain::touchpoint::Touchpoint)>> =
        BTreeMap::new();
    let kept = customers::touchpoints_since(db, &custs, from).await?;
    for (customer, at, id, body) in &kept {
        if earliest.get(customer.as_str()).is_none_or(|from| at < from) {
            continue;
        }
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
    let mut out = Vec::new();
    for l in late {
        let rule = rules[l.rule.as_str()];
        let lo = lower(l);
        // Net points per event of this customer and rule, and when.
        let mut net: HashMap<&str, (i64, i64)> = HashMap::new();
        for e in by_key
            .get(&(l.customer.as_str(), l.rule.as_str()))
            .into_iter()
            .flatten()
            .filter(|e| e.award_us >= lo)
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
        let events = touchpoints
            .get(l.customer.as_str())
            .into_iter()
            .flatten()
            .filter(|(at, _, tp)| *at >= l.from_us && rule.trigger.matches(tp));
        let times: HashMap<&str, i64> = events
            .clone()
            .map(|(at, id, _)| (id.as_str(), *at))
            .collect();
        for (id, want) in rule.replay(&before, events.map(|(at, id, _)| (*at, id.as_str()))) {
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
