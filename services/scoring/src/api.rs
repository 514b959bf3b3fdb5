//! `clm.scoring.v1.ScoringService`: each rpc authorizes (one [`respond`]
//! call), converts the request, runs one read or one idempotent write
//! transaction, and converts the result back.

use crate::convert;
use crate::error::ScoringError;
use crate::rescore;
use crate::scorer::{self, Models};
use crate::store::{customers, ledger, scoring_models, sums, timers};
use clm_domain::scoring::{Award, Decay};
use clm_domain::validation::{page_size, request_id, required_text};
use clm_domain::{Violation, Violations};
use clm_platform::audit::{self, Change};
use clm_platform::auth::{Policy, Role};
use clm_platform::convert::{from_timestamp, timestamp};
use clm_platform::db::{from_micros, to_micros};
use clm_platform::error::respond;
use clm_platform::page::Pager;
use clm_platform::{Error, Result, Runtime, idempotency, operations};
use clm_proto::google::longrunning::{GetOperationRequest, Operation};
use clm_proto::scoring as pb;
use clm_proto::scoring::scoring_service_server::ScoringService;
use std::collections::BTreeMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Roles that may create, change and activate models and re-score.
const MODEL_WRITERS: &[Role] = &[Role::Marketer];
/// Roles that may adjust scores by hand.
const ADJUSTERS: &[Role] = &[Role::Marketer, Role::Service];
/// Roles that may read models, scores and ledgers.
const READERS: &[Role] = &[
    Role::Marketer,
    Role::Analyst,
    Role::Service,
    Role::SegmentOwner,
    Role::DataSteward,
];

/// Who may call each rpc (admin may call all): the service's one role
/// table, which `clm roles --markdown` prints into docs/security.md.
pub const POLICY: Policy = Policy {
    service: "clm.scoring.v1.ScoringService",
    rules: &[
        ("CreateScoringModel", MODEL_WRITERS),
        ("GetScoringModel", READERS),
        ("ListScoringModels", READERS),
        ("UpdateScoringModel", MODEL_WRITERS),
        ("ActivateModelVersion", MODEL_WRITERS),
        ("GetScore", READERS),
        ("BatchGetScores", READERS),
        ("ListCustomerScores", READERS),
        ("ListScoreLedger", READERS),
        ("AdjustScore", ADJUSTERS),
        ("ListTopCustomers", READERS),
        ("RescoreCustomers", MODEL_WRITERS),
        ("GetOperation", READERS),
    ],
};

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;
const MAX_BATCH: usize = 1000;
const MODEL_PREFIX: &str = "scoringModels/";

/// The scoring service.
#[derive(Debug, Clone)]
pub struct ScoringApi {
    rt: Runtime,
    models: Arc<Models>,
}

