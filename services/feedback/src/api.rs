//! `clm.feedback.v1.FeedbackService`: each rpc authorizes (one [`respond`]
//! call), converts the request, runs one read or one write transaction,
//! and converts the result back.

use crate::convert::{self, survey_id};
use crate::error::{FeedbackError, state_name};
use crate::store::surveys::{self, Lock};
use crate::store::{invitations, policy, responses};
use crate::{invite, submit, summary};
use clm_domain::validation::{page_size, request_id};
use clm_domain::{Violation, Violations};
use clm_platform::audit::{self, Change};
use clm_platform::auth::{Policy, Role};
use clm_platform::convert::{check_etag, duration_millis, etag, from_timestamp, timestamp};
use clm_platform::db::{from_micros, to_micros};
use clm_platform::error::respond;
use clm_platform::outbox::NewEvent;
use clm_platform::page::Pager;
use clm_platform::{Error, Result, Runtime, idempotency};
use clm_proto::feedback as pb;
use clm_proto::feedback::feedback_service_server::FeedbackService;
use tonic::{Request, Response, Status};

/// Roles that write surveys and the fatigue policy.
const WRITERS: &[Role] = &[Role::Marketer];
/// Roles that invite: marketers, and platforms that send surveys.
const INVITERS: &[Role] = &[Role::Marketer, Role::Service];
/// Roles that submit answers: the platforms that show surveys.
const SUBMITTERS: &[Role] = &[Role::Service];
/// Roles that read surveys, invitations and summaries.
const READERS: &[Role] = &[
    Role::Marketer,
    Role::Analyst,
    Role::Service,
    Role::SegmentOwner,
    Role::DataSteward,
];
/// Roles that read individual responses (personal data).
const RESPONSE_READERS: &[Role] = &[
    Role::Marketer,
    Role::Analyst,
    Role::Service,
    Role::DataSteward,
];

/// Who may call each rpc (admin may call all).
pub const POLICY: Policy = Policy {
    service: "clm.feedback.v1.FeedbackService",
    rules: &[
        ("CreateSurvey", WRITERS),
        ("GetSurvey", READERS),
        ("ListSurveys", READERS),
        ("UpdateSurvey", WRITERS),
        ("PublishSurvey", WRITERS),
        ("CloseSurvey", WRITERS),
        ("CreateInvitations", INVITERS),
        ("ListInvitations", READERS),
        ("SubmitResponse", SUBMITTERS),
        ("GetResponse", RESPONSE_READERS),
        ("ListResponses", RESPONSE_READERS),
        ("GetSurveySummary", READERS),
        ("GetCustomerFeedback", READERS),
        ("GetFatiguePolicy", READERS),
        ("UpdateFatiguePolicy", WRITERS),
    ],
};

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;
/// Most customers in one CreateInvitations call.
pub const MAX_INVITATIONS: usize = 1000;
const POLICY_NAME: &str = "fatiguePolicy";

/// The feedback service.
#[derive(Debug, Clone)]
pub struct FeedbackApi {
    rt: Runtime,
}

/// A survey as answered: the stored version with the row's state and counters.
fn shown(s: &surveys::Stored) -> pb::Survey {
    let r = &s.row;
    let mut out = s.body.clone();
    out.name = format!("surveys/{}", r.id);
    out.state = i32::from(r.state);
    out.version = s.version;
    out.response_limit = r.response_limit;
    out.completed_responses = r.completed;
    out.create_time = Some(timestamp(from_micros(r.create_us)));
    out.update_time = Some(timestamp(from_micros(r.update_us)));
    out.etag = etag(r.revision);
    out
}

/// Only the writable fields of a survey, as a version stores them.
fn writable(s: &pb::Survey) -> pb::Survey {
    pb::Survey {
        display_name: s.display_name.trim().to_owned(),
        default_language: s.default_language.clone(),
        questions: s.questions.clone(),
        targeting: s.targeting.clone(),
        response_limit: s.response_limit,
        recontact_period: s.recontact_period,
        publish_time: s.publish_time,
        close_time: s.close_time,
        ..Default::default()
    }
}

