//! The threshold timer queue. A task looks at every timer whose `due_us`
//! has come by the service clock (woken after commits that re-arm timers,
//! and every [`TICK`] so that a clock moved forward is noticed): it reads
//! the score at the due instant, fires the threshold if the score is now
//! on its firing side (TransitionStage on the customer service through the
//! platform's peer client, with a request id made of customer, model,
//! threshold and instant, so a retry moves the stage once), and stores the
//! side and the next decay crossing.
//! Timers live in the database, so crossings due during a restart fire
//! when the service is back.

use crate::convert;
use crate::scorer::{self, Models};
use crate::store::{customers, ledger, timers};
use clm_domain::lifecycle::Stage;
use clm_domain::scoring::{next_crossing, score_at};
use clm_platform::db::from_micros;
use clm_platform::outbox::NewEvent;
use clm_platform::peer::{Idempotency, Peer};
use clm_platform::{Error, Result, Runtime};
use clm_proto::customer as cpb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::scoring as pb;
use sea_orm::TransactionTrait;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How often the queue looks at the clock without a wake-up.
pub const TICK: Duration = Duration::from_millis(50);
/// Longest pause between rounds while they keep failing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Timers looked at per round.
const ROUND: u64 = 200;

/// Calls the customer service through the platform's peer client (one
/// channel, a service token and a deadline on every call). TransitionStage
/// carries a request id, so a call the customer service may not have seen
/// is retried within the call's deadline.
#[derive(Clone, Debug)]
struct Customer {
    peer: Option<Peer>,
}

