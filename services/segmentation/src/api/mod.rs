//! `clm.segmentation.v1.SegmentationService`: each rpc authorizes (one
//! [`respond`] call), converts the request, runs its logic (writes: one
//! [`idempotency::write`]) and converts the result back.

mod accountability_api;
mod edit;

use crate::access;
use crate::accountability;
use crate::cache;
use crate::convert::{self, Live};
use crate::engine::{Engine, catalog_with_segments};
use crate::error::SegmentationError;
use crate::objectives;
use crate::store::objectives as stored_objectives;
use crate::store::segments::{self, Segment, State};
use crate::store::{change_requests, history, members};
use chrono::{DateTime, Utc};
use clm_domain::Violations;
use clm_domain::ids::CustomerId;
use clm_domain::rules::{self, Catalog, Rule};
use clm_domain::validation::{optional_text, page_size, request_id, required_text};
use clm_platform::audit::{self, Change};
use clm_platform::auth::{Policy, Principal, Role};
use clm_platform::db::{from_micros, to_micros};
use clm_platform::error::respond;
use clm_platform::idempotency;
use clm_platform::page::Pager;
use clm_platform::{Error, Result};
use clm_proto::segmentation as pb;
use clm_proto::segmentation::segmentation_service_server::SegmentationService;
use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

clm_domain::resource_id!(
    /// Id of a segment.
    SegmentId, "segments", "segment"
);

/// Roles that may create segments.
const CREATORS: &[Role] = &[Role::Marketer];
/// Roles that may change, delete, refresh, transfer and propose or review
/// changes of segments: owner-scoped (see [`crate::access`]), so only the
/// segments they own or whose team they are in.
const WRITERS: &[Role] = &[Role::Marketer, Role::SegmentOwner];
/// Roles that may read a segment's audit trail.
const AUDIT_READERS: &[Role] = &[
    Role::Marketer,
    Role::SegmentOwner,
    Role::Analyst,
    Role::DataSteward,
];
/// Roles that may read membership history (it names customers).
const HISTORY_READERS: &[Role] = &[
    Role::Marketer,
    Role::SegmentOwner,
    Role::Analyst,
    Role::DataSteward,
    Role::Service,
];
/// Roles that may read performance reports.
const REPORT_READERS: &[Role] = &[Role::Marketer, Role::SegmentOwner, Role::Analyst];
/// Roles that may follow objective alerts.
const ALERT_READERS: &[Role] = &[
    Role::Marketer,
    Role::SegmentOwner,
    Role::Analyst,
    Role::Service,
];
/// Roles that may read segments and preview rules.
const READERS: &[Role] = &[
    Role::Marketer,
    Role::SegmentOwner,
    Role::Analyst,
    Role::DataSteward,
    Role::Service,
];
/// Roles that may ask membership questions (IsMember and friends).
const MEMBERSHIP_READERS: &[Role] = &[
    Role::Marketer,
    Role::SegmentOwner,
    Role::Analyst,
    Role::Service,
];

/// Who may call each rpc (admin may call all): the service's one role
/// table, which `clm roles --markdown` prints into docs/security.md.
pub const POLICY: Policy = Policy {
    service: "clm.segmentation.v1.SegmentationService",
    rules: &[
        ("CreateSegment", CREATORS),
        ("GetSegment", READERS),
        ("ListSegments", READERS),
        ("UpdateSegment", WRITERS),
        ("DeleteSegment", WRITERS),
        ("PreviewSegment", READERS),
        ("IsMember", MEMBERSHIP_READERS),
        ("BatchIsMember", MEMBERSHIP_READERS),
        ("GetCustomerSegments", MEMBERSHIP_READERS),
        ("ListSegmentMembers", MEMBERSHIP_READERS),
        ("CountSegmentMembers", MEMBERSHIP_READERS),
        ("RefreshSegment", WRITERS),
        ("WatchMembership", MEMBERSHIP_READERS),
        ("TransferSegmentOwnership", WRITERS),
        ("ListSegmentAuditEntries", AUDIT_READERS),
        ("CreateSegmentChangeRequest", WRITERS),
        ("GetSegmentChangeRequest", READERS),
        ("ListSegmentChangeRequests", READERS),
        ("ApproveSegmentChangeRequest", WRITERS),
        ("RejectSegmentChangeRequest", WRITERS),
        ("ListMembershipHistory", HISTORY_READERS),
        ("GetSegmentPerformance", REPORT_READERS),
        ("WatchObjectiveAlerts", ALERT_READERS),
    ],
};

const DEFAULT_PAGE: u32 = 50;
const DEFAULT_MEMBER_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;
const MAX_BATCH_CHECKS: usize = 1000;
const MAX_SAMPLE: i32 = 100;
const DEFAULT_PREVIEW: std::time::Duration = std::time::Duration::from_secs(5);
const MAX_PREVIEW: std::time::Duration = std::time::Duration::from_secs(30);

