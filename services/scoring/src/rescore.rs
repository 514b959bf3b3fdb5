//! RescoreCustomers: replays every customer's kept touchpoints and profile
//! under a model version and swaps each customer's rule-made ledger entries
//! in one transaction per chunk of customers (manual adjustments and
//! consent-denial awards of rules the version still has are kept). Progress
//! and the final count are in the operation. Each chunk's transaction also
//! emits a ScoreChanged (cause RESCORE) for every score of its customers
//! that have entries under the model, with the rewritten curve.

use crate::convert;
use crate::scorer::{self, Models, Version};
use crate::store::ledger::{self, NewRow};
use crate::store::{customers, sums, timers};
use clm_domain::lifecycle::Stage;
use clm_domain::scoring::RuleHistory;
use clm_platform::db::from_micros;
use clm_platform::{Error, Result, Runtime, operations};
use clm_proto::customer as cpb;
use clm_proto::google::longrunning::Operation;
use clm_proto::scoring as pb;
use prost::Message;
use sea_orm::TransactionTrait;
use std::collections::HashMap;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Operation kind in the operations table.
pub const KIND: &str = "scoring.rescore";
/// Customers per transaction.
const CHUNK: u64 = 500;

/// The runner of re-scorings, registered in the descriptor: the platform
/// runs each on the one replica that claims it, and another replica
/// resumes it (from its start: each chunk's swap is atomic and a replay
/// writes the same ledger) when that replica's lease lapses.
pub fn runner(models: Arc<Models>) -> operations::Runner {
    Arc::new(move |rt, op, cancel| Box::pin(run(rt, models.clone(), op, cancel)))
}

/// Runs a claimed re-scoring to its end, recording the outcome in `op`.
async fn run(
    rt: Runtime,
    models: Arc<Models>,
    mut op: Operation,
    cancel: CancellationToken,
) -> Result<()> {
    let mut meta = op
        .metadata
        .as_ref()
        .and_then(|m| pb::RescoreCustomersMetadata::decode(m.value.as_slice()).ok())
        .ok_or_else(|| Error::internal(format!("{}: unreadable metadata", op.name)))?;
    meta.customers_done = 0;
    let id = meta
        .scoring_model
        .trim_start_matches("scoringModels/")
        .to_owned();
    let Some(v) = models.get(&rt.db, &id, meta.model_version).await? else {
        return operations::fail(
            &rt.db,
            &rt.operations,
            &mut op,
            tonic::Code::FailedPrecondition,
            "the model version to re-score with no longer exists".into(),
            rt.clock.now(),
        )
        .await;
    };
    let entries = replay(&rt, &mut op, &v, &mut meta, &cancel).await?;
    operations::succeed(
        &rt.db,
        &rt.operations,
        &mut op,
        clm_proto::pack_any(&meta),
        clm_proto::pack_any(&pb::RescoreCustomersResponse {
            customers: meta.customers_done,
            ledger_entries: entries,
        }),
        rt.clock.now(),
    )
    .await
}

