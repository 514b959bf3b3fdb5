//! The report projection: the KPI rollups ([`store::activity`],
//! [`store::rollups`]) and journey rows ([`store::journeys`]) the reports
//! read, kept by a consumer of this service's own change stream
//! (`Parts::follow_own`) instead of inside the writes. A touchpoint or
//! stage write commits its rows and its outbox events only.
//!
//! The platform subscriber applies up to `subscriber.batch_size` events in
//! one transaction together with its cursor (kept under `customer` in
//! `consumer_cursors`), so a restart resumes where the projection stopped
//! and applies nothing twice; each customer's mark
//! ([`store::projection::unapplied`]) makes every event idempotent by its
//! position as well, which lets the subscriber apply batches of touchpoints
//! and moves split by customer in partitions side by side. That cursor is
//! the position the reports say they are fresh to ([`freshness`]).
//!
//! * `TouchpointRecorded`: the touchpoints still stored (an erased
//!   customer's are gone, and its events scrubbed) are added to the
//!   rollups of the event's customer, and the journey rows of its moves at
//!   or after them are recomputed.
//! * `StageChanged`, and `CustomerCreated` for the stage a customer
//!   starts in: the stays the moves closed, first conversions and churns,
//!   and the moves' journey rows.
//! * `CustomersMerged`: the duplicates' rows folded into the survivor's,
//!   once ([`store::projection::fold`]).
//! * `CustomerErased`: every projected row of the customer and those merged
//!   into it deleted (the erasure deleted them already; this covers rows a
//!   batch in flight wrote meanwhile).

use crate::store;
use crate::store::touchpoints::TouchpointRecord;
use clm_domain::ids::CustomerId;
use clm_domain::lifecycle::Stage;
use clm_platform::changes::{Apply, Handlers, OnBatch};
use clm_platform::{Error, Runtime};
use clm_proto::common::ChangeEvent;
use clm_proto::customer as pb;
use sea_orm::DatabaseTransaction;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// The handlers of the report projection on this service's own stream.
pub fn handlers() -> Handlers {
    let p = Arc::new(Projection);
    Handlers::new()
        .on_batch_partitioned::<pb::TouchpointRecorded, _>(p.clone())
        .on_batch_partitioned::<pb::StageChanged, _>(p.clone())
        .on_batch_partitioned::<pb::CustomerCreated, _>(p.clone())
        .on_batch::<pb::CustomersMerged, _>(p.clone())
        .on_batch::<pb::CustomerErased, _>(p)
}

/// The report projection's handlers (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Projection;

/// The customer id of a `customers/{id}` name, or None (a scrubbed event).
fn customer_id(name: &str) -> Option<String> {
    CustomerId::parse_name("customer", name)
        .ok()
        .map(|c| c.to_string())
}

/// Of `items` (customer id, event, what to apply), those not applied
/// before (by position), with the marks to store once they are.
#[allow(clippy::type_complexity)]
async fn unapplied<T>(
    txn: &DatabaseTransaction,
    items: Vec<(String, &ChangeEvent, T)>,
) -> Result<(Vec<(String, T)>, Vec<(String, i64)>), Error> {
    let keys: Vec<(String, i64)> = items
        .iter()
        .map(|(c, e, _)| (c.clone(), e.sequence))
        .collect();
    let fresh = store::projection::unapplied(txn, &keys).await?;
    let todo = items
        .into_iter()
        .zip(fresh)
        .filter(|(_, f)| *f)
        .map(|((c, _, t), _)| (c, t))
        .collect();
    Ok((todo, keys))
}

#[async_trait::async_trait]
impl OnBatch<pb::TouchpointRecorded> for Projection {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, pb::TouchpointRecorded)>,
    ) -> Result<(), Error> {
        let items = messages
            .into_iter()
            .filter_map(|(e, m)| {
                let t = m.touchpoint?;
                let c = customer_id(&t.customer)?;
                (!t.event_id.is_empty()).then_some((c, e, t.event_id))
            })
            .collect();
        let (items, keys) = unapplied(cx.txn(), items).await?;
        if items.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = items.iter().map(|(_, id)| id.as_str()).collect();
        let stored = store::touchpoints::existing(cx.txn(), &ids).await?;
        let mut records: Vec<TouchpointRecord> = Vec::with_capacity(items.len());
        for (customer, id) in &items {
            let Some(r) = stored.get(id) else { continue };
            let mut r = r.clone();
            // The event's customer: a duplicate's touchpoints moved to its
            // survivor are folded into it at the merge's event.
            r.customer = CustomerId::parse_id("customer", customer).map_err(Error::internal)?;
            records.push(r);
        }
        let inserted: HashSet<String> = records
            .iter()
            .map(|r| r.touchpoint.event_id.clone())
            .collect();
        store::activity::on_touchpoints(cx.txn(), &records, &inserted).await?;
        let mut earliest: BTreeMap<String, i64> = BTreeMap::new();
        for r in &records {
            let at = clm_platform::db::to_micros(r.touchpoint.occurred_time);
            earliest
                .entry(r.customer.to_string())
                .and_modify(|e| *e = Ord::min(*e, at))
                .or_insert(at);
        }
        store::journeys::on_touchpoints(cx.txn(), &earliest).await?;
        store::projection::mark(cx.txn(), &keys).await
    }
}

fn micros(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000
}

fn stage(code: i32) -> Option<Stage> {
    Stage::from_code(i16::try_from(code).ok()?)
}

