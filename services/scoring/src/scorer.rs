//! The scoring work shared by the stream handlers, the API, the timer
//! queue and re-scoring: compiled model versions (cached; versions never
//! change once written), scores of a customer from its ledger rows, and
//! applying awards (insert, ScoreChanged events, re-armed timers).

use crate::convert;
use crate::store::ledger::{self, NewRow, Row};
use crate::store::sums::{self, SumRow};
use crate::store::{scoring_models, timers};
use clm_domain::scoring::{
    Curve, Decay, Entry, Model, ScoreSpec, Sum, Term, score_at, score_from_sums,
};
use clm_platform::outbox::NewEvent;
use clm_platform::{Error, Result};
use clm_proto::scoring as pb;
use sea_orm::ConnectionTrait;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// How long a read (GetScore, BatchGetScores) trusts the active version it
/// looked up: an activation in another replica is seen within this time; in
/// this process Create/Update/Activate drop the entry at once.
pub const ACTIVE_TTL: Duration = Duration::from_secs(1);

/// Compiled model versions by (id, version), and the active version of each
/// model as last read (for the read path).
#[derive(Debug, Default)]
pub struct Models {
    cache: Mutex<HashMap<(String, i64), Arc<Model>>>,
    active: Mutex<HashMap<String, (i64, Instant)>>,
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

    /// A version already compiled (versions never change once written).
    fn cached(&self, id: &str, version: i64) -> Result<Option<Version>> {
        Ok(self
            .cache
            .lock()
            .map_err(Error::internal)?
            .get(&(id.to_owned(), version))
            .map(|m| Version {
                id: id.to_owned(),
                version,
                model: m.clone(),
            }))
    }

    /// A model's version (0: active), if it exists. A numbered version
    /// compiled before is not read again; the active one is read from `db`.
    pub async fn get(
        &self,
        db: &impl ConnectionTrait,
        id: &str,
        version: i64,
    ) -> Result<Option<Version>> {
        if version > 0
            && let Some(v) = self.cached(id, version)?
        {
            return Ok(Some(v));
        }
        scoring_models::get(db, id, version)
            .await?
            .map(|v| self.compiled(&v))
            .transpose()
    }

    /// A model's active version for reads: from memory when looked up in
    /// the last [`ACTIVE_TTL`] (and not dropped by [`Models::forget`]),
    /// else from `db`. Writers (stream handlers, timers) use [`Models::get`]
    /// and [`Models::active`] in their transaction instead.
    pub async fn active_for_read(
        &self,
        db: &impl ConnectionTrait,
        id: &str,
    ) -> Result<Option<Version>> {
        let known = self
            .active
            .lock()
            .map_err(Error::internal)?
            .get(id)
            .filter(|(_, at)| at.elapsed() < ACTIVE_TTL)
            .map(|(v, _)| *v);
        if let Some(version) = known
            && let Some(v) = self.cached(id, version)?
        {
            return Ok(Some(v));
        }
        let fetched = Instant::now();
        let v = self.get(db, id, 0).await?;
        if let Some(v) = &v {
            self.active
                .lock()
                .map_err(Error::internal)?
                .insert(id.to_owned(), (v.version, fetched));
        }
        Ok(v)
    }