async fn replay(
    rt: &Runtime,
    op: &mut Operation,
    v: &Version,
    meta: &mut pb::RescoreCustomersMetadata,
    cancel: &CancellationToken,
) -> Result<i64> {
    let mut after = String::new();
    let mut written = 0i64;
    // Kept as they are: consent denials (not kept as history) and profile
    // rules' entries, which record since when each rule held; re-scoring
    // adds only the correction a profile rule needs now, so GetScore at a
    // read time before the re-scoring answers what it answered before.
    let keep: Vec<String> = v
        .model
        .consent_rules
        .iter()
        .map(|r| r.id.clone())
        .chain(v.model.profile_rules.iter().map(|r| r.id.clone()))
        .collect();
    loop {
        // Between chunks: each chunk's swap is whole.
        if cancel.is_cancelled() {
            return Err(Error::Cancelled("re-scoring cancelled".into()));
        }
        if rt.background.is_cancelled() {
            return Err(Error::Unavailable("service stopping".into()));
        }
        let ids = customers::ids_after(&rt.read, &after, CHUNK).await?;
        let Some(last_id) = ids.last().cloned() else {
            break;
        };
        let now = clm_domain::clock::micros(rt.clock.now());
        let now_us = now.timestamp_micros();
        let txn = rt.db.begin().await?;
        customers::ensure_and_lock(&txn, &ids).await?;
        let tps = customers::touchpoints(&txn, &ids).await?;
        let rows = customers::get(&txn, &ids).await?;
        let kept = ledger::kept(&txn, &v.id, &ids, &keep).await?;
        let last = customers::last_activity(&txn, &ids, now_us).await?;
        let before = scorer::curves(&txn, v, &ids, &last, now_us).await?;
        let mut net: HashMap<&str, HashMap<String, i64>> = HashMap::new();
        for r in &kept {
            *net.entry(r.customer.as_str())
                .or_default()
                .entry(r.rule.clone())
                .or_default() += r.points;
        }
        let none = HashMap::new();
        let mut new = Vec::new();
        let mut histories: HashMap<String, RuleHistory> = HashMap::new();
        for (customer, body) in &tps {
            let Ok(tp) = cpb::Touchpoint::decode(body.as_slice()) else {
                continue;
            };
            let h = histories.entry(customer.clone()).or_default();
            let Some(tp) = convert::touchpoint(&tp) else {
                continue;
            };
            for award in v.model.award_touchpoint(&tp, h) {
                new.push(row(customer, v, award));
            }
        }
        for r in &rows {
            let profile = r
                .profile
                .as_deref()
                .and_then(|b| cpb::Customer::decode(b).ok());
            let stage = r
                .stage
                .and_then(Stage::from_code)
                .zip(r.stage_us.map(from_micros));
            let facts = convert::facts(profile.as_ref(), stage);
            let source = format!("{}:{}", op.name, r.customer);
            let net = net.get(r.customer.as_str()).unwrap_or(&none);
            for award in v.model.award_profile(&facts, net, &source, now) {
                new.push(row(&r.customer, v, award));
            }
        }
        // The swap: rule-made entries out, the replayed ones in.
        ledger::delete_rule_made(&txn, &v.id, &ids, &keep).await?;
        written += ledger::insert(&txn, &new).await? as i64;
        // The model's sums anew: the replayed entries and the kept ones.
        let rows: Vec<ledger::Row> = new.iter().map(NewRow::as_row).chain(kept).collect();
        sums::replace_model(&txn, &v.id, &ids, &sums::of_rows(&rows)).await?;
        let keys: Vec<(String, String, String)> = ids
            .iter()
            .flat_map(|c| {
                v.model
                    .thresholds
                    .iter()
                    .map(move |t| (c.clone(), v.id.clone(), t.id.clone()))
            })
            .collect();
        timers::touch(&txn, &keys, now_us).await?;
        // Every score of the chunk re-stated, in the swap's transaction:
        // readers (segmentation) learn the rewritten scores and curves.
        let rewritten = scorer::curves(&txn, v, &ids, &last, now_us).await?;
        let events = scorer::restated(
            v,
            &before,
            &rewritten,
            pb::ScoreChangeCause::Rescore,
            now_us,
        );
        rt.outbox.append(&txn, &events, now).await?;
        meta.customers_done += ids.len() as i64;
        // Commits only while this replica holds the operation's lease.
        operations::progress(&txn, &rt.operations, op, clm_proto::pack_any(meta), now).await?;
        rt.outbox.commit(txn).await?;
        after = last_id;
    }
    Ok(written)
}

fn row(customer: &str, v: &Version, award: clm_domain::scoring::Award) -> NewRow {
    NewRow {
        customer: customer.to_owned(),
        model: v.id.clone(),
        model_version: v.version,
        award,
        reason: String::new(),
        actor: String::new(),
    }
}
