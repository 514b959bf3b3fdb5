//! The loyalty service through gRPC, with the customer service beside it
//! (each on its own fresh backend: SQLite, or PostgreSQL + Redis when
//! `CLM_TEST_DATABASE_URL` is set), sharing one controlled clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Duration, Utc};
use clm_domain::{Clock, ManualClock};
use clm_platform::testing::{Running, TestBackend, assert_bad_field, eventually, start_with_clock};
use clm_proto::common::Money;
use clm_proto::common::WatchChangesRequest;
use clm_proto::common::change_stream_service_client::ChangeStreamServiceClient;
use clm_proto::customer as cpb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::loyalty as pb;
use clm_proto::loyalty::loyalty_service_client::LoyaltyServiceClient;
use std::sync::Arc;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

type Loyalty = LoyaltyServiceClient<Channel>;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    clm_platform::convert::timestamp(t)
}

fn dur(secs: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: secs,
        nanos: 0,
    }
}

const DAY: i64 = 86_400;

struct Env {
    customer: Option<Running>,
    feedback: Option<(Running, TestBackend)>,
    loyalty: Running,
    clock: ManualClock,
    _backends: (TestBackend, TestBackend),
    postgres: bool,
}

impl Env {
    async fn start() -> Env {
        Self::start_with(false).await
    }

    async fn start_with(with_feedback: bool) -> Env {
        let cb = TestBackend::migrated::<clm_customer::store::Migrator>().await;
        let lb = TestBackend::migrated::<clm_loyalty::store::Migrator>().await;
        let clock = ManualClock::new(t0());
        let mut cc = cb.config("customer");
        cc.change_poll_interval_ms = 50;
        let customer =
            start_with_clock(&clm_customer::DESCRIPTOR, cc, Arc::new(clock.clone())).await;
        let mut feedback = None;
        let mut lc = lb.config("loyalty");
        if with_feedback {
            let fb = TestBackend::migrated::<clm_feedback::store::Migrator>().await;
            let mut fc = fb.config("feedback");
            fc.change_poll_interval_ms = 50;
            fc.peers.insert("customer".into(), customer.url());
            let running =
                start_with_clock(&clm_feedback::DESCRIPTOR, fc, Arc::new(clock.clone())).await;
            lc.peers.insert("feedback".into(), running.url());
            feedback = Some((running, fb));
        }
        lc.change_poll_interval_ms = 50;
        lc.database.max_connections = 16;
        lc.peers.insert("customer".into(), customer.url());
        let loyalty = start_with_clock(&clm_loyalty::DESCRIPTOR, lc, Arc::new(clock.clone())).await;
        let postgres = lb.is_postgres();
        Env {
            customer: Some(customer),
            feedback,
            loyalty,
            clock,
            _backends: (cb, lb),
            postgres,
        }
    }

    /// A second replica of the loyalty service on the same database and
    /// clock (its lanes are its own: only the database orders the two).
    async fn replica(&self) -> Running {
        let mut lc = self._backends.1.config("loyalty");
        lc.change_poll_interval_ms = 50;
        lc.database.max_connections = 16;
        lc.peers
            .insert("customer".into(), self.customer.as_ref().unwrap().url());
        start_with_clock(&clm_loyalty::DESCRIPTOR, lc, Arc::new(self.clock.clone())).await
    }

    fn api(&self) -> Loyalty {
        LoyaltyServiceClient::new(self.loyalty.channel())
    }