fn policy_to_proto(r: &policy::Row) -> pb::FatiguePolicy {
    pb::FatiguePolicy {
        name: POLICY_NAME.into(),
        max_invitations: r.max_invitations,
        period: Some(clm_platform::convert::duration_from_millis(
            r.period_us / 1000,
        )),
        etag: etag(r.revision),
        update_time: (r.update_us > 0).then(|| timestamp(from_micros(r.update_us))),
    }
}

impl FeedbackApi {
    /// Serves from `rt`.
    pub fn new(rt: Runtime) -> Self {
        Self { rt }
    }

    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        clm_domain::clock::micros(self.rt.clock.now())
    }

    /// Publishes or closes survey `name`.
    async fn change_state(
        &self,
        rpc: &'static str,
        name: &str,
        sent_etag: &str,
        rid: &str,
        req: &impl prost::Message,
        to: pb::SurveyState,
    ) -> Result<pb::Survey> {
        let id = survey_id("name", name).map_err(Error::from)?;
        let rid = request_id("request_id", rid)?;
        let now = self.now();
        idempotency::write(&self.rt, rpc, rid, req, now, async |txn| {
            let mut s = surveys::get(txn, &id, 0, Lock::Update)
                .await?
                .ok_or_else(|| Error::NotFound(format!("surveys/{id}")))?;
            if !sent_etag.is_empty() {
                check_etag(sent_etag, s.row.revision)?;
            }
            let before = shown(&s);
            let allowed = match to {
                pb::SurveyState::Published => s.row.state == pb::SurveyState::Draft as i16,
                _ => s.row.state != pb::SurveyState::Closed as i16,
            };
            if !allowed {
                return Err(FeedbackError::WrongState {
                    survey: id.clone(),
                    state: state_name(s.row.state),
                    what: if to == pb::SurveyState::Published {
                        "only a draft can be published"
                    } else {
                        "it is closed already"
                    },
                }
                .into());
            }
            let us = to_micros(now);
            s.row.state = to as i16;
            s.row.revision += 1;
            s.row.update_us = us;
            if to == pb::SurveyState::Published {
                s.body.publish_time = Some(timestamp(now));
            } else {
                s.body.close_time = Some(timestamp(now));
            }
            // The times live in the version's body: store it again as is.
            surveys::save(txn, &s.row).await?;
            surveys::replace_body(txn, &id, s.version, &s.body).await?;
            let after = shown(&s);
            audit::record(
                txn,
                crate::SERVICE,
                now,
                Change::update(&after.name, &before, &after),
            )
            .await?;
            let event = if to == pb::SurveyState::Published {
                NewEvent::new(
                    &after.name,
                    &pb::SurveyPublished {
                        survey: Some(after.clone()),
                    },
                )
            } else {
                NewEvent::new(
                    &after.name,
                    &pb::SurveyClosed {
                        survey: after.name.clone(),
                    },
                )
            };
            Ok((after, vec![event]))
        })
        .await
    }
}

