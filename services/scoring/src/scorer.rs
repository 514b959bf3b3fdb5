//! The scoring work shared by the stream handlers, the API, the timer
//! queue and re-scoring: compiled model versions (cached; versions never
//! change once written), scores of a customer from its ledger rows, and
//! applying awards (insert, ScoreChanged events, re-armed timers).

use crate::convert;
use crate::store::ledger::{self, NewRow, Row};
use crate::store::{scoring_models, timers};
use clm_domain::scoring::{Entry, Model, score_at};
use clm_platform::outbox::NewEvent;
use clm_platform::{Error, Result};
use clm_proto::scoring as pb;
use sea_orm::ConnectionTrait;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// A compiled model version.
#[derive(Debug, Clone)]
pub struct Version {
    /// Model id.
    pub id: String,
    /// Version.
    pub version: i64,
    /// Compiled rules.
    pub model: Arc<Model>,
}

/// Compiled model versions by (id, version).
#[derive(Debug, Default)]
pub struct Models {
    cache: Mutex<HashMap<(String, i64), Arc<Model>>>,
}

impl Models {
    fn compiled(&self, v: &scoring_models::Version) -> Result<Version> {
        let key = (v.id.clone(), v.version);
        if let Some(m) = self.cache.lock().map_err(Error::internal)?.get(&key) {
            return Ok(Version {
                id: v.id.clone(),
                version: v.version,
                model: m.clone(),
            });
        }
        let model = Arc::new(
            convert::compile_model("scoring_model", &v.body).map_err(|e| {
                Error::internal(format!(
                    "stored model {} v{} no longer compiles: {e:?}",
                    v.id, v.version
                ))
            })?,
        );
        self.cache
            .lock()
            .map_err(Error::internal)?
            .insert(key, model.clone());
        Ok(Version {
            id: v.id.clone(),
            version: v.version,
            model,
        })
    }

    /// Every model's active version (one query; compiled once per version).
    pub async fn active(&self, db: &impl ConnectionTrait) -> Result<Vec<Version>> {
        scoring_models::list_active(db, None, 10_000)
            .await?
            .iter()
            .map(|v| self.compiled(v))
            .collect()
    }

    /// A model's version (0: active), if it exists.
    pub async fn get(
        &self,
        db: &impl ConnectionTrait,
        id: &str,
        version: i64,
    ) -> Result<Option<Version>> {
        scoring_models::get(db, id, version)
            .await?
            .map(|v| self.compiled(&v))
            .transpose()
    }
}

/// Whether any score of `model` has inactivity decay (only then is the
/// customer's last activity read).
pub fn uses_inactivity(model: &Model) -> bool {
    model.scores.iter().any(|s| s.inactivity.is_some())
}

/// Ledger rows grouped by customer (rows arrive sorted by customer).
pub fn by_customer(rows: Vec<Row>) -> BTreeMap<String, Vec<Row>> {
    let mut out: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    for r in rows {
        out.entry(r.customer.clone()).or_default().push(r);
    }
    out
}

/// Entries of `score` among `rows`.
pub fn entries(rows: &[Row], score: &str) -> Vec<Entry> {
    rows.iter()
        .filter(|r| r.score == score)
        .map(Row::entry)
        .collect()
}

/// Every score of `model` for a customer with ledger `rows` at `t_us`, and the grade.
pub fn scores(
    model: &Model,
    rows: &[Row],
    last_activity: Option<i64>,
    t_us: i64,
) -> (Vec<(String, f64)>, String) {
    let values: Vec<(String, f64)> = model
        .scores
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                score_at(s, &entries(rows, &s.name), last_activity, t_us),
            )
        })
        .collect();
    let get = |n: &str| values.iter().find(|(k, _)| k == n).map_or(0.0, |(_, v)| *v);
    let grade = model.bands.grade(
        get(clm_domain::scoring::FIT),
        get(clm_domain::scoring::ENGAGEMENT),
    );
    (values, grade)
}

/// A new row as a ledger row (for computing scores before it is read back).
fn as_row(n: &NewRow) -> Row {
    let (kind, param) = n.award.decay.code();
    Row {
        id: i64::MAX,
        customer: n.customer.clone(),
        model: n.model.clone(),
        model_version: n.model_version,
        score: n.award.score.clone(),
        rule: n.award.rule.clone(),
        points: n.award.points,
        source_event: n.award.source_event.clone(),
        award_us: n.award.award_us,
        decay_kind: kind,
        decay_us: param,
        reason: n.reason.clone(),
        actor: n.actor.clone(),
    }
}

/// Writes `new` awards of `v` (customers' previous ledgers in `before`),
/// re-arms the timers of thresholds on changed scores to `now_us`, and
/// returns the ScoreChanged events. One insert for all awards.
pub async fn apply(
    db: &impl ConnectionTrait,
    v: &Version,
    before: &BTreeMap<String, Vec<Row>>,
    new: Vec<NewRow>,
    last_activity: &HashMap<String, i64>,
    now_us: i64,
) -> Result<Vec<NewEvent>> {
    if new.is_empty() {
        return Ok(Vec::new());
    }
    ledger::insert(db, &new).await?;
    let mut added: BTreeMap<&str, Vec<Row>> = BTreeMap::new();
    for n in &new {
        added
            .entry(n.customer.as_str())
            .or_default()
            .push(as_row(n));
    }
    let mut events = Vec::new();
    let mut rearm = Vec::new();
    let empty = Vec::new();
    for (customer, rows) in added {
        let old_rows = before.get(customer).unwrap_or(&empty);
        let last = last_activity.get(customer).copied();
        let (old, _) = scores(&v.model, old_rows, last, now_us);
        let mut all = old_rows.clone();
        all.extend(rows);
        let (newv, grade) = scores(&v.model, &all, last, now_us);
        for ((name, o), (_, n)) in old.iter().zip(&newv) {
            if o == n {
                continue;
            }
            events.push(NewEvent::new(
                customer,
                &pb::ScoreChanged {
                    customer: customer.to_owned(),
                    scoring_model: format!("scoringModels/{}", v.id),
                    score: name.clone(),
                    old_value: *o,
                    new_value: *n,
                    grade: grade.clone(),
                    change_time: Some(clm_platform::convert::timestamp(
                        clm_platform::db::from_micros(now_us),
                    )),
                },
            ));
            for t in v.model.thresholds.iter().filter(|t| &t.score == name) {
                rearm.push((customer.to_owned(), v.id.clone(), t.id.clone()));
            }
        }
    }
    timers::touch(db, &rearm, now_us).await?;
    Ok(events)
}