    fn customers(&self) -> CustomerServiceClient<Channel> {
        CustomerServiceClient::new(self.customer.as_ref().unwrap().channel())
    }

    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    async fn new_customer(&self, email: &str) -> String {
        self.customers()
            .create_customer(cpb::CreateCustomerRequest {
                customer: Some(cpb::Customer {
                    email: email.into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .name
    }

    async fn program(&self, id: &str, p: pb::Program) -> pb::Program {
        self.api()
            .create_program(pb::CreateProgramRequest {
                program: Some(p),
                program_id: id.into(),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn enroll(&self, program: &str, customer: &str) -> pb::Member {
        self.api()
            .enroll_member(pb::EnrollMemberRequest {
                program: format!("programs/{program}"),
                customer: customer.into(),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn earn(&self, member: &str, points: i64, rid: &str) -> pb::EarnPointsResponse {
        self.api()
            .earn_points(pb::EarnPointsRequest {
                member: member.into(),
                earning: Some(pb::earn_points_request::Earning::Points(points)),
                reason: "test".into(),
                request_id: rid.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Sends every redemption at once (over 10 connections: HTTP/2 streams;
    /// a connection per call would overflow the test server's accept queue)
    /// and answers each outcome. A loaded machine may answer UNAVAILABLE (no
    /// database connection in time): like a client, the call is retried with
    /// the same request_id, which the service answers once.
    async fn redeem_concurrently(
        &self,
        calls: Vec<pb::RedeemRewardRequest>,
    ) -> Vec<Result<pb::Redemption, tonic::Status>> {
        use futures::StreamExt;
        let channels: Vec<Channel> = (0..10).map(|_| self.loyalty.channel()).collect();
        let running = futures::stream::FuturesUnordered::new();
        for (k, req) in calls.into_iter().enumerate() {
            let mut api = LoyaltyServiceClient::new(channels[k % 10].clone());
            running.push(async move {
                loop {
                    match api.redeem_reward(req.clone()).await {
                        Err(e) if e.code() == tonic::Code::Unavailable => {
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                        other => break other.map(tonic::Response::into_inner),
                    }
                }
            });
        }
        running.collect().await
    }

    async fn member(&self, name: &str) -> pb::Member {
        self.api()
            .get_member(pb::GetMemberRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner()
    }

    async fn reward(&self, program: &str, id: &str, r: pb::Reward) -> pb::Reward {
        self.api()
            .create_reward(pb::CreateRewardRequest {
                parent: format!("programs/{program}"),
                reward: Some(r),
                reward_id: id.into(),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn redeem(
        &self,
        member: &str,
        reward: &str,
        rid: &str,
    ) -> Result<pb::Redemption, tonic::Status> {
        self.api()
            .redeem_reward(pb::RedeemRewardRequest {
                member: member.into(),
                reward: reward.into(),
                request_id: rid.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    async fn transactions(&self, member: &str) -> Vec<pb::Transaction> {
        self.api()
            .list_transactions(pb::ListTransactionsRequest {
                parent: member.into(),
                page_size: 1000,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .transactions
    }

    /// Every event of type `T` (`event_type`) loyalty emitted so far, in order.
    async fn emitted<T: prost::Message + Default>(&self, event_type: &str) -> Vec<T> {
        let mut s = ChangeStreamServiceClient::new(self.loyalty.channel())
            .watch_changes(WatchChangesRequest {
                after_sequence: 0,
                event_types: vec![event_type.into()],
            })
            .await
            .unwrap()
            .into_inner();
        let mut out = Vec::new();
        while let Ok(Ok(Some(m))) =
            tokio::time::timeout(std::time::Duration::from_millis(300), s.message()).await
        {
            let any = m.event.unwrap().payload.unwrap();
            out.push(T::decode(any.value.as_slice()).unwrap());
        }
        out
    }

    /// Runs SQL on loyalty's database (to lay out internal rows a test needs).
    async fn loyalty_sql(&self, sql: &str) {
        use sea_orm::ConnectionTrait;
        let db = sea_orm::Database::connect(&self._backends.1.database_url)
            .await
            .unwrap();
        db.execute_unprepared(sql).await.unwrap();
        db.close().await.unwrap();
    }

    async fn touch(
        &self,
        customer: &str,
        event: &str,
        kind: cpb::TouchpointType,
        revenue: Option<Money>,
    ) {
        self.customers()
            .record_touchpoints(cpb::RecordTouchpointsRequest {
                touchpoints: vec![cpb::Touchpoint {
                    customer: customer.into(),
                    event_id: event.into(),
                    r#type: kind as i32,
                    product: "shop".into(),
                    revenue,
                    occurred_time: Some(ts(self.now())),
                    ..Default::default()
                }],
            })
            .await
            .unwrap();
    }

    async fn stage(&self, customer: &str, to: cpb::Stage) {
        self.customers()
            .transition_stage(cpb::TransitionStageRequest {
                name: customer.into(),
                to_stage: to as i32,
                reason: "test".into(),
                request_id: String::new(),
                etag: String::new(),
                forward_only: false,
            })
            .await
            .unwrap();
    }
}

fn eur(minor: i64) -> Money {
    Money {
        currency_code: "EUR".into(),
        amount_minor: minor,
    }
}

fn tiers() -> Vec<pb::Tier> {
    vec![
        pb::Tier {
            id: "bronze".into(),
            threshold: 0,
            ..Default::default()
        },
        pb::Tier {
            id: "silver".into(),
            threshold: 1000,
            earn_multiplier_percent: 150,
            benefits: vec![pb::Benefit {
                kind: pb::BenefitKind::Discount as i32,
                discount_percent: 5,
                ..Default::default()
            }],
            ..Default::default()
        },
        pb::Tier {
            id: "gold".into(),
            threshold: 5000,
            benefits: vec![pb::Benefit {
                kind: pb::BenefitKind::PrioritySupport as i32,
                ..Default::default()
            }],
            ..Default::default()
        },
    ]
}

/// A program: 1 point per euro of purchase (pending 14 days), 10 per
/// support contact (daily cap 20), referral bonuses, points expiring 12
/// months after earning, tiers on a 365-day window with 30 days of grace.
fn program() -> pb::Program {
    pb::Program {
        display_name: "Stars".into(),
        points_currency: "stars".into(),
        earning_rules: vec![
            pb::EarningRule {
                id: "purchase".into(),
                trigger: pb::EarningTrigger::Purchase as i32,
                currency_code: "EUR".into(),
                points_per_unit: 1,
                unit_minor: 100,
                ..Default::default()
            },
            pb::EarningRule {
                id: "support".into(),
                trigger: pb::EarningTrigger::Touchpoint as i32,
                touchpoint_type: cpb::TouchpointType::SupportContact as i32,
                points: 10,
                daily_cap: 20,
                ..Default::default()
            },
            pb::EarningRule {
                id: "referrer".into(),
                trigger: pb::EarningTrigger::ReferralReferrer as i32,
                points: 500,
                ..Default::default()
            },
            pb::EarningRule {
                id: "referee".into(),
                trigger: pb::EarningTrigger::ReferralReferee as i32,
                points: 200,
                ..Default::default()
            },
        ],
        pending_period: Some(dur(14 * DAY)),
        expiry: Some(pb::ExpiryPolicy {
            policy: Some(pb::expiry_policy::Policy::MonthsAfterEarning(12)),
        }),
        tiers: tiers(),
        tier_window: Some(dur(365 * DAY)),
        downgrade_grace: Some(dur(30 * DAY)),
        loyalty_tier: "gold".into(),
        auto_enroll: true,
        ..Default::default()
    }
}

fn member_name(program: &str, customer: &str) -> String {
    format!(
        "programs/{program}/members/{}",
        customer.trim_start_matches("customers/")
    )
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn spends_soonest_expiring_lots_first_and_a_cancel_restores_them() {
    let env = Env::start().await;
    env.program("stars", program()).await;
    let c = env.new_customer("lots@example.com").await;
    let m = member_name("stars", &c);
    env.enroll("stars", &c).await;
    // Lot A earned now (expires in 12 months), lot B earned 2 months
    // later (expires later): B is newer, A expires first.
    let a = env.earn(&m, 100, "earn-a").await.transactions[0].clone();
    env.clock.advance(Duration::days(60));
    let b = env.earn(&m, 100, "earn-b").await.transactions[0].clone();
    assert_eq!(env.member(&m).await.balance, 200);
    env.reward(
        "stars",
        "mug",
        pb::Reward {
            display_name: "Mug".into(),
            cost: 150,
            ..Default::default()
        },
    )
    .await;
    let r = env
        .redeem(&m, "programs/stars/rewards/mug", "redeem-1")
        .await
        .unwrap();
    assert_eq!(r.balance, 50);
    let spend = r.spend.clone().unwrap();
    let draws: Vec<(i64, i64)> = spend.draws.iter().map(|d| (d.lot, d.points)).collect();
    assert_eq!(
        draws,
        vec![(a.lot, 100), (b.lot, 50)],
        "soonest-expiring lot first"
    );
    assert!(
        spend.draws[0].lot_expire_time.unwrap().seconds
            < spend.draws[1].lot_expire_time.unwrap().seconds
    );
    assert_eq!(r.coupon.as_ref().unwrap().code.len(), 32);
    // Cancelling gives each lot back exactly its draw, with its own expiry.
    let cancelled = env
        .api()
        .cancel_redemption(pb::CancelRedemptionRequest {
            name: r.name.clone(),
            reason: "changed mind".into(),
            request_id: "cancel-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, pb::RedemptionState::Cancelled as i32);
    assert_eq!(cancelled.balance, 200);
    let txns = env.transactions(&m).await;
    let refund = txns
        .iter()
        .find(|t| t.kind == pb::TransactionKind::Refund as i32)
        .unwrap();
    let back: Vec<(i64, i64)> = refund.draws.iter().map(|d| (d.lot, d.points)).collect();
    assert_eq!(back, draws);
    // Lot A still expires at its own instant: 12 months after it was earned.
    let a_expiry = t0().checked_add_months(chrono::Months::new(12)).unwrap();
    env.clock.set(a_expiry - Duration::microseconds(1));
    assert_eq!(env.member(&m).await.balance, 200);
    env.clock.set(a_expiry);
    assert_eq!(
        env.member(&m).await.balance,
        100,
        "expired at the exact instant"
    );
    let expired = eventually(std::time::Duration::from_secs(20), || async {
        env.transactions(&m)
            .await
            .into_iter()
            .find(|t| t.kind == pb::TransactionKind::Expire as i32)
    })
    .await;
    assert_eq!(expired.points, -100);
    assert_eq!(expired.create_time, Some(ts(a_expiry)));
    assert_eq!(expired.draws[0].lot, a.lot);
    // The cancelled coupon is void.
    let v = env
        .api()
        .validate_coupon(pb::ValidateCouponRequest {
            program: "programs/stars".into(),
            code: r.coupon.unwrap().code,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    assert_eq!(v.reason, "VOID");
}

#[tokio::test]
async fn purchases_earn_pending_points_and_tiers_move_up_then_down_after_grace() {
    let env = Env::start().await;
    env.program("stars", program()).await;
    let c = env.new_customer("buyer@example.com").await;
    let m = member_name("stars", &c);
    // A purchase of 12.34 EUR auto-enrols and earns 12 pending points.
    env.touch(&c, "buy-1", cpb::TouchpointType::Purchase, Some(eur(1234)))
        .await;
    let got = eventually(std::time::Duration::from_secs(20), || async {
        env.api()
            .get_member(pb::GetMemberRequest { name: m.clone() })
            .await
            .ok()
            .map(|r| r.into_inner())
            .filter(|m| m.pending == 12)
    })
    .await;
    assert_eq!(got.balance, 0);
    assert_eq!(got.tier, "bronze");
    env.clock.advance(Duration::days(14));
    let after = env.member(&m).await;
    assert_eq!(
        (after.balance, after.pending),
        (12, 0),
        "spendable after the return window"
    );
    // Support contacts: 10 each, at most 20 a day.
    for i in 0..3 {
        env.touch(
            &c,
            &format!("support-{i}"),
            cpb::TouchpointType::SupportContact,
            None,
        )
        .await;
    }
    eventually(std::time::Duration::from_secs(20), || async {
        env.member(&m).await.lifetime_earned == 32
    })
    .await;
    // A big purchase: its points count towards tiers once spendable, not
    // while they may still be returned.
    env.touch(
        &c,
        "buy-2",
        cpb::TouchpointType::Purchase,
        Some(eur(100_000)),
    )
    .await;
    let pending = eventually(std::time::Duration::from_secs(20), || async {
        Some(env.member(&m).await).filter(|m| m.lifetime_earned == 1032 && m.pending == 1000)
    })
    .await;
    assert_eq!(
        (pending.tier.as_str(), pending.tier_points, pending.pending),
        ("bronze", 32, 1000)
    );
    // The return window passes: spendable, silver at that instant.
    env.clock.advance(Duration::days(14));
    let silver = eventually(std::time::Duration::from_secs(20), || async {
        Some(env.member(&m).await).filter(|m| m.tier == "silver")
    })
    .await;
    assert_eq!(silver.next_tier, "gold");
    assert_eq!(silver.tier_points, 1032);
    assert_eq!(silver.points_to_next_tier, 5000 - 1032);
    // Followers heard it all: the starting tier at enrolment, the balance
    // as each purchase's points became spendable (no transaction), and
    // the move to silver.
    let tiers: Vec<(String, String)> = env
        .emitted::<pb::TierChanged>("clm.loyalty.v1.TierChanged")
        .await
        .into_iter()
        .map(|t| (t.old_tier, t.new_tier))
        .collect();
    assert_eq!(
        tiers,
        vec![
            (String::new(), "bronze".to_owned()),
            ("bronze".to_owned(), "silver".to_owned())
        ]
    );
    let spendable: Vec<i64> = env
        .emitted::<pb::PointsChanged>("clm.loyalty.v1.PointsChanged")
        .await
        .into_iter()
        .filter(|p| p.transaction.is_none())
        .map(|p| p.balance)
        .collect();
    // (The first is 12, or 32 if the support points were in first.)
    assert_eq!(spendable.len(), 2, "{spendable:?}");
    assert_eq!(spendable[1], 1032);
    // The silver multiplier applies to the next purchase: 10 EUR → 15 points.
    env.touch(&c, "buy-3", cpb::TouchpointType::Purchase, Some(eur(1000)))
        .await;
    eventually(std::time::Duration::from_secs(20), || async {
        env.member(&m).await.lifetime_earned == 1047
    })
    .await;
    // A year on, the window holds nothing: below silver, kept for the grace period.
    env.clock.advance(Duration::days(366));
    let below = eventually(std::time::Duration::from_secs(20), || async {
        Some(env.member(&m).await).filter(|m| m.below_tier_time.is_some())
    })
    .await;
    assert_eq!(below.tier, "silver");
    env.clock.advance(Duration::days(29));
    assert_eq!(env.member(&m).await.tier, "silver");
    env.clock.advance(Duration::days(2));
    let down = eventually(std::time::Duration::from_secs(20), || async {
        Some(env.member(&m).await).filter(|m| m.tier == "bronze")
    })
    .await;
    assert!(down.below_tier_time.is_none());
}

#[tokio::test]
async fn every_refusal_has_its_own_error() {
    let env = Env::start().await;
    let mut p = program();
    p.campaign_budgets = vec![pb::CampaignBudget {
        campaign: "launch".into(),
        total: Some(eur(1000)),
        per_member: Some(eur(600)),
    }];
    env.program("stars", p).await;
    let c = env.new_customer("refusals@example.com").await;
    let d = env.new_customer("refusals2@example.com").await;
    let m = member_name("stars", &c);
    let n = member_name("stars", &d);
    env.enroll("stars", &c).await;
    env.enroll("stars", &d).await;
    env.earn(&m, 100, "e1").await;
    env.earn(&n, 10_000, "e2").await;
    env.reward(
        "stars",
        "cheap",
        pb::Reward {
            cost: 10,
            stock: Some(1),
            per_member_limit: 5,
            ..Default::default()
        },
    )
    .await;
    env.reward(
        "stars",
        "dear",
        pb::Reward {
            cost: 1000,
            ..Default::default()
        },
    )
    .await;
    env.reward(
        "stars",
        "once",
        pb::Reward {
            cost: 1,
            per_member_limit: 1,
            ..Default::default()
        },
    )
    .await;
    env.reward(
        "stars",
        "gold",
        pb::Reward {
            cost: 1,
            eligible_tiers: vec!["gold".into()],
            ..Default::default()
        },
    )
    .await;
    env.reward(
        "stars",
        "launch",
        pb::Reward {
            cost: 1,
            campaign: "launch".into(),
            value: Some(eur(400)),
            ..Default::default()
        },
    )
    .await;
    // Insufficient points: FAILED_PRECONDITION with balance and cost.
    let e = env
        .redeem(&m, "programs/stars/rewards/dear", "r1")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(reason(&e), "INSUFFICIENT_POINTS");
    assert!(
        e.message().contains("balance 100") && e.message().contains("cost 1000"),
        "{}",
        e.message()
    );
    // Out of stock.
    env.redeem(&m, "programs/stars/rewards/cheap", "r2")
        .await
        .unwrap();
    let e = env
        .redeem(&m, "programs/stars/rewards/cheap", "r3")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(reason(&e), "OUT_OF_STOCK");
    assert!(e.get_error_details().quota_failure().is_some());
    // An update that does not name the stock leaves what redemptions left.
    let cheap = env
        .api()
        .get_reward(pb::GetRewardRequest {
            name: "programs/stars/rewards/cheap".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let renamed = env
        .api()
        .update_reward(pb::UpdateRewardRequest {
            reward: Some(pb::Reward {
                display_name: "Cheap".into(),
                stock: Some(50),
                ..cheap.clone()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (renamed.display_name.as_str(), renamed.stock),
        ("Cheap", Some(0))
    );
    // Per-member limit.
    env.redeem(&m, "programs/stars/rewards/once", "r4")
        .await
        .unwrap();
    let e = env
        .redeem(&m, "programs/stars/rewards/once", "r5")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(reason(&e), "PER_MEMBER_LIMIT_REACHED");
    // Tier eligibility.
    let e = env
        .redeem(&m, "programs/stars/rewards/gold", "r6")
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::FailedPrecondition, "NOT_ELIGIBLE".to_owned())
    );
    // Budgets: 600 per member (one 400 redemption), 1000 in total.
    env.redeem(&m, "programs/stars/rewards/launch", "r7")
        .await
        .unwrap();
    let e = env
        .redeem(&m, "programs/stars/rewards/launch", "r8")
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::ResourceExhausted, "BUDGET_REACHED".to_owned())
    );
    env.redeem(&n, "programs/stars/rewards/launch", "r9")
        .await
        .unwrap();
    let o = env.new_customer("refusals3@example.com").await;
    let on = member_name("stars", &o);
    env.enroll("stars", &o).await;
    env.earn(&on, 10, "e3").await;
    let e = env
        .redeem(&on, "programs/stars/rewards/launch", "r10")
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::ResourceExhausted, "BUDGET_REACHED".to_owned())
    );
    // Nothing was spent by the refusals: 100 - 10 - 1 - 1.
    assert_eq!(env.member(&m).await.balance, 88);
    // Coupons: used once, then USED; expired after their validity.
    let r = env
        .redeem(&n, "programs/stars/rewards/dear", "r11")
        .await
        .unwrap();
    let code = r.coupon.unwrap().code;
    let use_it = |rid: &str| {
        let mut api = env.api();
        let code = code.clone();
        let rid = rid.to_owned();
        async move {
            api.use_coupon(pb::UseCouponRequest {
                program: "programs/stars".into(),
                code,
                request_id: rid,
            })
            .await
        }
    };
    let used = use_it("u1").await.unwrap().into_inner();
    assert_eq!(used.state, pb::CouponState::Used as i32);
    let e = use_it("u2").await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::FailedPrecondition, "COUPON_USED".to_owned())
    );
    let e = env
        .api()
        .cancel_redemption(pb::CancelRedemptionRequest {
            name: r.name.clone(),
            reason: String::new(),
            request_id: "c1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "NOT_CANCELLABLE");
    let r = env
        .redeem(&n, "programs/stars/rewards/dear", "r12")
        .await
        .unwrap();
    env.clock.advance(Duration::days(91));
    let e = env
        .api()
        .use_coupon(pb::UseCouponRequest {
            program: "programs/stars".into(),
            code: r.coupon.unwrap().code,
            request_id: "u3".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::FailedPrecondition, "COUPON_EXPIRED".to_owned())
    );
    // Bad input names its field.
    let e = env
        .redeem("members/x", "programs/stars/rewards/dear", "r13")
        .await
        .unwrap_err();
    assert_bad_field(&e, "member");
    let e = env
        .redeem(&m, "programs/stars/rewards/dear", "")
        .await
        .unwrap_err();
    assert_bad_field(&e, "request_id");
    let mut bad = program();
    bad.earning_rules[0].unit_minor = 0;
    bad.tiers[2].threshold = 10;
    let e = env
        .api()
        .create_program(pb::CreateProgramRequest {
            program: Some(bad),
            program_id: "bad".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "program.earning_rules[0].unit_minor");
    assert_bad_field(&e, "program.tiers[2].threshold");
    let e = env
        .api()
        .adjust_points(pb::AdjustPointsRequest {
            member: m.clone(),
            points: -1000,
            reason: "fix".into(),
            request_id: "a1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "INSUFFICIENT_POINTS");
    let e = env
        .api()
        .get_member(pb::GetMemberRequest {
            name: member_name("stars", &format!("customers/{}", uuid::Uuid::new_v4())),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn retries_with_a_request_id_are_no_ops() {
    let env = Env::start().await;
    env.program("stars", program()).await;
    let c = env.new_customer("retry@example.com").await;
    let m = member_name("stars", &c);
    env.enroll("stars", &c).await;
    // Enrolling again answers the member.
    assert_eq!(env.enroll("stars", &c).await.name, m);
    let first = env.earn(&m, 70, "same").await;
    let again = env.earn(&m, 70, "same").await;
    assert_eq!(first, again);
    assert_eq!(env.member(&m).await.balance, 70);
    let e = env
        .api()
        .earn_points(pb::EarnPointsRequest {
            member: m.clone(),
            earning: Some(pb::earn_points_request::Earning::Points(71)),
            reason: "test".into(),
            request_id: "same".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let adj = |points: i64| pb::AdjustPointsRequest {
        member: m.clone(),
        points,
        reason: "goodwill".into(),
        request_id: "adj".into(),
    };
    let a1 = env
        .api()
        .adjust_points(adj(-20))
        .await
        .unwrap()
        .into_inner();
    let a2 = env
        .api()
        .adjust_points(adj(-20))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a1, a2);
    assert_eq!(env.member(&m).await.balance, 50);
    env.reward(
        "stars",
        "pen",
        pb::Reward {
            cost: 5,
            ..Default::default()
        },
    )
    .await;
    let r1 = env
        .redeem(&m, "programs/stars/rewards/pen", "buy-pen")
        .await
        .unwrap();
    let r2 = env
        .redeem(&m, "programs/stars/rewards/pen", "buy-pen")
        .await
        .unwrap();
    assert_eq!(r1, r2);
    assert_eq!(env.member(&m).await.balance, 45);
    // A dry run changes nothing.
    let sim = env
        .api()
        .simulate_event(pb::SimulateEventRequest {
            member: m.clone(),
            event: Some(pb::simulate_event_request::Event::Activity(pb::Activity {
                touchpoint_type: cpb::TouchpointType::Purchase as i32,
                revenue: Some(eur(500_000)),
                ..Default::default()
            })),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sim.transactions[0].points, 5000);
    // Pending purchase points: no tier until the return window passes.
    let would = sim.member.unwrap();
    assert_eq!((would.pending, would.tier.as_str()), (5000, "bronze"));
    let sim = env
        .api()
        .simulate_event(pb::SimulateEventRequest {
            member: m.clone(),
            event: Some(pb::simulate_event_request::Event::RedeemReward(
                "programs/stars/rewards/pen".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sim.member.unwrap().balance, 40);
    let now = env.member(&m).await;
    assert_eq!((now.balance, now.tier.as_str()), (45, "bronze"));
}

#[tokio::test]
async fn a_referral_is_rewarded_once_when_the_referee_converts() {
    let env = Env::start().await;
    env.program("stars", program()).await;
    let referrer = env.new_customer("referrer@example.com").await;
    let referee = env.new_customer("referee@example.com").await;
    let rm = member_name("stars", &referrer);
    let em = member_name("stars", &referee);
    env.enroll("stars", &referrer).await;
    let code = env
        .api()
        .create_referral_code(pb::CreateReferralCodeRequest {
            member: rm.clone(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .code;
    let claim = |customer: &str| pb::ClaimReferralRequest {
        program: "programs/stars".into(),
        code: code.clone(),
        customer: customer.into(),
        request_id: String::new(),
    };
    // Self-referral is refused.
    let e = env
        .api()
        .claim_referral(claim(&referrer))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "SELF_REFERRAL");
    let joined = env
        .api()
        .claim_referral(claim(&referee))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(joined.referred_by, referrer);
    // A second claim (the referee now exists) is refused.
    let e = env.api().claim_referral(claim(&referee)).await.unwrap_err();
    assert_eq!(reason(&e), "REFEREE_EXISTS");
    let existing = env.new_customer("existing@example.com").await;
    env.enroll("stars", &existing).await;
    let e = env
        .api()
        .claim_referral(claim(&existing))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "REFEREE_EXISTS");
    // Conversion rewards both, once (a churn and a second conversion earn nothing).
    env.stage(&referee, cpb::Stage::Conversion).await;
    eventually(std::time::Duration::from_secs(20), || async {
        env.member(&rm).await.balance == 500 && env.member(&em).await.balance == 200
    })
    .await;
    env.stage(&referee, cpb::Stage::Churned).await;
    env.stage(&referee, cpb::Stage::Retention).await;
    env.stage(&referee, cpb::Stage::Churned).await;
    env.touch(&referee, "after", cpb::TouchpointType::SupportContact, None)
        .await;
    eventually(std::time::Duration::from_secs(20), || async {
        env.member(&em).await.balance == 210
    })
    .await;
    assert_eq!(env.member(&rm).await.balance, 500);
}

#[tokio::test]
async fn merge_moves_points_once_and_erasure_deletes_with_a_receipt() {
    let env = Env::start().await;
    env.program("stars", program()).await;
    let a = env.new_customer("a@example.com").await;
    let b = env.new_customer("b@example.com").await;
    let am = member_name("stars", &a);
    let bm = member_name("stars", &b);
    env.enroll("stars", &a).await;
    env.enroll("stars", &b).await;
    env.earn(&am, 300, "ea").await;
    env.earn(&bm, 900, "eb").await;
    env.reward(
        "stars",
        "pen",
        pb::Reward {
            cost: 100,
            ..Default::default()
        },
    )
    .await;
    env.redeem(&bm, "programs/stars/rewards/pen", "rb")
        .await
        .unwrap();
    env.customers()
        .merge_customers(cpb::MergeCustomersRequest {
            survivor: a.clone(),
            duplicates: vec![b.clone()],
            policy: None,
            request_id: String::new(),
        })
        .await
        .unwrap();
    let merged = eventually(std::time::Duration::from_secs(20), || async {
        Some(env.member(&am).await).filter(|m| m.balance == 1100)
    })
    .await;
    assert_eq!(merged.lifetime_earned, 1200);
    assert_eq!(merged.tier, "silver", "the merged earnings reach silver");
    assert_eq!(
        env.api()
            .get_member(pb::GetMemberRequest { name: bm.clone() })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(env.transactions(&am).await.len(), 3);
    // Erasure.
    let watch = clm_proto::common::change_stream_service_client::ChangeStreamServiceClient::new(
        env.loyalty.channel(),
    );
    env.customers()
        .erase_customer(cpb::EraseCustomerRequest {
            name: a.clone(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    eventually(std::time::Duration::from_secs(20), || async {
        env.api()
            .get_member(pb::GetMemberRequest { name: am.clone() })
            .await
            .is_err()
    })
    .await;
    assert!(env.transactions(&am).await.is_empty());
    let receipt = eventually(std::time::Duration::from_secs(20), || async {
        let mut s = watch
            .clone()
            .watch_changes(clm_proto::common::WatchChangesRequest {
                after_sequence: 0,
                event_types: vec!["clm.common.v1.CustomerDataErased".into()],
            })
            .await
            .unwrap()
            .into_inner();
        tokio::time::timeout(std::time::Duration::from_millis(500), s.message())
            .await
            .ok()?
            .ok()?
    })
    .await;
    assert_eq!(receipt.event.unwrap().subject, a);
}

/// 1,000 concurrent redemptions from 200 members of a reward with stock
/// 100 and a limit of 1 per member: exactly 100 succeed, nothing is
/// overdrawn, and lots, transactions and balances agree.
#[tokio::test]
async fn concurrent_redemptions_never_oversell_or_overdraw() {
    let env = Env::start().await;
    // Purchase points spendable at once, so the stream's earnings can be spent.
    let mut p = program();
    p.pending_period = None;
    env.program("stars", p).await;
    env.reward(
        "stars",
        "tee",
        pb::Reward {
            cost: 30,
            stock: Some(100),
            per_member_limit: 1,
            ..Default::default()
        },
    )
    .await;
    // Set-based setup: 200 customers in one call, their 400 purchases in
    // another; loyalty's stream consumer enrols them (auto-enrol) and earns
    // two lots each, in batches. Some cannot afford a tee at all.
    let created = env
        .customers()
        .batch_create_customers(cpb::BatchCreateCustomersRequest {
            requests: (0..200)
                .map(|i| cpb::CreateCustomerRequest {
                    customer: Some(cpb::Customer {
                        email: format!("tee{i}@example.com"),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                })
                .collect(),
            request_id: "tees".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .customers;
    let mut purchases = Vec::new();
    let mut members = Vec::new();
    for (i, c) in created.iter().enumerate() {
        let euros = [15 + (i as i64 % 3) * 5, 10];
        for (j, e) in euros.into_iter().enumerate() {
            purchases.push(cpb::Touchpoint {
                customer: c.name.clone(),
                event_id: format!("tee-{i}-{j}"),
                r#type: cpb::TouchpointType::Purchase as i32,
                product: "shop".into(),
                revenue: Some(eur(e * 100)),
                occurred_time: Some(ts(env.now())),
                ..Default::default()
            });
        }
        members.push(member_name("stars", &c.name));
    }
    env.customers()
        .record_touchpoints(cpb::RecordTouchpointsRequest {
            touchpoints: purchases,
        })
        .await
        .unwrap();
    let expected: i64 = (0..200).map(|i| 25 + (i % 3) * 5).sum();
    let before = eventually(std::time::Duration::from_secs(60), || async {
        let page = env
            .api()
            .list_members(pb::ListMembersRequest {
                parent: "programs/stars".into(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .members;
        let sum: i64 = page.iter().map(|m| m.balance).sum();
        (page.len() == 200 && sum == expected).then_some(sum)
    })
    .await;
    let calls = (0..1000)
        .map(|k| pb::RedeemRewardRequest {
            member: members[k % 200].clone(),
            reward: "programs/stars/rewards/tee".into(),
            request_id: format!("x{k}"),
        })
        .collect();
    let mut ok = 0;
    let mut codes = std::collections::BTreeMap::new();
    for r in env.redeem_concurrently(calls).await {
        match r {
            Ok(_) => ok += 1,
            Err(e) => {
                codes
                    .entry(format!("{:?}/{}", e.code(), reason(&e)))
                    .or_insert((0, format!("{e:?}")))
                    .0 += 1
            }
        }
    }
    assert_eq!(ok, 100, "refusals: {codes:?}");
    let reward = env
        .api()
        .get_reward(pb::GetRewardRequest {
            name: "programs/stars/rewards/tee".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reward.stock, Some(0));
    let mut after = 0;
    let mut winners = 0;
    for m in &members {
        let v = env.member(m).await;
        assert!(v.balance >= 0);
        let txns = env.transactions(m).await;
        let ledger: i64 = txns.iter().map(|t| t.points).sum();
        assert_eq!(ledger, v.balance, "{m}: the ledger sums to the balance");
        let spends: Vec<&pb::Transaction> = txns
            .iter()
            .filter(|t| t.kind == pb::TransactionKind::Spend as i32)
            .collect();
        assert!(spends.len() <= 1, "{m}: at most one redemption");
        for s in &spends {
            assert_eq!(s.draws.iter().map(|d| d.points).sum::<i64>(), 30);
            winners += 1;
        }
        after += v.balance;
    }
    assert_eq!(winners, 100);
    assert_eq!(before - after, 100 * 30);
    let _ = env.postgres;
}

/// A burst of 200 redemptions for one member queues in the service
/// (`clm_platform::lanes`), not on the member's row lock: no statement ever
/// waits for a lock (on PostgreSQL), so the pool stays free for other
/// members, and every point is counted once.
#[tokio::test]
async fn a_burst_for_one_member_queues_in_the_service_not_on_its_row_lock() {
    let env = Env::start().await;
    let mut p = program();
    p.pending_period = None;
    env.program("stars", p).await;
    env.reward(
        "stars",
        "sticker",
        pb::Reward {
            cost: 1,
            ..Default::default()
        },
    )
    .await;
    let c = env.new_customer("burst@example.com").await;
    let m = env.enroll("stars", &c).await.name;
    env.earn(&m, 1_000, "burst-points").await;
    let waits = clm_platform::testing::LockWaits::sample(&env._backends.1.database_url);
    let calls = (0..200)
        .map(|k| pb::RedeemRewardRequest {
            member: m.clone(),
            reward: "programs/stars/rewards/sticker".into(),
            request_id: format!("burst-{k}"),
        })
        .collect();
    for r in env.redeem_concurrently(calls).await {
        r.unwrap();
    }
    let waited = waits.stop().await;
    assert!(
        waited.is_empty(),
        "same-member calls waited on a row lock: {waited:?}"
    );
    assert_eq!(env.member(&m).await.balance, 1_000 - 200);
}

/// Two replicas of the service (their lanes do not see each other, so only
/// the database guards order them) redeem at once: a member's last points
/// are spent once (the other calls refused with FAILED_PRECONDITION, the
/// balance never below zero), the last unit of a stock goes once (the
/// rest OUT_OF_STOCK), and calls repeating one request_id all answer the
/// one redemption it made.
#[tokio::test]
async fn two_replicas_never_overdraw_oversell_or_double_a_request_id() {
    let env = Env::start().await;
    let replica = env.replica().await;
    let mut p = program();
    p.pending_period = None;
    env.program("stars", p).await;
    env.reward(
        "stars",
        "mug",
        pb::Reward {
            cost: 10,
            ..Default::default()
        },
    )
    .await;
    env.reward(
        "stars",
        "last",
        pb::Reward {
            cost: 1,
            stock: Some(1),
            ..Default::default()
        },
    )
    .await;
    let apis = [env.api(), LoyaltyServiceClient::new(replica.channel())];
    let c = env.new_customer("last-points@example.com").await;
    let m = env.enroll("stars", &c).await.name;
    env.earn(&m, 25, "last-points").await;
    // 12 calls over both replicas for 2 mugs' worth of points, and 8 calls
    // with one request_id.
    let mut calls = futures::stream::FuturesUnordered::new();
    for k in 0..20 {
        let mut api = apis[k % 2].clone();
        let req = pb::RedeemRewardRequest {
            member: m.clone(),
            reward: "programs/stars/rewards/mug".into(),
            request_id: if k < 12 {
                format!("mug-{k}")
            } else {
                "mug-again".into()
            },
        };
        calls.push(async move {
            loop {
                match api.redeem_reward(req.clone()).await {
                    Err(e) if e.code() == tonic::Code::Unavailable => {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                    other => break (k, other.map(tonic::Response::into_inner)),
                }
            }
        });
    }
    use futures::StreamExt;
    let mut won = std::collections::BTreeSet::new();
    let mut again = std::collections::BTreeSet::new();
    let mut short = 0;
    while let Some((k, r)) = calls.next().await {
        match r {
            Ok(r) => {
                assert!(r.balance >= 0, "{r:?}");
                if k >= 12 {
                    again.insert(r.name.clone());
                }
                won.insert(r.name);
            }
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
                assert_eq!(reason(&e), "INSUFFICIENT_POINTS", "{e:?}");
                if k >= 12 {
                    // Refused: refused for every retry of that request_id.
                    again.insert(String::new());
                }
                short += 1;
            }
        }
    }
    assert_eq!(won.len(), 2, "two mugs' worth of points: {won:?}");
    assert_eq!(again.len(), 1, "one answer for one request_id: {again:?}");
    let view = env.member(&m).await;
    assert_eq!(view.balance, 5);
    let txns = env.transactions(&m).await;
    let spends = txns
        .iter()
        .filter(|t| t.kind == pb::TransactionKind::Spend as i32)
        .count();
    assert_eq!(spends, 2);
    assert_eq!(txns.iter().map(|t| t.points).sum::<i64>(), 5);
    assert!(short >= 10);
    // The last unit: six members at once over both replicas, one wins.
    let mut members = Vec::new();
    for i in 0..6 {
        let c = env.new_customer(&format!("last-unit{i}@example.com")).await;
        let m = env.enroll("stars", &c).await.name;
        env.earn(&m, 5, &format!("last-unit-{i}")).await;
        members.push(m);
    }
    let mut calls = futures::stream::FuturesUnordered::new();
    for (k, m) in members.iter().enumerate() {
        let mut api = apis[k % 2].clone();
        let req = pb::RedeemRewardRequest {
            member: m.clone(),
            reward: "programs/stars/rewards/last".into(),
            request_id: format!("last-{k}"),
        };
        calls.push(async move {
            loop {
                match api.redeem_reward(req.clone()).await {
                    Err(e) if e.code() == tonic::Code::Unavailable => {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                    other => break other,
                }
            }
        });
    }
    let (mut ok, mut out) = (0, 0);
    while let Some(r) = calls.next().await {
        match r {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(reason(&e), "OUT_OF_STOCK", "{e:?}");
                out += 1;
            }
        }
    }
    assert_eq!((ok, out), (1, 5));
    let mut balances = 0;
    for m in &members {
        balances += env.member(m).await.balance;
    }
    assert_eq!(balances, 6 * 5 - 1, "only the winner paid");
    replica.stop().await;
}

/// A stock spread over slots whose last units all sit in one slot (the
/// other 15 empty): of 40 concurrent redemptions exactly those units
/// succeed; a cancellation puts one unit back, exactly; a new stock or a
/// new number of slots leaves exactly the stock asked for or held.
#[tokio::test]
async fn the_last_units_in_one_slot_are_never_oversold() {
    let env = Env::start().await;
    env.program("stars", program()).await;
    let created = env
        .reward(
            "stars",
            "cap",
            pb::Reward {
                cost: 10,
                stock: Some(16),
                ..Default::default()
            },
        )
        .await;
    assert_eq!((created.stock, created.stock_slots), (Some(16), 16));
    // Move the stock: 5 units in slot 11, none elsewhere.
    env.loyalty_sql(
        "UPDATE loyalty_reward_slots SET stock = CASE WHEN slot = 11 THEN 5 ELSE 0 END \
         WHERE program = 'stars' AND reward = 'cap'",
    )
    .await;
    let get = || async {
        env.api()
            .get_reward(pb::GetRewardRequest {
                name: "programs/stars/rewards/cap".into(),
            })
            .await
            .unwrap()
            .into_inner()
    };
    assert_eq!(
        get().await.stock,
        Some(5),
        "the stock read is the slots' sum"
    );
    let env = &env;
    use futures::StreamExt;
    let members: Vec<String> = futures::stream::iter(0..41)
        .map(|i| async move {
            let c = format!("customers/{}", uuid::Uuid::new_v4());
            let m = member_name("stars", &c);
            env.enroll("stars", &c).await;
            env.earn(&m, 10, &format!("cap-earn-{i}")).await;
            m
        })
        .buffered(4)
        .collect()
        .await;
    let mut calls = futures::stream::FuturesUnordered::new();
    for (k, m) in members[..40].iter().enumerate() {
        let mut api = env.api();
        let m = m.clone();
        calls.push(async move {
            api.redeem_reward(pb::RedeemRewardRequest {
                member: m,
                reward: "programs/stars/rewards/cap".into(),
                request_id: format!("cap-{k}"),
            })
            .await
        });
    }
    let mut won = Vec::new();
    let mut refused = 0;
    while let Some(r) = calls.next().await {
        match r {
            Ok(r) => won.push(r.into_inner()),
            Err(e) => {
                assert_eq!(reason(&e), "OUT_OF_STOCK", "{e:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((won.len(), refused), (5, 35));
    assert_eq!(get().await.stock, Some(0));
    // A cancellation gives exactly one unit back; it is taken once.
    env.api()
        .cancel_redemption(pb::CancelRedemptionRequest {
            name: won[0].name.clone(),
            reason: String::new(),
            request_id: "cap-cancel".into(),
        })
        .await
        .unwrap();
    assert_eq!(get().await.stock, Some(1));
    env.redeem(&members[40], "programs/stars/rewards/cap", "cap-again")
        .await
        .unwrap();
    let e = env
        .redeem(&members[39], "programs/stars/rewards/cap", "cap-none")
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "OUT_OF_STOCK");
    // A new stock replaces what remains exactly; new slots keep the stock.
    let update = |r: pb::Reward, path: &str, rid: &str| pb::UpdateRewardRequest {
        reward: Some(r),
        update_mask: Some(prost_types::FieldMask {
            paths: vec![path.into()],
        }),
        request_id: rid.into(),
    };
    let r = get().await;
    let r = env
        .api()
        .update_reward(update(
            pb::Reward {
                stock: Some(7),
                ..r
            },
            "stock",
            "cap-restock",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.stock, Some(7));
    let r = env
        .api()
        .update_reward(update(
            pb::Reward {
                stock_slots: 4,
                ..r
            },
            "stock_slots",
            "cap-slots",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.stock, r.stock_slots), (Some(7), 4));
    let e = env
        .api()
        .update_reward(update(
            pb::Reward {
                stock_slots: 1000,
                ..r
            },
            "stock_slots",
            "cap-bad",
        ))
        .await
        .unwrap_err();
    assert_bad_field(&e, "reward.stock_slots");
}

/// A campaign's total budget spread over slots is never exceeded: 60
/// concurrent redemptions of 100 against 5,000 give exactly 50 (the last
/// two from units scattered over several slots); raising the total lets
/// exactly the difference through, a cancellation gives its value back,
/// and a total lowered below what was spent counts from there.
#[tokio::test]
async fn a_campaign_budget_over_slots_is_never_exceeded() {
    let env = Env::start().await;
    let mut p = program();
    p.campaign_budgets = vec![pb::CampaignBudget {
        campaign: "launch".into(),
        total: Some(eur(5000)),
        per_member: None,
    }];
    let created = env.program("stars", p).await;
    env.reward(
        "stars",
        "voucher",
        pb::Reward {
            cost: 1,
            campaign: "launch".into(),
            value: Some(eur(100)),
            ..Default::default()
        },
    )
    .await;
    let env = &env;
    use futures::StreamExt;
    let members: Vec<String> = futures::stream::iter(0..60)
        .map(|i| async move {
            let c = format!("customers/{}", uuid::Uuid::new_v4());
            let m = member_name("stars", &c);
            env.enroll("stars", &c).await;
            env.earn(&m, 10, &format!("budget-earn-{i}")).await;
            m
        })
        .buffered(4)
        .collect()
        .await;
    let channels: Vec<Channel> = (0..4).map(|_| env.loyalty.channel()).collect();
    // Redeems `n` at once (request ids from `tag`): (granted, the redemptions).
    let redeem_many = |n: usize, tag: &'static str| {
        let (members, channels) = (members.clone(), channels.clone());
        async move {
            let mut calls = futures::stream::FuturesUnordered::new();
            for k in 0..n {
                let mut api = LoyaltyServiceClient::new(channels[k % 4].clone());
                let m = members[k % members.len()].clone();
                calls.push(async move {
                    api.redeem_reward(pb::RedeemRewardRequest {
                        member: m,
                        reward: "programs/stars/rewards/voucher".into(),
                        request_id: format!("{tag}-{k}"),
                    })
                    .await
                });
            }
            let mut won = Vec::new();
            while let Some(r) = calls.next().await {
                match r {
                    Ok(r) => won.push(r.into_inner()),
                    Err(e) => assert_eq!(reason(&e), "BUDGET_REACHED", "{e:?}"),
                }
            }
            won
        }
    };
    let won = redeem_many(60, "first").await;
    assert_eq!(won.len(), 50, "5,000 / 100");
    let set_total = |total: i64, etag: String, rid: &'static str| async move {
        env.api()
            .update_program(pb::UpdateProgramRequest {
                program: Some(pb::Program {
                    name: "programs/stars".into(),
                    etag,
                    campaign_budgets: vec![pb::CampaignBudget {
                        campaign: "launch".into(),
                        total: Some(eur(total)),
                        per_member: None,
                    }],
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["campaign_budgets".into()],
                }),
                request_id: rid.into(),
            })
            .await
            .unwrap()
            .into_inner()
    };
    let p = set_total(5300, created.etag, "raise").await;
    assert_eq!(redeem_many(10, "second").await.len(), 3, "the 300 added");
    env.api()
        .cancel_redemption(pb::CancelRedemptionRequest {
            name: won[0].name.clone(),
            reason: String::new(),
            request_id: "budget-cancel".into(),
        })
        .await
        .unwrap();
    assert_eq!(redeem_many(5, "third").await.len(), 1, "the 100 given back");
    // Spent 5,300; a total of 4,000 leaves -1,300; 5,500 then leaves 200.
    let p = set_total(4000, p.etag, "lower").await;
    assert_eq!(redeem_many(3, "fourth").await.len(), 0);
    let p = set_total(5500, p.etag, "raise-again").await;
    assert_eq!(redeem_many(5, "fifth").await.len(), 2);
    // A redemption made while its campaign had no total took nothing from
    // it, so cancelling it later gives nothing back.
    env.api()
        .update_program(pb::UpdateProgramRequest {
            program: Some(pb::Program {
                name: "programs/stars".into(),
                etag: p.etag,
                campaign_budgets: Vec::new(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["campaign_budgets".into()],
            }),
            request_id: "unlimited".into(),
        })
        .await
        .unwrap();
    let uncounted = env
        .redeem(
            &members[0],
            "programs/stars/rewards/voucher",
            "no-total-yet",
        )
        .await
        .unwrap();
    let p = env
        .api()
        .get_program(pb::GetProgramRequest {
            name: "programs/stars".into(),
        })
        .await
        .unwrap()
        .into_inner();
    set_total(200, p.etag, "small-total").await;
    env.api()
        .cancel_redemption(pb::CancelRedemptionRequest {
            name: uncounted.name,
            reason: String::new(),
            request_id: "cancel-uncounted".into(),
        })
        .await
        .unwrap();
    assert_eq!(redeem_many(4, "sixth").await.len(), 2, "200, not 300");
}

/// With several programs, one is primary (marked, else the oldest): its
/// events are plain, the others' carry `secondary`, so segmentation's
/// plain loyalty facts follow one program. A second mark is refused.
#[tokio::test]
async fn events_of_programs_other_than_the_primary_are_marked_secondary() {
    let env = Env::start().await;
    env.program("alpha", program()).await;
    let beta = env.program("beta", program()).await;
    let c = env.new_customer("two@example.com").await;
    env.enroll("alpha", &c).await;
    env.enroll("beta", &c).await;
    env.earn(&member_name("alpha", &c), 10, "a1").await;
    env.earn(&member_name("beta", &c), 20, "b1").await;
    // None marked: alpha (the oldest; same instant, then by id) is primary.
    let marks = |events: Vec<pb::PointsChanged>| -> Vec<(String, bool)> {
        events
            .into_iter()
            .map(|p| (p.program, p.secondary))
            .collect()
    };
    assert_eq!(
        marks(env.emitted("clm.loyalty.v1.PointsChanged").await),
        vec![
            ("programs/alpha".to_owned(), false),
            ("programs/beta".to_owned(), true)
        ]
    );
    let tiers: Vec<(String, bool)> = env
        .emitted::<pb::TierChanged>("clm.loyalty.v1.TierChanged")
        .await
        .into_iter()
        .map(|t| (t.program, t.secondary))
        .collect();
    assert_eq!(
        tiers,
        vec![
            ("programs/alpha".to_owned(), false),
            ("programs/beta".to_owned(), true)
        ]
    );
    // Mark beta primary: from then on its events are the plain ones.
    let marked = env
        .api()
        .update_program(pb::UpdateProgramRequest {
            program: Some(pb::Program {
                primary: true,
                ..beta
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["primary".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(marked.primary);
    env.earn(&member_name("alpha", &c), 10, "a2").await;
    env.earn(&member_name("beta", &c), 20, "b2").await;
    assert_eq!(
        marks(env.emitted("clm.loyalty.v1.PointsChanged").await)[2..],
        [
            ("programs/alpha".to_owned(), true),
            ("programs/beta".to_owned(), false)
        ]
    );
    // A second primary is refused.
    let mut gamma = program();
    gamma.primary = true;
    let e = env
        .api()
        .create_program(pb::CreateProgramRequest {
            program: Some(gamma),
            program_id: "gamma".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (
            Code::FailedPrecondition,
            "PRIMARY_PROGRAM_EXISTS".to_owned()
        )
    );
}

/// A run of touchpoints on the customer stream is earned set-based, with
/// the arithmetic of one event at a time: in stream order, a member lifted
/// a tier earns the next event at the new multiplier, and the daily cap
/// counts the batch's earlier events.
#[tokio::test]
async fn a_batch_of_touchpoints_earns_exactly_as_one_at_a_time() {
    let env = Env::start().await;
    let mut p = program();
    p.earning_rules.push(pb::EarningRule {
        id: "feature".into(),
        trigger: pb::EarningTrigger::Touchpoint as i32,
        touchpoint_type: cpb::TouchpointType::FeatureUse as i32,
        points: 600,
        ..Default::default()
    });
    env.program("stars", p).await;
    let c = env.new_customer("batch-c@example.com").await;
    let d = env.new_customer("batch-d@example.com").await;
    let tp = |customer: &str, event: &str, kind: cpb::TouchpointType| cpb::Touchpoint {
        customer: customer.into(),
        event_id: event.into(),
        r#type: kind as i32,
        product: "app".into(),
        feature: if kind == cpb::TouchpointType::FeatureUse {
            "export".into()
        } else {
            String::new()
        },
        occurred_time: Some(ts(env.now())),
        ..Default::default()
    };
    use cpb::TouchpointType::{FeatureUse, SupportContact};
    env.customers()
        .record_touchpoints(cpb::RecordTouchpointsRequest {
            touchpoints: vec![
                tp(&c, "c-f1", FeatureUse),
                tp(&d, "d-f1", FeatureUse),
                tp(&c, "c-f2", FeatureUse),
                tp(&c, "c-f3", FeatureUse),
                tp(&c, "c-s1", SupportContact),
                tp(&d, "d-s1", SupportContact),
                tp(&c, "c-s2", SupportContact),
                tp(&c, "c-s3", SupportContact),
            ],
        })
        .await
        .unwrap();
    let (cm, dm) = (member_name("stars", &c), member_name("stars", &d));
    let members = eventually(std::time::Duration::from_secs(30), || async {
        let page = env
            .api()
            .list_members(pb::ListMembersRequest {
                parent: "programs/stars".into(),
                page_size: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .members;
        (page.len() == 2 && page.iter().all(|m| m.lifetime_earned > 0)).then_some(page)
    })
    .await;
    let of = |name: &str| members.iter().find(|m| m.name == name).unwrap().clone();
    // c: 600 and 600 at bronze (silver from 1,200), then 900 at silver's
    // 150 %; support 15, then 5 up to the daily cap of 20, then nothing.
    let (cv, dv) = (of(&cm), of(&dm));
    assert_eq!(
        (
            cv.lifetime_earned,
            cv.tier_points,
            cv.balance,
            cv.tier.as_str()
        ),
        (2120, 2120, 2120, "silver")
    );
    assert_eq!((dv.lifetime_earned, dv.tier.as_str()), (610, "bronze"));
    let mut earned: Vec<(String, i64)> = env
        .transactions(&cm)
        .await
        .into_iter()
        .map(|t| (t.rule, t.points))
        .collect();
    earned.reverse();
    let expect = [
        ("feature", 600),
        ("feature", 600),
        ("feature", 900),
        ("support", 15),
        ("support", 5),
    ];
    assert_eq!(
        earned,
        expect.map(|(r, n)| (r.to_owned(), n)).to_vec(),
        "in stream order"
    );
    let moves: Vec<(String, String, String)> = env
        .emitted::<pb::TierChanged>("clm.loyalty.v1.TierChanged")
        .await
        .into_iter()
        .map(|t| (t.customer, t.old_tier, t.new_tier))
        .collect();
    assert!(
        moves.contains(&(c.clone(), "bronze".into(), "silver".into())),
        "{moves:?}"
    );
    assert_eq!(moves.len(), 3, "two enrolments and one move up: {moves:?}");
}

/// 50 concurrent UseCoupon calls on one code: exactly one succeeds.
#[tokio::test]
async fn a_coupon_is_used_once_under_concurrent_use() {
    let env = Env::start().await;
    env.program("stars", program()).await;
    let c = env.new_customer("coupon@example.com").await;
    let m = member_name("stars", &c);
    env.enroll("stars", &c).await;
    env.earn(&m, 100, "e").await;
    env.reward(
        "stars",
        "voucher",
        pb::Reward {
            cost: 50,
            code_kind: pb::CodeKind::Voucher as i32,
            ..Default::default()
        },
    )
    .await;
    let code = env
        .redeem(&m, "programs/stars/rewards/voucher", "v")
        .await
        .unwrap()
        .coupon
        .unwrap()
        .code;
    let mut calls = futures::stream::FuturesUnordered::new();
    for k in 0..50 {
        let mut api = env.api();
        let code = code.clone();
        calls.push(async move {
            api.use_coupon(pb::UseCouponRequest {
                program: "programs/stars".into(),
                code,
                request_id: format!("use-{k}"),
            })
            .await
        });
    }
    use futures::StreamExt;
    let mut ok = 0;
    while let Some(r) = calls.next().await {
        match r {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(reason(&e), "COUPON_USED", "{e:?}"),
        }
    }
    assert_eq!(ok, 1);
}

/// The customer service, following loyalty's stream, moves a member who
/// reaches the program's loyalty tier into the LOYALTY stage.
#[tokio::test]
async fn reaching_the_loyalty_tier_moves_the_customer_into_loyalty() {
    let mut env = Env::start().await;
    // Restart the customer service on its address, now following loyalty.
    let old = env.customer.take().unwrap();
    let mut cc = env._backends.0.config("customer");
    cc.listen = old.addr;
    cc.change_poll_interval_ms = 50;
    cc.peers.insert("loyalty".into(), env.loyalty.url());
    old.stop().await;
    env.customer =
        Some(start_with_clock(&clm_customer::DESCRIPTOR, cc, Arc::new(env.clock.clone())).await);
    let mut p = program();
    p.loyalty_tier = "silver".into();
    env.program("stars", p).await;
    let c = env.new_customer("loyal@example.com").await;
    let m = member_name("stars", &c);
    env.enroll("stars", &c).await;
    env.earn(&m, 1000, "big").await;
    assert_eq!(env.member(&m).await.tier, "silver");
    eventually(std::time::Duration::from_secs(20), || async {
        env.customers()
            .get_customer(cpb::GetCustomerRequest { name: c.clone() })
            .await
            .unwrap()
            .into_inner()
            .stage
            == cpb::Stage::Loyalty as i32
    })
    .await;
}

/// A completed survey response (the feedback service's stream) earns the
/// program's survey bonus, once.
#[tokio::test]
async fn a_completed_survey_earns_the_survey_bonus() {
    use clm_proto::feedback as fpb;
    use clm_proto::feedback::feedback_service_client::FeedbackServiceClient;
    let env = Env::start_with(true).await;
    let feedback = &env.feedback.as_ref().unwrap().0;
    let mut p = program();
    p.earning_rules.push(pb::EarningRule {
        id: "survey".into(),
        trigger: pb::EarningTrigger::SurveyCompleted as i32,
        points: 25,
        ..Default::default()
    });
    env.program("stars", p).await;
    let c = env.new_customer("survey@example.com").await;
    let m = member_name("stars", &c);
    env.enroll("stars", &c).await;
    env.customers()
        .set_consent(cpb::SetConsentRequest {
            name: c.clone(),
            settings: vec![cpb::ConsentSetting {
                purpose: cpb::ConsentPurpose::Surveys as i32,
                channel: cpb::ConsentChannel::Email as i32,
                state: cpb::ConsentState::Granted as i32,
            }],
            source: cpb::ConsentSource::Api as i32,
            request_id: "consent".into(),
        })
        .await
        .unwrap();
    let mut fb = FeedbackServiceClient::new(feedback.channel());
    let survey = fb
        .create_survey(fpb::CreateSurveyRequest {
            survey: Some(fpb::Survey {
                display_name: "NPS".into(),
                questions: vec![fpb::Question {
                    id: "nps".into(),
                    kind: fpb::QuestionKind::Nps as i32,
                    text: std::collections::BTreeMap::from([(
                        "en".to_owned(),
                        "How likely?".to_owned(),
                    )]),
                    required: true,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            survey_id: "nps".into(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    fb.publish_survey(fpb::PublishSurveyRequest {
        name: survey.name.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let invitation = eventually(std::time::Duration::from_secs(30), || {
        let mut fb = fb.clone();
        let (survey, c) = (survey.name.clone(), c.clone());
        async move {
            fb.create_invitations(fpb::CreateInvitationsRequest {
                survey,
                customers: vec![c],
                channel: cpb::ConsentChannel::Email as i32,
                ..Default::default()
            })
            .await
            .ok()?
            .into_inner()
            .invitations
            .pop()
        }
    })
    .await;
    fb.submit_response(fpb::SubmitResponseRequest {
        name: format!("{}/responses/r1", survey.name),
        invitation: invitation.name.clone(),
        answers: vec![fpb::Answer {
            question: "nps".into(),
            value: Some(fpb::answer::Value::Number(9)),
            ..Default::default()
        }],
        finish: true,
    })
    .await
    .unwrap();
    eventually(std::time::Duration::from_secs(30), || async {
        env.member(&m).await.balance == 25
    })
    .await;
    let earned: Vec<pb::Transaction> = env.transactions(&m).await;
    assert_eq!(earned.len(), 1);
    assert_eq!(earned[0].rule, "survey");
}
