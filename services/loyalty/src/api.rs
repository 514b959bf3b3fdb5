//! `clm.loyalty.v1.LoyaltyService`: each rpc authorizes (one [`respond`]
//! call), converts the request, runs one read or one idempotent write
//! transaction (through [`crate::ledger`]), and converts the result back.
//! Calls to the segmentation service (segment-only rewards) happen before
//! the transaction opens, never inside it.

use crate::convert::{self, member_name, member_of, program_id, reward_name};
use crate::error::LoyaltyError;
use crate::ledger::{self, Program, Trigger, Who};
use crate::redeem;
use crate::store::entity::{redemptions, rewards};
use crate::store::{self, kind};
use clm_domain::loyalty as dl;
use clm_domain::validation::{page_size, request_id};
use clm_platform::audit::{self, Change};
use clm_platform::auth::{Policy, Role};
use clm_platform::convert::{check_etag, from_timestamp, timestamp};
use clm_platform::db::{from_micros, to_micros};
use clm_platform::error::respond;
use clm_platform::lanes::Lanes;
use clm_platform::outbox::NewEvent;
use clm_platform::page::Pager;
use clm_platform::peer::Idempotency;
use clm_platform::timers;
use clm_platform::{Error, Result, Runtime, idempotency};
use clm_proto::loyalty as pb;
use clm_proto::loyalty::loyalty_service_server::LoyaltyService;
use sea_orm::{ConnectionTrait, TransactionTrait};
use std::sync::Arc;
use tokio::sync::MutexGuard;
use tonic::{Request, Response, Status};

/// Roles that shape programs and the reward catalogue.
const PROGRAM_WRITERS: &[Role] = &[Role::Marketer];
/// Roles that move members' points (platforms at the till, marketers).
const OPERATORS: &[Role] = &[Role::Marketer, Role::Service];
/// Roles that read programs, members and ledgers.
const READERS: &[Role] = &[
    Role::Marketer,
    Role::Analyst,
    Role::Service,
    Role::SegmentOwner,
    Role::DataSteward,
];

/// Who may call each rpc (admin may call all).
pub const POLICY: Policy = Policy {
    service: "clm.loyalty.v1.LoyaltyService",
    rules: &[
        ("CreateProgram", PROGRAM_WRITERS),
        ("GetProgram", READERS),
        ("UpdateProgram", PROGRAM_WRITERS),
        ("EnrollMember", OPERATORS),
        ("GetMember", READERS),
        ("ListMembers", READERS),
        ("EarnPoints", OPERATORS),
        ("AdjustPoints", OPERATORS),
        ("ListTransactions", READERS),
        ("CreateReward", PROGRAM_WRITERS),
        ("GetReward", READERS),
        ("ListRewards", READERS),
        ("UpdateReward", PROGRAM_WRITERS),
        ("ListEligibleRewards", READERS),
        ("RedeemReward", OPERATORS),
        ("CancelRedemption", OPERATORS),
        ("ValidateCoupon", READERS),
        ("UseCoupon", OPERATORS),
        ("CreateReferralCode", OPERATORS),
        ("ClaimReferral", OPERATORS),
        ("SimulateEvent", READERS),
    ],
};

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;

/// The loyalty service.
#[derive(Debug, Clone)]
pub struct LoyaltyApi {
    rt: Runtime,
    /// Same-member (and same-coupon) calls queue here before they take a
    /// pool connection, so a burst for a few members cannot park the pool
    /// on their row locks (`clm_platform::lanes`).
    lanes: Arc<Lanes>,
}

fn required_rid(v: &str) -> Result<String> {
    request_id("request_id", v)?.ok_or_else(|| Error::invalid("request_id", "is required"))
}

fn not_member(program: &str, customer: &str) -> Error {
    Error::NotFound(member_of(program, customer))
}

fn stamp(us: i64) -> Option<prost_types::Timestamp> {
    Some(timestamp(from_micros(us)))
}

impl LoyaltyApi {
    /// Serves from `rt`.
    pub fn new(rt: Runtime) -> Self {
        Self {
            rt,
            lanes: Arc::default(),
        }
    }

