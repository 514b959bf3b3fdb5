//! Thresholds. A crossing is judged by the write that causes it: an award
//! ([`crate::scorer::apply`]) judges the thresholds of the scores it
//! changed at its own instant, in its own transaction ([`judge`]), and
//! when one fires emits ThresholdCrossed and arms a stage move there.
//! Decay crosses thresholds with no write: a [`Thresholds`] handler on the
//! platform timer queue ([`clm_platform::timers`]) looks at each at the
//! exact instant decay crosses it, in the queue's transaction under the
//! customer's lock, never at an instant before the last judgement
//! (`threshold_sides.seen_us`). [`StageMoves`] delivers each move to the
//! customer service through the platform's peer client with no
//! transaction open, retried until delivered (a request id made of model,
//! threshold, customer and instant, so a retry moves the stage once).
//! Timers live in the database, so crossings due during a restart fire
//! when the service is back, once across replicas.

use crate::convert;
use crate::scorer::{self, Models, Version};
use crate::store::{customers, ledger, timers};
use clm_domain::lifecycle::Stage;
use clm_domain::scoring::Threshold;
use clm_domain::scoring::{next_crossing, score_at};
use clm_platform::changes::Apply;
use clm_platform::db::{from_micros, to_micros};
use clm_platform::outbox::NewEvent;
use clm_platform::peer::{Idempotency, Peer};
use clm_platform::timers::{self as platform_timers, Arm, Deliver, OnDue, Timer};
use clm_platform::{Error, Result, Runtime};
use clm_proto::customer as cpb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::scoring as pb;
use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Calls the customer service through the platform's peer client (one
/// channel, a service token and a deadline on every call). TransitionStage
/// carries a request id, so a call the customer service may not have seen
/// is retried within the call's deadline.
#[derive(Clone, Debug)]
struct Customer {
    peer: Option<Peer>,
}

impl Customer {
    async fn transition(&self, request: cpb::TransitionStageRequest) -> Result<()> {
        let customer = request.name.clone();
        let Some(peer) = &self.peer else {
            tracing::warn!(
                customer,
                "threshold fired but peers.customer is not configured: stage not moved"
            );
            return Ok(());
        };
        let moved = peer
            .unary(
                "TransitionStage",
                Idempotency::Idempotent,
                request,
                |channel, request| async move {
                    CustomerServiceClient::new(channel)
                        .transition_stage(request)
                        .await
                },
            )
            .await;
        match moved {
            Ok(_) => Ok(()),
            // Refused moves (already there, not allowed, customer gone) are final.
            Err(e)
                if matches!(
                    e.code(),
                    tonic::Code::FailedPrecondition
                        | tonic::Code::NotFound
                        | tonic::Code::InvalidArgument
                ) =>
            {
                tracing::info!(customer, code = ?e.code(), message = e.status().message(), "threshold stage move refused");
                Ok(())
            }
            Err(e) => Err(Error::from(e)),
        }
    }
}

/// Looks at due thresholds (timers of kind [`timers::THRESHOLD`]) in the
/// platform queue's transaction, under the customers' locks (the lock every
/// scoring writer takes first): reads each score at its timer's instant,
/// records the side, and when the threshold fires emits ThresholdCrossed
/// and arms a [`timers::STAGE_MOVE`] to deliver; re-arms the next decay
/// crossing.
#[derive(Clone, Debug)]
pub struct Thresholds {
    models: Arc<Models>,
}

impl Thresholds {
    /// Over `models`.
    pub fn new(models: Arc<Models>) -> Self {
        Self { models }
    }
}

