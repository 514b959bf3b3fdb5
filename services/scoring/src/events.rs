//! Handlers for the customer change stream. Each runs in the subscriber's
//! transaction (effect, own events and cursor commit together), so a
//! replay after a crash applies nothing twice; awards are idempotent by
//! (source event, rule, model, version) on top of that.
//!
//! Touchpoint batches are registered partition-safe
//! (`Handlers::on_batch_partitioned`): on PostgreSQL the subscriber splits
//! them by customer (the events' subject) into transactions side by side
//! and stores the cursor after them. Safe because the handler writes only
//! its customers' rows (locked first, in one order) and scores only
//! touchpoints it had not kept yet, so a partition replayed after a crash
//! adds nothing.

use crate::convert;
use crate::recap;
use crate::scorer::{self, Models};
use crate::store::ledger::{self, NewRow};
use crate::store::{customers, limited, sums, timers};
use clm_domain::lifecycle::Stage;
use clm_domain::scoring::{Period, RuleHistory};
use clm_platform::Error;
use clm_platform::changes::{Apply, Handlers, On, OnBatch};
use clm_platform::db::{from_micros, to_micros};
use clm_proto::common::ChangeEvent;
use clm_proto::customer as cpb;
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The handlers of the customer stream.
pub fn customer_handlers(models: Arc<Models>) -> Handlers {
    let h = Arc::new(CustomerEvents { models });
    Handlers::new()
        .on_batch_partitioned::<cpb::TouchpointRecorded, _>(h.clone())
        .on_batch::<cpb::CustomerCreated, _>(h.clone())
        .on::<cpb::CustomerUpdated, _>(h.clone())
        .on::<cpb::StageChanged, _>(h.clone())
        .on::<cpb::ConsentChanged, _>(h.clone())
        .on::<cpb::CustomersMerged, _>(h.clone())
        .on::<cpb::CustomerErased, _>(h)
}

/// Scores customer events.
pub struct CustomerEvents {
    models: Arc<Models>,
}

impl CustomerEvents {
    fn after(&self, cx: &mut Apply) {
        let timers = cx.runtime().timers.clone();
        cx.after_commit(async move { timers.wake() });
    }

    /// Re-evaluates profile rules of every active model for `customer`.
    async fn profile_changed(
        &self,
        cx: &mut Apply,
        customer: &str,
        event: &str,
    ) -> Result<(), Error> {
        let now = clm_domain::clock::micros(cx.now());
        let txn = cx.txn();
        let row = customers::get(txn, &[customer.to_owned()]).await?.pop();
        let profile = row
            .as_ref()
            .and_then(|r| r.profile.as_deref())
            .and_then(|b| cpb::Customer::decode(b).ok());
        let stage = row
            .as_ref()
            .and_then(|r| Some((Stage::from_code(r.stage?)?, from_micros(r.stage_us?))));
        let facts = convert::facts(profile.as_ref(), stage);
        let last = customers::last_activity(txn, &[customer.to_owned()], to_micros(now)).await?;
        let mut events = Vec::new();
        for v in self.models.active(txn).await? {
            if v.model.profile_rules.is_empty() {
                continue;
            }
            let before = scorer::by_customer(
                ledger::of_customers(txn, &v.id, &[customer.to_owned()]).await?,
            );
            let mut net: HashMap<String, i64> = HashMap::new();
            for r in before.values().flatten() {
                *net.entry(r.rule.clone()).or_default() += r.points;
            }
            let new: Vec<NewRow> = v
                .model
                .award_profile(&facts, &net, event, now)
                .into_iter()
                .map(|award| NewRow {
                    customer: customer.to_owned(),
                    model: v.id.clone(),
                    model_version: v.version,
                    award,
                    reason: String::new(),
                    actor: String::new(),
                })
                .collect();
            events.extend(scorer::apply(txn, &v, new, &last, to_micros(now)).await?);
        }
        for e in events {
            cx.emit(e);
        }
        self.after(cx);
        Ok(())
    }
}

fn stage_of(c: &cpb::Customer) -> Option<(i16, i64)> {
    let s = convert::stage("stage", c.stage).ok()?;
    let at = c
        .stage_change_time
        .as_ref()
        .and_then(|t| clm_platform::convert::from_timestamp("", t).ok())
        .map_or(0, to_micros);
    Some((s.code(), at))
}