    /// Waits for the member's lane (see [`LoyaltyApi::lanes`]).
    async fn member_lane(&self, program: &str, customer: &str) -> MutexGuard<'_, ()> {
        self.lanes
            .enter(&format!("member/{program}/{customer}"))
            .await
    }

    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        clm_domain::clock::micros(self.rt.clock.now())
    }

    /// A read-only transaction whose statements all see one snapshot
    /// (PostgreSQL REPEATABLE READ; a SQLite read transaction is one), so a
    /// member's figures from several queries agree with each other.
    /// ListMembers with `customer`: that customer's memberships, of the
    /// parent program or (`programs/-`) of every program, in one page.
    async fn memberships_of(
        &self,
        req: &pb::ListMembersRequest,
    ) -> Result<pb::ListMembersResponse> {
        let customer = convert::customer("customer", &req.customer)?;
        let program = if req.parent == "programs/-" {
            None
        } else {
            Some(program_id("parent", &req.parent)?)
        };
        page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)?;
        if !req.tier.is_empty() && !convert::valid_id(&req.tier) {
            return Err(Error::invalid("tier", "must be a tier id"));
        }
        let read = self.snapshot().await?;
        let rows = store::memberships(&read, &customer, program.as_deref()).await?;
        let now = to_micros(self.now());
        let mut members = Vec::with_capacity(rows.len());
        for row in rows {
            if !req.tier.is_empty() && row.tier != req.tier {
                continue;
            }
            let p = Program::load(&read, &row.program).await?;
            members.extend(ledger::member_views(&read, &p, std::slice::from_ref(&row), now).await?);
        }
        read.commit().await?;
        Ok(pb::ListMembersResponse {
            members,
            next_page_token: String::new(),
        })
    }

    async fn snapshot(&self) -> Result<sea_orm::DatabaseTransaction> {
        let db = &self.rt.read;
        Ok(if clm_platform::db::is_postgres(db) {
            db.begin_with_config(
                Some(sea_orm::IsolationLevel::RepeatableRead),
                Some(sea_orm::AccessMode::ReadOnly),
            )
            .await?
        } else {
            db.begin().await?
        })
    }

    /// Asks segmentation whether `customer` is in `segment` (no
    /// transaction is open here).
    async fn in_segment(&self, segment: &str, customer: &str) -> Result<bool> {
        let peer = self.rt.peers.get("segmentation").ok_or_else(|| {
            Error::Unavailable("segment-only reward: peers.segmentation is not configured".into())
        })?;
        let req = clm_proto::segmentation::IsMemberRequest {
            segment: segment.to_owned(),
            customer: customer.to_owned(),
        };
        let answer = peer
            .unary("IsMember", Idempotency::Idempotent, req, |ch, r| async move {
                clm_proto::segmentation::segmentation_service_client::SegmentationServiceClient::new(ch)
                    .is_member(r)
                    .await
            })
            .await
            .map_err(|e| Error::Unavailable(format!("segmentation: {}", e.code())))?;
        Ok(answer.member)
    }

    /// Which of `segments` the customer is in: one BatchIsMember call.
    async fn in_segments(
        &self,
        segments: &[String],
        customer: &str,
    ) -> Result<std::collections::HashSet<String>> {
        if segments.is_empty() {
            return Ok(Default::default());
        }
        let peer = self.rt.peers.get("segmentation").ok_or_else(|| {
            Error::Unavailable("segment-only reward: peers.segmentation is not configured".into())
        })?;
        let req = clm_proto::segmentation::BatchIsMemberRequest {
            checks: segments
                .iter()
                .map(|s| clm_proto::segmentation::MembershipCheck {
                    segment: s.clone(),
                    customer: customer.to_owned(),
                })
                .collect(),
        };
        let answer = peer
            .unary("BatchIsMember", Idempotency::Idempotent, req, |ch, r| async move {
                clm_proto::segmentation::segmentation_service_client::SegmentationServiceClient::new(ch)
                    .batch_is_member(r)
                    .await
            })
            .await
            .map_err(|e| Error::Unavailable(format!("segmentation: {}", e.code())))?;
        Ok(answer
            .answers
            .into_iter()
            .filter(|a| a.member)
            .map(|a| a.segment)
            .collect())
    }

    async fn check_segment(&self, reward: &pb::Reward, customer: &str) -> Result<()> {
        if reward.eligible_segment.is_empty()
            || self.in_segment(&reward.eligible_segment, customer).await?
        {
            return Ok(());
        }
        Err(LoyaltyError::NotEligible(format!(
            "{} is only for members of {}",
            reward.name, reward.eligible_segment
        ))
        .into())
    }

    async fn earn_in(
        &self,
        txn: &impl ConnectionTrait,
        program: &str,
        customer: &str,
        req: &pb::EarnPointsRequest,
        now_us: i64,
    ) -> Result<(pb::EarnPointsResponse, Vec<NewEvent>)> {
        let p = Program::load(txn, program).await?;
        let m = store::lock_members(txn, program, &[customer])
            .await?
            .pop()
            .ok_or_else(|| not_member(program, customer))?;
        let who = Who::current(&req.reason);
        let (made, mut events) = match &req.earning {
            Some(pb::earn_points_request::Earning::Points(points)) => {
                let t = ledger::earn(
                    txn,
                    &p,
                    customer,
                    *points,
                    kind::EARN,
                    "",
                    ledger::fresh_source("earn"),
                    now_us,
                    false,
                    &who,
                )
                .await?;
                let made: Vec<_> = t.into_iter().collect();
                let balance = dl::balance(
                    &store::open_lots(txn, program, customer, now_us).await?,
                    now_us,
                );
                let mut events: Vec<NewEvent> = made
                    .iter()
                    .map(|t| ledger::points_changed(&p, t, &[], balance))
                    .collect();
                if let Some(tc) = ledger::review_tier(txn, &p, &m, now_us).await? {
                    events.push(NewEvent::new(customer, &tc));
                }
                (made, events)
            }
            Some(pb::earn_points_request::Earning::Activity(a)) => {
                let (trigger, at_us, source) = activity(a, now_us)?;
                ledger::earn_and_review(txn, &p, &m, &trigger, &source, at_us, now_us, &who).await?
            }
            None => return Err(Error::invalid("points", "points or activity is required")),
        };
        let m = store::member(txn, program, customer)
            .await?
            .ok_or_else(|| not_member(program, customer))?;
        let member = ledger::member_view(txn, &p, &m, now_us).await?;
        let transactions: Vec<pb::Transaction> = made
            .iter()
            .map(|t| convert::transaction(t, Vec::new()))
            .collect();
        let response = pb::EarnPointsResponse {
            transactions,
            member: Some(member),
        };
        audit::record(
            txn,
            crate::SERVICE,
            from_micros(now_us),
            Change::action(member_of(program, customer), &response).customer(customer),
        )
        .await?;
        events.shrink_to_fit();
        Ok((response, events))
    }
}

/// An activity as a trigger, its instant (not after now) and its source.
fn activity(a: &pb::Activity, now_us: i64) -> Result<(Trigger, i64, String)> {
    if a.touchpoint_type <= 0
        || clm_proto::customer::TouchpointType::try_from(a.touchpoint_type).is_err()
    {
        return Err(Error::invalid("activity.touchpoint_type", "is required"));
    }
    if let Some(m) = &a.revenue
        && (!clm_domain::money::is_iso_4217(&m.currency_code) || m.amount_minor < 0)
    {
        return Err(Error::invalid(
            "activity.revenue",
            "must be a non-negative ISO 4217 amount",
        ));
    }
    let at_us = match &a.occurred_time {
        Some(t) => to_micros(from_timestamp("activity.occurred_time", t)?).min(now_us),
        None => now_us,
    };
    let source = if a.event_id.is_empty() {
        ledger::fresh_source("activity")
    } else {
        clm_domain::ids::event_id("activity.event_id", &a.event_id)?;
        format!("activity/{}", a.event_id)
    };
    Ok((
        Trigger::Touchpoint {
            kind: a.touchpoint_type,
            revenue: a.revenue.clone(),
        },
        at_us,
        source,
    ))
}

/// Draws as proto with their lots' expiry.
async fn with_expiry(db: &impl ConnectionTrait, draws: &[dl::Draw]) -> Result<Vec<pb::LotDraw>> {
    let ids: Vec<i64> = draws.iter().map(|d| d.lot).collect();
    let exp = store::lot_expiries(db, &ids).await?;
    Ok(draws
        .iter()
        .map(|d| pb::LotDraw {
            lot: d.lot,
            points: d.amount,
            lot_expire_time: exp.get(&d.lot).copied().and_then(convert::ts),
        })
        .collect())
}