fn customers_of(due: &[Timer]) -> Vec<String> {
    due.iter()
        .filter_map(|t| timers::parse(&t.key).map(|k| k.0))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[async_trait::async_trait]
impl OnDue for Thresholds {
    async fn lock(&self, txn: &DatabaseTransaction, due: &[Timer]) -> Result<()> {
        customers::ensure_and_lock(txn, &customers_of(due)).await?;
        Ok(())
    }

    async fn fire(&self, cx: &mut Apply, due: Vec<Timer>) -> Result<()> {
        let custs = customers_of(&due);
        let txn = cx.txn();
        let keyed: Vec<(timers::Key, i64)> = due
            .iter()
            .filter_map(|t| timers::parse(&t.key).map(|k| (k, t.due_us)))
            .collect();
        let keys: Vec<timers::Key> = keyed.iter().map(|(k, _)| k.clone()).collect();
        let seen = timers::sides(txn, &keys).await?;
        let stages = stages(txn, &custs).await?;
        let now = to_micros(clm_domain::clock::micros(cx.now()));
        let last = customers::last_activity(txn, &custs, now).await?;
        let mut next_looks = Vec::new();
        let model_ids: BTreeSet<String> = keys.iter().map(|k| k.1.clone()).collect();
        let mut events = Vec::new();
        for model_id in model_ids {
            // A model without an active version: nothing to look at.
            let Some(v) = self.models.get(txn, &model_id, 0).await? else {
                continue;
            };
            let ledgers = scorer::by_customer(ledger::of_customers(txn, &model_id, &custs).await?);
            let empty = Vec::new();
            let mut looks = Vec::new();
            for (k, due_us) in keyed.iter().filter(|(k, _)| k.1 == model_id) {
                let th = v.model.thresholds.iter().find(|x| x.id == k.2);
                let spec = th.and_then(|th| v.model.score(&th.score));
                let (Some(th), Some(spec)) = (th, spec) else {
                    continue;
                };
                // Never behind a judgement already made (an award's).
                let at = (*due_us).max(seen.get(k).map_or(i64::MIN, |s| s.seen_us));
                let entries = scorer::entries(ledgers.get(&k.0).unwrap_or(&empty), &th.score);
                let la = last.get(&k.0).copied();
                looks.push(Look {
                    key: k.clone(),
                    threshold: th,
                    value: score_at(spec, &entries, la, at),
                    at_us: at,
                });
                if let Some(next) = next_crossing(spec, &entries, la, th.value(), at) {
                    next_looks.push((k.clone(), next));
                }
            }
            events.extend(judge(txn, &v, &looks, &seen, &stages, now).await?);
        }
        // Re-armed timers stay (their version moved); the queue deletes the rest.
        let arms: Vec<Arm> = next_looks
            .iter()
            .map(|(k, next)| Arm::new(timers::key(k), k.0.clone(), *next))
            .collect();
        platform_timers::arm(txn, timers::THRESHOLD, &arms).await?;
        for e in events {
            cx.emit(e);
        }
        Ok(())
    }
}

/// The stage of each of `customers` that has one (from StageChanged).
pub async fn stages(
    db: &impl ConnectionTrait,
    customers: &[String],
) -> Result<HashMap<String, Stage>> {
    Ok(customers::get(db, customers)
        .await?
        .into_iter()
        .filter_map(|r| Some((r.customer, Stage::from_code(r.stage?)?)))
        .collect())
}

/// A threshold judged: the score's value at an instant.
#[derive(Debug, Clone)]
pub struct Look<'a> {
    /// (customer, model, threshold).
    pub key: timers::Key,
    /// The threshold.
    pub threshold: &'a Threshold,
    /// The score's value at `at_us`.
    pub value: f64,
    /// The instant.
    pub at_us: i64,
}

/// Records the side of each look (in the caller's transaction: an award's
/// or the timer queue's, under the customer's lock) and, for each that
/// fires against the side last recorded in `seen`, arms the stage move to
/// deliver and returns its ThresholdCrossed: each crossing is recorded
/// exactly once, with the write that causes it.
pub async fn judge(
    db: &impl ConnectionTrait,
    v: &Version,
    looks: &[Look<'_>],
    seen: &HashMap<timers::Key, timers::Side>,
    stages: &HashMap<String, Stage>,
    now_us: i64,
) -> Result<Vec<NewEvent>> {
    let mut sides = Vec::with_capacity(looks.len());
    let mut moves = Vec::new();
    let mut events = Vec::new();
    for l in looks {
        let customer = &l.key.0;
        let th = l.threshold;
        let above = l.value >= th.value();
        let was_above = seen.get(&l.key).is_some_and(|s| s.above);
        sides.push((
            l.key.clone(),
            timers::Side {
                above,
                seen_us: l.at_us,
            },
        ));
        let Some(to) = th.fires(was_above, above, stages.get(customer).copied()) else {
            continue;
        };
        let request_id = format!("scoring:{}:{}:{customer}:{}", v.id, th.id, l.at_us);
        let request = cpb::TransitionStageRequest {
            name: customer.clone(),
            to_stage: convert::stage_to_proto(to) as i32,
            reason: format!("score threshold: {}", th.id),
            request_id: request_id.clone(),
            etag: String::new(),
            // A promotion never moves a customer back down the funnel; a
            // BELOW threshold (a demotion, e.g. to CHURNED) may.
            forward_only: matches!(th.kind, clm_domain::scoring::ThresholdKind::AtLeast { .. }),
        };
        moves.push(Arm {
            key: request_id,
            subject: customer.clone(),
            due_us: now_us,
            payload: Some(request.encode_to_vec()),
        });
        events.push(NewEvent::new(
            customer,
            &pb::ThresholdCrossed {
                customer: customer.clone(),
                scoring_model: format!("scoringModels/{}", v.id),
                threshold: th.id.clone(),
                score: th.score.clone(),
                value: l.value,
                to_stage: convert::stage_to_proto(to) as i32,
                cross_time: Some(clm_platform::convert::timestamp(from_micros(l.at_us))),
            },
        ));
    }
    timers::record_sides(db, &sides).await?;
    platform_timers::arm(db, timers::STAGE_MOVE, &moves).await?;
    Ok(events)
}

/// Delivers stage moves (timers of kind [`timers::STAGE_MOVE`]) to the
/// customer service through the platform's peer client, with no
/// transaction open. TransitionStage carries the request id made of model,
/// threshold, customer and instant, so a retry moves the stage once.
#[derive(Clone, Debug)]
pub struct StageMoves {
    customer: Customer,
}

impl StageMoves {
    /// Through `rt`'s `customer` peer (a missing one is logged and skipped).
    pub fn new(rt: &Runtime) -> Self {
        Self {
            customer: Customer {
                peer: rt.peers.get("customer"),
            },
        }
    }
}

#[async_trait::async_trait]
impl Deliver for StageMoves {
    async fn deliver(&self, timer: &Timer) -> Result<()> {
        let Some(request) = timer
            .payload
            .as_deref()
            .and_then(|p| cpb::TransitionStageRequest::decode(p).ok())
        else {
            tracing::error!(key = %timer.key, "a stage move without a readable request: dropped");
            return Ok(());
        };
        self.customer.transition(request).await
    }
}
