//! The accountability rpcs: ownership transfer, a segment's audit trail,
//! change requests, membership history, performance, objective alerts.

use super::{SegmentId, SegmentationApi, edit};
use crate::access;
use crate::accountability::day_start;
use crate::error::SegmentationError;
use crate::objectives;
use crate::store::history::{self, DAY_US};
use crate::store::objectives as stored_objectives;
use crate::store::{change_requests, members, metrics, segments};
use clm_domain::Violations;
use clm_domain::ids::CustomerId;
use clm_domain::validation::{optional_text, page_size, request_id, required_text};
use clm_platform::audit::{self, Change};
use clm_platform::auth::Principal;
use clm_platform::convert::{etag, from_timestamp, timestamp};
use clm_platform::db::{from_micros, to_micros};
use clm_platform::idempotency;
use clm_platform::page::Pager;
use clm_platform::{Error, Result};
use clm_proto::segmentation as pb;
use std::pin::Pin;
use tokio_stream::Stream;
use tonic::Status;

const DEFAULT_PAGE: u32 = 50;
const DEFAULT_HISTORY_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;
const MAX_PERIOD_DAYS: i64 = 366;
const DEFAULT_PERIOD_DAYS: i64 = 30;

/// A change request's name split: (segment id, change request id).
fn parse_cr_name(field: &str, name: &str) -> Result<(String, String)> {
    let bad = || {
        Error::invalid(
            field,
            "must be segments/{segment_id}/changeRequests/{change_request_id}",
        )
    };
    let (seg, cr) = name.split_once("/changeRequests/").ok_or_else(bad)?;
    let seg = SegmentId::parse_name(field, seg).map_err(|_| bad())?;
    if cr.is_empty() || cr.len() > 64 || !cr.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(bad());
    }
    Ok((seg.0.to_string(), cr.to_owned()))
}

fn state_name(state: i32) -> String {
    pb::ChangeRequestState::try_from(state)
        .map(|s| s.as_str_name().to_owned())
        .unwrap_or_else(|_| "UNKNOWN".into())
}

pub(super) type AlertStream = Pin<
    Box<dyn Stream<Item = std::result::Result<pb::WatchObjectiveAlertsResponse, Status>> + Send>,
>;

