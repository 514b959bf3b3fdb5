//! Thresholds on the platform timer queue ([`clm_platform::timers`]): a
//! [`Thresholds`] handler looks at each due threshold at its exact instant
//! (the next decay crossing, or "now" after an award) in the queue's
//! transaction and, when one fires, emits ThresholdCrossed and arms a stage
//! move in that same transaction; [`StageMoves`] delivers each move to the
//! customer service through the platform's peer client with no
//! transaction open, retried until delivered (a request id made of model,
//! threshold, customer and instant, so a retry moves the stage once).
//! Timers live in the database, so crossings due during a restart fire
//! when the service is back, once across replicas.

use crate::convert;
use crate::scorer::{self, Models};
use crate::store::{customers, ledger, timers};
use clm_domain::lifecycle::Stage;
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
use sea_orm::DatabaseTransaction;
use std::collections::BTreeSet;
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
        let now = to_micros(clm_domain::clock::micros(cx.now()));
        let custs = customers_of(&due);
        let txn = cx.txn();
        let keyed: Vec<(timers::Key, i64)> = due
            .iter()
            .filter_map(|t| timers::parse(&t.key).map(|k| (k, t.due_us)))
            .collect();
        let keys: Vec<timers::Key> = keyed.iter().map(|(k, _)| k.clone()).collect();
        let seen = timers::sides(txn, &keys).await?;
        let rows = customers::get(txn, &custs).await?;
        let last = customers::last_activity(txn, &custs, now).await?;
        let mut sides = Vec::with_capacity(keyed.len());
        let mut next_looks = Vec::new();
        let mut moves = Vec::new();
        let mut events = Vec::new();
        let model_ids: BTreeSet<String> = keys.iter().map(|k| k.1.clone()).collect();
        for model_id in model_ids {
            // A model without an active version: nothing to look at.
            let Some(v) = self.models.get(txn, &model_id, 0).await? else {
                continue;
            };
            let ledgers = scorer::by_customer(ledger::of_customers(txn, &model_id, &custs).await?);
            let empty = Vec::new();
            for (k, at) in keyed.iter().filter(|(k, _)| k.1 == model_id) {
                let (customer, _, threshold) = k;
                let at = *at;
                let th = v.model.thresholds.iter().find(|x| &x.id == threshold);
                let spec = th.and_then(|th| v.model.score(&th.score));
                let (Some(th), Some(spec)) = (th, spec) else {
                    continue;
                };
                let entries = scorer::entries(ledgers.get(customer).unwrap_or(&empty), &th.score);
                let la = last.get(customer).copied();
                let value = score_at(spec, &entries, la, at);
                let above = value >= th.value();
                let was_above = seen.get(k).copied().unwrap_or(false);
                let stage = rows
                    .iter()
                    .find(|r| &r.customer == customer)
                    .and_then(|r| Stage::from_code(r.stage?));
                sides.push((k.clone(), above));
                if let Some(next) = next_crossing(spec, &entries, la, th.value(), at) {
                    next_looks.push((k.clone(), next));
                }
                let Some(to) = th.fires(was_above, above, stage) else {
                    continue;
                };
                let request_id = format!("scoring:{}:{}:{customer}:{at}", v.id, th.id);
                let request = cpb::TransitionStageRequest {
                    name: customer.clone(),
                    to_stage: convert::stage_to_proto(to) as i32,
                    reason: format!("score threshold: {}", th.id),
                    request_id: request_id.clone(),
                    etag: String::new(),
                };
                moves.push(Arm {
                    key: request_id,
                    subject: customer.clone(),
                    due_us: now,
                    payload: Some(request.encode_to_vec()),
                });
                events.push(NewEvent::new(
                    customer,
                    &pb::ThresholdCrossed {
                        customer: customer.clone(),
                        scoring_model: format!("scoringModels/{}", v.id),
                        threshold: th.id.clone(),
                        score: th.score.clone(),
                        value,
                        to_stage: convert::stage_to_proto(to) as i32,
                        cross_time: Some(clm_platform::convert::timestamp(from_micros(at))),
                    },
                ));
            }
        }
        timers::record_sides(txn, &sides).await?;
        // Re-armed timers stay (their version moved); the queue deletes the rest.
        let looks: Vec<Arm> = next_looks
            .iter()
            .map(|(k, next)| Arm::new(timers::key(k), k.0.clone(), *next))
            .collect();
        platform_timers::arm(txn, timers::THRESHOLD, &looks).await?;
        platform_timers::arm(txn, timers::STAGE_MOVE, &moves).await?;
        for e in events {
            cx.emit(e);
        }
        Ok(())
    }
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