fn check_period(
    v: &mut Violations,
    field: &str,
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> (Option<i64>, Option<i64>) {
    let s = start.and_then(|t| v.check("", from_timestamp(&format!("{field}start_time"), t)));
    let e = end.and_then(|t| v.check("", from_timestamp(&format!("{field}end_time"), t)));
    if let (Some(s), Some(e)) = (s, e)
        && e <= s
    {
        v.push(Violation::new(
            format!("{field}end_time"),
            "must be after start_time",
        ));
    }
    (s.map(to_micros), e.map(to_micros))
}

#[tonic::async_trait]
impl FeedbackService for FeedbackApi {
    async fn create_survey(
        &self,
        request: Request<pb::CreateSurveyRequest>,
    ) -> Result<Response<pb::Survey>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let mut v = Violations::new();
            let rid = v.check("", request_id("request_id", &req.request_id));
            let mut body = req
                .survey
                .clone()
                .ok_or_else(|| Error::invalid("survey", "is required"))?;
            if let Err(e) = convert::normalize("survey", &mut body) {
                v.0.extend(e.0);
            }
            let id = if req.survey_id.is_empty() {
                format!("s-{}", uuid::Uuid::now_v7().simple())
            } else {
                req.survey_id.clone()
            };
            if !convert::valid_survey_id(&id) {
                v.push(Violation::new(
                    "survey_id",
                    "must be 1-64 characters of a-z, 0-9 and -",
                ));
            }
            v.into_result()?;
            let body = writable(&body);
            let now = self.now();
            idempotency::write(
                &self.rt,
                "CreateSurvey",
                rid.flatten(),
                &req,
                now,
                async |txn| {
                    if surveys::row(txn, &id, Lock::None).await?.is_some() {
                        return Err(FeedbackError::SurveyExists(id.clone()).into());
                    }
                    let row = surveys::insert(txn, &id, &body, to_micros(now)).await?;
                    let out = shown(&surveys::Stored {
                        row,
                        body: body.clone(),
                        version: 1,
                    });
                    audit::record(txn, crate::SERVICE, now, Change::create(&out.name, &out))
                        .await?;
                    Ok((out, Vec::new()))
                },
            )
            .await
        })
        .await
    }

    async fn get_survey(
        &self,
        request: Request<pb::GetSurveyRequest>,
    ) -> Result<Response<pb::Survey>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let id = survey_id("name", &req.name)?;
            if req.version < 0 {
                return Err(Error::invalid("version", "must not be negative"));
            }
            let s = surveys::get(&self.rt.read, &id, req.version, Lock::None)
                .await?
                .ok_or_else(|| {
                    Error::NotFound(if req.version == 0 {
                        format!("surveys/{id}")
                    } else {
                        format!("surveys/{id} version {}", req.version)
                    })
                })?;
            Ok(shown(&s))
        })
        .await
    }

    async fn list_surveys(
        &self,
        request: Request<pb::ListSurveysRequest>,
    ) -> Result<Response<pb::ListSurveysResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let size = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)?;
            let state = match pb::SurveyState::try_from(req.state) {
                Ok(pb::SurveyState::Unspecified) => None,
                Ok(s) => Some(s as i16),
                Err(_) => return Err(Error::invalid("state", "is not a survey state")),
            };
            let state_key = req.state.to_string();
            let pager = Pager::new(&["surveys", &state_key]);
            let after: Option<(i64, String)> = pager.after(&req.page_token)?;
            let rows = surveys::list(&self.rt.read, state, after, u64::from(size) + 1).await?;
            let stored = surveys::with_bodies(&self.rt.read, rows).await?;
            let (surveys, next) = pager.page(&stored, size as usize, shown, |s| {
                (s.row.create_us, s.row.id.clone())
            });
            Ok(pb::ListSurveysResponse {
                surveys,
                next_page_token: next,
            })
        })
        .await
    }

    async fn update_survey(
        &self,
        request: Request<pb::UpdateSurveyRequest>,
    ) -> Result<Response<pb::Survey>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let mut v = Violations::new();
            let rid = v.check("", request_id("request_id", &req.request_id));
            let sent = req
                .survey
                .clone()
                .ok_or_else(|| Error::invalid("survey", "is required"))?;
            let id = survey_id("survey.name", &sent.name)?;
            let paths: Vec<String> = req
                .update_mask
                .as_ref()
                .map(|m| m.paths.clone())
                .unwrap_or_default();
            if paths.is_empty() {
                v.push(Violation::new(
                    "update_mask",
                    "must name the fields to change",
                ));
            }
            const FIELDS: &[&str] = &[
                "display_name",
                "default_language",
                "questions",
                "targeting",
                "response_limit",
                "recontact_period",
            ];
            for (i, p) in paths.iter().enumerate() {
                if !FIELDS.contains(&p.as_str()) {
                    v.push(Violation::new(
                        format!("update_mask.paths[{i}]"),
                        format!("cannot be changed; one of: {}", FIELDS.join(", ")),
                    ));
                }
            }
            v.into_result()?;
            let now = self.now();
            idempotency::write(
                &self.rt,
                "UpdateSurvey",
                rid.flatten(),
                &req,
                now,
                async |txn| {
                    let mut s = surveys::get(txn, &id, 0, Lock::Update)
                        .await?
                        .ok_or_else(|| Error::NotFound(format!("surveys/{id}")))?;
                    check_etag(&sent.etag, s.row.revision)?;
                    if s.row.state == pb::SurveyState::Closed as i16 {
                        return Err(FeedbackError::WrongState {
                            survey: id.clone(),
                            state: state_name(s.row.state),
                            what: "a closed survey cannot change",
                        }
                        .into());
                    }
                    let before = shown(&s);
                    let mut next = s.body.clone();
                    for p in &paths {
                        match p.as_str() {
                            "display_name" => next.display_name.clone_from(&sent.display_name),
                            "default_language" => {
                                next.default_language.clone_from(&sent.default_language)
                            }
                            "questions" => next.questions.clone_from(&sent.questions),
                            "targeting" => next.targeting.clone_from(&sent.targeting),
                            "response_limit" => next.response_limit = sent.response_limit,
                            _ => next.recontact_period = sent.recontact_period,
                        }
                    }
                    convert::normalize("survey", &mut next)?;
                    let next = writable(&next);
                    let us = to_micros(now);
                    s.row.revision += 1;
                    s.row.update_us = us;
                    s.row.response_limit = next.response_limit;
                    if next.questions != s.body.questions
                        || next.default_language != s.body.default_language
                    {
                        s.row.version += 1;
                        surveys::insert_version(txn, &id, s.row.version, &next).await?;
                        s.version = s.row.version;
                    } else {
                        surveys::replace_body(txn, &id, s.version, &next).await?;
                    }
                    s.body = next;
                    surveys::save(txn, &s.row).await?;
                    let after = shown(&s);
                    audit::record(
                        txn,
                        crate::SERVICE,
                        now,
                        Change::update(&after.name, &before, &after).mask(req.update_mask.as_ref()),
                    )
                    .await?;
                    Ok((after, Vec::new()))
                },
            )
            .await
        })
        .await
    }

    async fn publish_survey(
        &self,
        request: Request<pb::PublishSurveyRequest>,
    ) -> Result<Response<pb::Survey>, Status> {
        respond(request, &POLICY, |_, req| async move {
            self.change_state(
                "PublishSurvey",
                &req.name,
                &req.etag,
                &req.request_id,
                &req,
                pb::SurveyState::Published,
            )
            .await
        })
        .await
    }

    async fn close_survey(
        &self,
        request: Request<pb::CloseSurveyRequest>,
    ) -> Result<Response<pb::Survey>, Status> {
        respond(request, &POLICY, |_, req| async move {
            self.change_state(
                "CloseSurvey",
                &req.name,
                &req.etag,
                &req.request_id,
                &req,
                pb::SurveyState::Closed,
            )
            .await
        })
        .await
    }

    async fn create_invitations(
        &self,
        request: Request<pb::CreateInvitationsRequest>,
    ) -> Result<Response<pb::CreateInvitationsResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let mut v = Violations::new();
            let rid = v.check("", request_id("request_id", &req.request_id));
            let id = v.check("", survey_id("survey", &req.survey));
            if req.customers.is_empty() || req.customers.len() > MAX_INVITATIONS {
                v.push(Violation::new(
                    "customers",
                    format!("must hold 1 to {MAX_INVITATIONS} customers"),
                ));
            }
            let mut seen = std::collections::HashSet::new();
            for (i, c) in req.customers.iter().enumerate() {
                let f = format!("customers[{i}]");
                if v.check("", convert::customer_name(&f, c)).is_some() && !seen.insert(c) {
                    v.push(Violation::new(f, "is listed twice"));
                }
            }
            match clm_proto::customer::ConsentChannel::try_from(req.channel) {
                Ok(clm_proto::customer::ConsentChannel::Unspecified) => {
                    v.push(Violation::new("channel", "is required"))
                }
                Ok(_) => {}
                Err(_) => v.push(Violation::new("channel", "is not a channel")),
            }
            let ttl = req
                .ttl
                .as_ref()
                .and_then(|d| v.check("", convert::ttl_ms("ttl", d)));
            v.into_result()?;
            let Some(id) = id else {
                return Err(Error::internal("survey id missing"));
            };
            // The target segment is asked of segmentation before the
            // transaction; membership can change meanwhile, as it can
            // after the invitation is made.
            let stored = surveys::get(&self.rt.read, &id, 0, Lock::None)
                .await?
                .ok_or_else(|| Error::NotFound(format!("surveys/{id}")))?;
            let members = match invite::target_segment(&stored.body) {
                Some(segment) => {
                    Some(crate::segments::members(&self.rt, segment, &req.customers).await?)
                }
                None => None,
            };
            let now = self.now();
            let out = idempotency::write(
                &self.rt,
                "CreateInvitations",
                rid.flatten(),
                &req,
                now,
                async |txn| {
                    let out = invite::invite(
                        txn,
                        invite::Request {
                            survey: &id,
                            customers: &req.customers,
                            channel: req.channel,
                            ttl_ms: ttl,
                            members: members.as_ref(),
                            now_us: to_micros(now),
                        },
                    )
                    .await?;
                    audit::record_all(txn, crate::SERVICE, now, out.audit).await?;
                    Ok((out.response, out.events))
                },
            )
            .await?;
            self.rt.timers.wake();
            Ok(out)
        })
        .await
    }

    async fn list_invitations(
        &self,
        request: Request<pb::ListInvitationsRequest>,
    ) -> Result<Response<pb::ListInvitationsResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let mut v = Violations::new();
            let size = v.check(
                "",
                page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE),
            );
            let survey = if req.parent == "surveys/-" {
                if req.customer.is_empty() {
                    v.push(Violation::new(
                        "customer",
                        "is required when parent is surveys/-",
                    ));
                }
                None
            } else {
                v.check("", survey_id("parent", &req.parent))
            };
            let customer = if req.customer.is_empty() {
                None
            } else {
                v.check("", convert::customer_name("customer", &req.customer))
            };
            v.into_result()?;
            let size = size.unwrap_or(DEFAULT_PAGE);
            let pager = Pager::new(&["invitations", &req.parent, &req.customer]);
            let after: Option<(i64, String)> = pager.after(&req.page_token)?;
            let rows = invitations::list(
                &self.rt.read,
                survey.as_deref(),
                customer.as_deref(),
                after,
                u64::from(size) + 1,
            )
            .await?;
            let (invitations, next) = pager.page(&rows, size as usize, invite::to_proto, |r| {
                (r.create_us, r.id.clone())
            });
            Ok(pb::ListInvitationsResponse {
                invitations,
                next_page_token: next,
            })
        })
        .await
    }

    async fn submit_response(
        &self,
        request: Request<pb::SubmitResponseRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let out = submit::submit(&self.rt, req).await?;
            self.rt.timers.wake();
            Ok(out)
        })
        .await
    }

    async fn get_response(
        &self,
        request: Request<pb::GetResponseRequest>,
    ) -> Result<Response<pb::Response>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let (survey, id) = convert::child("name", &req.name, "responses")?;
            let row = responses::get(&self.rt.read, &survey, &id)
                .await?
                .ok_or_else(|| Error::NotFound(req.name.clone()))?;
            submit::page_to_proto(&self.rt.read, &survey, std::slice::from_ref(&row))
                .await?
                .pop()
                .ok_or_else(|| Error::NotFound(req.name.clone()))
        })
        .await
    }

    async fn list_responses(
        &self,
        request: Request<pb::ListResponsesRequest>,
    ) -> Result<Response<pb::ListResponsesResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let mut v = Violations::new();
            let size = v.check(
                "",
                page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE),
            );
            let survey = v.check("", survey_id("parent", &req.parent));
            v.into_result()?;
            let (Some(size), Some(survey)) = (size, survey) else {
                return Err(Error::internal("validated fields missing"));
            };
            let completed = req.completed_only.to_string();
            let pager = Pager::new(&["responses", &req.parent, &completed]);
            let after: Option<(i64, String)> = pager.after(&req.page_token)?;
            let rows = responses::list(
                &self.rt.read,
                &survey,
                req.completed_only,
                after,
                u64::from(size) + 1,
            )
            .await?;
            let shown = submit::page_to_proto(&self.rt.read, &survey, &rows).await?;
            let keyed: Vec<(&responses::Row, pb::Response)> = rows.iter().zip(shown).collect();
            let (responses, next) = pager.page(
                &keyed,
                size as usize,
                |(_, r)| r.clone(),
                |(row, _)| (row.create_us, row.id.clone()),
            );
            Ok(pb::ListResponsesResponse {
                responses,
                next_page_token: next,
            })
        })
        .await
    }

    async fn get_customer_feedback(
        &self,
        request: Request<pb::GetCustomerFeedbackRequest>,
    ) -> Result<Response<pb::CustomerFeedback>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let customer = convert::customer_name("customer", &req.customer)?;
            let (nps, csat, completed) =
                responses::customer_feedback(&self.rt.read, &customer).await?;
            let time = |at: i64| Some(timestamp(from_micros(at)));
            Ok(pb::CustomerFeedback {
                customer,
                last_nps: nps.map(|(n, _)| n),
                last_nps_category: nps.map_or(pb::NpsCategory::Unspecified, |(n, _)| {
                    convert::nps_category(clm_domain::survey::Kind::Nps, n)
                }) as i32,
                last_nps_time: nps.and_then(|(_, at)| time(at)),
                last_csat: csat.map(|(n, _)| n),
                last_csat_time: csat.and_then(|(_, at)| time(at)),
                completed_responses: completed,
            })
        })
        .await
    }

    async fn get_survey_summary(
        &self,
        request: Request<pb::GetSurveySummaryRequest>,
    ) -> Result<Response<pb::SurveySummary>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let mut v = Violations::new();
            let survey = v.check("", survey_id("survey", &req.survey));
            if req.survey_version < 0 {
                v.push(Violation::new("survey_version", "must not be negative"));
            }
            let (start_us, end_us) =
                check_period(&mut v, "", req.start_time.as_ref(), req.end_time.as_ref());
            let stage = match req.stage {
                0 => None,
                s => v
                    .check("", clm_platform::customer_events::stage("stage", s))
                    .map(|s| s.code()),
            };
            let segment = if req.segment.is_empty() {
                None
            } else if req
                .segment
                .strip_prefix("segments/")
                .is_some_and(convert::valid_child_id)
            {
                Some(req.segment.clone())
            } else {
                v.push(Violation::new("segment", "must be segments/{segment_id}"));
                None
            };
            let bucket_us = match &req.trend_bucket {
                None => None,
                Some(d) => match duration_millis("trend_bucket", d) {
                    Ok(ms) if (3_600_000..=366 * convert::DAY_MS).contains(&ms) => Some(ms * 1000),
                    Ok(_) => {
                        v.push(Violation::new("trend_bucket", "must be 1 hour to 366 days"));
                        None
                    }
                    Err(e) => {
                        v.push(e);
                        None
                    }
                },
            };
            v.into_result()?;
            let Some(survey) = survey else {
                return Err(Error::internal("survey id missing"));
            };
            let s = surveys::get(&self.rt.read, &survey, 0, Lock::None)
                .await?
                .ok_or_else(|| Error::NotFound(format!("surveys/{survey}")))?;
            if req.survey_version > s.row.version {
                return Err(Error::NotFound(format!(
                    "surveys/{survey} version {}",
                    req.survey_version
                )));
            }
            let versions = surveys::question_ids(&self.rt.read, &survey).await?;
            let filter = crate::store::summary::Filter {
                survey,
                version: req.survey_version,
                start_us,
                end_us,
                stage,
                segment,
                completed_only: req.completed_only,
            };
            summary::summarise(&self.rt.reports, &filter, &versions, bucket_us, self.now()).await
        })
        .await
    }

    async fn get_fatigue_policy(
        &self,
        request: Request<pb::GetFatiguePolicyRequest>,
    ) -> Result<Response<pb::FatiguePolicy>, Status> {
        respond(request, &POLICY, |_, req| async move {
            if req.name != POLICY_NAME {
                return Err(Error::invalid("name", "must be fatiguePolicy"));
            }
            Ok(policy_to_proto(&policy::get(&self.rt.read).await?))
        })
        .await
    }

    async fn update_fatigue_policy(
        &self,
        request: Request<pb::UpdateFatiguePolicyRequest>,
    ) -> Result<Response<pb::FatiguePolicy>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let mut v = Violations::new();
            let rid = v.check("", request_id("request_id", &req.request_id));
            let sent = req
                .policy
                .clone()
                .ok_or_else(|| Error::invalid("policy", "is required"))?;
            if !sent.name.is_empty() && sent.name != POLICY_NAME {
                v.push(Violation::new("policy.name", "must be fatiguePolicy"));
            }
            let paths: Vec<String> = req
                .update_mask
                .as_ref()
                .map(|m| m.paths.clone())
                .unwrap_or_default();
            if paths.is_empty() {
                v.push(Violation::new(
                    "update_mask",
                    "must name the fields to change",
                ));
            }
            for (i, p) in paths.iter().enumerate() {
                if p != "max_invitations" && p != "period" {
                    v.push(Violation::new(
                        format!("update_mask.paths[{i}]"),
                        "cannot be changed; one of: max_invitations, period",
                    ));
                }
            }
            let wants = |f: &str| paths.iter().any(|p| p == f);
            if wants("max_invitations") && !(0..=1000).contains(&sent.max_invitations) {
                v.push(Violation::new(
                    "policy.max_invitations",
                    "must be 0 (no cap) to 1000",
                ));
            }
            let period_ms = if wants("period") {
                match sent.period.as_ref() {
                    None => {
                        v.push(Violation::new("policy.period", "is required"));
                        None
                    }
                    Some(d) => match duration_millis("policy.period", d) {
                        Ok(ms) if (3_600_000..=convert::MAX_SPAN_MS).contains(&ms) => Some(ms),
                        Ok(_) => {
                            v.push(Violation::new(
                                "policy.period",
                                "must be 1 hour to 365 days",
                            ));
                            None
                        }
                        Err(e) => {
                            v.push(e);
                            None
                        }
                    },
                }
            } else {
                None
            };
            v.into_result()?;
            let now = self.now();
            idempotency::write(
                &self.rt,
                "UpdateFatiguePolicy",
                rid.flatten(),
                &req,
                now,
                async |txn| {
                    let mut row = policy::lock(txn).await?;
                    if !sent.etag.is_empty() {
                        check_etag(&sent.etag, row.revision)?;
                    }
                    let before = policy_to_proto(&row);
                    if wants("max_invitations") {
                        row.max_invitations = sent.max_invitations;
                    }
                    if let Some(ms) = period_ms {
                        row.period_us = ms * 1000;
                    }
                    row.revision += 1;
                    row.update_us = to_micros(now);
                    policy::put(txn, row.clone()).await?;
                    let after = policy_to_proto(&row);
                    audit::record(
                        txn,
                        crate::SERVICE,
                        now,
                        Change::update(POLICY_NAME, &before, &after).mask(req.update_mask.as_ref()),
                    )
                    .await?;
                    Ok((after, Vec::new()))
                },
            )
            .await
        })
        .await
    }
}
