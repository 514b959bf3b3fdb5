//! Making invitations, shared by `CreateInvitations`, the customer-stream
//! triggers (entering a stage) and the after-purchase timers. Everything is
//! checked inside the caller's transaction, under the locks that order
//! invitation writes: the survey row shared (a close waits), then the
//! customers' rows in customer order (two invitations of one customer take
//! turns, so the fatigue cap and the cadence cannot be raced past).
//!
//! Refusals, in the order they are checked: no survey consent on the
//! channel (`NO_SURVEY_CONSENT`), not in the target segment
//! (`NOT_IN_SEGMENT`), the fatigue cap (`FATIGUE_CAP`: at most N
//! invitations per customer in the sliding period, across all surveys and
//! channels), the recontact cadence (`RECONTACT_CADENCE`: this survey at
//! most once per period).

use crate::convert;
use crate::error::{FeedbackError, state_name};
use crate::store::surveys::{self, Lock};
use crate::store::{customers, invitations, policy};
use clm_platform::audit::Change;
use clm_platform::outbox::NewEvent;
use clm_platform::timers::{self, Arm};
use clm_platform::{Error, Result};
use clm_proto::feedback as pb;
use sea_orm::DatabaseTransaction;
use std::collections::HashSet;

/// The timer kind that expires invitations.
pub const EXPIRY: &str = "feedback.invitation_expiry";

/// What to invite.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The survey id.
    pub survey: &'a str,
    /// The customers (`customers/{id}`), distinct.
    pub customers: &'a [String],
    /// The channel; 0 = the survey's targeting channel.
    pub channel: i32,
    /// Lifetime (ms); `None` = the survey's.
    pub ttl_ms: Option<i64>,
    /// Members of the survey's target segment among `customers`, when the
    /// survey targets one (asked of segmentation before the transaction).
    pub members: Option<&'a HashSet<String>>,
    /// Now (µs).
    pub now_us: i64,
}

/// What was made and refused.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The response to answer.
    pub response: pb::CreateInvitationsResponse,
    /// One event per invitation.
    pub events: Vec<NewEvent>,
    /// One audit change per invitation.
    pub audit: Vec<Change>,
}

fn refuse(
    customer: &str,
    reason: &str,
    code: tonic::Code,
    message: String,
) -> pb::InvitationRefusal {
    pb::InvitationRefusal {
        customer: customer.to_owned(),
        reason: reason.to_owned(),
        code: code as i32,
        message,
    }
}

/// The segment a survey targets, if any.
pub fn target_segment(s: &pb::Survey) -> Option<&str> {
    match s.targeting.as_ref()?.audience.as_ref()? {
        pb::targeting::Audience::Segment(name) => Some(name),
        _ => None,
    }
}

