//! Handlers for the customer change stream, each in the subscriber's
//! transaction (effect and cursor commit together, so a replay applies
//! nothing twice):
//!
//! * created, updated: the stage and the `language` attribute;
//! * consent changes for the SURVEYS purpose: the consent bit per channel;
//! * stage changes: the stage, and invitations to published surveys that
//!   target customers entering that stage (refusals are logged: the
//!   fatigue cap and consent apply to automatic invitations too);
//! * purchase touchpoints: an after-purchase timer per published survey
//!   that asks for one, keyed by survey and touchpoint (a replayed event
//!   arms the same timer again);
//! * merges: invitations, responses and timers move to the survivor;
//! * erasure: open-text answers are deleted, responses unlinked from the
//!   customer (their numbers stay in summaries), invitations kept
//!   anonymous (response rates stay true), timers deleted, then the receipt.

use crate::store::surveys;
use crate::store::{customers, invitations, responses};
use crate::triggers::AFTER_PURCHASE;
use clm_platform::Error;
use clm_platform::changes::{Apply, Handlers, On, OnBatch};
use clm_platform::db::to_micros;
use clm_platform::timers::{self, Arm};
use clm_proto::common::ChangeEvent;
use clm_proto::customer as cpb;
use clm_proto::feedback as pb;
use std::sync::Arc;

/// The handlers of the customer stream.
pub fn customer_handlers() -> Handlers {
    let h = Arc::new(CustomerEvents);
    Handlers::new()
        .on_batch::<cpb::TouchpointRecorded, _>(h.clone())
        .on::<cpb::CustomerCreated, _>(h.clone())
        .on::<cpb::CustomerUpdated, _>(h.clone())
        .on::<cpb::StageChanged, _>(h.clone())
        .on::<cpb::ConsentChanged, _>(h.clone())
        .on::<cpb::CustomersMerged, _>(h.clone())
        .on::<cpb::CustomerErased, _>(h)
}

/// Applies customer events.
pub struct CustomerEvents;

