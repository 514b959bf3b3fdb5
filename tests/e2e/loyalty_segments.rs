//! Loyalty and segmentation together, through gRPC (each on its own fresh
//! backend: SQLite, or PostgreSQL + Redis when `CLM_TEST_DATABASE_URL` is
//! set): a segment-only reward is redeemed by members of the segment and
//! refused to others (NOT_ELIGIBLE), and segmentation's `loyalty.balance`
//! follows the loyalty stream: the primary program's, not a second one's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::testing::{TestBackend, eventually, start};
use clm_proto::customer as cpb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::loyalty as lpb;
use clm_proto::loyalty::loyalty_service_client::LoyaltyServiceClient;
use clm_proto::segmentation as gpb;
use clm_proto::segmentation::segmentation_service_client::SegmentationServiceClient;
use std::time::Duration;
use tonic_types::StatusExt;

fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn a_segment_only_reward_and_the_balance_in_segments() {
    let cb = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let gb = TestBackend::migrated::<clm_segmentation::store::Migrator>().await;
    let lb = TestBackend::migrated::<clm_loyalty::store::Migrator>().await;
    let fast = |mut c: clm_platform::config::Config| {
        c.change_poll_interval_ms = 50;
        c
    };
    let customer = start(&clm_customer::DESCRIPTOR, fast(cb.config("customer"))).await;
    let seg_addr = free_addr();
    let mut lc = fast(lb.config("loyalty"));
    lc.peers.insert("customer".into(), customer.url());
    lc.peers
        .insert("segmentation".into(), format!("http://{seg_addr}"));
    let loyalty = start(&clm_loyalty::DESCRIPTOR, lc).await;
    let mut gc = fast(gb.config("segmentation"));
    gc.listen = seg_addr;
    gc.peers.insert("customer".into(), customer.url());
    gc.peers.insert("loyalty".into(), loyalty.url());
    let segmentation = start(&clm_segmentation::DESCRIPTOR, gc).await;
    let mut customers = CustomerServiceClient::new(customer.channel());
    let mut segments = SegmentationServiceClient::new(segmentation.channel());
    let mut points = LoyaltyServiceClient::new(loyalty.channel());

    let segment = |rule: &str| gpb::CreateSegmentRequest {
        segment: Some(gpb::Segment {
            display_name: rule.into(),
            owner: "crm-team".into(),
            rule_text: rule.into(),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    let engineers = segments
        .create_segment(segment(r#"occupation = "engineer""#))
        .await
        .unwrap()
        .into_inner()
        .name;
    let rich = segments
        .create_segment(segment("loyalty.balance >= 50"))
        .await
        .unwrap()
        .into_inner()
        .name;
    let mut who = Vec::new();
    for (email, occupation) in [("eng@x.io", "engineer"), ("other@x.io", "baker")] {
        who.push(
            customers
                .create_customer(cpb::CreateCustomerRequest {
                    customer: Some(cpb::Customer {
                        email: email.into(),
                        demographics: Some(cpb::Demographics {
                            occupation: occupation.into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .name,
        );
    }
    points
        .create_program(lpb::CreateProgramRequest {
            program: Some(lpb::Program {
                display_name: "Stars".into(),
                points_currency: "stars".into(),
                tiers: vec![lpb::Tier {
                    id: "member".into(),
                    threshold: 0,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            program_id: "stars".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    points
        .create_reward(lpb::CreateRewardRequest {
            parent: "programs/stars".into(),
            reward: Some(lpb::Reward {
                display_name: "Engineers' mug".into(),
                cost: 30,
                stock: Some(10),
                eligible_segment: engineers.clone(),
                ..Default::default()
            }),
            reward_id: "mug".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    points
        .create_reward(lpb::CreateRewardRequest {
            parent: "programs/stars".into(),
            reward: Some(lpb::Reward {
                display_name: "Sticker, one each".into(),
                cost: 5,
                per_member_limit: 1,
                ..Default::default()
            }),
            reward_id: "sticker".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let mut members = Vec::new();
    for c in &who {
        let id = c.trim_start_matches("customers/");
        // Loyalty learns of the customer from the customer stream.
        eventually(Duration::from_secs(30), || {
            let mut points = points.clone();
            let c = c.clone();
            async move {
                points
                    .enroll_member(lpb::EnrollMemberRequest {
                        program: "programs/stars".into(),
                        customer: c,
                        request_id: String::new(),
                    })
                    .await
                    .is_ok()
            }
        })
        .await;
        let member = format!("programs/stars/members/{id}");
        points
            .earn_points(lpb::EarnPointsRequest {
                member: member.clone(),
                earning: Some(lpb::earn_points_request::Earning::Points(100)),
                reason: "welcome".into(),
                request_id: format!("welcome-{id}"),
            })
            .await
            .unwrap();
        members.push(member);
    }
    // Segmentation sees the balance from the loyalty stream, and the
    // engineer's occupation from the customer stream.
    for c in &who {
        eventually(Duration::from_secs(30), || {
            let mut segments = segments.clone();
            let (rich, c) = (rich.clone(), c.clone());
            async move {
                segments
                    .is_member(gpb::IsMemberRequest {
                        segment: rich,
                        customer: c,
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .member
            }
        })
        .await;
    }
    eventually(Duration::from_secs(30), || {
        let mut segments = segments.clone();
        let (engineers, c) = (engineers.clone(), who[0].clone());
        async move {
            segments
                .is_member(gpb::IsMemberRequest {
                    segment: engineers,
                    customer: c,
                })
                .await
                .unwrap()
                .into_inner()
                .member
        }
    })
    .await;
    let redeem = |member: String, rid: &'static str| {
        let mut points = points.clone();
        async move {
            points
                .redeem_reward(lpb::RedeemRewardRequest {
                    member,
                    reward: "programs/stars/rewards/mug".into(),
                    request_id: rid.into(),
                })
                .await
        }
    };
    let eligible = |member: String| {
        let mut points = points.clone();
        async move {
            let mut names: Vec<String> = points
                .list_eligible_rewards(lpb::ListEligibleRewardsRequest { member })
                .await
                .unwrap()
                .into_inner()
                .rewards
                .into_iter()
                .map(|r| r.name)
                .collect();
            names.sort();
            names
        }
    };
    assert_eq!(
        eligible(members[0].clone()).await,
        [
            "programs/stars/rewards/mug",
            "programs/stars/rewards/sticker"
        ]
    );
    // The segment-only mug is not listed for the baker.
    assert_eq!(
        eligible(members[1].clone()).await,
        ["programs/stars/rewards/sticker"]
    );
    let mut points_for_sticker = points.clone();
    points_for_sticker
        .redeem_reward(lpb::RedeemRewardRequest {
            member: members[1].clone(),
            reward: "programs/stars/rewards/sticker".into(),
            request_id: "sticker-other".into(),
        })
        .await
        .unwrap();
    // One sticker each: the baker has had theirs.
    assert!(eligible(members[1].clone()).await.is_empty());
    redeem(members[0].clone(), "r-eng").await.unwrap();
    let err = redeem(members[1].clone(), "r-other").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        err.get_error_details().error_info().unwrap().reason,
        "NOT_ELIGIBLE"
    );
    // Spending 30 of 100 leaves 70: still in `loyalty.balance >= 50`;
    // two more mugs leave 10, and the engineer leaves the segment (the
    // baker, at 95 after the sticker, stays).
    redeem(members[0].clone(), "r-eng-2").await.unwrap();
    redeem(members[0].clone(), "r-eng-3").await.unwrap();
    eventually(Duration::from_secs(30), || {
        let mut segments = segments.clone();
        let (rich, c) = (rich.clone(), who[0].clone());
        async move {
            !segments
                .is_member(gpb::IsMemberRequest {
                    segment: rich,
                    customer: c,
                })
                .await
                .unwrap()
                .into_inner()
                .member
        }
    })
    .await;
    // A second program, not primary: its points do not move the plain
    // `loyalty.balance` (which stays the primary program's). The engineer
    // earns 1,000 there; then the baker earns 1 in the primary program,
    // a sentinel: once segmentation has it (loyalty.balance >= 96), the
    // club's event before it was applied too, and skipped.
    points
        .create_program(lpb::CreateProgramRequest {
            program: Some(lpb::Program {
                display_name: "Club".into(),
                ..Default::default()
            }),
            program_id: "club".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let sentinel = segments
        .create_segment(segment("loyalty.balance >= 96"))
        .await
        .unwrap()
        .into_inner()
        .name;
    points
        .enroll_member(lpb::EnrollMemberRequest {
            program: "programs/club".into(),
            customer: who[0].clone(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let earn = |member: String, n: i64, rid: &'static str| {
        let mut points = points.clone();
        async move {
            points
                .earn_points(lpb::EarnPointsRequest {
                    member,
                    earning: Some(lpb::earn_points_request::Earning::Points(n)),
                    reason: "test".into(),
                    request_id: rid.into(),
                })
                .await
                .unwrap()
        }
    };
    let club = format!(
        "programs/club/members/{}",
        who[0].trim_start_matches("customers/")
    );
    earn(club, 1000, "club-1000").await;
    earn(members[1].clone(), 1, "sentinel").await;
    eventually(Duration::from_secs(30), || {
        let mut segments = segments.clone();
        let (sentinel, c) = (sentinel.clone(), who[1].clone());
        async move {
            segments
                .is_member(gpb::IsMemberRequest {
                    segment: sentinel,
                    customer: c,
                })
                .await
                .unwrap()
                .into_inner()
                .member
        }
    })
    .await;
    let rich_now = segments
        .is_member(gpb::IsMemberRequest {
            segment: rich.clone(),
            customer: who[0].clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .member;
    assert!(
        !rich_now,
        "the secondary program's 1,000 points are not the plain loyalty.balance"
    );
    loyalty.stop().await;
    segmentation.stop().await;
    customer.stop().await;
}
