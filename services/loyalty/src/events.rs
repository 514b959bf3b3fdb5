//! Handlers of the streams loyalty follows. Each runs in the subscriber's
//! transaction (effect, own events and cursor commit together), so a
//! replay after a crash applies nothing twice; earnings are also keyed by
//! their source (`tp/{event_id}/{rule}`, `survey/{response}/{rule}`,
//! `referral/{referee}/{rule}`) under a unique index.
//!
//! * Customer stream: purchases and other touchpoints earn by the rules
//!   (auto-enrolling where the program says so), each run of consecutive
//!   touchpoints set-based in one go ([`crate::earning`]); a StageChanged to
//!   CONVERSION rewards a pending referral, once, to both sides;
//!   CustomersMerged moves members, lots, transactions, redemptions and
//!   referrals to the survivor (rows move, nothing is copied, so nothing
//!   counts twice) and reviews its tiers; CustomerErased deletes the
//!   customer's rows and emits the receipt.
//! * Feedback stream: a completed survey response earns the
//!   SURVEY_COMPLETED rules' bonus (runs of them set-based, likewise).

use crate::earning::{self, Activity};
use crate::ledger::{self, Program, Trigger, Who};
use crate::store;
use clm_platform::Error;
use clm_platform::changes::{Apply, Handlers, On, OnBatch};
use clm_platform::customer_events::time;
use clm_platform::db::to_micros;
use clm_platform::outbox::NewEvent;
use clm_platform::timers::{self, Arm};
use clm_proto::common::ChangeEvent;
use clm_proto::customer as cpb;
use clm_proto::loyalty as pb;
use std::sync::Arc;

/// The handlers of the customer stream.
pub fn customer_handlers() -> Handlers {
    let h = Arc::new(CustomerEvents);
    Handlers::new()
        .on_batch::<cpb::TouchpointRecorded, _>(h.clone())
        .on::<cpb::StageChanged, _>(h.clone())
        .on::<cpb::CustomersMerged, _>(h.clone())
        .on::<cpb::CustomerErased, _>(h)
}

/// The handlers of the feedback stream.
pub fn feedback_handlers() -> Handlers {
    Handlers::new().on_batch::<clm_proto::feedback::ResponseCompleted, _>(Arc::new(CustomerEvents))
}

/// Applies customer and feedback events.
#[derive(Debug)]
pub struct CustomerEvents;

fn now_us(cx: &Apply) -> i64 {
    to_micros(clm_domain::clock::micros(cx.now()))
}

fn wake(cx: &mut Apply) {
    let timers = cx.runtime().timers.clone();
    cx.after_commit(async move { timers.wake() });
}

/// Earns a run of activities set-based ([`earning::earn_batch`]) and
/// emits what it made.
async fn earn_all(cx: &mut Apply, activities: Vec<Activity>) -> Result<(), Error> {
    if activities.is_empty() {
        return Ok(());
    }
    let now = now_us(cx);
    let who = Who {
        actor: format!("system:{}", crate::SERVICE),
        ..Who::default()
    };
    let events = earning::earn_batch(cx.txn(), &activities, now, &who).await?;
    for e in events {
        cx.emit(e);
    }
    wake(cx);
    Ok(())
}

#[async_trait::async_trait]
impl OnBatch<cpb::TouchpointRecorded> for CustomerEvents {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, cpb::TouchpointRecorded)>,
    ) -> Result<(), Error> {
        let now = now_us(cx);
        let activities = messages
            .into_iter()
            .filter_map(|(_, m)| m.touchpoint)
            .map(|t| Activity {
                at_us: time(t.occurred_time.as_ref()).map_or(now, to_micros),
                source: format!("tp/{}", t.event_id),
                trigger: Trigger::Touchpoint {
                    kind: t.r#type,
                    revenue: t.revenue,
                },
                customer: t.customer,
                enroll: true,
            })
            .collect();
        earn_all(cx, activities).await
    }
}

#[async_trait::async_trait]
impl OnBatch<clm_proto::feedback::ResponseCompleted> for CustomerEvents {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, clm_proto::feedback::ResponseCompleted)>,
    ) -> Result<(), Error> {
        let now = now_us(cx);
        let activities = messages
            .into_iter()
            .filter(|(_, m)| !m.customer.is_empty() && !m.response.is_empty())
            .map(|(_, m)| Activity {
                source: format!("survey/{}", m.response),
                customer: m.customer,
                trigger: Trigger::Survey,
                at_us: now,
                enroll: false,
            })
            .collect();
        earn_all(cx, activities).await
    }
}