fn language(c: &cpb::Customer) -> Option<String> {
    match c.attributes.get("language")?.value.as_ref()? {
        cpb::attribute_value::Value::StringValue(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// Writes what a customer message says (stage, language), keeping consent.
async fn profile(txn: &sea_orm::DatabaseTransaction, c: &cpb::Customer) -> Result<(), Error> {
    let consent = customers::get(txn, &c.name).await?.map_or(0, |r| r.consent);
    customers::put(
        txn,
        customers::Row {
            customer: c.name.clone(),
            stage: stage_code(c.stage),
            language: language(c),
            consent,
        },
    )
    .await
}

fn stage_code(stage: i32) -> i16 {
    clm_platform::customer_events::stage("", stage).map_or(0, |s| s.code())
}

#[async_trait::async_trait]
impl On<cpb::CustomerCreated> for CustomerEvents {
    async fn on(
        &self,
        cx: &mut Apply,
        _: &ChangeEvent,
        m: cpb::CustomerCreated,
    ) -> Result<(), Error> {
        match &m.customer {
            Some(c) => profile(cx.txn(), c).await,
            None => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl On<cpb::CustomerUpdated> for CustomerEvents {
    async fn on(
        &self,
        cx: &mut Apply,
        _: &ChangeEvent,
        m: cpb::CustomerUpdated,
    ) -> Result<(), Error> {
        match &m.customer {
            Some(c) => profile(cx.txn(), c).await,
            None => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl On<cpb::ConsentChanged> for CustomerEvents {
    async fn on(
        &self,
        cx: &mut Apply,
        _: &ChangeEvent,
        m: cpb::ConsentChanged,
    ) -> Result<(), Error> {
        let surveys: Vec<&cpb::ConsentChange> = m
            .changes
            .iter()
            .filter(|c| c.purpose == cpb::ConsentPurpose::Surveys as i32)
            .collect();
        if surveys.is_empty() {
            return Ok(());
        }
        let txn = cx.txn();
        let mut row = customers::get(txn, &m.customer)
            .await?
            .unwrap_or(customers::Row {
                customer: m.customer.clone(),
                stage: 0,
                language: None,
                consent: 0,
            });
        for c in surveys {
            let bit = customers::bit(c.channel);
            if c.to_state == cpb::ConsentState::Granted as i32 {
                row.consent |= bit;
            } else {
                row.consent &= !bit;
            }
        }
        customers::put(txn, row).await
    }
}

#[async_trait::async_trait]
impl On<cpb::StageChanged> for CustomerEvents {
    async fn on(&self, cx: &mut Apply, _: &ChangeEvent, m: cpb::StageChanged) -> Result<(), Error> {
        let Some(change) = &m.change else {
            return Ok(());
        };
        let txn = cx.txn();
        let mut row = customers::get(txn, &m.customer)
            .await?
            .unwrap_or(customers::Row {
                customer: m.customer.clone(),
                stage: 0,
                language: None,
                consent: 0,
            });
        row.stage = stage_code(change.to_stage);
        customers::put(txn, row).await?;
        let now_us = to_micros(cx.now());
        let targets: Vec<String> = surveys::published(txn)
            .await?
            .into_iter()
            .filter(|s| {
                matches!(
                    s.body.targeting.as_ref().and_then(|t| t.audience.as_ref()),
                    Some(pb::targeting::Audience::StageEntered(e)) if e.stage == change.to_stage
                )
            })
            .map(|s| s.row.id)
            .collect();
        for survey in targets {
            crate::triggers::invite_one(cx, &survey, &m.customer, now_us).await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl OnBatch<cpb::TouchpointRecorded> for CustomerEvents {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, cpb::TouchpointRecorded)>,
    ) -> Result<(), Error> {
        let purchases: Vec<cpb::Touchpoint> = messages
            .into_iter()
            .filter_map(|(_, m)| m.touchpoint)
            .filter(|t| t.r#type == cpb::TouchpointType::Purchase as i32)
            .collect();
        if purchases.is_empty() {
            return Ok(());
        }
        let txn = cx.txn();
        let mut arms = Vec::new();
        for s in surveys::published(txn).await? {
            let Some(pb::targeting::Audience::AfterPurchase(p)) =
                s.body.targeting.as_ref().and_then(|t| t.audience.as_ref())
            else {
                continue;
            };
            let delay_us = p
                .delay
                .as_ref()
                .and_then(|d| clm_platform::convert::duration_millis("", d).ok())
                .unwrap_or(0)
                * 1000;
            for t in &purchases {
                let Some(at) = clm_platform::customer_events::time(t.occurred_time.as_ref()) else {
                    continue;
                };
                arms.push(Arm {
                    key: format!("{}|{}|{}", s.row.id, t.customer, t.event_id),
                    subject: t.customer.clone(),
                    due_us: to_micros(at).saturating_add(delay_us),
                    payload: Some(s.row.id.clone().into_bytes()),
                });
            }
        }
        timers::arm(txn, AFTER_PURCHASE, &arms).await?;
        if !arms.is_empty() {
            let t = cx.runtime().timers.clone();
            cx.after_commit(async move { t.wake() });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl On<cpb::CustomersMerged> for CustomerEvents {
    async fn on(
        &self,
        cx: &mut Apply,
        _: &ChangeEvent,
        m: cpb::CustomersMerged,
    ) -> Result<(), Error> {
        let txn = cx.txn();
        // Locks in the order invitations take them: the customers first.
        let mut all = m.merged.clone();
        all.push(m.survivor.clone());
        customers::lock(txn, &all).await?;
        invitations::reassign(txn, &m.merged, &m.survivor).await?;
        responses::reassign(txn, &m.merged, &m.survivor).await?;
        timers::move_subjects(txn, &m.merged, &m.survivor).await?;
        // The survivor keeps its own consent; the customer service sends
        // any consent the merge changed as ConsentChanged.
        let survivor = customers::get(txn, &m.survivor).await?;
        customers::delete(txn, &m.merged).await?;
        if let Some(c) = &m.customer {
            customers::put(
                txn,
                customers::Row {
                    customer: m.survivor.clone(),
                    stage: stage_code(c.stage),
                    language: language(c),
                    consent: survivor.map_or(0, |r| r.consent),
                },
            )
            .await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl On<cpb::CustomerErased> for CustomerEvents {
    async fn on(
        &self,
        cx: &mut Apply,
        _: &ChangeEvent,
        m: cpb::CustomerErased,
    ) -> Result<(), Error> {
        let mut all = m.merged_from.clone();
        all.push(m.customer.clone());
        let txn = cx.txn();
        customers::lock(txn, &all).await?;
        responses::erase(txn, &all).await?;
        invitations::anonymize(txn, &all).await?;
        timers::disarm_subjects(txn, None, &all).await?;
        customers::delete(txn, &all).await?;
        cx.erased(&m).await
    }
}