fn model_id(field: &str, name: &str) -> Result<String> {
    name.strip_prefix(MODEL_PREFIX)
        .filter(|id| valid_id(id))
        .map(str::to_owned)
        .ok_or_else(|| Error::invalid(field, "must be scoringModels/{id}"))
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn customer_name(field: &str, name: &str) -> Result<String> {
    clm_domain::ids::CustomerId::parse_name(field, name)?;
    Ok(name.to_owned())
}

fn diff(old: &pb::ScoringModel, new: &pb::ScoringModel) -> pb::RuleDiff {
    let o: BTreeMap<&str, &pb::ScoringRule> =
        old.rules.iter().map(|r| (r.id.as_str(), r)).collect();
    let n: BTreeMap<&str, &pb::ScoringRule> =
        new.rules.iter().map(|r| (r.id.as_str(), r)).collect();
    pb::RuleDiff {
        added: n
            .keys()
            .filter(|k| !o.contains_key(*k))
            .map(|k| k.to_string())
            .collect(),
        removed: o
            .keys()
            .filter(|k| !n.contains_key(*k))
            .map(|k| k.to_string())
            .collect(),
        changed: n
            .iter()
            .filter(|(k, r)| o.get(*k).is_some_and(|x| x != *r))
            .map(|(k, _)| k.to_string())
            .collect(),
    }
}

impl ScoringApi {
    /// Serves from `rt`.
    pub fn new(rt: Runtime, models: Arc<Models>) -> Self {
        Self { rt, models }
    }

    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        clm_domain::clock::micros(self.rt.clock.now())
    }

    fn read_time(&self, t: Option<&prost_types::Timestamp>) -> Result<i64> {
        Ok(match t {
            Some(t) => to_micros(from_timestamp("read_time", t)?),
            None => to_micros(self.now()),
        })
    }

    /// A stored version as answered: with the model's active version and etag.
    async fn shown(&self, id: &str, version: i64) -> Result<pb::ScoringModel> {
        let v = scoring_models::get(&self.rt.read, id, version)
            .await?
            .ok_or_else(|| Error::NotFound(format!("{MODEL_PREFIX}{id}")))?;
        let active = scoring_models::get(&self.rt.read, id, 0)
            .await?
            .map_or(0, |a| a.version);
        let latest = scoring_models::latest_version(&self.rt.read, id).await?;
        let mut m = v.body;
        m.name = format!("{MODEL_PREFIX}{id}");
        m.version = v.version;
        m.active_version = active;
        m.etag = clm_platform::convert::etag(latest);
        Ok(m)
    }

    async fn scores_of(
        &self,
        model: &str,
        custs: &[String],
        at: i64,
    ) -> Result<Vec<pb::CustomerScores>> {
        let v = self
            .models
            .active_for_read(&self.rt.read, model)
            .await?
            .ok_or_else(|| Error::NotFound(format!("{MODEL_PREFIX}{model}")))?;
        self.scores_under(&v, custs, at).await
    }

    /// The scores of `custs` under model version `v` at `at`.
    async fn scores_under(
        &self,
        v: &scorer::Version,
        custs: &[String],
        at: i64,
    ) -> Result<Vec<pb::CustomerScores>> {
        let model = v.id.as_str();
        let ledgers = scorer::by_customer(ledger::of_customers(&self.rt.read, model, custs).await?);
        let last = if scorer::uses_inactivity(&v.model) {
            customers::last_activity(&self.rt.read, custs, at).await?
        } else {
            Default::default()
        };
        let empty = Vec::new();
        Ok(custs
            .iter()
            .map(|c| {
                let (values, grade) = scorer::scores(
                    &v.model,
                    ledgers.get(c).unwrap_or(&empty),
                    last.get(c).copied(),
                    at,
                );
                pb::CustomerScores {
                    customer: c.clone(),
                    scoring_model: format!("{MODEL_PREFIX}{model}"),
                    scores: values
                        .into_iter()
                        .map(|(score, value)| pb::ScoreValue { score, value })
                        .collect(),
                    grade,
                    read_time: Some(timestamp(from_micros(at))),
                }
            })
            .collect())
    }
}