/// The segmentation service.
#[derive(Debug, Clone)]
pub struct SegmentationApi {
    engine: Engine,
    evaluations: std::sync::Arc<objectives::ReadCache>,
}

impl SegmentationApi {
    /// Serves with `engine`.
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            evaluations: std::sync::Arc::default(),
        }
    }

    fn now(&self) -> DateTime<Utc> {
        clm_domain::clock::micros(self.engine.rt().clock.now())
    }

    async fn live(&self, segs: &[Segment]) -> Result<Vec<Live>> {
        let rt = self.engine.rt();
        let ids: Vec<String> = segs.iter().map(|s| s.id.clone()).collect();
        let counts = members::counts(&rt.read, &ids).await?;
        let lag = members::freshness(&rt.read).await?.map(|(e, a)| a - e);
        let ttl =
            std::time::Duration::from_secs(u64::from(rt.config.segmentation.objective_cache_secs));
        let mut cached: HashMap<String, Vec<pb::Objective>> = segs
            .iter()
            .filter_map(|s| {
                self.evaluations
                    .get(&s.id, (s.revision, s.evaluate_us), ttl)
                    .map(|l| (s.id.clone(), l))
            })
            .collect();
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !cached.contains_key(*id))
            .cloned()
            .collect();
        if !missing.is_empty() {
            let evaluated = objectives::evaluate(
                &rt.read,
                &missing,
                to_micros(self.now()),
                rt.config.segmentation.objective_trend_days,
            )
            .await?;
            for s in segs.iter().filter(|s| missing.contains(&s.id)) {
                let list: Vec<pb::Objective> = evaluated
                    .get(&s.id)
                    .map(|l| {
                        l.iter()
                            .map(|(o, e)| objectives::to_proto(o, Some(e)))
                            .collect()
                    })
                    .unwrap_or_default();
                if !ttl.is_zero() {
                    self.evaluations
                        .put(&s.id, (s.revision, s.evaluate_us), list.clone());
                }
                cached.insert(s.id.clone(), list);
            }
        }
        Ok(segs
            .iter()
            .map(|s| Live {
                member_count: counts.get(&s.id).copied().unwrap_or(0),
                progress: self.engine.progress(&s.id),
                lag_us: lag,
                objectives: cached.remove(&s.id).unwrap_or_default(),
            })
            .collect())
    }

    async fn to_proto(&self, s: &Segment) -> Result<pb::Segment> {
        let live = self.live(std::slice::from_ref(s)).await?;
        Ok(convert::segment_to_proto(s, &live[0]))
    }

    async fn existing(&self, field: &str, name: &str) -> Result<Segment> {
        let id = SegmentId::parse_name(field, name)?;
        segments::get(&self.engine.rt().read, &id.0.to_string())
            .await?
            .ok_or_else(|| Error::NotFound(name.to_owned()))
    }

    /// The rule given as a tree or as text, checked against the catalog.
    fn resolve_rule(
        prefix: &str,
        tree: Option<&pb::Rule>,
        text: &str,
        catalog: &dyn Catalog,
    ) -> Result<Rule> {
        match (tree, text.trim().is_empty()) {
            (Some(_), false) => Err(Error::invalid(
                format!("{prefix}rule_text"),
                "give the rule as a tree (rule) or as text (rule_text), not both",
            )),
            (None, true) => Err(Error::invalid(
                format!("{prefix}rule_text"),
                "is required (or give the rule as a tree in rule)",
            )),
            (None, false) => {
                let field = format!("{prefix}rule_text");
                let r = rules::compile(text, catalog)
                    .map_err(|e| Error::InvalidArgument(e.to_violations(&field)))?;
                storable(&field, r)
            }
            (Some(t), true) => {
                let field = format!("{prefix}rule");
                let r = convert::rule(&field, t)?;
                rules::check(&r, catalog)
                    .map_err(|e| Error::InvalidArgument(e.to_violations(&field)))?;
                storable(&field, r)
            }
        }
    }

    async fn create(
        &self,
        caller: Principal,
        req: pb::CreateSegmentRequest,
    ) -> Result<pb::Segment> {
        let now = self.now();
        let rid = request_id("request_id", &req.request_id)?;
        let s = req
            .segment
            .as_ref()
            .ok_or_else(|| Error::invalid("segment", "is required"))?;
        let id = SegmentId::new().0.to_string();
        let mut v = Violations::new();
        v.check(
            "",
            required_text("segment.display_name", &s.display_name, 200),
        );
        let owner = if s.owner.trim().is_empty() {
            caller.subject.clone()
        } else {
            v.check("", required_text("segment.owner", &s.owner, 200))
                .unwrap_or_default()
        };
        v.into_result()?;
        // Everything but the owner and the rule is what an edit sets.
        let mut paths: Vec<String> = ["display_name", "description", "team", "purpose", "playbook"]
            .map(str::to_owned)
            .to_vec();
        paths.push("approval_required".into());
        paths.push("objectives".into());
        let mut edit = self.parse_edit("segment.", &id, s, &paths).await?;
        let catalog = catalog_with_segments(self.engine.rt()).await?;
        let rule = Self::resolve_rule("segment.", s.rule.as_ref(), &s.rule_text, &catalog)?;
        let rule_field = if s.rule.is_some() {
            "segment.rule"
        } else {
            "segment.rule_text"
        };
        let mut row = Segment {
            id,
            display_name: String::new(),
            owner: owner.trim().to_owned(),
            description: String::new(),
            rule_text: rule.to_string(),
            version: 1,
            revision: 1,
            state: State::Backfilling.code(),
            failure_reason: None,
            create_us: to_micros(now),
            update_us: to_micros(now),
            evaluate_us: None,
            operation: Some(Engine::new_backfill_name()),
            team: String::new(),
            purpose: String::new(),
            playbook: String::new(),
            approval_required: false,
        };
        let objectives = edit.objectives.take().unwrap_or_default();
        let hour = self.engine.rt().config.segmentation.snapshot_hour_utc;
        let actor = caller.subject;
        let created = idempotency::write(
            self.engine.rt(),
            "CreateSegment",
            rid,
            &req,
            now,
            async move |txn| {
                check_references(txn, &row.id, rule_field, &rule).await?;
                edit::apply(txn, &edit, &mut row, now).await?;
                Engine::start_backfill(txn, &row, now).await?;
                segments::insert(txn, row.clone(), &actor).await?;
                stored_objectives::replace(txn, &row.id, objectives.clone()).await?;
                accountability::arm_deadlines(txn, &row.id, &objectives, to_micros(now)).await?;
                accountability::arm_snapshot(txn, &row.id, to_micros(now), hour).await?;
                members::bump_generation(txn).await?;
                let out = edit::audit_view(txn, &row).await?;
                audit::record(txn, crate::SERVICE, now, Change::create(&out.name, &out)).await?;
                Ok((out, Vec::new()))
            },
        )
        .await?;
        self.engine.rt().operations.wake();
        self.engine.rt().timers.wake();
        match self.existing("segment.name", &created.name).await {
            Ok(row) => self.to_proto(&row).await,
            // A retry answered after the segment was deleted: the first answer.
            Err(Error::NotFound(_)) => Ok(created),
            Err(e) => Err(e),
        }
    }

    async fn get(&self, req: pb::GetSegmentRequest) -> Result<pb::Segment> {
        let s = self.existing("name", &req.name).await?;
        self.to_proto(&s).await
    }

    async fn list(&self, req: pb::ListSegmentsRequest) -> Result<pb::ListSegmentsResponse> {
        let size = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)? as usize;
        let mut v = Violations::new();
        v.check("", optional_text("owner", &req.owner, 200));
        v.check("", optional_text("team", &req.team, 200));
        v.into_result()?;
        let pager = Pager::new(&["segments", &req.owner, &req.team]);
        let after = pager.after::<String>(&req.page_token)?;
        let filter = |f: &str| Some(f.trim()).filter(|f| !f.is_empty()).map(str::to_owned);
        let (owner, team) = (filter(&req.owner), filter(&req.team));
        let rows = segments::page(
            &self.engine.rt().read,
            owner.as_deref(),
            team.as_deref(),
            after.as_ref().map(|(k, _)| k.as_str()),
            size as u64 + 1,
        )
        .await?;
        let live = self.live(&rows).await?;
        let pairs: Vec<(Segment, Live)> = rows.into_iter().zip(live).collect();
        let (segments, next_page_token) = pager.page(
            &pairs,
            size,
            |(s, l)| convert::segment_to_proto(s, l),
            |(s, _)| (s.id.clone(), s.id.clone()),
        );
        Ok(pb::ListSegmentsResponse {
            segments,
            next_page_token,
        })
    }

    /// Whether `rule` (of segment `id`) would close a cycle through
    /// `in_segment`.
    async fn check_cycle(&self, id: &str, field: &str, rule: &Rule) -> Result<()> {
        let all = segments::all(&self.engine.rt().read).await?;
        cycle_in(&all, id, field, rule)
    }

    async fn update(
        &self,
        caller: Principal,
        req: pb::UpdateSegmentRequest,
    ) -> Result<pb::UpdateSegmentResponse> {
        let now = self.now();
        let rid = request_id("request_id", &req.request_id)?;
        let s = req
            .segment
            .as_ref()
            .ok_or_else(|| Error::invalid("segment", "is required"))?;
        let id = SegmentId::parse_name("segment.name", &s.name)?
            .0
            .to_string();
        let paths: Vec<String> = req
            .update_mask
            .as_ref()
            .map(|m| m.paths.clone())
            .unwrap_or_default();
        if paths.is_empty() {
            return Err(Error::invalid(
                "update_mask",
                "is required: name the fields to change",
            ));
        }
        let edit = self.parse_edit("segment.", &id, s, &paths).await?;
        let name = s.name.clone();
        let mask = req.update_mask.clone();
        let resp = idempotency::write(
            self.engine.rt(),
            "UpdateSegment",
            rid,
            &req,
            now,
            async move |txn| {
                segments::lock(txn, &id).await?;
                let mut row = segments::get(txn, &id)
                    .await?
                    .ok_or_else(|| Error::NotFound(name.clone()))?;
                access::check(&caller, access::UPDATE, &row)?;
                clm_platform::convert::check_etag(&s.etag, row.revision)?;
                let guarded = edit.guarded();
                if row.approval_required && !guarded.is_empty() {
                    return Err(SegmentationError::ApprovalRequired {
                        segment: name.clone(),
                        fields: guarded.join(", "),
                    }
                    .into());
                }
                let before = edit::audit_view(txn, &row).await?;
                let applied = edit::apply(txn, &edit, &mut row, now).await?;
                edit::store(txn, &mut row, &applied, &caller.subject, now).await?;
                let after = edit::audit_view(txn, &row).await?;
                audit::record(
                    txn,
                    crate::SERVICE,
                    now,
                    Change::update(&name, &before, &after).mask(mask.as_ref()),
                )
                .await?;
                Ok((
                    pb::UpdateSegmentResponse {
                        segment: Some(after),
                        rule_diff: applied.rule_diff,
                    },
                    Vec::new(),
                ))
            },
        )
        .await?;
        if resp.rule_diff.is_some() {
            self.engine.rt().operations.wake();
        }
        self.engine.rt().timers.wake();
        let fresh = match &resp.segment {
            Some(seg) => Some(
                self.to_proto(&self.existing("segment.name", &seg.name).await?)
                    .await?,
            ),
            None => None,
        };
        Ok(pb::UpdateSegmentResponse {
            segment: fresh,
            rule_diff: resp.rule_diff,
        })
    }

    async fn delete(
        &self,
        caller: Principal,
        req: pb::DeleteSegmentRequest,
    ) -> Result<pb::DeleteSegmentResponse> {
        let now = self.now();
        let rid = request_id("request_id", &req.request_id)?;
        let id = SegmentId::parse_name("name", &req.name)?.0.to_string();
        let name = req.name.clone();
        let etag = req.etag.clone();
        let rt = self.engine.rt().clone();
        let mut dropped: Vec<String> = Vec::new();
        let mut version = 0;
        let dropped_ref = &mut dropped;
        let version_ref = &mut version;
        let resp = idempotency::write(&rt, "DeleteSegment", rid, &req, now, async move |txn| {
            let row = segments::get(txn, &id)
                .await?
                .ok_or_else(|| Error::NotFound(name.clone()))?;
            access::check(&caller, access::DELETE, &row)?;
            if !etag.is_empty() {
                clm_platform::convert::check_etag(&etag, row.revision)?;
            }
            // Checked under the lock, so a segment starting to name this one
            // meanwhile is seen.
            let users = users_of(txn, &name).await?;
            if !users.is_empty() {
                return Err(SegmentationError::InUse {
                    segment: name.clone(),
                    users,
                }
                .into());
            }
            *version_ref = members::lock_version(txn).await?;
            *dropped_ref = members::of_segment(txn, &id).await?;
            let before = edit::audit_view(txn, &row).await?;
            audit::record(txn, crate::SERVICE, now, Change::delete(&name, &before)).await?;
            members::delete_segment(txn, &id).await?;
            crate::store::backfill_diffs::finish(txn, &id).await?;
            stored_objectives::delete_segment(txn, &id).await?;
            history::delete_segment(txn, &id).await?;
            change_requests::delete_segment(txn, &id).await?;
            accountability::disarm(txn, &id).await?;
            segments::delete(txn, &id).await?;
            members::bump_generation(txn).await?;
            // Watchers see every member leave with the segment.
            let exits = dropped_ref
                .iter()
                .map(|customer| {
                    let exited = pb::SegmentMembershipChanged {
                        segment: name.clone(),
                        customer: format!("customers/{customer}"),
                        change: pb::MembershipChange::Exited as i32,
                        change_time: Some(clm_platform::convert::timestamp(now)),
                        segment_version: row.version,
                        reason: pb::MembershipReason::Unspecified as i32,
                    };
                    clm_platform::outbox::NewEvent::new(name.clone(), &exited)
                })
                .collect();
            Ok((
                pb::DeleteSegmentResponse {
                    name: name.clone(),
                    member_count: dropped_ref.len() as i64,
                },
                exits,
            ))
        })
        .await?;
        // This replica forgets the segment at once.
        self.engine.registry(&rt.db).await?;
        if version > 0 {
            let id = resp.name.strip_prefix("segments/").unwrap_or_default();
            let version = u64::try_from(version).unwrap_or(0);
            // Each member's set forgets the segment (pipelined in chunks);
            // the segment's own set is dropped whole, in O(1).
            let writes: Vec<_> = dropped
                .iter()
                .map(|c| cache::customer_write(id, c, false, version))
                .collect();
            cache::apply(&rt, &writes).await;
            let _ = rt.cache.delete(&cache::segment_key(id), version).await;
        }
        Ok(resp)
    }

    async fn preview(&self, req: pb::PreviewSegmentRequest) -> Result<pb::PreviewSegmentResponse> {
        let catalog = catalog_with_segments(self.engine.rt()).await?;
        let rule = Self::resolve_rule("", req.rule.as_ref(), &req.rule_text, &catalog)?;
        if !(0..=MAX_SAMPLE).contains(&req.sample_size) {
            return Err(Error::invalid(
                "sample_size",
                format!("must be 0..{MAX_SAMPLE}"),
            ));
        }
        let sample = if req.sample_size == 0 {
            10
        } else {
            req.sample_size
        } as u64;
        let timeout = match &req.timeout {
            None => DEFAULT_PREVIEW,
            Some(d) => {
                let ms = clm_platform::convert::duration_millis("timeout", d)?;
                if ms <= 0 {
                    return Err(Error::invalid("timeout", "must be positive"));
                }
                std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0)).min(MAX_PREVIEW)
            }
        };
        let (count, ids) = tokio::time::timeout(timeout, self.engine.preview(&rule, sample))
            .await
            .map_err(|_| Error::from(SegmentationError::PreviewTimeout(timeout)))??;
        Ok(pb::PreviewSegmentResponse {
            count,
            sample: ids.into_iter().map(|c| format!("customers/{c}")).collect(),
            rule_text: rule.to_string(),
            rule: Some(convert::rule_to_proto(&rule)),
        })
    }

    async fn segment_id(&self, field: &str, name: &str) -> Result<String> {
        let id = SegmentId::parse_name(field, name)?.0.to_string();
        if !self.engine.knows(&id).await? {
            return Err(Error::NotFound(name.to_owned()));
        }
        Ok(id)
    }

    async fn is_member(&self, req: pb::IsMemberRequest) -> Result<pb::IsMemberResponse> {
        let seg = self.segment_id("segment", &req.segment).await?;
        let customer = CustomerId::parse_name("customer", &req.customer)?;
        let member = cache::is_member(self.engine.rt(), &seg, &customer.to_string()).await?;
        Ok(pb::IsMemberResponse { member })
    }

    async fn batch_is_member(
        &self,
        req: pb::BatchIsMemberRequest,
    ) -> Result<pb::BatchIsMemberResponse> {
        let n = req.checks.len();
        if n == 0 || n > MAX_BATCH_CHECKS {
            return Err(Error::invalid(
                "checks",
                format!("must hold 1..{MAX_BATCH_CHECKS} pairs, got {n}"),
            ));
        }
        let reg = self.engine.registry(&self.engine.rt().read).await?;
        let mut v = Violations::new();
        let mut pairs = Vec::with_capacity(n);
        for (i, c) in req.checks.iter().enumerate() {
            let s = v.check(
                "",
                SegmentId::parse_name(&format!("checks[{i}].segment"), &c.segment),
            );
            let cu = v.check(
                "",
                CustomerId::parse_name(&format!("checks[{i}].customer"), &c.customer),
            );
            if let Some(s) = &s
                && reg.get(&s.0.to_string()).is_none()
            {
                return Err(Error::NotFound(c.segment.clone()));
            }
            if let (Some(s), Some(cu)) = (s, cu) {
                pairs.push((s.0.to_string(), cu.to_string()));
            }
        }
        v.into_result()?;
        let mut by_customer: HashMap<String, Vec<String>> = HashMap::new();
        let mut answers = Vec::with_capacity(n);
        for (s, cu) in &pairs {
            if !by_customer.contains_key(cu) {
                let segs = cache::customer_segments(self.engine.rt(), cu).await?;
                by_customer.insert(cu.clone(), segs);
            }
            answers.push(by_customer.get(cu).is_some_and(|l| l.contains(s)));
        }
        Ok(pb::BatchIsMemberResponse {
            answers: req
                .checks
                .iter()
                .zip(answers)
                .map(|(c, member)| pb::MembershipAnswer {
                    segment: c.segment.clone(),
                    customer: c.customer.clone(),
                    member,
                })
                .collect(),
        })
    }

    async fn customer_segments(
        &self,
        req: pb::GetCustomerSegmentsRequest,
    ) -> Result<pb::GetCustomerSegmentsResponse> {
        let customer = CustomerId::parse_name("customer", &req.customer)?;
        let reg = self.engine.cached_registry();
        let mut segments: Vec<String> =
            cache::customer_segments(self.engine.rt(), &customer.to_string())
                .await?
                .into_iter()
                .filter(|s| reg.get(s).is_some())
                .map(|s| format!("segments/{s}"))
                .collect();
        segments.sort();
        Ok(pb::GetCustomerSegmentsResponse { segments })
    }

    async fn list_members(
        &self,
        req: pb::ListSegmentMembersRequest,
    ) -> Result<pb::ListSegmentMembersResponse> {
        let seg = self.segment_id("parent", &req.parent).await?;
        let size = page_size("page_size", req.page_size, DEFAULT_MEMBER_PAGE, MAX_PAGE)? as usize;
        let pager = Pager::new(&["members", &req.parent]);
        let after = pager.after::<String>(&req.page_token).map_err(|_| {
            Error::invalid(
                "page_token",
                "is not a page token of this segment's member list; start again without one",
            )
        })?;
        let rows = members::page(
            &self.engine.rt().read,
            &seg,
            after.as_ref().map(|(k, _)| k.as_str()),
            size as u64 + 1,
        )
        .await?;
        let (members, next_page_token) = pager.page(
            &rows,
            size,
            |(c, enter)| pb::SegmentMember {
                customer: format!("customers/{c}"),
                enter_time: Some(clm_platform::convert::timestamp(from_micros(*enter))),
            },
            |(c, _)| (c.clone(), c.clone()),
        );
        Ok(pb::ListSegmentMembersResponse {
            members,
            next_page_token,
        })
    }

    async fn count_members(
        &self,
        req: pb::CountSegmentMembersRequest,
    ) -> Result<pb::CountSegmentMembersResponse> {
        let seg = self.segment_id("segment", &req.segment).await?;
        let counts = members::counts(&self.engine.rt().read, std::slice::from_ref(&seg)).await?;
        Ok(pb::CountSegmentMembersResponse {
            count: counts.get(&seg).copied().unwrap_or(0),
        })
    }

    async fn refresh(
        &self,
        caller: Principal,
        req: pb::RefreshSegmentRequest,
    ) -> Result<pb::Segment> {
        let now = self.now();
        let rid = request_id("request_id", &req.request_id)?;
        let id = SegmentId::parse_name("name", &req.name)?.0.to_string();
        let name = req.name.clone();
        let out = idempotency::write(
            self.engine.rt(),
            "RefreshSegment",
            rid,
            &req,
            now,
            async move |txn| {
                segments::lock(txn, &id).await?;
                let mut row = segments::get(txn, &id)
                    .await?
                    .ok_or_else(|| Error::NotFound(name.clone()))?;
                access::check(&caller, access::REFRESH, &row)?;
                let before = edit::audit_view(txn, &row).await?;
                segments::set_state(txn, &id, row.version, State::Backfilling, None, None).await?;
                row.state = State::Backfilling.code();
                row.failure_reason = None;
                row.operation = Some(Engine::new_backfill_name());
                Engine::start_backfill(txn, &row, now).await?;
                segments::set_operation(txn, &id, row.operation.as_deref().unwrap_or_default())
                    .await?;
                let after = edit::audit_view(txn, &row).await?;
                audit::record(
                    txn,
                    crate::SERVICE,
                    now,
                    Change::update(&name, &before, &after),
                )
                .await?;
                Ok((after, Vec::new()))
            },
        )
        .await?;
        self.engine.rt().operations.wake();
        Ok(out)
    }
}