#[async_trait::async_trait]
impl OnBatch<cpb::TouchpointRecorded> for CustomerEvents {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, cpb::TouchpointRecorded)>,
    ) -> Result<(), Error> {
        let touchpoints = messages
            .into_iter()
            .filter_map(|(_, m)| m.touchpoint)
            .collect();
        self.touchpoints(cx, touchpoints).await
    }
}

/// The handlers of the feedback stream: each completed response's answers
/// are scored as `SURVEY_ANSWER` touchpoints (see
/// `clm_platform::customer_events::survey_answers`), with the same ledger,
/// caps, decay and idempotency as any touchpoint.
pub fn feedback_handlers(models: Arc<Models>) -> Handlers {
    Handlers::new()
        .on_batch::<clm_proto::feedback::ResponseCompleted, _>(Arc::new(CustomerEvents { models }))
}

#[async_trait::async_trait]
impl OnBatch<clm_proto::feedback::ResponseCompleted> for CustomerEvents {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, clm_proto::feedback::ResponseCompleted)>,
    ) -> Result<(), Error> {
        let touchpoints = messages
            .iter()
            .flat_map(|(_, m)| clm_platform::customer_events::survey_answers(m))
            .collect();
        self.touchpoints(cx, touchpoints).await
    }
}

impl CustomerEvents {
    /// Keeps and scores `touchpoints` (those not seen before).
    async fn touchpoints(
        &self,
        cx: &mut Apply,
        touchpoints: Vec<cpb::Touchpoint>,
    ) -> Result<(), Error> {
        let now = to_micros(clm_domain::clock::micros(cx.now()));
        let rows: Vec<customers::TouchRow> = touchpoints
            .iter()
            .map(|t| customers::TouchRow {
                event_id: t.event_id.clone(),
                customer: t.customer.clone(),
                occurred_us: t
                    .occurred_time
                    .as_ref()
                    .and_then(|ts| clm_platform::convert::from_timestamp("", ts).ok())
                    .map_or(0, to_micros),
                body: t.encode_to_vec(),
            })
            .collect();
        let txn = cx.txn();
        let custs: Vec<String> = {
            let mut c: Vec<String> = rows.iter().map(|r| r.customer.clone()).collect();
            c.sort();
            c.dedup();
            c
        };
        // Lock first: awards of one customer are computed and written by one writer at a time.
        customers::ensure_and_lock(txn, &custs).await?;
        let active = self.models.active(txn).await?;
        let inactivity = active.iter().any(|v| scorer::uses_inactivity(&v.model));
        // The last activity inactivity decay counts from, before this batch.
        let prior_last = if inactivity {
            customers::last_activity(txn, &custs, now).await?
        } else {
            Default::default()
        };
        let fresh: std::collections::HashSet<String> = customers::insert_touchpoints(txn, &rows)
            .await?
            .into_iter()
            .collect();
        let mut tps: Vec<(String, clm_domain::touchpoint::Touchpoint)> = touchpoints
            .iter()
            .filter(|t| fresh.contains(&t.event_id))
            .filter_map(|t| Some((t.customer.clone(), convert::touchpoint(t)?)))
            .collect();
        if tps.is_empty() {
            return Ok(());
        }
        // (time, event id) per customer: the order caps are defined in.
        tps.sort_by(|a, b| {
            (&a.0, a.1.occurred_time, &a.1.event_id).cmp(&(&b.0, b.1.occurred_time, &b.1.event_id))
        });
        let last = if inactivity {
            customers::last_activity(txn, &custs, now).await?
        } else {
            Default::default()
        };
        let mut events = Vec::new();
        for v in &active {
            if v.model.event_rules.is_empty() {
                continue;
            }
            // What caps and once-per-customer rules need of the customers'
            // earlier awards: the awards of the matching capped rules inside
            // the batch's cap windows, and any award of its once-only rules.
            let matching: Vec<&clm_domain::scoring::EventRule> = v
                .model
                .event_rules
                .iter()
                .filter(|r| tps.iter().any(|(_, tp)| r.trigger.matches(tp)))
                .collect();
            if matching.is_empty() {
                continue;
            }
            // Each (customer, limited rule) a touchpoint matches, with the
            // cap windows of its touchpoints: what its earlier awards used
            // there, and its newest award (one statement for the batch).
            let mut asks: BTreeMap<(&str, &str), limited::Ask> = BTreeMap::new();
            for (customer, tp) in &tps {
                let at = tp.occurred_time.timestamp_micros();
                for r in matching
                    .iter()
                    .filter(|r| r.limited() && r.trigger.matches(tp))
                {
                    let (bucket, (lo, hi)) = match r.cap {
                        Some(cap) if !r.once_per_customer => (
                            match cap.period {
                                Period::Day => limited::Bucket::Day,
                                Period::IsoWeek => limited::Bucket::Week,
                                Period::Rolling(_) => limited::Bucket::Rolling,
                            },
                            cap.window(at),
                        ),
                        _ => (limited::Bucket::Once, (i64::MIN, i64::MAX)),
                    };
                    asks.entry((customer.as_str(), r.id.as_str()))
                        .and_modify(|a| {
                            a.lo = a.lo.min(lo);
                            a.hi = a.hi.max(hi);
                        })
                        .or_insert_with(|| limited::Ask {
                            customer: customer.clone(),
                            rule: r.id.clone(),
                            bucket,
                            lo,
                            hi,
                        });
                }
            }
            let asked: Vec<limited::Ask> = asks.values().cloned().collect();
            let used = limited::used(txn, &v.id, v.version, &asked).await?;
            let mut before: HashMap<&str, Vec<(&str, &limited::Used)>> = HashMap::new();
            for ((customer, rule), u) in &used {
                before
                    .entry(customer.as_str())
                    .or_default()
                    .push((rule.as_str(), u));
            }
            let mut new = Vec::new();
            let mut histories: BTreeMap<&str, RuleHistory> = BTreeMap::new();
            for (customer, tp) in &tps {
                let h = histories.entry(customer.as_str()).or_insert_with(|| {
                    let mut h = RuleHistory::new();
                    for (rule, u) in before.get(customer.as_str()).into_iter().flatten() {
                        h.entry((*rule).to_owned())
                            .or_default()
                            .extend(u.uses.iter().copied());
                    }
                    h
                });
                new.extend(
                    v.model
                        .award_touchpoint(tp, h)
                        .into_iter()
                        .map(|award| NewRow {
                            customer: customer.clone(),
                            model: v.id.clone(),
                            model_version: v.version,
                            award,
                            reason: String::new(),
                            actor: String::new(),
                        }),
                );
            }
            // A touchpoint earlier than its limited rule's newest award for
            // the customer arrived late: that rule's awards from it on are
            // evaluated again (crate::recap) instead of on the fast path.
            let mut late: BTreeMap<(String, String), recap::Late> = BTreeMap::new();
            for (customer, tp) in &tps {
                let at = tp.occurred_time.timestamp_micros();
                for r in matching.iter().filter(|r| r.limited()) {
                    let newest = used
                        .get(&(customer.clone(), r.id.clone()))
                        .and_then(|u| u.newest);
                    if newest.is_none_or(|n| at >= n) || !r.trigger.matches(tp) {
                        continue;
                    }
                    let Some(ask) = asks.get(&(customer.as_str(), r.id.as_str())) else {
                        continue;
                    };
                    // Sorted by (time, event id): the first is the earliest.
                    late.entry((customer.clone(), r.id.clone()))
                        .or_insert_with(|| recap::Late {
                            customer: customer.clone(),
                            rule: r.id.clone(),
                            from_us: at,
                            until_us: match ask.bucket {
                                limited::Bucket::Day | limited::Bucket::Week => Some(ask.hi),
                                limited::Bucket::Once | limited::Bucket::Rolling => None,
                            },
                            cause: tp.event_id.clone(),
                        });
                }
            }
            if !late.is_empty() {
                new.retain(|n| !late.contains_key(&(n.customer.clone(), n.award.rule.clone())));
                let late: Vec<recap::Late> = late.into_values().collect();
                new.extend(recap::corrections(txn, v, &late, &tps).await?);
            }
            events.extend(scorer::apply(txn, v, new, &last, now).await?);
        }
        // A touchpoint moves the last activity of every score with
        // inactivity decay, awarded or not: those the awards above did not
        // re-state are re-stated here, so a reader's curve stays exact.
        let moved: Vec<String> = custs
            .iter()
            .filter(|c| last.get(*c) != prior_last.get(*c))
            .cloned()
            .collect();
        if !moved.is_empty() {
            let stated = scorer::stated(&events);
            for v in active.iter().filter(|v| scorer::uses_inactivity(&v.model)) {
                let before = scorer::curves(txn, v, &moved, &prior_last, now).await?;
                let after = scorer::curves(txn, v, &moved, &last, now).await?;
                let idle: Vec<&str> = v
                    .model
                    .scores
                    .iter()
                    .filter(|s| s.inactivity.is_some())
                    .map(|s| s.name.as_str())
                    .collect();
                events.extend(scorer::restated_where(
                    v,
                    &before,
                    &after,
                    clm_proto::scoring::ScoreChangeCause::Activity,
                    now,
                    |customer, score| {
                        idle.contains(&score)
                            && !stated.contains(&(
                                customer.to_owned(),
                                format!("scoringModels/{}", v.id),
                                score.to_owned(),
                            ))
                    },
                ));
            }
        }
        for e in events {
            cx.emit(e);
        }
        self.after(cx);
        Ok(())
    }
}