#[async_trait::async_trait]
impl On<cpb::StageChanged> for CustomerEvents {
    async fn on(
        &self,
        cx: &mut Apply,
        _event: &ChangeEvent,
        m: cpb::StageChanged,
    ) -> Result<(), Error> {
        let converted = m
            .change
            .as_ref()
            .is_some_and(|c| c.to_stage == cpb::Stage::Conversion as i32);
        if !converted {
            return Ok(());
        }
        let now = now_us(cx);
        let who = Who {
            actor: format!("system:{}", crate::SERVICE),
            reason: "referral".into(),
            ..Who::default()
        };
        let mut events = Vec::new();
        for claim in store::pending_referrals(cx.txn(), &m.customer).await? {
            let txn = cx.txn();
            let p = Program::load(txn, &claim.program).await?;
            // Both members, locked in customer order.
            let rows = store::lock_members(txn, &p.id, &[&claim.referee, &claim.referrer]).await?;
            if !store::reward_referral(txn, &p.id, &claim.referee, now).await? {
                continue;
            }
            for row in &rows {
                let trigger = if row.customer == claim.referee {
                    Trigger::Referee
                } else {
                    Trigger::Referrer
                };
                let source = format!("referral/{}", claim.referee);
                let (_, e) =
                    ledger::earn_and_review(txn, &p, row, &trigger, &source, now, now, &who)
                        .await?;
                events.extend(e);
            }
            events.push(NewEvent::new(
                &claim.referee,
                &pb::ReferralRewarded {
                    referrer: claim.referrer.clone(),
                    referee: claim.referee.clone(),
                    program: format!("programs/{}", p.id),
                    reward_time: Some(clm_platform::convert::timestamp(
                        clm_platform::db::from_micros(now),
                    )),
                },
            ));
        }
        for e in events {
            cx.emit(e);
        }
        wake(cx);
        Ok(())
    }
}

#[async_trait::async_trait]
impl On<cpb::CustomersMerged> for CustomerEvents {
    async fn on(
        &self,
        cx: &mut Apply,
        _event: &ChangeEvent,
        m: cpb::CustomersMerged,
    ) -> Result<(), Error> {
        let merged: Vec<String> = m
            .merged
            .iter()
            .filter(|c| **c != m.survivor)
            .cloned()
            .collect();
        if merged.is_empty() {
            return Ok(());
        }
        let now = now_us(cx);
        let txn = cx.txn();
        let mut all = merged.clone();
        all.push(m.survivor.clone());
        store::lock_customers(txn, &all).await?;
        // Lot expiries follow their lots to the survivor (the timer's lock is by subject).
        for kind in [ledger::LOT_EXPIRY, ledger::POINTS_SPENDABLE] {
            let armed = timers::of_subjects(txn, kind, &merged).await?;
            let moved: Vec<Arm> = armed
                .into_iter()
                .map(|(key, due)| Arm::new(key, &m.survivor, due))
                .collect();
            timers::arm(txn, kind, &moved).await?;
        }
        timers::disarm_subjects(txn, Some(ledger::TIER_REVIEW), &merged).await?;
        store::merge(txn, &merged, &m.survivor).await?;
        let mut events = Vec::new();
        for row in store::lock_customers(txn, std::slice::from_ref(&m.survivor)).await? {
            let p = Program::load(txn, &row.program).await?;
            // The merged lots moved the survivor's balance: followers
            // (segmentation's loyalty.balance) learn it here.
            let balance = ledger::member_views(txn, &p, std::slice::from_ref(&row), now)
                .await?
                .first()
                .map_or(0, |v| v.balance);
            events.push(ledger::points_spendable(&p, &m.survivor, balance));
            if let Some(tc) = ledger::review_tier(txn, &p, &row, now).await? {
                events.push(NewEvent::new(&m.survivor, &tc));
            }
        }
        for e in events {
            cx.emit(e);
        }
        wake(cx);
        Ok(())
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
        store::lock_customers(txn, &all).await?;
        store::erase(txn, &all).await?;
        timers::disarm_subjects(txn, None, &all).await?;
        cx.erased(&m).await
    }
}