    /// Drops what is known of `id`'s active version (after Create, Update
    /// or Activate committed in this process).
    pub fn forget(&self, id: &str) {
        if let Ok(mut a) = self.active.lock() {
            a.remove(id);
        }
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

/// What is known of one customer's ledger under one model to tell its
/// scores at one instant: the running sums, and either the linear entries
/// that still count or (when a sum cannot tell: an award after that
/// instant) every entry.
#[derive(Debug, Default)]
struct Known {
    sums: BTreeMap<(String, i16, i64), Sum>,
    rows: Vec<Row>,
    all_rows: bool,
}

impl Known {
    fn add(&mut self, n: &NewRow) {
        let (kind, param) = n.award.decay.code();
        self.sums
            .entry((n.award.score.clone(), kind, param))
            .or_insert_with(|| Sum::new(n.award.decay))
            .add(n.award.points, n.award.award_us);
        if self.all_rows || matches!(n.award.decay, Decay::Linear { .. }) {
            self.rows.push(n.as_row());
        }
    }

    /// Score `spec` from the instant these sums and rows describe on: the
    /// sums' terms in the order [`score_from_sums`] adds them, then the
    /// linear entries (or, when every entry was read, each entry in ledger
    /// order), so the curve's value is the one the sums give.
    fn curve(&self, spec: &ScoreSpec, last: Option<i64>) -> Curve {
        let term = |e: Entry| Term {
            coef: e.points as f64,
            since_us: e.award_us,
            decay: e.decay,
        };
        let mut terms = Vec::new();
        if !self.all_rows {
            for ((score, _, _), s) in &self.sums {
                if *score != spec.name || s.entries == 0 {
                    continue;
                }
                let since_us = match s.decay {
                    Decay::Linear { .. } => continue,
                    Decay::Exponential { .. } => s.anchor_us,
                    Decay::None => s.newest_us,
                };
                terms.push(Term {
                    coef: s.total,
                    since_us,
                    decay: s.decay,
                });
            }
        }
        terms.extend(entries(&self.rows, &spec.name).into_iter().map(term));
        Curve {
            terms,
            inactivity: spec.inactivity.zip(last),
            floor: spec.floor,
            ceiling: spec.ceiling,
        }
    }

    fn scores(
        &self,
        model: &Model,
        last: Option<i64>,
        t_us: i64,
    ) -> Result<(Vec<(String, f64)>, String)> {
        if self.all_rows {
            return Ok(scores(model, &self.rows, last, t_us));
        }
        let mut values = Vec::with_capacity(model.scores.len());
        for spec in &model.scores {
            let sums: Vec<Sum> = self
                .sums
                .iter()
                .filter(|((score, _, _), _)| *score == spec.name)
                .map(|(_, s)| *s)
                .collect();
            let linear = entries(&self.rows, &spec.name);
            let value = score_from_sums(spec, &sums, &linear, last, t_us).ok_or_else(|| {
                Error::internal("a running sum was asked about an instant before its newest award")
            })?;
            values.push((spec.name.clone(), value));
        }
        let get = |n: &str| values.iter().find(|(k, _)| k == n).map_or(0.0, |(_, v)| *v);
        let grade = model.bands.grade(
            get(clm_domain::scoring::FIT),
            get(clm_domain::scoring::ENGAGEMENT),
        );
        Ok((values, grade))
    }
}

/// Loads what [`Known`] needs of `customers` under `v` at `now_us`, given
/// the awards about to be added (`new`): the sums (one statement), the
/// linear entries that still count (one statement, only if there are any),
/// and every entry of the few customers with an award after `now_us`.
async fn known(
    db: &impl ConnectionTrait,
    v: &Version,
    customers: &[String],
    new: &[NewRow],
    now_us: i64,
) -> Result<BTreeMap<String, Known>> {
    let rows = sums::load(db, &v.id, customers).await?;
    known_from(db, v, customers, rows, new, now_us).await
}

/// [`known`] from sum rows already read.
async fn known_from(
    db: &impl ConnectionTrait,
    v: &Version,
    customers: &[String],
    rows: Vec<SumRow>,
    new: &[NewRow],
    now_us: i64,
) -> Result<BTreeMap<String, Known>> {
    let mut out: BTreeMap<String, Known> = customers
        .iter()
        .map(|c| (c.clone(), Known::default()))
        .collect();
    let mut linear_over = 0i64;
    for r in rows {
        let sum = r.sum();
        let Some(k) = out.get_mut(&r.customer) else {
            continue;
        };
        if sum.newest_us > now_us {
            k.all_rows = true;
        }
        if let Decay::Linear { .. } = sum.decay {
            linear_over = linear_over.max(r.decay_us);
        }
        k.sums.insert((r.score, r.decay_kind, r.decay_us), sum);
    }
    for n in new {
        if let Some(k) = out.get_mut(&n.customer) {
            k.all_rows |= n.award.award_us > now_us;
        }
    }
    let full: Vec<String> = out
        .iter()
        .filter(|(_, k)| k.all_rows)
        .map(|(c, _)| c.clone())
        .collect();
    for r in ledger::of_customers(db, &v.id, &full).await? {
        if let Some(k) = out.get_mut(&r.customer) {
            k.rows.push(r);
        }
    }
    if linear_over > 0 {
        let rest: Vec<String> = out
            .iter()
            .filter(|(_, k)| !k.all_rows)
            .map(|(c, _)| c.clone())
            .collect();
        for r in ledger::linear_since(db, &v.id, &rest, now_us.saturating_sub(linear_over)).await? {
            if let Some(k) = out.get_mut(&r.customer) {
                k.rows.push(r);
            }
        }
    }
    Ok(out)
}

/// Every scored customer's scores under `v` at `now_us` and grade, from
/// the running sums (ListTopCustomers): one read of the model's sums, plus
/// the linear entries that still count and the entries of customers with
/// an award after `now_us`.
pub async fn all_scores(
    db: &impl ConnectionTrait,
    v: &Version,
    last_activity: &HashMap<String, i64>,
    now_us: i64,
) -> Result<Vec<(String, Vec<(String, f64)>, String)>> {
    let rows = sums::of_model(db, &v.id).await?;
    let mut custs: Vec<String> = rows.iter().map(|r| r.customer.clone()).collect();
    custs.dedup();
    let known = known_from(db, v, &custs, rows, &[], now_us).await?;
    known
        .into_iter()
        .map(|(c, k)| {
            let (values, grade) = k.scores(&v.model, last_activity.get(&c).copied(), now_us)?;
            Ok((c, values, grade))
        })
        .collect()
}

/// Writes `new` awards of `v` (those already in the ledger are skipped),
/// keeps the running sums, re-arms the timers of thresholds on changed
/// scores to `now_us`, and returns the ScoreChanged events. The old and new
/// values come from the sums, not from every entry: a few statements
/// whatever the customers' ledgers hold.
pub async fn apply(
    db: &impl ConnectionTrait,
    v: &Version,
    new: Vec<NewRow>,
    last_activity: &HashMap<String, i64>,
    now_us: i64,
) -> Result<Vec<NewEvent>> {
    if new.is_empty() {
        return Ok(Vec::new());
    }
    let mut custs: Vec<String> = new.iter().map(|n| n.customer.clone()).collect();
    custs.sort();
    custs.dedup();
    let mut known = known(db, v, &custs, &new, now_us).await?;
    let new = ledger::insert_new(db, &new).await?;
    let mut added: BTreeMap<&str, Vec<&NewRow>> = BTreeMap::new();
    for n in &new {
        added.entry(n.customer.as_str()).or_default().push(n);
    }
    let mut events = Vec::new();
    let mut rearm = Vec::new();
    let mut changed = Vec::new();
    // Thresholds on the scores each customer's awards touched, and their
    // values now: judged below, in this transaction.
    let mut looks: Vec<(String, &clm_domain::scoring::Threshold, f64)> = Vec::new();
    for (customer, rows) in added {
        let Some(k) = known.get_mut(customer) else {
            continue;
        };
        let last = last_activity.get(customer).copied();
        let (old, _) = k.scores(&v.model, last, now_us)?;
        for n in &rows {
            k.add(n);
        }
        let (newv, grade) = k.scores(&v.model, last, now_us)?;
        let mut touched: Vec<(String, i16, i64)> = rows
            .iter()
            .map(|n| {
                let (kind, param) = n.award.decay.code();
                (n.award.score.clone(), kind, param)
            })
            .collect();
        touched.sort();
        touched.dedup();
        for t in v.model.thresholds.iter() {
            if touched.iter().any(|(score, _, _)| *score == t.score)
                && let Some((_, value)) = newv.iter().find(|(name, _)| *name == t.score)
            {
                looks.push((customer.to_owned(), t, *value));
                rearm.push((customer.to_owned(), v.id.clone(), t.id.clone()));
            }
        }
        for key in &touched {
            if let Some(sum) = k.sums.get(key) {
                changed.push(SumRow::new(customer, &v.id, &key.0, sum));
            }
        }
        for (spec, ((name, o), (_, n))) in v.model.scores.iter().zip(old.iter().zip(&newv)) {
            // An award changes the score's curve even where it leaves the
            // value now as it was (a decaying award, a capped one).
            if o == n && !touched.iter().any(|(score, _, _)| score == name) {
                continue;
            }
            events.push(score_changed(
                customer,
                v,
                name,
                (*o, *n, &grade),
                &k.curve(spec, last),
                pb::ScoreChangeCause::Award,
                now_us,
            ));
        }
    }
    sums::save(db, &changed).await?;
    if !looks.is_empty() {
        let keys: Vec<timers::Key> = looks
            .iter()
            .map(|(c, t, _)| (c.clone(), v.id.clone(), t.id.clone()))
            .collect();
        let seen = timers::sides(db, &keys).await?;
        let mut custs: Vec<String> = looks.iter().map(|(c, _, _)| c.clone()).collect();
        custs.dedup();
        let stages = crate::thresholds::stages(db, &custs).await?;
        let looks: Vec<crate::thresholds::Look> = looks
            .into_iter()
            .zip(keys)
            .map(|((_, threshold, value), key)| crate::thresholds::Look {
                key,
                threshold,
                value,
                at_us: now_us,
            })
            .collect();
        events.extend(crate::thresholds::judge(db, v, &looks, &seen, &stages, now_us).await?);
    }
    // The queue then finds each one's next decay crossing.
    rearm.sort();
    rearm.dedup();
    timers::touch(db, &rearm, now_us).await?;
    Ok(events)
}

/// A ScoreChanged of `customer`'s score `curve` under `v` at `now_us`, with
/// the value before and after and the grade after.
fn score_changed(
    customer: &str,
    v: &Version,
    name: &str,
    (old, new, grade): (f64, f64, &str),
    curve: &Curve,
    cause: pb::ScoreChangeCause,
    now_us: i64,
) -> NewEvent {
    NewEvent::new(
        customer,
        &pb::ScoreChanged {
            customer: customer.to_owned(),
            scoring_model: format!("scoringModels/{}", v.id),
            score: name.to_owned(),
            old_value: old,
            new_value: new,
            grade: grade.to_owned(),
            change_time: Some(clm_platform::convert::timestamp(
                clm_platform::db::from_micros(now_us),
            )),
            curve: Some(convert::curve_to_proto(curve)),
            cause: cause as i32,
        },
    )
}

/// Per customer: each score's (name, value, curve), and the grade.
pub type Stated = BTreeMap<String, (Vec<(String, f64, Curve)>, String)>;

/// Every score of `customers` under `v` at `now_us`: its value, curve and
/// the customer's grade, from the running sums (a few statements
/// whatever the ledgers hold). Customers without an entry under `v` are
/// left out.
pub async fn curves(
    db: &impl ConnectionTrait,
    v: &Version,
    customers: &[String],
    last_activity: &HashMap<String, i64>,
    now_us: i64,
) -> Result<Stated> {
    let rows = sums::load(db, &v.id, customers).await?;
    let mut with: Vec<String> = rows.iter().map(|r| r.customer.clone()).collect();
    with.dedup();
    let known = known_from(db, v, &with, rows, &[], now_us).await?;
    let mut out = BTreeMap::new();
    for (customer, k) in known {
        let last = last_activity.get(&customer).copied();
        let (values, grade) = k.scores(&v.model, last, now_us)?;
        let scores = v
            .model
            .scores
            .iter()
            .zip(values)
            .map(|(spec, (name, value))| (name, value, k.curve(spec, last)))
            .collect();
        out.insert(customer, (scores, grade));
    }
    Ok(out)
}

/// The ScoreChanged events that re-state every score of the customers in
/// `after` (from [`curves`] after a re-scoring, merge or activation), with
/// the values `before` it as old values (0 for a score that had none).
pub fn restated(
    v: &Version,
    before: &Stated,
    after: &Stated,
    cause: pb::ScoreChangeCause,
    now_us: i64,
) -> Vec<NewEvent> {
    restated_where(v, before, after, cause, now_us, |_, _| true)
}

/// [`restated`] for the (customer, score) pairs `keep` accepts.
pub fn restated_where(
    v: &Version,
    before: &Stated,
    after: &Stated,
    cause: pb::ScoreChangeCause,
    now_us: i64,
    keep: impl Fn(&str, &str) -> bool,
) -> Vec<NewEvent> {
    let mut events = Vec::new();
    for (customer, (scores, grade)) in after {
        for (name, value, curve) in scores {
            if !keep(customer, name) {
                continue;
            }
            let old = before
                .get(customer)
                .and_then(|(s, _)| s.iter().find(|(n, _, _)| n == name))
                .map_or(0.0, |(_, v, _)| *v);
            events.push(score_changed(
                customer,
                v,
                name,
                (old, *value, grade),
                curve,
                cause,
                now_us,
            ));
        }
    }
    events
}

/// The (customer, model, score) of each ScoreChanged among `events`.
pub fn stated(events: &[NewEvent]) -> std::collections::HashSet<(String, String, String)> {
    use prost::{Message, Name};
    events
        .iter()
        .filter(|e| e.event_type == pb::ScoreChanged::full_name())
        .filter_map(|e| pb::ScoreChanged::decode(e.payload.as_slice()).ok())
        .map(|c| (c.customer, c.scoring_model, c.score))
        .collect()
}