/// A run of new customers: their profiles are stored together; each is
/// then scored by the active models' profile rules one after the other, as
/// it arrived (nothing to score when no active model has one).
#[async_trait::async_trait]
impl OnBatch<cpb::CustomerCreated> for CustomerEvents {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, cpb::CustomerCreated)>,
    ) -> Result<(), Error> {
        let created: Vec<(&ChangeEvent, cpb::Customer)> = messages
            .into_iter()
            .filter_map(|(e, m)| Some((e, m.customer?)))
            .collect();
        let scored = self
            .models
            .active(cx.txn())
            .await?
            .iter()
            .any(|v| !v.model.profile_rules.is_empty());
        if scored {
            for (event, c) in created {
                customers::set_profile(cx.txn(), &c.name, c.encode_to_vec(), stage_of(&c)).await?;
                self.profile_changed(cx, &c.name, &event.event_id).await?;
            }
            return Ok(());
        }
        let profiles: Vec<customers::Profile> = created
            .iter()
            .map(|(_, c)| (c.name.clone(), c.encode_to_vec(), stage_of(c)))
            .collect();
        customers::set_profiles(cx.txn(), &profiles).await?;
        self.after(cx);
        Ok(())
    }
}

#[async_trait::async_trait]
impl On<cpb::CustomerUpdated> for CustomerEvents {
    async fn on(
        &self,
        cx: &mut Apply,
        event: &ChangeEvent,
        m: cpb::CustomerUpdated,
    ) -> Result<(), Error> {
        let Some(c) = m.customer else { return Ok(()) };
        customers::set_profile(cx.txn(), &c.name, c.encode_to_vec(), stage_of(&c)).await?;
        self.profile_changed(cx, &c.name, &event.event_id).await
    }
}