impl SegmentationApi {
    pub(super) async fn transfer(
        &self,
        caller: Principal,
        req: pb::TransferSegmentOwnershipRequest,
    ) -> Result<pb::Segment> {
        let now = self.now();
        let rid = request_id("request_id", &req.request_id)?;
        let id = SegmentId::parse_name("name", &req.name)?.0.to_string();
        let mut v = Violations::new();
        let owner = v
            .check("", required_text("new_owner", &req.new_owner, 200))
            .unwrap_or_default();
        let team = v
            .check("", optional_text("new_team", &req.new_team, 200))
            .flatten();
        v.into_result()?;
        let name = req.name.clone();
        let etag_given = req.etag.clone();
        let out = idempotency::write(
            self.engine.rt(),
            "TransferSegmentOwnership",
            rid,
            &req,
            now,
            async move |txn| {
                segments::lock(txn, &id).await?;
                let mut row = segments::get(txn, &id)
                    .await?
                    .ok_or_else(|| Error::NotFound(name.clone()))?;
                access::check(&caller, access::TRANSFER, &row)?;
                if !etag_given.is_empty() {
                    clm_platform::convert::check_etag(&etag_given, row.revision)?;
                }
                let before = edit::audit_view(txn, &row).await?;
                let mut paths = vec!["owner".to_owned()];
                row.owner = owner.trim().to_owned();
                if let Some(t) = &team {
                    row.team = t.trim().to_owned();
                    paths.push("team".into());
                }
                edit::store(
                    txn,
                    &mut row,
                    &edit::Applied::default(),
                    &caller.subject,
                    now,
                )
                .await?;
                let after = edit::audit_view(txn, &row).await?;
                let mask = prost_types::FieldMask { paths };
                audit::record(
                    txn,
                    crate::SERVICE,
                    now,
                    Change::update(&name, &before, &after).mask(Some(&mask)),
                )
                .await?;
                Ok((after, Vec::new()))
            },
        )
        .await?;
        match self.existing("name", &out.name).await {
            Ok(row) => self.to_proto(&row).await,
            Err(Error::NotFound(_)) => Ok(out),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn segment_audit(
        &self,
        req: pb::ListSegmentAuditEntriesRequest,
    ) -> Result<clm_proto::common::ListAuditEntriesResponse> {
        let s = self.existing("parent", &req.parent).await?;
        let name = format!("segments/{}", s.id);
        let list = clm_proto::common::ListAuditEntriesRequest {
            page_size: req.page_size,
            page_token: req.page_token,
            resource: String::new(),
            actor: String::new(),
            rpc: req.rpc,
            start_time: req.start_time,
            end_time: req.end_time,
        };
        audit::list_under(&self.engine.rt().read, &list, &name).await
    }

    pub(super) async fn create_change_request(
        &self,
        caller: Principal,
        req: pb::CreateSegmentChangeRequestRequest,
    ) -> Result<pb::SegmentChangeRequest> {
        let now = self.now();
        let rid = request_id("request_id", &req.request_id)?;
        let id = SegmentId::parse_name("parent", &req.parent)?.0.to_string();
        let cr = req
            .change_request
            .as_ref()
            .ok_or_else(|| Error::invalid("change_request", "is required"))?;
        let proposed = cr
            .segment
            .as_ref()
            .ok_or_else(|| Error::invalid("change_request.segment", "is required"))?;
        let reason = required_text("change_request.reason", &cr.reason, 2000)?;
        let paths: Vec<String> = cr
            .update_mask
            .as_ref()
            .map(|m| m.paths.clone())
            .unwrap_or_default();
        if paths.is_empty() {
            return Err(Error::invalid(
                "change_request.update_mask",
                "is required: name the fields to change",
            ));
        }
        let edit = self
            .parse_edit("change_request.segment.", &id, proposed, &paths)
            .await?;
        let preview = match &edit.rule {
            Some(rule) => Some(self.engine.preview(rule, 0).await?.0),
            None => None,
        };
        let parent = req.parent.clone();
        let mut proposal = proposed.clone();
        proposal.name = parent.clone();
        let mask = cr.update_mask.clone();
        let cr_id = uuid::Uuid::now_v7().simple().to_string();
        idempotency::write(
            self.engine.rt(),
            "CreateSegmentChangeRequest",
            rid,
            &req,
            now,
            async move |txn| {
                let row = segments::get(txn, &id)
                    .await?
                    .ok_or_else(|| Error::NotFound(parent.clone()))?;
                access::check(&caller, access::PROPOSE, &row)?;
                let count = members::counts(txn, std::slice::from_ref(&row.id))
                    .await?
                    .get(&row.id)
                    .copied()
                    .unwrap_or(0);
                let rule_diff = match &edit.rule {
                    Some(r) if r.to_string() != row.rule_text => {
                        let old = clm_domain::rules::parse(&row.rule_text).ok();
                        Some(super::rule_diff(
                            row.version,
                            &row.rule_text,
                            old.as_ref(),
                            r,
                        ))
                    }
                    _ => None,
                };
                let previous_objectives = if edit.objectives.is_some() {
                    stored_objectives::of_segments(txn, std::slice::from_ref(&row.id))
                        .await?
                        .remove(&row.id)
                        .unwrap_or_default()
                        .iter()
                        .map(|o| objectives::to_proto(o, None))
                        .collect()
                } else {
                    Vec::new()
                };
                let out = pb::SegmentChangeRequest {
                    name: format!("{parent}/changeRequests/{cr_id}"),
                    segment: Some(proposal),
                    update_mask: mask,
                    reason,
                    state: pb::ChangeRequestState::Pending as i32,
                    author: caller.subject.clone(),
                    rule_diff,
                    previous_objectives,
                    preview_member_count: preview.unwrap_or(count),
                    current_member_count: count,
                    create_time: Some(timestamp(now)),
                    base_etag: etag(row.revision),
                    ..Default::default()
                };
                change_requests::insert(txn, &cr_id, &row.id, to_micros(now), &out).await?;
                audit::record(txn, crate::SERVICE, now, Change::create(&out.name, &out)).await?;
                Ok((out, Vec::new()))
            },
        )
        .await
    }

    pub(super) async fn get_change_request(
        &self,
        req: pb::GetSegmentChangeRequestRequest,
    ) -> Result<pb::SegmentChangeRequest> {
        let (seg, cr) = parse_cr_name("name", &req.name)?;
        change_requests::get(&self.engine.rt().read, &seg, &cr)
            .await?
            .ok_or_else(|| Error::NotFound(req.name.clone()))
    }

    pub(super) async fn list_change_requests(
        &self,
        req: pb::ListSegmentChangeRequestsRequest,
    ) -> Result<pb::ListSegmentChangeRequestsResponse> {
        let s = self.existing("parent", &req.parent).await?;
        let size = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)? as usize;
        let state = pb::ChangeRequestState::try_from(req.state)
            .map_err(|_| Error::invalid("state", "is not a ChangeRequestState"))?;
        let pager = Pager::new(&["changeRequests", &req.parent, state.as_str_name()]);
        let after = pager.after::<String>(&req.page_token)?;
        let filter = (state != pb::ChangeRequestState::Unspecified).then_some(state as i16);
        let rows = change_requests::page(
            &self.engine.rt().read,
            &s.id,
            filter,
            after.as_ref().map(|(k, _)| k.as_str()),
            size as u64 + 1,
        )
        .await?;
        let (change_requests, next_page_token) = pager.page(
            &rows,
            size,
            |(_, cr)| cr.clone(),
            |(id, _)| (id.clone(), id.clone()),
        );
        Ok(pb::ListSegmentChangeRequestsResponse {
            change_requests,
            next_page_token,
        })
    }

    /// Approves (`approve`) or rejects a change request.
    pub(super) async fn review(
        &self,
        caller: Principal,
        name: String,
        comment: String,
        rid: String,
        approve: bool,
        request: impl prost::Message,
    ) -> Result<pb::SegmentChangeRequest> {
        let now = self.now();
        let rid = request_id("request_id", &rid)?;
        let comment = optional_text("comment", &comment, 2000)?.unwrap_or_default();
        let (seg, cr_id) = parse_cr_name("name", &name)?;
        let stored = change_requests::get(&self.engine.rt().read, &seg, &cr_id)
            .await?
            .ok_or_else(|| Error::NotFound(name.clone()))?;
        // The edit is validated again now: a segment its rule names may
        // have gone since the request was made.
        let edit = if approve && stored.state == pb::ChangeRequestState::Pending as i32 {
            let paths = stored
                .update_mask
                .as_ref()
                .map(|m| m.paths.clone())
                .unwrap_or_default();
            let proposed = stored.segment.clone().unwrap_or_default();
            // The request was valid when made; what no longer is (a segment
            // its rule names was deleted) is a precondition of approving.
            let parsed = self
                .parse_edit("change_request.segment.", &seg, &proposed, &paths)
                .await
                .map_err(|e| match e {
                    Error::InvalidArgument(v) => Error::FailedPrecondition {
                        reason: "CHANGE_REQUEST_INVALID",
                        message: format!(
                            "{name} can no longer be applied ({v}): reject it and propose the change again"
                        ),
                    },
                    other => other,
                })?;
            Some(parsed)
        } else {
            None
        };
        let scope = if approve {
            "ApproveSegmentChangeRequest"
        } else {
            "RejectSegmentChangeRequest"
        };
        let out = idempotency::write(self.engine.rt(), scope, rid, &request, now, async move |txn| {
            // Segment first, then the request: two reviews of one request
            // (or a review and an edit) are ordered, and the second sees
            // what the first committed.
            segments::lock(txn, &seg).await?;
            let before_cr = change_requests::get(txn, &seg, &cr_id)
                .await?
                .ok_or_else(|| Error::NotFound(name.clone()))?;
            let mut row = segments::get(txn, &seg)
                .await?
                .ok_or_else(|| Error::NotFound(format!("segments/{seg}")))?;
            access::check(&caller, access::APPROVE, &row)?;
            if before_cr.author == caller.subject {
                return Err(Error::PermissionDenied(format!(
                    "missing permission {} on {name}: its author ({}) cannot review it; another principal who owns the segment or is in its team (or an admin) must",
                    access::APPROVE,
                    before_cr.author
                )));
            }
            if before_cr.state != pb::ChangeRequestState::Pending as i32 {
                return Err(SegmentationError::NotPending {
                    name: name.clone(),
                    state: state_name(before_cr.state),
                }
                .into());
            }
            let mut after_cr = before_cr.clone();
            after_cr.reviewer = caller.subject.clone();
            after_cr.review_comment = comment;
            after_cr.review_time = Some(timestamp(now));
            let mut changes = Vec::new();
            if let Some(edit) = &edit {
                if before_cr.base_etag != etag(row.revision) {
                    return Err(SegmentationError::StaleChangeRequest {
                        name: name.clone(),
                        base: before_cr.base_etag.clone(),
                        current: etag(row.revision),
                    }
                    .into());
                }
                let before = edit::audit_view(txn, &row).await?;
                let applied = edit::apply(txn, edit, &mut row, now).await?;
                edit::store(txn, &mut row, &applied, &before_cr.author, now).await?;
                let after = edit::audit_view(txn, &row).await?;
                changes.push(
                    Change::update(&before.name, &before, &after)
                        .mask(before_cr.update_mask.as_ref()),
                );
                after_cr.state = pb::ChangeRequestState::Approved as i32;
                after_cr.applied_version = row.version;
            } else {
                after_cr.state = pb::ChangeRequestState::Rejected as i32;
            }
            change_requests::update(txn, &cr_id, &after_cr).await?;
            changes.push(Change::update(&name, &before_cr, &after_cr));
            audit::record_all(txn, crate::SERVICE, now, changes).await?;
            Ok((after_cr, Vec::new()))
        })
        .await?;
        if out.applied_version > 0 {
            self.engine.rt().operations.wake();
            self.engine.rt().timers.wake();
        }
        Ok(out)
    }

    pub(super) async fn membership_history(
        &self,
        req: pb::ListMembershipHistoryRequest,
    ) -> Result<pb::ListMembershipHistoryResponse> {
        if req.segment.is_empty() && req.customer.is_empty() {
            return Err(Error::invalid(
                "segment",
                "give a segment, a customer, or both",
            ));
        }
        let segment = if req.segment.is_empty() {
            None
        } else {
            Some(
                SegmentId::parse_name("segment", &req.segment)?
                    .0
                    .to_string(),
            )
        };
        let customer = if req.customer.is_empty() {
            None
        } else {
            Some(CustomerId::parse_name("customer", &req.customer)?.to_string())
        };
        let from_us = match &req.start_time {
            Some(t) => to_micros(from_timestamp("start_time", t)?),
            None => i64::MIN,
        };
        let to_us = match &req.end_time {
            Some(t) => to_micros(from_timestamp("end_time", t)?),
            None => i64::MAX,
        };
        if to_us < from_us {
            return Err(Error::invalid("end_time", "must not be before start_time"));
        }
        let size = page_size("page_size", req.page_size, DEFAULT_HISTORY_PAGE, MAX_PAGE)? as usize;
        let shape = format!("{from_us}|{to_us}");
        let pager = Pager::new(&["membershipHistory", &req.segment, &req.customer, &shape]);
        let after = pager.after::<history::After>(&req.page_token)?;
        let filter = history::Filter {
            segment,
            customer,
            from_us,
            to_us,
        };
        let rows = history::list(
            &self.engine.rt().read,
            &filter,
            after.as_ref().map(|(k, _)| k),
            size as u64 + 1,
        )
        .await?;
        let (entries, next_page_token) = pager.page(
            &rows,
            size,
            |e| pb::MembershipHistoryEntry {
                segment: format!("segments/{}", e.segment),
                customer: format!("customers/{}", e.customer),
                change: i32::from(e.change),
                change_time: Some(timestamp(from_micros(e.at_us))),
                segment_version: e.version,
                reason: i32::from(e.reason),
            },
            |e| {
                (
                    (e.at_us, e.segment.clone(), e.customer.clone(), e.change),
                    String::new(),
                )
            },
        );
        Ok(pb::ListMembershipHistoryResponse {
            entries,
            next_page_token,
        })
    }

    pub(super) async fn performance(
        &self,
        req: pb::GetSegmentPerformanceRequest,
    ) -> Result<pb::SegmentPerformance> {
        let s = self.existing("name", &req.name).await?;
        let now_us = to_micros(self.now());
        let last = match &req.end_time {
            Some(t) => day_start(to_micros(from_timestamp("end_time", t)?)),
            None => day_start(now_us),
        };
        let first = match &req.start_time {
            Some(t) => day_start(to_micros(from_timestamp("start_time", t)?)),
            None => last - (DEFAULT_PERIOD_DAYS - 1) * DAY_US,
        };
        if last < first {
            return Err(Error::invalid("end_time", "must not be before start_time"));
        }
        if (last - first) / DAY_US >= MAX_PERIOD_DAYS {
            return Err(Error::invalid(
                "end_time",
                format!("the period is at most {MAX_PERIOD_DAYS} days"),
            ));
        }
        let rt = self.engine.rt();
        let db = &rt.read;
        let end = last + DAY_US;
        let sizes = history::sizes(db, &s.id, first, end).await?;
        let (entries, exits) = history::daily_movement(db, &s.id, first, end).await?;
        let mut days = Vec::new();
        let mut day = first;
        while day < end {
            let size = sizes.get(&day).copied();
            let e = entries.get(&day).copied().unwrap_or(0);
            let x = exits.get(&day).copied().unwrap_or(0);
            let n = size.unwrap_or(0);
            days.push(pb::SegmentDay {
                day: Some(timestamp(from_micros(day))),
                size: n,
                entries: e,
                exits: x,
                volatility: if n == 0 {
                    0.0
                } else {
                    (e + x) as f64 / n as f64
                },
                snapshot_taken: size.is_some(),
            });
            day += DAY_US;
        }
        let ids = [s.id.clone()];
        let evaluated = objectives::evaluate(
            db,
            &ids,
            now_us,
            rt.config.segmentation.objective_trend_days,
        )
        .await?
        .remove(&s.id)
        .unwrap_or_default();
        let points = stored_objectives::snapshots(db, &ids, first, end).await?;
        let objectives = evaluated
            .iter()
            .map(|(o, e)| pb::ObjectiveSeries {
                objective: Some(objectives::to_proto(o, Some(e))),
                points: points
                    .iter()
                    .filter(|p| p.objective_id == o.objective_id)
                    .map(|p| pb::ObjectivePoint {
                        day: Some(timestamp(from_micros(p.day_us))),
                        value: p.value,
                        status: i32::from(p.status),
                    })
                    .collect(),
            })
            .collect();
        let m = objectives::measure(db, &ids, &[], true, now_us).await?;
        let facts = m.facts.get(&s.id).cloned().unwrap_or_default();
        let funnel = metrics::STAGES
            .iter()
            .map(|st| pb::StageCount {
                stage: i32::from(*st),
                count: facts.stages.get(st).copied().unwrap_or(0),
            })
            .collect();
        let mut clv: Vec<pb::CurrencyAmount> = m
            .lifetime
            .iter()
            .filter(|((seg, _), _)| *seg == s.id)
            .map(|((_, currency), total)| pb::CurrencyAmount {
                currency: currency.clone(),
                average_minor: if facts.size == 0 {
                    0
                } else {
                    total / facts.size
                },
                total_minor: *total,
            })
            .collect();
        clv.sort_by(|a, b| a.currency.cmp(&b.currency));
        Ok(pb::SegmentPerformance {
            segment: format!("segments/{}", s.id),
            days,
            objectives,
            funnel,
            clv,
            nps: objectives::nps(&facts),
            nps_responses: facts.nps_answers,
            member_count: facts.size,
        })
    }

    pub(super) async fn watch_alerts(
        &self,
        req: pb::WatchObjectiveAlertsRequest,
    ) -> Result<AlertStream> {
        if !req.segment.is_empty() {
            SegmentId::parse_name("segment", &req.segment)?;
        }
        if req.after_sequence < 0 {
            return Err(Error::invalid("after_sequence", "must not be negative"));
        }
        let alerting = [
            pb::ObjectiveStatus::AtRisk as i32,
            pb::ObjectiveStatus::Met as i32,
            pb::ObjectiveStatus::Missed as i32,
        ];
        let stream = clm_platform::changes::watch_own(
            self.engine.rt(),
            req.after_sequence,
            move |sequence, alert: pb::ObjectiveStatusChanged| {
                let wanted = alerting.contains(&alert.status)
                    && (req.segment.is_empty() || alert.segment == req.segment);
                wanted.then_some(pb::WatchObjectiveAlertsResponse {
                    sequence,
                    alert: Some(alert),
                })
            },
        )
        .await?;
        Ok(Box::pin(stream))
    }
}