/// The rule diff: conditions (canonical text) removed and added.
fn rule_diff(version: i64, old_text: &str, old: Option<&Rule>, new: &Rule) -> pb::RuleDiff {
    let conds = |r: &Rule| {
        let mut out = BTreeSet::new();
        r.for_each_condition(&mut |c| {
            out.insert(Rule::Cond(c.clone()).to_string());
        });
        out
    };
    let before = old.map(conds).unwrap_or_default();
    let after = conds(new);
    pb::RuleDiff {
        previous_version: version,
        previous_rule_text: old_text.to_owned(),
        removed_conditions: before.difference(&after).cloned().collect(),
        added_conditions: after.difference(&before).cloned().collect(),
    }
}

type WatchStream =
    Pin<Box<dyn Stream<Item = std::result::Result<pb::WatchMembershipResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SegmentationService for SegmentationApi {
    async fn create_segment(
        &self,
        request: Request<pb::CreateSegmentRequest>,
    ) -> std::result::Result<Response<pb::Segment>, Status> {
        respond(request, &POLICY, |p, r| self.create(p, r)).await
    }

    async fn get_segment(
        &self,
        request: Request<pb::GetSegmentRequest>,
    ) -> std::result::Result<Response<pb::Segment>, Status> {
        respond(request, &POLICY, |_, r| self.get(r)).await
    }

    async fn list_segments(
        &self,
        request: Request<pb::ListSegmentsRequest>,
    ) -> std::result::Result<Response<pb::ListSegmentsResponse>, Status> {
        respond(request, &POLICY, |_, r| self.list(r)).await
    }

    async fn update_segment(
        &self,
        request: Request<pb::UpdateSegmentRequest>,
    ) -> std::result::Result<Response<pb::UpdateSegmentResponse>, Status> {
        respond(request, &POLICY, |p, r| self.update(p, r)).await
    }

    async fn delete_segment(
        &self,
        request: Request<pb::DeleteSegmentRequest>,
    ) -> std::result::Result<Response<pb::DeleteSegmentResponse>, Status> {
        respond(request, &POLICY, |p, r| self.delete(p, r)).await
    }

    async fn preview_segment(
        &self,
        request: Request<pb::PreviewSegmentRequest>,
    ) -> std::result::Result<Response<pb::PreviewSegmentResponse>, Status> {
        respond(request, &POLICY, |_, r| self.preview(r)).await
    }

    async fn is_member(
        &self,
        request: Request<pb::IsMemberRequest>,
    ) -> std::result::Result<Response<pb::IsMemberResponse>, Status> {
        respond(request, &POLICY, |_, r| self.is_member(r)).await
    }

    async fn batch_is_member(
        &self,
        request: Request<pb::BatchIsMemberRequest>,
    ) -> std::result::Result<Response<pb::BatchIsMemberResponse>, Status> {
        respond(request, &POLICY, |_, r| self.batch_is_member(r)).await
    }

    async fn get_customer_segments(
        &self,
        request: Request<pb::GetCustomerSegmentsRequest>,
    ) -> std::result::Result<Response<pb::GetCustomerSegmentsResponse>, Status> {
        respond(request, &POLICY, |_, r| self.customer_segments(r)).await
    }

    async fn list_segment_members(
        &self,
        request: Request<pb::ListSegmentMembersRequest>,
    ) -> std::result::Result<Response<pb::ListSegmentMembersResponse>, Status> {
        respond(request, &POLICY, |_, r| self.list_members(r)).await
    }

    async fn count_segment_members(
        &self,
        request: Request<pb::CountSegmentMembersRequest>,
    ) -> std::result::Result<Response<pb::CountSegmentMembersResponse>, Status> {
        respond(request, &POLICY, |_, r| self.count_members(r)).await
    }

    async fn refresh_segment(
        &self,
        request: Request<pb::RefreshSegmentRequest>,
    ) -> std::result::Result<Response<pb::Segment>, Status> {
        respond(request, &POLICY, |p, r| self.refresh(p, r)).await
    }

    async fn transfer_segment_ownership(
        &self,
        request: Request<pb::TransferSegmentOwnershipRequest>,
    ) -> std::result::Result<Response<pb::Segment>, Status> {
        respond(request, &POLICY, |p, r| self.transfer(p, r)).await
    }

    async fn list_segment_audit_entries(
        &self,
        request: Request<pb::ListSegmentAuditEntriesRequest>,
    ) -> std::result::Result<Response<clm_proto::common::ListAuditEntriesResponse>, Status> {
        respond(request, &POLICY, |_, r| self.segment_audit(r)).await
    }

    async fn create_segment_change_request(
        &self,
        request: Request<pb::CreateSegmentChangeRequestRequest>,
    ) -> std::result::Result<Response<pb::SegmentChangeRequest>, Status> {
        respond(request, &POLICY, |p, r| self.create_change_request(p, r)).await
    }

    async fn get_segment_change_request(
        &self,
        request: Request<pb::GetSegmentChangeRequestRequest>,
    ) -> std::result::Result<Response<pb::SegmentChangeRequest>, Status> {
        respond(request, &POLICY, |_, r| self.get_change_request(r)).await
    }

    async fn list_segment_change_requests(
        &self,
        request: Request<pb::ListSegmentChangeRequestsRequest>,
    ) -> std::result::Result<Response<pb::ListSegmentChangeRequestsResponse>, Status> {
        respond(request, &POLICY, |_, r| self.list_change_requests(r)).await
    }

    async fn approve_segment_change_request(
        &self,
        request: Request<pb::ApproveSegmentChangeRequestRequest>,
    ) -> std::result::Result<Response<pb::SegmentChangeRequest>, Status> {
        respond(request, &POLICY, |p, r| {
            self.review(
                p,
                r.name.clone(),
                r.comment.clone(),
                r.request_id.clone(),
                true,
                r,
            )
        })
        .await
    }

    async fn reject_segment_change_request(
        &self,
        request: Request<pb::RejectSegmentChangeRequestRequest>,
    ) -> std::result::Result<Response<pb::SegmentChangeRequest>, Status> {
        respond(request, &POLICY, |p, r| {
            self.review(
                p,
                r.name.clone(),
                r.comment.clone(),
                r.request_id.clone(),
                false,
                r,
            )
        })
        .await
    }

    async fn list_membership_history(
        &self,
        request: Request<pb::ListMembershipHistoryRequest>,
    ) -> std::result::Result<Response<pb::ListMembershipHistoryResponse>, Status> {
        respond(request, &POLICY, |_, r| self.membership_history(r)).await
    }

    async fn get_segment_performance(
        &self,
        request: Request<pb::GetSegmentPerformanceRequest>,
    ) -> std::result::Result<Response<pb::SegmentPerformance>, Status> {
        respond(request, &POLICY, |_, r| self.performance(r)).await
    }

    type WatchObjectiveAlertsStream = accountability_api::AlertStream;

    async fn watch_objective_alerts(
        &self,
        request: Request<pb::WatchObjectiveAlertsRequest>,
    ) -> std::result::Result<Response<Self::WatchObjectiveAlertsStream>, Status> {
        clm_platform::auth::authorize(&request, &POLICY)?;
        clm_platform::error::known_enums(request.get_ref())?;
        Ok(Response::new(
            self.watch_alerts(request.into_inner()).await?,
        ))
    }

    type WatchMembershipStream = WatchStream;

    async fn watch_membership(
        &self,
        request: Request<pb::WatchMembershipRequest>,
    ) -> std::result::Result<Response<Self::WatchMembershipStream>, Status> {
        clm_platform::auth::authorize(&request, &POLICY)?;
        clm_platform::error::known_enums(request.get_ref())?;
        let req = request.into_inner();
        if !req.segment.is_empty() {
            self.segment_id("segment", &req.segment).await?;
        }
        if req.after_sequence < 0 {
            return Err(Error::invalid("after_sequence", "must not be negative").into());
        }
        // A position the outbox cannot serve is OUT_OF_RANGE, as for
        // WatchChanges, never a silent wait.
        let stream = clm_platform::changes::watch_own(
            self.engine.rt(),
            req.after_sequence,
            move |sequence, change: pb::SegmentMembershipChanged| {
                (req.segment.is_empty() || change.segment == req.segment).then_some(
                    pb::WatchMembershipResponse {
                        sequence,
                        change: Some(change),
                    },
                )
            },
        )
        .await?;
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Whether `rule`, as segment `id`'s rule, would close a cycle through
/// `in_segment` among `all` segments: INVALID_ARGUMENT at `field` if so.
fn cycle_in(all: &[segments::Segment], id: &str, field: &str, rule: &Rule) -> Result<()> {
    let refs: HashMap<String, BTreeSet<String>> = all
        .iter()
        .filter(|s| s.id != id)
        .map(|s| {
            let r = rules::parse(&s.rule_text)
                .map(|r| rules::segments_referenced(&r))
                .unwrap_or_default();
            (format!("segments/{}", s.id), r)
        })
        .collect();
    let me = format!("segments/{id}");
    let mut stack: Vec<String> = rules::segments_referenced(rule).into_iter().collect();
    let mut seen = BTreeSet::new();
    while let Some(n) = stack.pop() {
        if n == me {
            return Err(Error::invalid(
                field,
                format!("in_segment would close a cycle: {me} would depend on itself"),
            ));
        }
        if seen.insert(n.clone())
            && let Some(next) = refs.get(&n)
        {
            stack.extend(next.iter().cloned());
        }
    }
    Ok(())
}

/// The segment checks that must hold when the write commits, made inside
/// its transaction after taking the lock that orders segment writes (the
/// registry generation row): every segment `rule` names exists and no
/// cycle closes through `in_segment`. Two concurrent edits that would
/// each be fine alone (A names B, B names A) then cannot both commit.
pub(crate) async fn check_references(
    txn: &impl sea_orm::ConnectionTrait,
    id: &str,
    field: &str,
    rule: &Rule,
) -> Result<()> {
    let named = rules::segments_referenced(rule);
    if named.is_empty() {
        return Ok(());
    }
    members::bump_generation(txn).await?;
    let all = segments::all(txn).await?;
    for n in &named {
        if !all.iter().any(|s| format!("segments/{}", s.id) == *n) {
            return Err(Error::invalid(
                field,
                format!("in_segment names {n}, which does not exist (deleted meanwhile)"),
            ));
        }
    }
    cycle_in(&all, id, field, rule)
}

/// The segments whose rules name `name`, read inside the deleting
/// transaction after the lock that orders segment writes.
pub(crate) async fn users_of(
    txn: &impl sea_orm::ConnectionTrait,
    name: &str,
) -> Result<Vec<String>> {
    members::bump_generation(txn).await?;
    Ok(segments::all(txn)
        .await?
        .into_iter()
        .filter(|s| {
            rules::parse(&s.rule_text)
                .map(|r| rules::segments_referenced(&r).contains(name))
                .unwrap_or(false)
        })
        .map(|s| format!("segments/{}", s.id))
        .collect())
}

/// `rule` if it can be stored and evaluated: its canonical text (what is
/// stored and read back) fits [`rules::MAX_RULE_BYTES`] and parses back to
/// the same rule. A rule accepted here never turns FAILED for its size or
/// its escapes later.
fn storable(field: &str, rule: Rule) -> Result<Rule> {
    let text = rule.to_string();
    if text.len() > rules::MAX_RULE_BYTES {
        return Err(Error::invalid(
            field,
            format!(
                "is too large: its canonical text is {} bytes, at most {} (control characters count 6 bytes each, written \\u{{..}})",
                text.len(),
                rules::MAX_RULE_BYTES
            ),
        ));
    }
    match rules::parse(&text) {
        Ok(back) if back == rule => Ok(rule),
        _ => Err(Error::invalid(
            field,
            "cannot be stored: its canonical text does not read back as the same rule",
        )),
    }
}