/// Applies `items` (customer id, event, move) not applied before: the
/// stays they close, first conversions and churns, their journey rows.
async fn apply_moves(
    txn: &DatabaseTransaction,
    items: Vec<(String, &ChangeEvent, store::rollups::Move)>,
) -> Result<(), Error> {
    let (todo, keys) = unapplied(txn, items).await?;
    let moves: Vec<store::rollups::Move> = todo.into_iter().map(|(_, m)| m).collect();
    if moves.is_empty() {
        return Ok(());
    }
    store::rollups::on_moves(txn, &moves).await?;
    let mut customers: Vec<String> = moves.into_iter().map(|m| m.0).collect();
    customers.sort_unstable();
    customers.dedup();
    store::journeys::fill(txn, &customers).await?;
    store::projection::mark(txn, &keys).await
}

#[async_trait::async_trait]
impl OnBatch<pb::CustomerCreated> for Projection {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, pb::CustomerCreated)>,
    ) -> Result<(), Error> {
        let items = messages
            .into_iter()
            .filter_map(|(e, m)| {
                let c = m.customer?;
                let id = customer_id(&c.name)?;
                let to = stage(c.stage)?;
                let at = micros(c.stage_change_time.as_ref().or(c.create_time.as_ref())?);
                Some((id.clone(), e, (id, at, to)))
            })
            .collect();
        apply_moves(cx.txn(), items).await
    }
}

#[async_trait::async_trait]
impl OnBatch<pb::StageChanged> for Projection {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, pb::StageChanged)>,
    ) -> Result<(), Error> {
        let items = messages
            .into_iter()
            .filter_map(|(e, m)| {
                let c = customer_id(&m.customer)?;
                let change = m.change?;
                let to = stage(change.to_stage)?;
                let at = micros(change.change_time.as_ref()?);
                Some((c.clone(), e, (c, at, to)))
            })
            .collect();
        apply_moves(cx.txn(), items).await
    }
}

#[async_trait::async_trait]
impl OnBatch<pb::CustomersMerged> for Projection {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, pb::CustomersMerged)>,
    ) -> Result<(), Error> {
        for (_, m) in messages {
            let Some(survivor) = customer_id(&m.survivor) else {
                continue;
            };
            let dups: Vec<String> = m.merged.iter().filter_map(|d| customer_id(d)).collect();
            store::projection::fold(cx.txn(), &survivor, &dups).await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl OnBatch<pb::CustomerErased> for Projection {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, pb::CustomerErased)>,
    ) -> Result<(), Error> {
        let customers: Vec<String> = messages
            .iter()
            .flat_map(|(_, m)| std::iter::once(&m.customer).chain(&m.merged_from))
            .filter_map(|c| customer_id(c))
            .collect();
        store::projection::forget(cx.txn(), &customers).await
    }
}

/// How fresh the projection is: the position of the last event of this
/// service's stream it applied, and the stream's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// Every event up to this position is reflected in the reports.
    pub fresh: i64,
    /// The newest position of the stream.
    pub head: i64,
}

impl Freshness {
    /// As the report messages carry it.
    pub fn to_proto(self) -> pb::ReportFreshness {
        pb::ReportFreshness {
            fresh_position: self.fresh,
            head_position: self.head,
        }
    }
}

/// Longest a report waits for `min_position` without a deadline of its own.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// How often a waiting report looks at the projection's cursor again.
const RECHECK: Duration = Duration::from_millis(10);

/// The projection's freshness, after waiting (up to the call's deadline, at
/// most [`MAX_WAIT`]) until it has applied `min_position` (0: no wait).
/// Every event committed before the call has a position when the head is
/// read (PostgreSQL's relay stamps pending ones first), so a caller that
/// waits for the head it was told sees its own writes. DEADLINE_EXCEEDED,
/// naming both positions, when the projection does not get there in time;
/// INVALID_ARGUMENT for a negative `min_position`.
pub async fn freshness(rt: &Runtime, min_position: i64) -> Result<Freshness, Error> {
    if min_position < 0 {
        return Err(Error::invalid("min_position", "must not be negative"));
    }
    let head = head(rt).await?;
    let wait = clm_platform::peer::remaining().map_or(MAX_WAIT, |r| r.min(MAX_WAIT));
    // Answer a little before the deadline, so the answer is this error and
    // not the server layer's cut-off.
    let until = tokio::time::Instant::now() + wait - Ord::min(wait / 5, Duration::from_millis(200));
    loop {
        let fresh = clm_platform::changes::load_cursor(&rt.reports, crate::SERVICE).await?;
        if fresh >= min_position {
            return Ok(Freshness {
                fresh,
                head: Ord::max(head, fresh),
            });
        }
        if tokio::time::Instant::now() >= until {
            let head = Ord::max(head, fresh);
            return Err(Error::DeadlineExceeded(format!(
                "the reports are fresh to position {fresh} (stream head {head}); min_position \
                 {min_position} was not reached within {} ms",
                wait.as_millis()
            )));
        }
        tokio::time::sleep_until(Ord::min(tokio::time::Instant::now() + RECHECK, until)).await;
    }
}

/// The head of this service's stream, once every committed event has its
/// position.
async fn head(rt: &Runtime) -> Result<i64, Error> {
    if clm_platform::db::is_postgres(&rt.db) {
        rt.outbox.stamp(&rt.db).await?;
        Ok(rt.outbox.bounds(&rt.db).await?.head)
    } else {
        Ok(rt.outbox.bounds(&rt.read).await?.head)
    }
}