#[async_trait::async_trait]
impl On<cpb::StageChanged> for CustomerEvents {
    async fn on(
        &self,
        cx: &mut Apply,
        event: &ChangeEvent,
        m: cpb::StageChanged,
    ) -> Result<(), Error> {
        let Some(change) = m.change else {
            return Ok(());
        };
        let Ok(stage) = convert::stage("", change.to_stage) else {
            return Ok(());
        };
        let at = change
            .change_time
            .as_ref()
            .and_then(|t| clm_platform::convert::from_timestamp("", t).ok())
            .map_or(0, to_micros);
        customers::set_stage(cx.txn(), &m.customer, stage.code(), at).await?;
        self.profile_changed(cx, &m.customer, &event.event_id).await
    }
}

#[async_trait::async_trait]
impl On<cpb::ConsentChanged> for CustomerEvents {
    async fn on(
        &self,
        cx: &mut Apply,
        event: &ChangeEvent,
        m: cpb::ConsentChanged,
    ) -> Result<(), Error> {
        let denials: Vec<&cpb::ConsentChange> = m
            .changes
            .iter()
            .filter(|c| {
                c.to_state == cpb::ConsentState::Denied as i32 && c.from_state != c.to_state
            })
            .collect();
        if denials.is_empty() {
            return Ok(());
        }
        let now = to_micros(clm_domain::clock::micros(cx.now()));
        let txn = cx.txn();
        let custs = vec![m.customer.clone()];
        customers::ensure_and_lock(txn, &custs).await?;
        let last = customers::last_activity(txn, &custs, now).await?;
        let mut events = Vec::new();
        for v in self.models.active(txn).await? {
            if v.model.consent_rules.is_empty() {
                continue;
            }
            let mut new = Vec::new();
            for d in &denials {
                let Some(purpose) = convert::purpose_name(d.purpose) else {
                    continue;
                };
                let at = d
                    .change_time
                    .as_ref()
                    .and_then(|t| clm_platform::convert::from_timestamp("", t).ok())
                    .map_or(now, to_micros);
                // One denial per purpose and channel: each its own source.
                let source = format!("{}/{}/{}", event.event_id, d.purpose, d.channel);
                new.extend(
                    v.model
                        .award_consent_denial(purpose, &source, at)
                        .into_iter()
                        .map(|award| NewRow {
                            customer: m.customer.clone(),
                            model: v.id.clone(),
                            model_version: v.version,
                            award,
                            reason: String::new(),
                            actor: String::new(),
                        }),
                );
            }
            events.extend(scorer::apply(txn, &v, new, &last, now).await?);
        }
        for e in events {
            cx.emit(e);
        }
        self.after(cx);
        Ok(())
    }
}