impl Customer {
    async fn transition(
        &self,
        customer: &str,
        to: Stage,
        reason: String,
        request_id: String,
    ) -> Result<()> {
        let Some(peer) = &self.peer else {
            tracing::warn!(
                customer,
                "threshold fired but peers.customer is not configured: stage not moved"
            );
            return Ok(());
        };
        let request = cpb::TransitionStageRequest {
            name: customer.to_owned(),
            to_stage: convert::stage_to_proto(to) as i32,
            reason,
            request_id,
            etag: String::new(),
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

/// Starts the queue; it stops with the service.
pub fn spawn(rt: Runtime, models: Arc<Models>, wake: Arc<Notify>) -> anyhow::Result<()> {
    let customer = Customer {
        peer: rt.peers.get("customer"),
    };
    tokio::spawn(async move {
        let mut failures: u32 = 0;
        loop {
            let pause = match round(&rt, &models, &customer).await {
                Ok(n) if n as u64 == ROUND => {
                    failures = 0;
                    continue;
                }
                Ok(_) => {
                    failures = 0;
                    TICK
                }
                Err(e) => {
                    // Back off while the customer service (or the database)
                    // is down: one warning per attempt, at most every
                    // MAX_BACKOFF, not one every tick.
                    failures = failures.saturating_add(1);
                    let pause = TICK
                        .saturating_mul(2u32.saturating_pow(failures.min(10)))
                        .min(MAX_BACKOFF);
                    tracing::warn!(
                        error = %e,
                        attempt = failures,
                        retry_in_ms = pause.as_millis() as u64,
                        "threshold timers: round failed; retrying"
                    );
                    pause
                }
            };
            tokio::select! {
                () = wake.notified(), if failures == 0 => {}
                () = tokio::time::sleep(pause) => {}
                () = rt.background.cancelled() => return,
            }
        }
    });
    Ok(())
}

/// A threshold that fired: the stage move to make, then record.
struct Fired {
    timer: timers::Timer,
    at: i64,
    above: bool,
    next: Option<i64>,
    to: Stage,
    request_id: String,
    reason: String,
    event: pb::ThresholdCrossed,
}

/// Looks at due timers once; returns how many. Three steps, so that no
/// database transaction is open while the customer service is called:
/// decide (and settle the timers that did not fire) under the customers'
/// locks; call TransitionStage for the ones that fired; record them with
/// their ThresholdCrossed events. A crash between the steps leaves those
/// timers due: they fire again with the same request id, which the
/// customer service answers without moving the stage twice.
async fn round(rt: &Runtime, models: &Models, customer: &Customer) -> Result<usize> {
    let now = clm_domain::clock::micros(rt.clock.now()).timestamp_micros();
    let due = timers::due(&rt.read, now, ROUND).await?;
    if due.is_empty() {
        return Ok(0);
    }
    let count = due.len();
    let custs: Vec<String> = due
        .iter()
        .map(|t| t.customer.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut fired = Vec::new();
    let txn = rt.db.begin().await?;
    customers::ensure_and_lock(&txn, &custs).await?;
    // Re-read under the lock: a writer may have re-armed or settled them.
    let due = timers::due(&txn, now, ROUND).await?;
    let rows = customers::get(&txn, &custs).await?;
    let last = customers::last_activity(&txn, &custs, now).await?;
    let model_ids: BTreeSet<String> = due.iter().map(|t| t.model.clone()).collect();
    for model_id in model_ids {
        let Some(v) = models.get(&txn, &model_id, 0).await? else {
            for t in due.iter().filter(|t| t.model == model_id) {
                timers::settle(&txn, t, t.due_us.unwrap_or(now), t.above, None).await?;
            }
            continue;
        };
        let ledgers = scorer::by_customer(ledger::of_customers(&txn, &model_id, &custs).await?);
        let empty = Vec::new();
        for t in due.iter().filter(|t| t.model == model_id) {
            let at = t.due_us.unwrap_or(now);
            let threshold = v.model.thresholds.iter().find(|x| x.id == t.threshold);
            let spec = threshold.and_then(|th| v.model.score(&th.score));
            let (Some(th), Some(spec)) = (threshold, spec) else {
                timers::settle(&txn, t, at, t.above, None).await?;
                continue;
            };
            let entries = scorer::entries(ledgers.get(&t.customer).unwrap_or(&empty), &th.score);
            let la = last.get(&t.customer).copied();
            let value = score_at(spec, &entries, la, at);
            let above = value >= th.value();
            let stage = rows
                .iter()
                .find(|r| r.customer == t.customer)
                .and_then(|r| Stage::from_code(r.stage?));
            let next = next_crossing(spec, &entries, la, th.value(), at);
            match th.fires(t.above, above, stage) {
                Some(to) => fired.push(Fired {
                    timer: t.clone(),
                    at,
                    above,
                    next,
                    to,
                    request_id: format!("scoring:{}:{}:{}:{at}", v.id, th.id, t.customer),
                    reason: format!("score threshold: {}", th.id),
                    event: pb::ThresholdCrossed {
                        customer: t.customer.clone(),
                        scoring_model: format!("scoringModels/{}", v.id),
                        threshold: th.id.clone(),
                        score: th.score.clone(),
                        value,
                        to_stage: convert::stage_to_proto(to) as i32,
                        cross_time: Some(clm_platform::convert::timestamp(from_micros(at))),
                    },
                }),
                None => timers::settle(&txn, t, at, above, next).await?,
            }
        }
    }
    txn.commit().await?;
    if fired.is_empty() {
        return Ok(count);
    }
    let mut done = Vec::with_capacity(fired.len());
    let mut failure = None;
    for f in fired {
        match customer
            .transition(
                &f.timer.customer,
                f.to,
                f.reason.clone(),
                f.request_id.clone(),
            )
            .await
        {
            Ok(()) => done.push(f),
            // Left due, with the ones after it (the customer service is
            // unreachable or slow: no use waiting out each one's deadline):
            // the next round tries again with the same request ids.
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let txn = rt.db.begin().await?;
    let mut events = Vec::with_capacity(done.len());
    for f in done {
        // The side is recorded even if an award re-armed the timer meanwhile,
        // so the crossing is never fired twice.
        timers::record_side(&txn, &f.timer, f.above).await?;
        timers::settle(&txn, &f.timer, f.at, f.above, f.next).await?;
        events.push(NewEvent::new(&f.timer.customer, &f.event));
    }
    rt.outbox.append(&txn, &events, rt.clock.now()).await?;
    rt.outbox.commit(txn).await?;
    match failure {
        Some(e) => Err(e),
        None => Ok(count),
    }
}
