//! GetCustomerView (Customer 360): the customer service's own part
//! (profile, recent stage history, consent) and each peer's part, asked in
//! parallel under one deadline through the platform fan-out
//! ([`clm_platform::peer::fan_out`]). A peer that is not configured, down,
//! refusing or late marks its part instead of failing the call.

use clm_platform::Runtime;
use clm_platform::peer::{Idempotency, PeerError, fan_out};
use clm_proto::customer as pb;
use clm_proto::feedback::GetCustomerFeedbackRequest;
use clm_proto::feedback::feedback_service_client::FeedbackServiceClient;
use clm_proto::loyalty::ListMembersRequest;
use clm_proto::loyalty::loyalty_service_client::LoyaltyServiceClient;
use clm_proto::scoring::ListCustomerScoresRequest;
use clm_proto::scoring::scoring_service_client::ScoringServiceClient;
use clm_proto::segmentation::GetCustomerSegmentsRequest;
use clm_proto::segmentation::segmentation_service_client::SegmentationServiceClient;
use futures::future::BoxFuture;
use std::time::Duration;

/// The newest stage changes a view carries.
pub const VIEW_STAGE_HISTORY: u64 = 20;

/// One peer's answer.
enum Part {
    Scores(pb::CustomerViewScores),
    Segments(pb::CustomerViewSegments),
    Feedback(pb::CustomerViewFeedback),
    Loyalty(pb::CustomerViewLoyalty),
}

fn available() -> Option<pb::ViewPart> {
    Some(pb::ViewPart {
        state: pb::ViewPartState::Available as i32,
        reason: String::new(),
    })
}

fn missing(state: pb::ViewPartState, reason: String) -> Option<pb::ViewPart> {
    Some(pb::ViewPart {
        state: state as i32,
        reason,
    })
}

/// Fills `view`'s peer parts for `customer` (`customers/{id}`), asking
/// every configured peer at once and waiting `within` at most.
pub async fn fill_peer_parts(
    rt: &Runtime,
    customer: &str,
    within: Duration,
    view: &mut pb::CustomerView,
) {
    let not_configured = |peer: &str| {
        missing(
            pb::ViewPartState::NotConfigured,
            format!("peers.{peer} is not set"),
        )
    };
    view.scores = Some(pb::CustomerViewScores {
        part: not_configured("scoring"),
        ..Default::default()
    });
    view.segments = Some(pb::CustomerViewSegments {
        part: not_configured("segmentation"),
        ..Default::default()
    });
    view.feedback = Some(pb::CustomerViewFeedback {
        part: not_configured("feedback"),
        ..Default::default()
    });
    view.loyalty = Some(pb::CustomerViewLoyalty {
        part: not_configured("loyalty"),
        ..Default::default()
    });

    let mut calls: Vec<(&'static str, BoxFuture<'_, Result<Part, PeerError>>)> = Vec::new();
    let c = customer.to_owned();
    if let Some(peer) = rt.peers.get("scoring") {
        let request = ListCustomerScoresRequest {
            customer: c.clone(),
            read_time: None,
        };
        calls.push((
            "scoring",
            Box::pin(async move {
                let r = peer
                    .unary(
                        "ListCustomerScores",
                        Idempotency::Idempotent,
                        request,
                        |ch, req| async move {
                            ScoringServiceClient::new(ch)
                                .list_customer_scores(req)
                                .await
                        },
                    )
                    .await?;
                Ok(Part::Scores(pb::CustomerViewScores {
                    part: available(),
                    models: r.scores,
                }))
            }),
        ));
    }
    if let Some(peer) = rt.peers.get("segmentation") {
        let request = GetCustomerSegmentsRequest {
            customer: c.clone(),
        };
        calls.push((
            "segmentation",
            Box::pin(async move {
                let r = peer
                    .unary(
                        "GetCustomerSegments",
                        Idempotency::Idempotent,
                        request,
                        |ch, req| async move {
                            SegmentationServiceClient::new(ch)
                                .get_customer_segments(req)
                                .await
                        },
                    )
                    .await?;
                Ok(Part::Segments(pb::CustomerViewSegments {
                    part: available(),
                    segments: r.segments,
                }))
            }),
        ));
    }
    if let Some(peer) = rt.peers.get("feedback") {
        let request = GetCustomerFeedbackRequest {
            customer: c.clone(),
        };
        calls.push((
            "feedback",
            Box::pin(async move {
                let r = peer
                    .unary(
                        "GetCustomerFeedback",
                        Idempotency::Idempotent,
                        request,
                        |ch, req| async move {
                            FeedbackServiceClient::new(ch)
                                .get_customer_feedback(req)
                                .await
                        },
                    )
                    .await?;
                Ok(Part::Feedback(pb::CustomerViewFeedback {
                    part: available(),
                    feedback: Some(r),
                }))
            }),
        ));
    }
    if let Some(peer) = rt.peers.get("loyalty") {
        let request = ListMembersRequest {
            parent: "programs/-".into(),
            customer: c,
            ..Default::default()
        };
        calls.push((
            "loyalty",
            Box::pin(async move {
                let r = peer
                    .unary(
                        "ListMembers",
                        Idempotency::Idempotent,
                        request,
                        |ch, req| async move { LoyaltyServiceClient::new(ch).list_members(req).await },
                    )
                    .await?;
                Ok(Part::Loyalty(pb::CustomerViewLoyalty {
                    part: available(),
                    memberships: r.members,
                }))
            }),
        ));
    }

    let (peers, futures): (Vec<_>, Vec<_>) = calls.into_iter().unzip();
    for (peer, answer) in peers.into_iter().zip(fan_out(within, futures).await) {
        match answer {
            Ok(Part::Scores(p)) => view.scores = Some(p),
            Ok(Part::Segments(p)) => view.segments = Some(p),
            Ok(Part::Feedback(p)) => view.feedback = Some(p),
            Ok(Part::Loyalty(p)) => view.loyalty = Some(p),
            Err(e) => {
                tracing::info!(customer, peer, error = %e, "customer view: part unavailable");
                let part = missing(
                    pb::ViewPartState::Unavailable,
                    format!("{:?}: {}", e.code(), e.status().message()),
                );
                match peer {
                    "scoring" => {
                        view.scores = Some(pb::CustomerViewScores {
                            part,
                            ..Default::default()
                        })
                    }
                    "segmentation" => {
                        view.segments = Some(pb::CustomerViewSegments {
                            part,
                            ..Default::default()
                        });
                    }
                    "feedback" => {
                        view.feedback = Some(pb::CustomerViewFeedback {
                            part,
                            ..Default::default()
                        });
                    }
                    _ => {
                        view.loyalty = Some(pb::CustomerViewLoyalty {
                            part,
                            ..Default::default()
                        })
                    }
                }
            }
        }
    }
}