/// Applies a top-level update mask (empty: everything) of `new` onto `old`.
fn masked_program(
    old: &pb::Program,
    new: &pb::Program,
    mask: Option<&prost_types::FieldMask>,
) -> Result<pb::Program> {
    let paths = mask.map(|m| m.paths.clone()).unwrap_or_default();
    if paths.is_empty() {
        return Ok(new.clone());
    }
    let mut out = old.clone();
    for (i, path) in paths.iter().enumerate() {
        match path.as_str() {
            "display_name" => out.display_name = new.display_name.clone(),
            "points_currency" => out.points_currency = new.points_currency.clone(),
            "earning_rules" => out.earning_rules = new.earning_rules.clone(),
            "pending_period" => out.pending_period = new.pending_period,
            "expiry" => out.expiry = new.expiry,
            "tiers" => out.tiers = new.tiers.clone(),
            "tier_window" => out.tier_window = new.tier_window,
            "downgrade_grace" => out.downgrade_grace = new.downgrade_grace,
            "loyalty_tier" => out.loyalty_tier = new.loyalty_tier.clone(),
            "auto_enroll" => out.auto_enroll = new.auto_enroll,
            "campaign_budgets" => out.campaign_budgets = new.campaign_budgets.clone(),
            "coupon_validity" => out.coupon_validity = new.coupon_validity,
            "primary" => out.primary = new.primary,
            _ => {
                return Err(Error::invalid(
                    format!("update_mask.paths[{i}]"),
                    "is not a field of Program that can be changed",
                ));
            }
        }
    }
    Ok(out)
}

fn masked_reward(
    old: &pb::Reward,
    new: &pb::Reward,
    mask: Option<&prost_types::FieldMask>,
) -> Result<pb::Reward> {
    let paths = mask.map(|m| m.paths.clone()).unwrap_or_default();
    if paths.is_empty() {
        return Ok(new.clone());
    }
    let mut out = old.clone();
    for (i, path) in paths.iter().enumerate() {
        match path.as_str() {
            "display_name" => out.display_name = new.display_name.clone(),
            "cost" => out.cost = new.cost,
            "stock" => out.stock = new.stock,
            "per_member_limit" => out.per_member_limit = new.per_member_limit,
            "valid_from_time" => out.valid_from_time = new.valid_from_time,
            "valid_until_time" => out.valid_until_time = new.valid_until_time,
            "eligible_tiers" => out.eligible_tiers = new.eligible_tiers.clone(),
            "eligible_segment" => out.eligible_segment = new.eligible_segment.clone(),
            "campaign" => out.campaign = new.campaign.clone(),
            "value" => out.value = new.value.clone(),
            "coupon_validity" => out.coupon_validity = new.coupon_validity,
            "code_kind" => out.code_kind = new.code_kind,
            "stock_slots" => out.stock_slots = new.stock_slots,
            _ => {
                return Err(Error::invalid(
                    format!("update_mask.paths[{i}]"),
                    "is not a field of Reward that can be changed",
                ));
            }
        }
    }
    Ok(out)
}

fn stored_program(p: &pb::Program) -> Vec<u8> {
    let mut s = p.clone();
    s.name = String::new();
    s.etag = String::new();
    s.create_time = None;
    s.update_time = None;
    prost::Message::encode_to_vec(&s)
}

fn reward_row(
    program: &str,
    id: &str,
    r: &pb::Reward,
    version: i64,
    create_us: i64,
) -> rewards::Model {
    let mut s = r.clone();
    s.name = String::new();
    s.etag = String::new();
    s.stock = None;
    s.stock_slots = convert::stock_slots(r.stock_slots);
    rewards::Model {
        program: program.to_owned(),
        id: id.to_owned(),
        body: prost::Message::encode_to_vec(&s),
        cost: r.cost,
        stock: r.stock,
        per_member_limit: r.per_member_limit,
        campaign: r.campaign.clone(),
        value_minor: r.value.as_ref().map_or(0, |v| v.amount_minor),
        version,
        create_us,
    }
}

/// Refuses to mark `id` primary while another program is (checked in the
/// write transaction; the unique index `loyalty_programs_primary` stops a
/// concurrent second mark, which is then ABORTED).
async fn only_primary(txn: &impl ConnectionTrait, id: &str) -> Result<()> {
    match store::other_primary(txn, id).await? {
        Some(other) => Err(Error::FailedPrecondition {
            reason: "PRIMARY_PROGRAM_EXISTS",
            message: format!(
                "programs/{other} is the primary program; unmark it before marking another"
            ),
        }),
        None => Ok(()),
    }
}

/// The counter rows a reward's stock is spread over.
fn slot_count(r: &pb::Reward) -> usize {
    usize::try_from(convert::stock_slots(r.stock_slots)).unwrap_or(1)
}

/// Keeps each campaign's budget slots in line with the program: a new
/// total starts whole; a changed total moves what is left by the change
/// (under the slots' locks, so redemptions in flight count); a campaign
/// without a total (or gone) has none.
async fn sync_budgets(
    txn: &impl ConnectionTrait,
    program: &str,
    old: Option<&pb::Program>,
    new: &pb::Program,
) -> Result<()> {
    let total = |p: &pb::Program, c: &str| {
        p.campaign_budgets
            .iter()
            .find(|b| b.campaign == c)
            .and_then(|b| b.total.as_ref())
            .map(|t| t.amount_minor)
    };
    let mut campaigns: std::collections::BTreeSet<&str> = new
        .campaign_budgets
        .iter()
        .map(|b| b.campaign.as_str())
        .collect();
    if let Some(o) = old {
        campaigns.extend(o.campaign_budgets.iter().map(|b| b.campaign.as_str()));
    }
    for c in campaigns {
        let before = old.and_then(|o| total(o, c));
        let after = total(new, c);
        if before == after {
            continue;
        }
        let counter = store::budget(program, c);
        let left = match (before, after) {
            (_, None) => None,
            (None, Some(t)) => Some(t),
            (Some(b), Some(t)) => Some(match counter.lock_sum(txn).await? {
                Some(left) => left + (t - b),
                None => t,
            }),
        };
        counter
            .replace(txn, left, store::migration::BUDGET_SLOTS)
            .await?;
    }
    Ok(())
}