/// Invites `req.customers` in `txn`.
pub async fn invite(txn: &DatabaseTransaction, req: Request<'_>) -> Result<Outcome> {
    let stored = surveys::get(txn, req.survey, 0, Lock::Share)
        .await?
        .ok_or_else(|| Error::NotFound(format!("surveys/{}", req.survey)))?;
    let row = &stored.row;
    if row.state != pb::SurveyState::Published as i16 {
        return Err(FeedbackError::WrongState {
            survey: req.survey.to_owned(),
            state: state_name(row.state),
            what: "only a published survey takes invitations",
        }
        .into());
    }
    if row.response_limit > 0 && row.completed >= row.response_limit {
        return Err(FeedbackError::ResponseLimit {
            survey: req.survey.to_owned(),
            limit: row.response_limit,
        }
        .into());
    }
    let body = &stored.body;
    let channel = if req.channel == 0 {
        body.targeting.as_ref().map_or(0, |t| t.channel)
    } else {
        req.channel
    };
    let ttl_us = req.ttl_ms.unwrap_or_else(|| convert::survey_ttl_ms(body)) * 1000;
    let known = customers::lock(txn, req.customers).await?;
    let known: std::collections::HashMap<&str, &customers::Row> =
        known.iter().map(|r| (r.customer.as_str(), r)).collect();
    let fatigue = policy::get(txn).await?;
    let counts = if fatigue.max_invitations > 0 {
        invitations::counts_since(txn, req.customers, req.now_us - fatigue.period_us).await?
    } else {
        Default::default()
    };
    let recontact_us = convert::recontact_ms(body) * 1000;
    let recent = if recontact_us > 0 {
        invitations::invited_since(txn, req.survey, req.customers, req.now_us - recontact_us)
            .await?
    } else {
        Default::default()
    };
    let channel_name = clm_proto::customer::ConsentChannel::try_from(channel)
        .map_or("unknown", |c| c.as_str_name());
    let mut out = Outcome::default();
    let mut rows = Vec::new();
    let mut arms = Vec::new();
    for customer in req.customers {
        let row = known.get(customer.as_str());
        let consent = row.is_some_and(|r| r.consent & customers::bit(channel) != 0);
        if !consent {
            out.response.refusals.push(refuse(
                customer,
                "NO_SURVEY_CONSENT",
                tonic::Code::FailedPrecondition,
                format!("{customer} has not granted survey consent on {channel_name}"),
            ));
            continue;
        }
        if let Some(members) = req.members
            && !members.contains(customer)
        {
            out.response.refusals.push(refuse(
                customer,
                "NOT_IN_SEGMENT",
                tonic::Code::FailedPrecondition,
                format!(
                    "{customer} is not in {}, the survey's target",
                    target_segment(body).unwrap_or("the segment")
                ),
            ));
            continue;
        }
        let sent = counts.get(customer).copied().unwrap_or(0);
        if fatigue.max_invitations > 0 && sent >= i64::from(fatigue.max_invitations) {
            out.response.refusals.push(refuse(
                customer,
                "FATIGUE_CAP",
                tonic::Code::ResourceExhausted,
                format!(
                    "{customer} had {sent} invitations in the last {} days (fatigue cap {})",
                    fatigue.period_us / 86_400_000_000,
                    fatigue.max_invitations
                ),
            ));
            continue;
        }
        if recent.contains(customer) {
            out.response.refusals.push(refuse(
                customer,
                "RECONTACT_CADENCE",
                tonic::Code::ResourceExhausted,
                format!(
                    "{customer} was invited to surveys/{} in the last {} days (recontact cadence)",
                    req.survey,
                    recontact_us / 86_400_000_000
                ),
            ));
            continue;
        }
        let id = uuid::Uuid::now_v7().simple().to_string();
        let language = convert::language_for(body, row.and_then(|r| r.language.as_deref()));
        let inv = invitations::Row {
            id: id.clone(),
            survey_id: req.survey.to_owned(),
            customer: customer.clone(),
            channel: i16::try_from(channel).unwrap_or_default(),
            language,
            state: pb::InvitationState::Pending as i16,
            survey_version: stored.version,
            create_us: req.now_us,
            expire_us: req.now_us.saturating_add(ttl_us),
            response_id: None,
        };
        arms.push(Arm::new(id, customer.clone(), inv.expire_us));
        let shown = to_proto(&inv);
        out.events.push(NewEvent::new(
            &shown.name,
            &pb::InvitationCreated {
                invitation: Some(shown.clone()),
            },
        ));
        out.audit
            .push(Change::create(&shown.name, &shown).customer(customer.clone()));
        out.response.invitations.push(shown);
        rows.push(inv);
    }
    invitations::insert(txn, &rows).await?;
    timers::arm(txn, EXPIRY, &arms).await?;
    Ok(out)
}

/// An invitation as answered.
pub fn to_proto(r: &invitations::Row) -> pb::Invitation {
    use clm_platform::convert::timestamp;
    use clm_platform::db::from_micros;
    pb::Invitation {
        name: format!("surveys/{}/invitations/{}", r.survey_id, r.id),
        customer: r.customer.clone(),
        channel: i32::from(r.channel),
        language: r.language.clone(),
        state: i32::from(r.state),
        survey_version: r.survey_version,
        create_time: Some(timestamp(from_micros(r.create_us))),
        expire_time: Some(timestamp(from_micros(r.expire_us))),
        response: r
            .response_id
            .as_ref()
            .map(|id| format!("surveys/{}/responses/{id}", r.survey_id))
            .unwrap_or_default(),
    }
}