#[async_trait::async_trait]
impl On<cpb::CustomersMerged> for CustomerEvents {
    async fn on(
        &self,
        cx: &mut Apply,
        event: &ChangeEvent,
        m: cpb::CustomersMerged,
    ) -> Result<(), Error> {
        let now = to_micros(clm_domain::clock::micros(cx.now()));
        let txn = cx.txn();
        let mut all = m.merged.clone();
        all.push(m.survivor.clone());
        customers::ensure_and_lock(txn, &all).await?;
        let survivor = std::slice::from_ref(&m.survivor);
        let active = self.models.active(txn).await?;
        let mut before = Vec::with_capacity(active.len());
        {
            let last = customers::last_activity(txn, survivor, now).await?;
            for v in &active {
                before.push(scorer::curves(txn, v, survivor, &last, now).await?);
            }
        }
        // Award keys do not name the customer, so moved entries keep them
        // and a replayed event still scores once.
        ledger::move_to(txn, &m.merged, &m.survivor).await?;
        sums::delete_customers(txn, &m.merged).await?;
        sums::rebuild(txn, std::slice::from_ref(&m.survivor)).await?;
        customers::merge(txn, &m.merged, &m.survivor).await?;
        timers::delete(txn, &m.merged).await?;
        if let Some(c) = &m.customer {
            customers::set_profile(txn, &m.survivor, c.encode_to_vec(), stage_of(c)).await?;
        }
        // The survivor's thresholds are looked at again with the merged ledger.
        let mut keys = Vec::new();
        for v in self.models.active(txn).await? {
            for t in &v.model.thresholds {
                keys.push((m.survivor.clone(), v.id.clone(), t.id.clone()));
            }
        }
        timers::touch(txn, &keys, now).await?;
        // Caps and once-only rules over the two ledgers together, as a
        // re-scoring would give them (one award of a once-only rule).
        let mut events = Vec::new();
        let last = customers::last_activity(txn, std::slice::from_ref(&m.survivor), now).await?;
        for v in self.models.active(txn).await? {
            let late: Vec<recap::Late> = v
                .model
                .event_rules
                .iter()
                .filter(|r| r.limited())
                .map(|r| recap::Late {
                    customer: m.survivor.clone(),
                    rule: r.id.clone(),
                    from_us: i64::MIN,
                    until_us: None,
                    cause: event.event_id.clone(),
                })
                .collect();
            let new = recap::corrections(txn, &v, &late, &[]).await?;
            events.extend(scorer::apply(txn, &v, new, &last, now).await?);
        }
        // The survivor's scores re-stated with the merged ledger (its
        // curves changed even where no correction was needed).
        for (v, before) in active.iter().zip(&before) {
            let after = scorer::curves(txn, v, survivor, &last, now).await?;
            events.extend(scorer::restated(
                v,
                before,
                &after,
                clm_proto::scoring::ScoreChangeCause::Merge,
                now,
            ));
        }
        for e in events {
            cx.emit(e);
        }
        self.profile_changed(cx, &m.survivor, &event.event_id).await
    }
}

#[async_trait::async_trait]
impl On<cpb::CustomerErased> for CustomerEvents {
    async fn on(
        &self,
        cx: &mut Apply,
        _event: &ChangeEvent,
        m: cpb::CustomerErased,
    ) -> Result<(), Error> {
        let mut all = m.merged_from.clone();
        all.push(m.customer.clone());
        let txn = cx.txn();
        // Under the customers' locks, so a concurrent AdjustScore either
        // commits first (and its entry is deleted here) or finds no customer.
        customers::lock_existing(txn, &all).await?;
        ledger::delete_customers(txn, &all).await?;
        sums::delete_customers(txn, &all).await?;
        customers::delete(txn, &all).await?;
        timers::delete(txn, &all).await?;
        cx.erased(&m).await
    }
}