#[tonic::async_trait]
impl ScoringService for ScoringApi {
    async fn create_scoring_model(
        &self,
        request: Request<pb::CreateScoringModelRequest>,
    ) -> Result<Response<pb::ScoringModel>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let mut v = Violations::new();
            let rid = v.check("", request_id("request_id", &req.request_id));
            let body = req
                .scoring_model
                .clone()
                .ok_or_else(|| Error::invalid("scoring_model", "is required"))?;
            if let Err(e) = convert::compile_model("scoring_model", &body) {
                v.0.extend(e.0);
            }
            let id = if req.scoring_model_id.is_empty() {
                format!("m-{}", uuid::Uuid::now_v7().simple())
            } else {
                req.scoring_model_id.clone()
            };
            if !valid_id(&id) {
                v.push(Violation::new(
                    "scoring_model_id",
                    "must be 1-63 characters of a-z, 0-9 and -, starting with a letter",
                ));
            }
            v.into_result()?;
            let now = self.now();
            let mut stored = body.clone();
            stored.name = String::new();
            stored.version = 0;
            stored.active_version = 0;
            stored.etag = String::new();
            stored.create_time = Some(timestamp(now));
            idempotency::write(
                &self.rt,
                "CreateScoringModel",
                rid.flatten(),
                &req,
                now,
                async |txn| {
                    if scoring_models::latest_version(txn, &id).await? > 0 {
                        return Err(ScoringError::ModelExists(id.clone()).into());
                    }
                    scoring_models::insert(txn, &id, 1, &stored, true, to_micros(now)).await?;
                    let mut shown = stored.clone();
                    shown.name = format!("{MODEL_PREFIX}{id}");
                    shown.version = 1;
                    shown.active_version = 1;
                    shown.etag = clm_platform::convert::etag(1);
                    audit::record(
                        txn,
                        crate::SERVICE,
                        now,
                        Change::create(&shown.name, &shown),
                    )
                    .await?;
                    Ok((shown, Vec::new()))
                },
            )
            .await
        })
        .await
    }

    async fn get_scoring_model(
        &self,
        request: Request<pb::GetScoringModelRequest>,
    ) -> Result<Response<pb::ScoringModel>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let id = model_id("name", &req.name)?;
            if req.version < 0 {
                return Err(Error::invalid("version", "must not be negative"));
            }
            self.shown(&id, req.version).await
        })
        .await
    }

    async fn list_scoring_models(
        &self,
        request: Request<pb::ListScoringModelsRequest>,
    ) -> Result<Response<pb::ListScoringModelsResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let size = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)?;
            let pager = Pager::new(&["models"]);
            let after: Option<(String, String)> = pager.after(&req.page_token)?;
            let rows = scoring_models::list_active(
                &self.rt.read,
                after.as_ref().map(|(v, _)| v.as_str()),
                u64::from(size) + 1,
            )
            .await?;
            let mut shown = Vec::with_capacity(rows.len());
            for r in &rows {
                shown.push(self.shown(&r.id, r.version).await?);
            }
            let (models, next) = pager.page(&shown, size as usize, Clone::clone, |m| {
                (
                    m.name.trim_start_matches(MODEL_PREFIX).to_owned(),
                    String::new(),
                )
            });
            Ok(pb::ListScoringModelsResponse {
                scoring_models: models,
                next_page_token: next,
            })
        })
        .await
    }

    async fn update_scoring_model(
        &self,
        request: Request<pb::UpdateScoringModelRequest>,
    ) -> Result<Response<pb::UpdateScoringModelResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let mut v = Violations::new();
            let rid = v.check("", request_id("request_id", &req.request_id));
            let body = req
                .scoring_model
                .clone()
                .ok_or_else(|| Error::invalid("scoring_model", "is required"))?;
            let id = model_id("scoring_model.name", &body.name)?;
            if let Err(e) = convert::compile_model("scoring_model", &body) {
                v.0.extend(e.0);
            }
            v.into_result()?;
            let now = self.now();
            let out = idempotency::write(
                &self.rt,
                "UpdateScoringModel",
                rid.flatten(),
                &req,
                now,
                async |txn| {
                    let latest = scoring_models::latest_version(txn, &id).await?;
                    let prev = scoring_models::get(txn, &id, latest)
                        .await?
                        .ok_or_else(|| Error::NotFound(format!("{MODEL_PREFIX}{id}")))?;
                    clm_platform::convert::check_etag(&body.etag, latest)?;
                    let active = scoring_models::get(txn, &id, 0)
                        .await?
                        .map_or(0, |a| a.version);
                    let mut stored = body.clone();
                    stored.name = String::new();
                    stored.version = 0;
                    stored.active_version = 0;
                    stored.etag = String::new();
                    stored.create_time = Some(timestamp(now));
                    scoring_models::insert(txn, &id, latest + 1, &stored, false, to_micros(now))
                        .await?;
                    let mut shown = stored.clone();
                    shown.name = format!("{MODEL_PREFIX}{id}");
                    shown.version = latest + 1;
                    shown.active_version = active;
                    shown.etag = clm_platform::convert::etag(latest + 1);
                    let mut before = prev.body.clone();
                    before.name.clone_from(&shown.name);
                    before.version = latest;
                    before.active_version = active;
                    before.etag = clm_platform::convert::etag(latest);
                    audit::record(
                        txn,
                        crate::SERVICE,
                        now,
                        Change::update(&shown.name, &before, &shown),
                    )
                    .await?;
                    Ok((
                        pb::UpdateScoringModelResponse {
                            rule_diff: Some(diff(&prev.body, &stored)),
                            scoring_model: Some(shown),
                        },
                        Vec::new(),
                    ))
                },
            )
            .await;
            // The active version does not change, but drop it anyway: the
            // next read sees the database as of now.
            self.models.forget(&id);
            out
        })
        .await
    }

    async fn activate_model_version(
        &self,
        request: Request<pb::ActivateModelVersionRequest>,
    ) -> Result<Response<pb::ScoringModel>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let id = model_id("name", &req.name)?;
            let rid = request_id("request_id", &req.request_id)?;
            if req.version <= 0 {
                return Err(Error::invalid(
                    "version",
                    "must be a version number (1 or more)",
                ));
            }
            let now = self.now();
            idempotency::write(
                &self.rt,
                "ActivateModelVersion",
                rid,
                &req,
                now,
                async |txn| {
                    if scoring_models::get(txn, &id, req.version).await?.is_none() {
                        return Err(Error::NotFound(format!(
                            "{MODEL_PREFIX}{id} version {}",
                            req.version
                        )));
                    }
                    let was = scoring_models::get(txn, &id, 0)
                        .await?
                        .map_or(0, |a| a.version);
                    // The scores under the version that scored until now,
                    // to re-state them under the one that scores from now.
                    let restate = if was != req.version {
                        let scored = sums::customers_of_model(txn, &id).await?;
                        let last = customers::last_activity(txn, &scored, to_micros(now)).await?;
                        let old = self.models.get(txn, &id, was).await?;
                        let new = self.models.get(txn, &id, req.version).await?;
                        match (old, new) {
                            (Some(old), Some(new)) => {
                                let before =
                                    scorer::curves(txn, &old, &scored, &last, to_micros(now))
                                        .await?;
                                Some((new, before, scored, last))
                            }
                            _ => None,
                        }
                    } else {
                        None
                    };
                    scoring_models::activate(txn, &id, req.version).await?;
                    let mut events = Vec::new();
                    if let Some((new, before, scored, last)) = restate {
                        let after =
                            scorer::curves(txn, &new, &scored, &last, to_micros(now)).await?;
                        events = scorer::restated(
                            &new,
                            &before,
                            &after,
                            pb::ScoreChangeCause::Activation,
                            to_micros(now),
                        );
                    }
                    let active = |version| pb::ScoringModel {
                        name: format!("{MODEL_PREFIX}{id}"),
                        active_version: version,
                        ..Default::default()
                    };
                    audit::record(
                        txn,
                        crate::SERVICE,
                        now,
                        Change::update(
                            format!("{MODEL_PREFIX}{id}"),
                            &active(was),
                            &active(req.version),
                        )
                        .mask(Some(&prost_types::FieldMask {
                            paths: vec!["active_version".into()],
                        })),
                    )
                    .await?;
                    // Thresholds of the new version are looked at again.
                    timers::touch_model(txn, &id, to_micros(now)).await?;
                    Ok((pb::ScoringModel::default(), events))
                },
            )
            .await?;
            self.models.forget(&id);
            self.shown(&id, req.version).await
        })
        .await
    }

    async fn get_score(
        &self,
        request: Request<pb::GetScoreRequest>,
    ) -> Result<Response<pb::CustomerScores>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let c = customer_name("customer", &req.customer)?;
            let m = model_id("scoring_model", &req.scoring_model)?;
            let at = self.read_time(req.read_time.as_ref())?;
            let mut s = self.scores_of(&m, &[c], at).await?;
            s.pop().ok_or_else(|| Error::internal("no scores computed"))
        })
        .await
    }

    async fn batch_get_scores(
        &self,
        request: Request<pb::BatchGetScoresRequest>,
    ) -> Result<Response<pb::BatchGetScoresResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            if req.customers.is_empty() || req.customers.len() > MAX_BATCH {
                return Err(Error::invalid(
                    "customers",
                    format!("give 1 to {MAX_BATCH} customers"),
                ));
            }
            let mut v = Violations::new();
            let custs: Vec<String> = req
                .customers
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    v.check(
                        "",
                        clm_domain::ids::CustomerId::parse_name(&format!("customers[{i}]"), c)
                            .map(|_| c.clone()),
                    )
                })
                .collect();
            v.into_result()?;
            let m = model_id("scoring_model", &req.scoring_model)?;
            let at = self.read_time(req.read_time.as_ref())?;
            Ok(pb::BatchGetScoresResponse {
                scores: self.scores_of(&m, &custs, at).await?,
            })
        })
        .await
    }

    async fn list_customer_scores(
        &self,
        request: Request<pb::ListCustomerScoresRequest>,
    ) -> Result<Response<pb::ListCustomerScoresResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let c = customer_name("customer", &req.customer)?;
            let at = self.read_time(req.read_time.as_ref())?;
            let mut scores = Vec::new();
            for v in self.models.active(&self.rt.read).await? {
                scores.extend(self.scores_under(&v, std::slice::from_ref(&c), at).await?);
            }
            scores.sort_by(|a, b| a.scoring_model.cmp(&b.scoring_model));
            Ok(pb::ListCustomerScoresResponse { scores })
        })
        .await
    }

    async fn list_score_ledger(
        &self,
        request: Request<pb::ListScoreLedgerRequest>,
    ) -> Result<Response<pb::ListScoreLedgerResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let c = customer_name("customer", &req.customer)?;
            let m = model_id("scoring_model", &req.scoring_model)?;
            let size = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)?;
            let at = self.read_time(req.read_time.as_ref())?;
            let pager = Pager::new(&[&c, &m]);
            let after: Option<(i64, String)> = pager.after(&req.page_token)?;
            let after = match after {
                Some((award, id)) => Some((
                    award,
                    id.parse::<i64>().map_err(|_| {
                        Error::invalid(
                            "page_token",
                            "is not a page token returned by this list call",
                        )
                    })?,
                )),
                None => None,
            };
            let rows = ledger::page(&self.rt.read, &c, &m, after, u64::from(size) + 1).await?;
            let (entries, next) = pager.page(
                &rows,
                size as usize,
                |r| convert::ledger_entry(r, at),
                |r| (r.award_us, r.id.to_string()),
            );
            Ok(pb::ListScoreLedgerResponse {
                entries,
                next_page_token: next,
            })
        })
        .await
    }

    async fn adjust_score(
        &self,
        request: Request<pb::AdjustScoreRequest>,
    ) -> Result<Response<pb::LedgerEntry>, Status> {
        respond(request, &POLICY, |who, req| async move {
            let mut v = Violations::new();
            let c = v.check(
                "",
                clm_domain::ids::CustomerId::parse_name("customer", &req.customer)
                    .map(|_| req.customer.clone()),
            );
            let reason = v.check("", required_text("reason", &req.reason, 1000));
            let rid = v.check("", request_id("request_id", &req.request_id));
            if req.points == 0 {
                v.push(Violation::new("points", "must not be zero"));
            }
            let m = model_id("scoring_model", &req.scoring_model)?;
            let version = self
                .models
                .get(&self.rt.read, &m, 0)
                .await?
                .ok_or_else(|| Error::NotFound(format!("{MODEL_PREFIX}{m}")))?;
            if version.model.score(&req.score).is_none() {
                v.push(Violation::new(
                    "score",
                    format!(
                        "unknown score {:?} in {MODEL_PREFIX}{m}",
                        clm_domain::validation::shorten(&req.score, 64)
                    ),
                ));
            }
            v.into_result()?;
            let (Some(c), Some(reason), Some(rid)) = (c, reason, rid) else {
                return Err(Error::internal("validated fields missing"));
            };
            let now = self.now();
            let source = rid.clone().map_or_else(
                || format!("adjust:{}", uuid::Uuid::now_v7()),
                |r| format!("adjust:{r}"),
            );
            let actor = who.subject.clone();
            let models = self.models.clone();
            idempotency::write(&self.rt, "AdjustScore", rid, &req, now, async |txn| {
                // Only customers scoring has seen on the customer stream,
                // checked under their lock: an erased one is never recreated.
                if customers::lock_existing(txn, std::slice::from_ref(&c))
                    .await?
                    .is_empty()
                {
                    return Err(Error::NotFound(c.clone()));
                }
                let last =
                    customers::last_activity(txn, std::slice::from_ref(&c), to_micros(now)).await?;
                let new = ledger::NewRow {
                    customer: c.clone(),
                    model: m.clone(),
                    model_version: 0,
                    award: Award {
                        rule: "manual".into(),
                        score: req.score.clone(),
                        points: req.points,
                        source_event: source.clone(),
                        award_us: to_micros(now),
                        decay: Decay::None,
                    },
                    reason: reason.clone(),
                    actor: actor.clone(),
                };
                let events = scorer::apply(txn, &version, vec![new], &last, to_micros(now)).await?;
                let row = ledger::by_source(txn, &source, "manual")
                    .await?
                    .ok_or_else(|| Error::internal("adjustment not stored"))?;
                let _ = &models;
                let entry = convert::ledger_entry(&row, to_micros(now));
                audit::record(
                    txn,
                    crate::SERVICE,
                    now,
                    Change::create(&entry.name, &entry).customer(c.clone()),
                )
                .await?;
                Ok((entry, events))
            })
            .await
        })
        .await
    }

    async fn list_top_customers(
        &self,
        request: Request<pb::ListTopCustomersRequest>,
    ) -> Result<Response<pb::ListTopCustomersResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let m = model_id("scoring_model", &req.scoring_model)?;
            let size = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)?;
            let pager = Pager::new(&[&m, &req.score, &req.grade]);
            // The token pins the read time and the model version of the
            // first page: later pages rank the same scores, so decay or an
            // activation between pages neither skips nor repeats anyone.
            let after: Option<((f64, i64, i64), String)> = pager.after(&req.page_token)?;
            let (read_us, pinned) = after
                .as_ref()
                .map_or((to_micros(self.now()), 0), |((_, t, v), _)| (*t, *v));
            let v = self
                .models
                .get(&self.rt.read, &m, pinned)
                .await?
                .ok_or_else(|| Error::NotFound(format!("{MODEL_PREFIX}{m}")))?;
            if v.model.score(&req.score).is_none() {
                return Err(Error::invalid("score", "unknown score in this model"));
            }
            // Every customer's scores at the read time, from the model's
            // running sums; the answer is built for the page only.
            let last = if scorer::uses_inactivity(&v.model) {
                customers::last_activity_all(&self.rt.read, read_us).await?
            } else {
                Default::default()
            };
            let all = scorer::all_scores(&self.rt.read, &v, &last, read_us).await?;
            let mut ranked: Vec<(f64, usize)> = all
                .iter()
                .enumerate()
                .filter(|(_, (_, _, grade))| req.grade.is_empty() || *grade == req.grade)
                .map(|(i, (_, values, _))| {
                    let value = values
                        .iter()
                        .find(|(k, _)| *k == req.score)
                        .map_or(0.0, |(_, x)| *x);
                    (value, i)
                })
                .filter(|(value, i)| match &after {
                    None => true,
                    Some(((av, _, _), ac)) => *value < *av || (*value == *av && all[*i].0 > *ac),
                })
                .collect();
            let order = |a: &(f64, usize), b: &(f64, usize)| {
                b.0.total_cmp(&a.0)
                    .then_with(|| all[a.1].0.cmp(&all[b.1].0))
            };
            let keep = size as usize + 1;
            if ranked.len() > keep {
                ranked.select_nth_unstable_by(keep - 1, order);
                ranked.truncate(keep);
            }
            ranked.sort_by(order);
            let version = v.version;
            let (customers, next) = pager.page(
                &ranked,
                size as usize,
                |(_, i)| {
                    let (c, values, grade) = &all[*i];
                    pb::CustomerScores {
                        customer: c.clone(),
                        scoring_model: format!("{MODEL_PREFIX}{m}"),
                        scores: values
                            .iter()
                            .map(|(score, value)| pb::ScoreValue {
                                score: score.clone(),
                                value: *value,
                            })
                            .collect(),
                        grade: grade.clone(),
                        read_time: Some(timestamp(from_micros(read_us))),
                    }
                },
                |(value, i)| ((*value, read_us, version), all[*i].0.clone()),
            );
            Ok(pb::ListTopCustomersResponse {
                customers,
                next_page_token: next,
            })
        })
        .await
    }

    async fn rescore_customers(
        &self,
        request: Request<pb::RescoreCustomersRequest>,
    ) -> Result<Response<Operation>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let m = model_id("scoring_model", &req.scoring_model)?;
            let rid = request_id("request_id", &req.request_id)?;
            if req.model_version < 0 {
                return Err(Error::invalid("model_version", "must not be negative"));
            }
            let v = self
                .models
                .get(&self.rt.read, &m, req.model_version)
                .await?
                .ok_or_else(|| {
                    Error::NotFound(format!("{MODEL_PREFIX}{m} version {}", req.model_version))
                })?;
            let now = self.now();
            let total = customers::count(&self.rt.read).await?;
            let meta = pb::RescoreCustomersMetadata {
                scoring_model: format!("{MODEL_PREFIX}{m}"),
                model_version: v.version,
                customers_total: total,
                customers_done: 0,
                start_time: Some(timestamp(now)),
            };
            let id = uuid::Uuid::now_v7().simple().to_string();
            let op =
                idempotency::write(&self.rt, "RescoreCustomers", rid, &req, now, async |txn| {
                    let op =
                        operations::start(txn, &id, rescore::KIND, clm_proto::pack_any(&meta), now)
                            .await?;
                    audit::record(
                        txn,
                        crate::SERVICE,
                        now,
                        Change::action(format!("{MODEL_PREFIX}{m}"), &op),
                    )
                    .await?;
                    Ok((op, Vec::new()))
                })
                .await?;
            // A replica's runner (usually this one's) claims it and runs it.
            self.rt.operations.wake();
            Ok(op)
        })
        .await
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        respond(request, &POLICY, |_, req| async move {
            operations::get(&self.rt.read, &req.name).await
        })
        .await
    }
}