#[tonic::async_trait]
impl LoyaltyService for LoyaltyApi {
    async fn create_program(
        &self,
        request: Request<pb::CreateProgramRequest>,
    ) -> Result<Response<pb::Program>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let rid = request_id("request_id", &req.request_id)?;
            let body = req
                .program
                .clone()
                .ok_or_else(|| Error::invalid("program", "is required"))?;
            convert::check_program("program", &body)?;
            let id = if req.program_id.is_empty() {
                format!("p-{}", uuid::Uuid::now_v7().simple())
            } else {
                req.program_id.clone()
            };
            if !convert::valid_id(&id) {
                return Err(Error::invalid(
                    "program_id",
                    "must be 1-63 of a-z, 0-9, - and _, starting with a letter",
                ));
            }
            let now = self.now();
            idempotency::write(&self.rt, "CreateProgram", rid, &req, now, async |txn| {
                if body.primary {
                    only_primary(txn, &id).await?;
                }
                let row = crate::store::entity::programs::Model {
                    id: id.clone(),
                    body: stored_program(&body),
                    version: 1,
                    create_us: to_micros(now),
                    update_us: to_micros(now),
                    is_primary: i16::from(body.primary),
                };
                if !store::insert_program(txn, &row).await? {
                    return Err(LoyaltyError::Exists(format!("programs/{id}")).into());
                }
                sync_budgets(txn, &id, None, &body).await?;
                let out = Program::load(txn, &id).await?.body;
                audit::record(txn, crate::SERVICE, now, Change::create(&out.name, &out)).await?;
                Ok((out, Vec::new()))
            })
            .await
        })
        .await
    }

    async fn get_program(
        &self,
        request: Request<pb::GetProgramRequest>,
    ) -> Result<Response<pb::Program>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let id = program_id("name", &req.name)?;
            Ok(Program::load(&self.rt.read, &id).await?.body)
        })
        .await
    }

    async fn update_program(
        &self,
        request: Request<pb::UpdateProgramRequest>,
    ) -> Result<Response<pb::Program>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let rid = request_id("request_id", &req.request_id)?;
            let new = req
                .program
                .clone()
                .ok_or_else(|| Error::invalid("program", "is required"))?;
            let id = program_id("program.name", &new.name)?;
            let now = self.now();
            idempotency::write(&self.rt, "UpdateProgram", rid, &req, now, async |txn| {
                let old = Program::load(txn, &id).await?;
                check_etag(&new.etag, old.version)?;
                let merged = masked_program(&old.body, &new, req.update_mask.as_ref())?;
                convert::check_program("program", &merged)?;
                if merged.primary {
                    only_primary(txn, &id).await?;
                }
                if !store::update_program(
                    txn,
                    &id,
                    old.version,
                    stored_program(&merged),
                    merged.primary,
                    to_micros(now),
                )
                .await?
                {
                    return Err(Error::Aborted(
                        "the program changed meanwhile; re-read and retry".into(),
                    ));
                }
                sync_budgets(txn, &id, Some(&old.body), &merged).await?;
                let out = Program::load(txn, &id).await?.body;
                audit::record(
                    txn,
                    crate::SERVICE,
                    now,
                    Change::update(&out.name, &old.body, &out).mask(req.update_mask.as_ref()),
                )
                .await?;
                Ok((out, Vec::new()))
            })
            .await
        })
        .await
    }

    async fn enroll_member(
        &self,
        request: Request<pb::EnrollMemberRequest>,
    ) -> Result<Response<pb::Member>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let rid = request_id("request_id", &req.request_id)?;
            let program = program_id("program", &req.program)?;
            let customer = convert::customer("customer", &req.customer)?;
            let now = self.now();
            let now_us = to_micros(now);
            idempotency::write(&self.rt, "EnrollMember", rid, &req, now, async |txn| {
                let p = Program::load(txn, &program).await?;
                let (m, created, events) = ledger::enroll(txn, &p, &customer, None, now_us).await?;
                let out = ledger::member_view(txn, &p, &m, now_us).await?;
                if created {
                    audit::record(
                        txn,
                        crate::SERVICE,
                        now,
                        Change::create(&out.name, &out).customer(&customer),
                    )
                    .await?;
                }
                Ok((out, events))
            })
            .await
        })
        .await
    }

    async fn get_member(
        &self,
        request: Request<pb::GetMemberRequest>,
    ) -> Result<Response<pb::Member>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let (program, customer) = member_name("name", &req.name)?;
            let read = self.snapshot().await?;
            let p = Program::load(&read, &program).await?;
            let m = store::member(&read, &program, &customer)
                .await?
                .ok_or_else(|| not_member(&program, &customer))?;
            let view = ledger::member_view(&read, &p, &m, to_micros(self.now())).await?;
            read.commit().await?;
            Ok(view)
        })
        .await
    }

    async fn list_members(
        &self,
        request: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            if !req.customer.is_empty() {
                return self.memberships_of(&req).await;
            }
            let program = program_id("parent", &req.parent)?;
            let size = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)?;
            if !req.tier.is_empty() && !convert::valid_id(&req.tier) {
                return Err(Error::invalid("tier", "must be a tier id"));
            }
            let pager = Pager::new(&["members", &program, &req.tier]);
            let after: Option<(String, String)> = pager.after(&req.page_token)?;
            let read = self.snapshot().await?;
            let p = Program::load(&read, &program).await?;
            let rows = store::list_members(
                &read,
                &program,
                (!req.tier.is_empty()).then_some(req.tier.as_str()),
                after.as_ref().map(|(c, _)| c.as_str()),
                u64::from(size) + 1,
            )
            .await?;
            // The page's figures in two set-based queries, not a view per member.
            let views = ledger::member_views(&read, &p, &rows, to_micros(self.now())).await?;
            read.commit().await?;
            let (members, next) = pager.page(&views, size as usize, Clone::clone, |m| {
                (m.customer.clone(), String::new())
            });
            Ok(pb::ListMembersResponse {
                members,
                next_page_token: next,
            })
        })
        .await
    }

    async fn earn_points(
        &self,
        request: Request<pb::EarnPointsRequest>,
    ) -> Result<Response<pb::EarnPointsResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let rid = required_rid(&req.request_id)?;
            let (program, customer) = member_name("member", &req.member)?;
            if let Some(pb::earn_points_request::Earning::Points(p)) = req.earning
                && p <= 0
            {
                return Err(Error::invalid("points", "must be positive"));
            }
            if req.reason.len() > convert::MAX_TEXT {
                return Err(Error::invalid("reason", "is too long"));
            }
            let _lane = self.member_lane(&program, &customer).await;
            let now = self.now();
            let out =
                idempotency::write(&self.rt, "EarnPoints", Some(rid), &req, now, async |txn| {
                    self.earn_in(txn, &program, &customer, &req, to_micros(now))
                        .await
                })
                .await?;
            self.rt.timers.wake();
            Ok(out)
        })
        .await
    }

    async fn adjust_points(
        &self,
        request: Request<pb::AdjustPointsRequest>,
    ) -> Result<Response<pb::AdjustPointsResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let rid = required_rid(&req.request_id)?;
            let (program, customer) = member_name("member", &req.member)?;
            if req.points == 0 {
                return Err(Error::invalid("points", "must not be 0"));
            }
            if req.reason.is_empty() || req.reason.len() > convert::MAX_TEXT {
                return Err(Error::invalid("reason", "is required (at most 200 bytes)"));
            }
            let _lane = self.member_lane(&program, &customer).await;
            let now = self.now();
            let now_us = to_micros(now);
            let out = idempotency::write(
                &self.rt,
                "AdjustPoints",
                Some(rid),
                &req,
                now,
                async |txn| {
                    let p = Program::load(txn, &program).await?;
                    let m = store::lock_members(txn, &program, &[&customer])
                        .await?
                        .pop()
                        .ok_or_else(|| not_member(&program, &customer))?;
                    let who = Who::current(&req.reason);
                    let (t, draws, shown) = if req.points > 0 {
                        let t = ledger::earn(
                            txn,
                            &p,
                            &customer,
                            req.points,
                            kind::ADJUST,
                            "",
                            ledger::fresh_source("adjust"),
                            now_us,
                            false,
                            &who,
                        )
                        .await?
                        .ok_or_else(|| Error::internal("adjust source taken"))?;
                        (t, Vec::new(), Vec::new())
                    } else {
                        let spent = ledger::spend(
                            txn,
                            &program,
                            &customer,
                            -req.points,
                            kind::ADJUST,
                            ledger::fresh_source("adjust"),
                            now_us,
                            &who,
                        )
                        .await?;
                        let shown = spent.lot_draws();
                        (spent.txn, spent.draws, shown)
                    };
                    let member = ledger::member_view(txn, &p, &m, now_us).await?;
                    let out = pb::AdjustPointsResponse {
                        transaction: Some(convert::transaction(&t, shown)),
                        member: Some(member.clone()),
                    };
                    audit::record(
                        txn,
                        crate::SERVICE,
                        now,
                        Change::action(&member.name, &out).customer(&customer),
                    )
                    .await?;
                    Ok((
                        out,
                        vec![ledger::points_changed(&p, &t, &draws, member.balance)],
                    ))
                },
            )
            .await?;
            self.rt.timers.wake();
            Ok(out)
        })
        .await
    }

    async fn list_transactions(
        &self,
        request: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let (program, customer) = member_name("parent", &req.parent)?;
            let size = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)?;
            let pager = Pager::new(&["transactions", &req.parent]);
            let after: Option<(i64, String)> = pager.after(&req.page_token)?;
            let rows = store::list_txns(
                &self.rt.read,
                &program,
                &customer,
                after.map(|(id, _)| id),
                u64::from(size) + 1,
            )
            .await?;
            let ids: Vec<i64> = rows.iter().map(|t| t.id).collect();
            let draws = store::draws_of(&self.rt.read, &ids).await?;
            let lots: Vec<i64> = draws.iter().map(|(_, d)| d.lot).collect();
            let exp = store::lot_expiries(&self.rt.read, &lots).await?;
            let (transactions, next) = pager.page(
                &rows,
                size as usize,
                |t| {
                    let mine = draws
                        .iter()
                        .filter(|(x, _)| *x == t.id)
                        .map(|(_, d)| pb::LotDraw {
                            lot: d.lot,
                            points: d.amount,
                            lot_expire_time: exp.get(&d.lot).copied().and_then(convert::ts),
                        })
                        .collect();
                    convert::transaction(t, mine)
                },
                |t| (t.id, String::new()),
            );
            Ok(pb::ListTransactionsResponse {
                transactions,
                next_page_token: next,
            })
        })
        .await
    }

    async fn create_reward(
        &self,
        request: Request<pb::CreateRewardRequest>,
    ) -> Result<Response<pb::Reward>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let rid = request_id("request_id", &req.request_id)?;
            let program = program_id("parent", &req.parent)?;
            let body = req
                .reward
                .clone()
                .ok_or_else(|| Error::invalid("reward", "is required"))?;
            convert::check_reward("reward", &body)?;
            let id = if req.reward_id.is_empty() {
                format!("r-{}", uuid::Uuid::now_v7().simple())
            } else {
                req.reward_id.clone()
            };
            if !convert::valid_id(&id) {
                return Err(Error::invalid(
                    "reward_id",
                    "must be 1-63 of a-z, 0-9, - and _, starting with a letter",
                ));
            }
            let now = self.now();
            idempotency::write(&self.rt, "CreateReward", rid, &req, now, async |txn| {
                Program::load(txn, &program).await?;
                let row = reward_row(&program, &id, &body, 1, to_micros(now));
                if !store::insert_reward(txn, &row).await? {
                    return Err(
                        LoyaltyError::Exists(format!("programs/{program}/rewards/{id}")).into(),
                    );
                }
                if body.stock.is_some() {
                    store::stock(&program, &id)
                        .replace(txn, body.stock, slot_count(&body))
                        .await?;
                }
                let mut out = convert::reward(&row)?;
                out.create_time = stamp(to_micros(now));
                audit::record(txn, crate::SERVICE, now, Change::create(&out.name, &out)).await?;
                Ok((out, Vec::new()))
            })
            .await
        })
        .await
    }

    async fn get_reward(
        &self,
        request: Request<pb::GetRewardRequest>,
    ) -> Result<Response<pb::Reward>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let (program, id) = reward_name("name", &req.name)?;
            let row = store::reward(&self.rt.read, &program, &id)
                .await?
                .ok_or_else(|| Error::NotFound(req.name.clone()))?;
            convert::reward(&row)
        })
        .await
    }

    async fn list_rewards(
        &self,
        request: Request<pb::ListRewardsRequest>,
    ) -> Result<Response<pb::ListRewardsResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let program = program_id("parent", &req.parent)?;
            let size = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)?;
            let pager = Pager::new(&["rewards", &program]);
            let after: Option<(String, String)> = pager.after(&req.page_token)?;
            let rows = store::list_rewards(
                &self.rt.read,
                &program,
                after.as_ref().map(|(a, _)| a.as_str()),
                u64::from(size) + 1,
            )
            .await?;
            let shown = rows
                .iter()
                .map(convert::reward)
                .collect::<Result<Vec<_>>>()?;
            let (rewards, next) = pager.page(&shown, size as usize, Clone::clone, |r| {
                (
                    r.name.rsplit('/').next().unwrap_or_default().to_owned(),
                    String::new(),
                )
            });
            Ok(pb::ListRewardsResponse {
                rewards,
                next_page_token: next,
            })
        })
        .await
    }

    async fn update_reward(
        &self,
        request: Request<pb::UpdateRewardRequest>,
    ) -> Result<Response<pb::Reward>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let rid = request_id("request_id", &req.request_id)?;
            let new = req
                .reward
                .clone()
                .ok_or_else(|| Error::invalid("reward", "is required"))?;
            let (program, id) = reward_name("reward.name", &new.name)?;
            let now = self.now();
            idempotency::write(&self.rt, "UpdateReward", rid, &req, now, async |txn| {
                let row = store::reward(txn, &program, &id)
                    .await?
                    .ok_or_else(|| Error::NotFound(new.name.clone()))?;
                check_etag(&new.etag, row.version)?;
                let old = convert::reward(&row)?;
                let merged = masked_reward(&old, &new, req.update_mask.as_ref())?;
                convert::check_reward("reward", &merged)?;
                let next = reward_row(&program, &id, &merged, row.version + 1, row.create_us);
                let set_stock = req
                    .update_mask
                    .as_ref()
                    .is_none_or(|m| m.paths.is_empty() || m.paths.iter().any(|p| p == "stock"));
                if !store::update_reward(txn, &next, set_stock).await? {
                    return Err(Error::Aborted(
                        "the reward changed meanwhile; re-read and retry".into(),
                    ));
                }
                // A new stock replaces what remains, exactly; new slots
                // spread what remains over them.
                let respread = convert::stock_slots(merged.stock_slots) != old.stock_slots;
                if set_stock || respread {
                    let stock = store::stock(&program, &id);
                    let total = if set_stock {
                        merged.stock
                    } else {
                        stock.lock_sum(txn).await?
                    };
                    stock.replace(txn, total, slot_count(&merged)).await?;
                }
                let stored = store::reward(txn, &program, &id)
                    .await?
                    .ok_or_else(|| Error::NotFound(new.name.clone()))?;
                let out = convert::reward(&stored)?;
                audit::record(
                    txn,
                    crate::SERVICE,
                    now,
                    Change::update(&out.name, &old, &out).mask(req.update_mask.as_ref()),
                )
                .await?;
                Ok((out, Vec::new()))
            })
            .await
        })
        .await
    }

    async fn list_eligible_rewards(
        &self,
        request: Request<pb::ListEligibleRewardsRequest>,
    ) -> Result<Response<pb::ListEligibleRewardsResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let (program, customer) = member_name("member", &req.member)?;
            let now_us = to_micros(self.now());
            let db = &self.rt.read;
            let m = store::member(db, &program, &customer)
                .await?
                .ok_or_else(|| not_member(&program, &customer))?;
            let rows = store::list_rewards(db, &program, None, u64::from(MAX_PAGE)).await?;
            // One query for the per-member limits and one call for the
            // segments, whatever the number of rewards.
            let used = store::usage_by_reward(db, &program, &customer).await?;
            let mut candidates = Vec::new();
            for r in &rows {
                let body = convert::reward(r)?;
                let limited = r.per_member_limit > 0
                    && used.get(&r.id).copied().unwrap_or(0) >= r.per_member_limit;
                if redeem::eligible(&body, &m, now_us).is_err()
                    || r.stock.is_some_and(|s| s <= 0)
                    || limited
                {
                    continue;
                }
                candidates.push(body);
            }
            let segments: Vec<String> = candidates
                .iter()
                .map(|b| b.eligible_segment.clone())
                .filter(|s| !s.is_empty())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let member_of = self.in_segments(&segments, &customer).await?;
            let out: Vec<pb::Reward> = candidates
                .into_iter()
                .filter(|b| {
                    b.eligible_segment.is_empty() || member_of.contains(&b.eligible_segment)
                })
                .collect();
            Ok(pb::ListEligibleRewardsResponse { rewards: out })
        })
        .await
    }

    async fn redeem_reward(
        &self,
        request: Request<pb::RedeemRewardRequest>,
    ) -> Result<Response<pb::Redemption>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let rid = required_rid(&req.request_id)?;
            let (program, customer) = member_name("member", &req.member)?;
            let (rp, reward_id) = reward_name("reward", &req.reward)?;
            if rp != program {
                return Err(Error::invalid(
                    "reward",
                    "must be a reward of the member's program",
                ));
            }
            // Segment eligibility is asked before the transaction opens.
            if let Some(body) = store::reward_body(&self.rt.read, &program, &reward_id).await? {
                let mut r = <pb::Reward as prost::Message>::decode(body.as_slice())
                    .map_err(Error::internal)?;
                r.name = format!("programs/{program}/rewards/{reward_id}");
                self.check_segment(&r, &customer).await?;
            }
            let _lane = self.member_lane(&program, &customer).await;
            let now = self.now();
            let out = if clm_platform::db::is_postgres(&self.rt.db) {
                // The last units of a stock can deadlock two redemptions
                // (store::slots): the loser runs again.
                clm_platform::db::retry_conflicts(|| {
                    redeem::on_postgres(
                        &self.rt,
                        &req,
                        rid.clone(),
                        &program,
                        &customer,
                        &reward_id,
                        now,
                    )
                })
                .await?
            } else {
                idempotency::write(&self.rt, redeem::SCOPE, Some(rid), &req, now, async |txn| {
                    redeem::general(txn, &program, &customer, &reward_id, to_micros(now)).await
                })
                .await?
            };
            // The coupon's expiry timer: far off, found by the queue's ticks.
            if let Some(until) = out
                .coupon
                .as_ref()
                .and_then(|c| c.expire_time.as_ref())
                .and_then(|t| from_timestamp("", t).ok())
            {
                self.rt.timers.wake_for(to_micros(until), to_micros(now));
            }
            Ok(out)
        })
        .await
    }

    async fn cancel_redemption(
        &self,
        request: Request<pb::CancelRedemptionRequest>,
    ) -> Result<Response<pb::Redemption>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let rid = required_rid(&req.request_id)?;
            let (program, id) = convert::redemption_name("name", &req.name)?;
            if req.reason.len() > convert::MAX_TEXT {
                return Err(Error::invalid("reason", "is too long"));
            }
            let now = self.now();
            let now_us = to_micros(now);
            let out = idempotency::write(
                &self.rt,
                "CancelRedemption",
                Some(rid),
                &req,
                now,
                async |txn| {
                    let r = store::redemption(txn, Some(&id), None)
                        .await?
                        .filter(|r| r.program == program)
                        .ok_or_else(|| Error::NotFound(req.name.clone()))?;
                    let p = Program::load(txn, &program).await?;
                    store::lock_members(txn, &program, &[&r.customer]).await?;
                    if !store::cancel_redemption(txn, &id, now_us).await? {
                        let why = match store::redemption(txn, Some(&id), None)
                            .await?
                            .map(|r| (r.state, r.coupon_state))
                        {
                            Some((store::CANCELLED, _)) => "the redemption is already cancelled",
                            Some((_, store::USED)) => "the redemption's coupon was used",
                            _ => "the redemption cannot be cancelled",
                        };
                        return Err(LoyaltyError::NotCancellable(why.into()).into());
                    }
                    let who = Who::current(if req.reason.is_empty() {
                        "redemption cancelled"
                    } else {
                        &req.reason
                    });
                    let made =
                        ledger::refund(txn, &program, &r.customer, r.spend_txn, now_us, &who)
                            .await?;
                    store::stock(&program, &r.reward).give_back(txn, 1).await?;
                    // Only what the redemption took from the total goes back.
                    if r.budget_minor > 0 {
                        store::budget(&program, &r.campaign)
                            .give_back(txn, r.budget_minor)
                            .await?;
                    }
                    timers::disarm(txn, ledger::COUPON_EXPIRY, &[format!("coupon/{}", r.code)])
                        .await?;
                    let balance = dl::balance(
                        &store::open_lots(txn, &program, &r.customer, now_us).await?,
                        now_us,
                    );
                    let row = store::redemption(txn, Some(&id), None)
                        .await?
                        .ok_or_else(|| Error::internal("redemption vanished"))?;
                    let spend = store::txn(txn, r.spend_txn).await?;
                    let spend_draws: Vec<dl::Draw> = store::draws_of(txn, &[r.spend_txn])
                        .await?
                        .into_iter()
                        .map(|(_, d)| d)
                        .collect();
                    let spend = match spend {
                        Some(t) => Some(convert::transaction(
                            &t,
                            with_expiry(txn, &spend_draws).await?,
                        )),
                        None => None,
                    };
                    let out = convert::redemption(&row, spend, balance);
                    let mut events: Vec<NewEvent> = made
                        .iter()
                        .map(|(t, d)| ledger::points_changed(&p, t, d, balance))
                        .collect();
                    events.push(NewEvent::new(
                        &r.customer,
                        &pb::RedemptionCancelled {
                            customer: r.customer.clone(),
                            redemption: Some(out.clone()),
                        },
                    ));
                    audit::record(
                        txn,
                        crate::SERVICE,
                        now,
                        Change::action(&out.name, &out).customer(&r.customer),
                    )
                    .await?;
                    Ok((out, events))
                },
            )
            .await?;
            self.rt.timers.wake();
            Ok(out)
        })
        .await
    }

    async fn validate_coupon(
        &self,
        request: Request<pb::ValidateCouponRequest>,
    ) -> Result<Response<pb::ValidateCouponResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let program = program_id("program", &req.program)?;
            let code = convert::code("code", &req.code)?;
            let r = store::redemption(&self.rt.read, None, Some(&code))
                .await?
                .filter(|r| r.program == program)
                .ok_or_else(|| Error::NotFound(format!("coupon {code}")))?;
            let now_us = to_micros(self.now());
            let reason = coupon_refusal(&r, now_us).map(|(reason, _)| reason.to_owned());
            Ok(pb::ValidateCouponResponse {
                valid: reason.is_none(),
                coupon: Some(convert::coupon(&r)),
                reason: reason.unwrap_or_default(),
            })
        })
        .await
    }

    async fn use_coupon(
        &self,
        request: Request<pb::UseCouponRequest>,
    ) -> Result<Response<pb::Coupon>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let rid = required_rid(&req.request_id)?;
            let program = program_id("program", &req.program)?;
            let code = convert::code("code", &req.code)?;
            let _lane = self.lanes.enter(&format!("coupon/{program}/{code}")).await;
            let now = self.now();
            let now_us = to_micros(now);
            idempotency::write(&self.rt, "UseCoupon", Some(rid), &req, now, async |txn| {
                // One conditional UPDATE: of concurrent uses, one changes the row.
                let used = store::use_code(txn, &program, &code, now_us).await?;
                let r = store::redemption(txn, None, Some(&code))
                    .await?
                    .filter(|r| r.program == program)
                    .ok_or_else(|| Error::NotFound(format!("coupon {code}")))?;
                if !used {
                    let err = coupon_refusal(&r, now_us)
                        .map(|(_, e)| e)
                        .unwrap_or_else(|| LoyaltyError::CouponUsed(code.clone()));
                    return Err(err.into());
                }
                let out = convert::coupon(&r);
                timers::disarm(txn, ledger::COUPON_EXPIRY, &[format!("coupon/{code}")]).await?;
                audit::record(
                    txn,
                    crate::SERVICE,
                    now,
                    Change::action(&out.redemption, &out).customer(&r.customer),
                )
                .await?;
                let event = NewEvent::new(
                    &r.customer,
                    &pb::CouponUsed {
                        customer: r.customer.clone(),
                        coupon: Some(out.clone()),
                    },
                );
                Ok((out, vec![event]))
            })
            .await
        })
        .await
    }

    async fn create_referral_code(
        &self,
        request: Request<pb::CreateReferralCodeRequest>,
    ) -> Result<Response<pb::ReferralCode>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let rid = request_id("request_id", &req.request_id)?;
            let (program, customer) = member_name("member", &req.member)?;
            let _lane = self.member_lane(&program, &customer).await;
            let now = self.now();
            idempotency::write(
                &self.rt,
                "CreateReferralCode",
                rid,
                &req,
                now,
                async |txn| {
                    let m = store::lock_members(txn, &program, &[&customer])
                        .await?
                        .pop()
                        .ok_or_else(|| not_member(&program, &customer))?;
                    let code = match m.referral_code {
                        Some(c) => c,
                        None => {
                            let c = format!("R{}", &redeem::new_code()[..12]);
                            store::set_referral_code(txn, &program, &customer, &c).await?;
                            let out = pb::ReferralCode {
                                code: c.clone(),
                                member: req.member.clone(),
                            };
                            audit::record(
                                txn,
                                crate::SERVICE,
                                now,
                                Change::create(&req.member, &out).customer(&customer),
                            )
                            .await?;
                            c
                        }
                    };
                    Ok((
                        pb::ReferralCode {
                            code,
                            member: req.member.clone(),
                        },
                        Vec::new(),
                    ))
                },
            )
            .await
        })
        .await
    }

    async fn claim_referral(
        &self,
        request: Request<pb::ClaimReferralRequest>,
    ) -> Result<Response<pb::Member>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let rid = request_id("request_id", &req.request_id)?;
            let program = program_id("program", &req.program)?;
            let code = convert::code("code", &req.code)?;
            let customer = convert::customer("customer", &req.customer)?;
            let now = self.now();
            let now_us = to_micros(now);
            idempotency::write(&self.rt, "ClaimReferral", rid, &req, now, async |txn| {
                let p = Program::load(txn, &program).await?;
                let referrer = store::referral_owner(txn, &program, &code)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("referral code {code}")))?;
                if referrer == customer {
                    return Err(LoyaltyError::Referral {
                        reason: "SELF_REFERRAL",
                        message: "a member cannot refer itself".into(),
                    }
                    .into());
                }
                let (m, created, events) = ledger::enroll(txn, &p, &customer, Some(referrer.clone()), now_us).await?;
                if !created {
                    return Err(LoyaltyError::Referral {
                        reason: "REFEREE_EXISTS",
                        message: format!("{customer} is already a member of programs/{program}: only new customers can claim a referral"),
                    }
                    .into());
                }
                let claim = crate::store::entity::referrals::Model {
                    program: program.clone(),
                    referee: customer.clone(),
                    referrer,
                    code,
                    state: 1,
                    claim_us: now_us,
                    reward_us: None,
                };
                if !store::insert_referral(txn, &claim).await? {
                    return Err(LoyaltyError::Referral {
                        reason: "ALREADY_CLAIMED",
                        message: format!("{customer} already claimed a referral"),
                    }
                    .into());
                }
                let out = ledger::member_view(txn, &p, &m, now_us).await?;
                audit::record(txn, crate::SERVICE, now, Change::create(&out.name, &out).customer(&customer)).await?;
                Ok((out, events))
            })
            .await
        })
        .await
    }

    async fn simulate_event(
        &self,
        request: Request<pb::SimulateEventRequest>,
    ) -> Result<Response<pb::SimulateEventResponse>, Status> {
        respond(request, &POLICY, |_, req| async move {
            let (program, customer) = member_name("member", &req.member)?;
            let now_us = to_micros(self.now());
            let event = req.event.clone().ok_or_else(|| {
                Error::invalid("activity", "activity or redeem_reward is required")
            })?;
            let reward_id = match &event {
                pb::simulate_event_request::Event::RedeemReward(name) => {
                    let (rp, id) = reward_name("redeem_reward", name)?;
                    if rp != program {
                        return Err(Error::invalid(
                            "redeem_reward",
                            "must be a reward of the member's program",
                        ));
                    }
                    if let Some(row) = store::reward(&self.rt.read, &program, &id).await? {
                        self.check_segment(&convert::reward(&row)?, &customer)
                            .await?;
                    }
                    Some(id)
                }
                pb::simulate_event_request::Event::Activity(_) => None,
            };
            // The real work in a transaction that is rolled back.
            let txn = self.rt.db.begin().await?;
            let transactions = match (&event, reward_id) {
                (_, Some(id)) => {
                    let (r, _) = redeem::general(&txn, &program, &customer, &id, now_us).await?;
                    r.spend.into_iter().collect()
                }
                (pb::simulate_event_request::Event::Activity(a), None) => {
                    let p = Program::load(&txn, &program).await?;
                    let m = store::lock_members(&txn, &program, &[&customer])
                        .await?
                        .pop()
                        .ok_or_else(|| not_member(&program, &customer))?;
                    let (trigger, at_us, _) = activity(a, now_us)?;
                    let (made, _) = ledger::earn_and_review(
                        &txn,
                        &p,
                        &m,
                        &trigger,
                        &ledger::fresh_source("simulate"),
                        at_us,
                        now_us,
                        &Who::current("simulation"),
                    )
                    .await?;
                    made.iter()
                        .map(|t| convert::transaction(t, Vec::new()))
                        .collect()
                }
                _ => Vec::new(),
            };
            let p = Program::load(&txn, &program).await?;
            let m = store::member(&txn, &program, &customer)
                .await?
                .ok_or_else(|| not_member(&program, &customer))?;
            let member = ledger::member_view(&txn, &p, &m, now_us).await?;
            txn.rollback().await?;
            Ok(pb::SimulateEventResponse {
                transactions,
                member: Some(member),
            })
        })
        .await
    }
}

/// Why a coupon cannot be used at `now_us`: its reason and error.
fn coupon_refusal(r: &redemptions::Model, now_us: i64) -> Option<(&'static str, LoyaltyError)> {
    match r.coupon_state {
        store::USED => Some(("USED", LoyaltyError::CouponUsed(r.code.clone()))),
        store::VOID => Some(("VOID", LoyaltyError::CouponVoid(r.code.clone()))),
        store::EXPIRED => Some(("EXPIRED", LoyaltyError::CouponExpired(r.code.clone()))),
        _ if r.coupon_expire_us <= now_us => {
            Some(("EXPIRED", LoyaltyError::CouponExpired(r.code.clone())))
        }
        _ => None,
    }
}
