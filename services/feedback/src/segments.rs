//! What feedback asks the segmentation service (`peers.segmentation`),
//! always before its own transaction opens: who of a batch is in a
//! survey's target segment, and which segments a customer is in when a
//! response completes (for summaries by segment).

use clm_platform::peer::{Idempotency, Peer};
use clm_platform::{Error, Result, Runtime};
use clm_proto::segmentation as spb;
use clm_proto::segmentation::segmentation_service_client::SegmentationServiceClient;
use std::collections::HashSet;

fn peer(rt: &Runtime) -> Option<Peer> {
    rt.peers.get("segmentation")
}

/// Which of `customers` are in `segment` now. Without a configured peer
/// the survey's targeting cannot be checked: FAILED_PRECONDITION.
pub async fn members(rt: &Runtime, segment: &str, customers: &[String]) -> Result<HashSet<String>> {
    let Some(peer) = peer(rt) else {
        return Err(Error::FailedPrecondition {
            reason: "SEGMENTATION_NOT_CONFIGURED",
            message: format!(
                "the survey targets {segment} but peers.segmentation is not configured"
            ),
        });
    };
    let request = spb::BatchIsMemberRequest {
        checks: customers
            .iter()
            .map(|c| spb::MembershipCheck {
                segment: segment.to_owned(),
                customer: c.clone(),
            })
            .collect(),
    };
    let answer = peer
        .unary(
            "BatchIsMember",
            Idempotency::Idempotent,
            request,
            |channel, request| async move {
                SegmentationServiceClient::new(channel)
                    .batch_is_member(request)
                    .await
            },
        )
        .await?;
    Ok(answer
        .answers
        .into_iter()
        .filter(|a| a.member)
        .map(|a| a.customer)
        .collect())
}

/// The segments `customer` is in now; empty (and a warning) when
/// segmentation is not configured or does not answer: a customer's answer
/// is never lost because another service is down, its summary by segment
/// just does not count it.
pub async fn of_customer(rt: &Runtime, customer: &str) -> Vec<String> {
    let Some(peer) = peer(rt) else {
        return Vec::new();
    };
    let request = spb::GetCustomerSegmentsRequest {
        customer: customer.to_owned(),
    };
    match peer
        .unary(
            "GetCustomerSegments",
            Idempotency::Idempotent,
            request,
            |channel, request| async move {
                SegmentationServiceClient::new(channel)
                    .get_customer_segments(request)
                    .await
            },
        )
        .await
    {
        Ok(r) => r.segments,
        Err(e) => {
            tracing::warn!(customer, code = ?e.code(), "segments at completion unknown: {}", e.status().message());
            Vec::new()
        }
    }
}
