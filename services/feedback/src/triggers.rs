//! The feedback service's timers on the platform queue:
//!
//! * [`EXPIRY`](crate::invite::EXPIRY) ([`Expiry`]): an invitation still
//!   open at its `expire_time` becomes EXPIRED at that instant and
//!   `InvitationExpired` is emitted. Submissions check the instant
//!   themselves too, so an answer at or after it is refused even before
//!   the timer has fired.
//! * [`AFTER_PURCHASE`] ([`AfterPurchase`]): a purchase touchpoint arms one
//!   per published survey targeting purchases, due its delay after the
//!   purchase; firing invites the customer (the fatigue cap, the cadence
//!   and consent apply; refusals are logged).

use crate::invite;
use crate::store::invitations;
use clm_platform::Error;
use clm_platform::changes::Apply;
use clm_platform::db::to_micros;
use clm_platform::outbox::NewEvent;
use clm_platform::timers::{OnDue, Timer};
use clm_proto::feedback as pb;

/// The timer kind of after-purchase invitations.
pub const AFTER_PURCHASE: &str = "feedback.after_purchase";

/// Expires invitations.
pub struct Expiry;

#[async_trait::async_trait]
impl OnDue for Expiry {
    async fn fire(&self, cx: &mut Apply, due: Vec<Timer>) -> Result<(), Error> {
        let now_us = to_micros(cx.now());
        let ids: Vec<String> = due.into_iter().map(|t| t.key).collect();
        for r in invitations::expire(cx.txn(), &ids, now_us).await? {
            let name = format!("surveys/{}/invitations/{}", r.survey_id, r.id);
            cx.emit(NewEvent::new(
                &name,
                &pb::InvitationExpired {
                    invitation: name.clone(),
                    customer: r.customer,
                },
            ));
        }
        Ok(())
    }
}

/// Invites customers a while after their purchases.
pub struct AfterPurchase;

#[async_trait::async_trait]
impl OnDue for AfterPurchase {
    async fn fire(&self, cx: &mut Apply, due: Vec<Timer>) -> Result<(), Error> {
        let now_us = to_micros(cx.now());
        for t in due {
            let Some(survey) = t.payload.and_then(|p| String::from_utf8(p).ok()) else {
                continue;
            };
            invite_one(cx, &survey, &t.subject, now_us).await?;
        }
        Ok(())
    }
}

/// Invites `customer` to `survey` automatically (a stage entered, a
/// purchase), on the survey's channel: made, or refused and logged. A
/// survey no longer published or full invites nobody.
pub async fn invite_one(
    cx: &mut Apply,
    survey: &str,
    customer: &str,
    now_us: i64,
) -> Result<(), Error> {
    let customers = [customer.to_owned()];
    let out = invite::invite(
        cx.txn(),
        invite::Request {
            survey,
            customers: &customers,
            channel: 0,
            ttl_ms: None,
            members: None,
            now_us,
        },
    )
    .await;
    match out {
        Ok(out) => {
            for r in &out.response.refusals {
                tracing::info!(
                    survey,
                    customer,
                    reason = r.reason,
                    "automatic invitation refused"
                );
            }
            for e in out.events {
                cx.emit(e);
            }
            let t = cx.runtime().timers.clone();
            cx.after_commit(async move { t.wake() });
            Ok(())
        }
        Err(
            Error::FailedPrecondition { .. } | Error::ResourceExhausted { .. } | Error::NotFound(_),
        ) => {
            tracing::info!(
                survey,
                customer,
                "automatic invitation not made: the survey takes none"
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}
