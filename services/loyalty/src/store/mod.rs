//! Storage of the loyalty service: every statement runs on PostgreSQL and
//! SQLite, names tables and columns through [`entity`], and is set-based
//! (a spend's draws are one UPDATE and one INSERT, whatever their number).
//!
//! Lock order: every change of a member's points (earn, spend, refund,
//! expiry, merge, erasure) first locks the member rows it touches with
//! [`lock_members`], in (program, customer) order; a redemption then
//! changes the reward's stock and the campaign's budget last, with
//! conditional UPDATEs, so the hot rows are held for the shortest time.
//! SQLite has one writer.

pub mod entity;
pub mod migration;
pub mod redeem;
pub mod slots;

pub use migration::Migrator;

use clm_domain::loyalty::{Draw, Lot};
use clm_platform::Result;
use clm_platform::db::{is_postgres, rows_per_statement};
use entity::{
    budget_slots, draws, lots, members, programs, redemptions, referral_codes, referrals,
    reward_slots, rewards, transactions,
};
use sea_orm::sea_query::{
    CaseStatement, Cond, Expr, ExprTrait, Func, LockType, OnConflict, Order, Query, SelectStatement,
};
use sea_orm::{ConnectionTrait, EntityName, FromQueryResult, IdenStatic};
use std::collections::HashMap;

use budget_slots::Column as BSC;
use draws::Column as DC;
use lots::Column as LC;
use members::Column as MC;
use programs::Column as PC;
use redemptions::Column as RC;
use referral_codes::Column as CC;
use referrals::Column as FC;
use reward_slots::Column as SC;
use rewards::Column as WC;
use transactions::Column as TC;

/// Transaction kinds as stored (`clm.loyalty.v1.TransactionKind`).
pub mod kind {
    /// Earned.
    pub const EARN: i16 = 1;
    /// Spent.
    pub const SPEND: i16 = 2;
    /// Expired.
    pub const EXPIRE: i16 = 3;
    /// Adjusted by hand.
    pub const ADJUST: i16 = 4;
    /// Refunded.
    pub const REFUND: i16 = 5;
}

async fn all<M: FromQueryResult>(db: &impl ConnectionTrait, q: &SelectStatement) -> Result<Vec<M>> {
    Ok(M::find_by_statement(db.get_database_backend().build(q))
        .all(db)
        .await?)
}

async fn one<M: FromQueryResult>(
    db: &impl ConnectionTrait,
    q: &SelectStatement,
) -> Result<Option<M>> {
    Ok(M::find_by_statement(db.get_database_backend().build(q))
        .one(db)
        .await?)
}

fn sum_i64(col: &str) -> Expr {
    Expr::cust(format!("CAST(COALESCE(SUM({col}), 0) AS BIGINT)"))
}

#[derive(Debug, FromQueryResult)]
struct Total {
    total: i64,
}

async fn total(db: &impl ConnectionTrait, q: &SelectStatement) -> Result<i64> {
    Ok(one::<Total>(db, q).await?.map_or(0, |t| t.total))
}

// ---------------------------------------------------------------- programs

pub(crate) const PROGRAM_COLS: [PC; 6] = [
    PC::Id,
    PC::Body,
    PC::Version,
    PC::CreateUs,
    PC::UpdateUs,
    PC::IsPrimary,
];

/// A program's row and whether it is the primary program now.
#[derive(Debug, FromQueryResult)]
pub(crate) struct ProgramRow {
    id: String,
    body: Vec<u8>,
    version: i64,
    create_us: i64,
    update_us: i64,
    is_primary: i16,
    leads: i32,
}

impl ProgramRow {
    pub(crate) fn split(self) -> (programs::Model, bool) {
        (
            programs::Model {
                id: self.id,
                body: self.body,
                version: self.version,
                create_us: self.create_us,
                update_us: self.update_us,
                is_primary: self.is_primary,
            },
            self.leads == 1,
        )
    }
}

/// Programs with a `leads` column: 1 for the primary program (the one
/// marked primary, else the oldest), in the same read.
pub(crate) fn programs_query() -> SelectStatement {
    let primary = Query::select()
        .column(PC::Id)
        .from(programs::Entity)
        .order_by(PC::IsPrimary, Order::Desc)
        .order_by(PC::CreateUs, Order::Asc)
        .order_by(PC::Id, Order::Asc)
        .limit(1)
        .to_owned();
    let leads = CaseStatement::new()
        .case(
            Expr::col((programs::Entity, PC::Id)).in_subquery(primary),
            Expr::val(1i32),
        )
        .finally(Expr::val(0i32));
    Query::select()
        .columns(PROGRAM_COLS.map(|c| (programs::Entity, c)))
        .expr_as(
            Expr::Case(Box::new(leads)),
            sea_orm::sea_query::Alias::new("leads"),
        )
        .from(programs::Entity)
        .to_owned()
}

/// A program's row, and whether it is the primary program.
pub async fn program(
    db: &impl ConnectionTrait,
    id: &str,
) -> Result<Option<(programs::Model, bool)>> {
    let q = programs_query()
        .and_where(Expr::col((programs::Entity, PC::Id)).eq(id))
        .to_owned();
    Ok(one::<ProgramRow>(db, &q).await?.map(ProgramRow::split))
}

/// Every program's row with its primary flag (stream handlers look at
/// each program).
pub async fn all_programs(db: &impl ConnectionTrait) -> Result<Vec<(programs::Model, bool)>> {
    let q = programs_query()
        .order_by((programs::Entity, PC::Id), Order::Asc)
        .to_owned();
    Ok(all::<ProgramRow>(db, &q)
        .await?
        .into_iter()
        .map(ProgramRow::split)
        .collect())
}

/// The program marked primary other than `except`, if any.
pub async fn other_primary(db: &impl ConnectionTrait, except: &str) -> Result<Option<String>> {
    #[derive(FromQueryResult)]
    struct Row {
        id: String,
    }
    let q = Query::select()
        .column(PC::Id)
        .from(programs::Entity)
        .and_where(Expr::col(PC::IsPrimary).eq(1i16))
        .and_where(Expr::col(PC::Id).ne(except))
        .to_owned();
    Ok(one::<Row>(db, &q).await?.map(|r| r.id))
}

/// Inserts a program; `false` if the id is taken.
pub async fn insert_program(db: &impl ConnectionTrait, row: &programs::Model) -> Result<bool> {
    let q = Query::insert()
        .into_table(programs::Entity)
        .columns(PROGRAM_COLS)
        .values_panic([
            row.id.clone().into(),
            row.body.clone().into(),
            row.version.into(),
            row.create_us.into(),
            row.update_us.into(),
            row.is_primary.into(),
        ])
        .on_conflict(OnConflict::column(PC::Id).do_nothing().to_owned())
        .to_owned();
    Ok(db.execute(&q).await?.rows_affected() == 1)
}

/// Replaces a program's body if its version is still `version`; `false` otherwise.
pub async fn update_program(
    db: &impl ConnectionTrait,
    id: &str,
    version: i64,
    body: Vec<u8>,
    is_primary: bool,
    now_us: i64,
) -> Result<bool> {
    let q = Query::update()
        .table(programs::Entity)
        .value(PC::Body, body)
        .value(PC::Version, version + 1)
        .value(PC::UpdateUs, now_us)
        .value(PC::IsPrimary, i16::from(is_primary))
        .and_where(Expr::col(PC::Id).eq(id))
        .and_where(Expr::col(PC::Version).eq(version))
        .to_owned();
    Ok(db.execute(&q).await?.rows_affected() == 1)
}

// ----------------------------------------------------------------- members

pub(crate) const MEMBER_COLS: [MC; 8] = [
    MC::Program,
    MC::Customer,
    MC::Tier,
    MC::TierUs,
    MC::BelowUs,
    MC::EnrollUs,
    MC::ReferralCode,
    MC::ReferredBy,
];

/// A member's row.
pub async fn member(
    db: &impl ConnectionTrait,
    program: &str,
    customer: &str,
) -> Result<Option<members::Model>> {
    let q = Query::select()
        .columns(MEMBER_COLS)
        .from(members::Entity)
        .and_where(Expr::col(MC::Program).eq(program))
        .and_where(Expr::col(MC::Customer).eq(customer))
        .to_owned();
    one(db, &q).await
}

/// `customer`'s memberships, of `program` only or in every program,
/// ordered by program.
pub async fn memberships(
    db: &impl ConnectionTrait,
    customer: &str,
    program: Option<&str>,
) -> Result<Vec<members::Model>> {
    let mut q = Query::select();
    q.columns(MEMBER_COLS)
        .from(members::Entity)
        .and_where(Expr::col(MC::Customer).eq(customer))
        .order_by(MC::Program, Order::Asc);
    if let Some(p) = program {
        q.and_where(Expr::col(MC::Program).eq(p));
    }
    all(db, &q).await
}

/// The rows of every member that is one of `customers`, in any program,
/// locked (PostgreSQL `FOR UPDATE`) in (program, customer) order.
pub async fn lock_customers(
    db: &impl ConnectionTrait,
    customers: &[String],
) -> Result<Vec<members::Model>> {
    if customers.is_empty() {
        return Ok(Vec::new());
    }
    let mut q = Query::select();
    q.columns(MEMBER_COLS)
        .from(members::Entity)
        .and_where(Expr::col(MC::Customer).is_in(customers.iter().cloned()))
        .order_by(MC::Program, Order::Asc)
        .order_by(MC::Customer, Order::Asc);
    if is_postgres(db) {
        q.lock(LockType::Update);
    }
    all(db, &q).await
}

/// The rows of `customers` in `program`, locked in customer order (the
/// lock every change of their points takes first).
pub async fn lock_members(
    db: &impl ConnectionTrait,
    program: &str,
    customers: &[&str],
) -> Result<Vec<members::Model>> {
    let mut q = Query::select();
    q.columns(MEMBER_COLS)
        .from(members::Entity)
        .and_where(Expr::col(MC::Program).eq(program))
        .and_where(Expr::col(MC::Customer).is_in(customers.iter().map(|c| c.to_string())))
        .order_by(MC::Customer, Order::Asc);
    if is_postgres(db) {
        q.lock(LockType::Update);
    }
    all(db, &q).await
}

/// Enrols a customer; `false` if it already was.
pub async fn insert_member(db: &impl ConnectionTrait, m: &members::Model) -> Result<bool> {
    let q = Query::insert()
        .into_table(members::Entity)
        .columns(MEMBER_COLS)
        .values_panic([
            m.program.clone().into(),
            m.customer.clone().into(),
            m.tier.clone().into(),
            m.tier_us.into(),
            m.below_us.into(),
            m.enroll_us.into(),
            m.referral_code.clone().into(),
            m.referred_by.clone().into(),
        ])
        .on_conflict(
            OnConflict::columns([MC::Program, MC::Customer])
                .do_nothing()
                .to_owned(),
        )
        .to_owned();
    Ok(db.execute(&q).await?.rows_affected() == 1)
}

/// Stores a member's tier state.
pub async fn set_tier(
    db: &impl ConnectionTrait,
    program: &str,
    customer: &str,
    tier: &str,
    tier_us: i64,
    below_us: Option<i64>,
) -> Result<()> {
    let q = Query::update()
        .table(members::Entity)
        .value(MC::Tier, tier)
        .value(MC::TierUs, tier_us)
        .value(MC::BelowUs, below_us)
        .and_where(Expr::col(MC::Program).eq(program))
        .and_where(Expr::col(MC::Customer).eq(customer))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

/// Stores a member's referral code.
pub async fn set_referral_code(
    db: &impl ConnectionTrait,
    program: &str,
    customer: &str,
    code: &str,
) -> Result<()> {
    let q = Query::update()
        .table(members::Entity)
        .value(MC::ReferralCode, code)
        .and_where(Expr::col(MC::Program).eq(program))
        .and_where(Expr::col(MC::Customer).eq(customer))
        .to_owned();
    db.execute(&q).await?;
    let ins = Query::insert()
        .into_table(referral_codes::Entity)
        .columns([CC::Code, CC::Program, CC::Customer])
        .values_panic([code.into(), program.into(), customer.into()])
        .to_owned();
    db.execute(&ins).await?;
    Ok(())
}

/// The member a referral code belongs to.
pub async fn referral_owner(
    db: &impl ConnectionTrait,
    program: &str,
    code: &str,
) -> Result<Option<String>> {
    #[derive(FromQueryResult)]
    struct Row {
        customer: String,
    }
    let q = Query::select()
        .column(CC::Customer)
        .from(referral_codes::Entity)
        .and_where(Expr::col(CC::Program).eq(program))
        .and_where(Expr::col(CC::Code).eq(code))
        .to_owned();
    Ok(one::<Row>(db, &q).await?.map(|r| r.customer))
}

/// A page of a program's members by customer, after `after`.
pub async fn list_members(
    db: &impl ConnectionTrait,
    program: &str,
    tier: Option<&str>,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<members::Model>> {
    let mut q = Query::select();
    q.columns(MEMBER_COLS)
        .from(members::Entity)
        .and_where(Expr::col(MC::Program).eq(program))
        .order_by(MC::Customer, Order::Asc)
        .limit(limit);
    if let Some(t) = tier {
        q.and_where(Expr::col(MC::Tier).eq(t));
    }
    if let Some(a) = after {
        q.and_where(Expr::col(MC::Customer).gt(a));
    }
    all(db, &q).await
}

// -------------------------------------------------------------------- lots

#[derive(Debug, FromQueryResult)]
struct LotRow {
    id: i64,
    remaining: i64,
    spendable_us: i64,
    expire_us: i64,
}

/// [`open_lots`]' query: id, remaining, spendable_us and expire_us,
/// soonest-expiring first.
pub(crate) fn open_lots_query(program: Expr, customer: Expr, now_us: Expr) -> SelectStatement {
    Query::select()
        .columns([LC::Id, LC::Remaining, LC::SpendableUs, LC::ExpireUs])
        .from(lots::Entity)
        .and_where(Expr::col(LC::Program).eq(program))
        .and_where(Expr::col(LC::Customer).eq(customer))
        .and_where(Expr::col(LC::Remaining).gt(0))
        .and_where(Expr::col(LC::ExpireUs).gt(now_us))
        .order_by(LC::ExpireUs, Order::Asc)
        .order_by(LC::Id, Order::Asc)
        .to_owned()
}

/// The member's lots that still hold points not expired at `now_us`
/// (spendable or pending).
pub async fn open_lots(
    db: &impl ConnectionTrait,
    program: &str,
    customer: &str,
    now_us: i64,
) -> Result<Vec<Lot>> {
    let q = open_lots_query(Expr::val(program), Expr::val(customer), Expr::val(now_us));
    Ok(all::<LotRow>(db, &q)
        .await?
        .into_iter()
        .map(|r| Lot {
            id: r.id,
            remaining: r.remaining,
            spendable_us: r.spendable_us,
            expire_us: r.expire_us,
        })
        .collect())
}

/// The open lots (still holding points, not expired at `now_us`) of each
/// of `customers` in `program`, soonest-expiring first: one query.
pub async fn open_lots_of(
    db: &impl ConnectionTrait,
    program: &str,
    customers: &[String],
    now_us: i64,
) -> Result<HashMap<String, Vec<Lot>>> {
    #[derive(Debug, FromQueryResult)]
    struct Row {
        customer: String,
        id: i64,
        remaining: i64,
        spendable_us: i64,
        expire_us: i64,
    }
    let mut out: HashMap<String, Vec<Lot>> = HashMap::new();
    for part in customers.chunks(rows_per_statement(1)) {
        let q = Query::select()
            .columns([
                LC::Customer,
                LC::Id,
                LC::Remaining,
                LC::SpendableUs,
                LC::ExpireUs,
            ])
            .from(lots::Entity)
            .and_where(Expr::col(LC::Program).eq(program))
            .and_where(Expr::col(LC::Customer).is_in(part.iter().cloned()))
            .and_where(Expr::col(LC::Remaining).gt(0))
            .and_where(Expr::col(LC::ExpireUs).gt(now_us))
            .order_by(LC::Customer, Order::Asc)
            .order_by(LC::ExpireUs, Order::Asc)
            .order_by(LC::Id, Order::Asc)
            .to_owned();
        for r in all::<Row>(db, &q).await? {
            out.entry(r.customer).or_default().push(Lot {
                id: r.id,
                remaining: r.remaining,
                spendable_us: r.spendable_us,
                expire_us: r.expire_us,
            });
        }
    }
    Ok(out)
}

/// What each of `customers` earned in `program` (EARN transactions):
/// (lifetime, qualifying), where qualifying counts the earnings after
/// `since_us` whose lot is spendable at `now_us` (see
/// [`qualifying_earned`]). One grouped query.
pub async fn earned_totals(
    db: &impl ConnectionTrait,
    program: &str,
    customers: &[String],
    since_us: i64,
    now_us: i64,
) -> Result<HashMap<String, (i64, i64)>> {
    #[derive(Debug, FromQueryResult)]
    struct Row {
        customer: String,
        lifetime: i64,
        qualifying: i64,
    }
    let qualifies = CaseStatement::new()
        .case(
            Cond::all()
                .add(Expr::col((transactions::Entity, TC::AtUs)).gt(since_us))
                .add(Expr::col((lots::Entity, LC::SpendableUs)).lte(now_us)),
            Expr::col((transactions::Entity, TC::Points)),
        )
        .finally(Expr::val(0i64));
    let bigint = || sea_orm::sea_query::Alias::new("BIGINT");
    let mut out = HashMap::new();
    for part in customers.chunks(rows_per_statement(1)) {
        let q = Query::select()
            .column((transactions::Entity, TC::Customer))
            .expr_as(
                Func::cast_as(
                    Func::sum(Expr::col((transactions::Entity, TC::Points))),
                    bigint(),
                ),
                sea_orm::sea_query::Alias::new("lifetime"),
            )
            .expr_as(
                Func::cast_as(Func::sum(Expr::Case(Box::new(qualifies.clone()))), bigint()),
                sea_orm::sea_query::Alias::new("qualifying"),
            )
            .from(transactions::Entity)
            .left_join(
                lots::Entity,
                Expr::col((lots::Entity, LC::Id)).equals((transactions::Entity, TC::Lot)),
            )
            .and_where(Expr::col((transactions::Entity, TC::Program)).eq(program))
            .and_where(Expr::col((transactions::Entity, TC::Customer)).is_in(part.iter().cloned()))
            .and_where(Expr::col((transactions::Entity, TC::Kind)).eq(kind::EARN))
            .group_by_col((transactions::Entity, TC::Customer))
            .to_owned();
        for r in all::<Row>(db, &q).await? {
            out.insert(r.customer, (r.lifetime, r.qualifying));
        }
    }
    Ok(out)
}

/// A new lot.
#[derive(Debug, Clone)]
pub struct NewLot {
    /// Program id.
    pub program: String,
    /// `customers/{id}`.
    pub customer: String,
    /// Points.
    pub amount: i64,
    /// Earned at (µs).
    pub earn_us: i64,
    /// Spendable from (µs).
    pub spendable_us: i64,
    /// Expires at (µs).
    pub expire_us: i64,
    /// The transaction that creates it.
    pub txn: i64,
}

/// Inserts a lot; returns its id.
pub async fn insert_lot(db: &impl ConnectionTrait, l: &NewLot) -> Result<i64> {
    let q = Query::insert()
        .into_table(lots::Entity)
        .columns([
            LC::Program,
            LC::Customer,
            LC::Amount,
            LC::Remaining,
            LC::EarnUs,
            LC::SpendableUs,
            LC::ExpireUs,
            LC::Txn,
        ])
        .values_panic([
            l.program.clone().into(),
            l.customer.clone().into(),
            l.amount.into(),
            l.amount.into(),
            l.earn_us.into(),
            l.spendable_us.into(),
            l.expire_us.into(),
            l.txn.into(),
        ])
        .returning_col(LC::Id)
        .to_owned();
    let row = db
        .query_one(&q)
        .await?
        .ok_or_else(|| clm_platform::Error::internal("lot insert returned no id"))?;
    Ok(row.try_get("", LC::Id.as_str())?)
}

/// Changes each drawn lot's remainder by `sign` × its amount: one UPDATE
/// (`remaining = remaining + CASE id WHEN .. END`).
pub async fn move_points(db: &impl ConnectionTrait, draws: &[Draw], sign: i64) -> Result<()> {
    if draws.is_empty() {
        return Ok(());
    }
    let mut case = CaseStatement::new();
    for d in draws {
        case = case.case(Expr::col(LC::Id).eq(d.lot), Expr::val(sign * d.amount));
    }
    case = case.finally(Expr::val(0i64));
    let q = Query::update()
        .table(lots::Entity)
        .value(
            LC::Remaining,
            Expr::col(LC::Remaining).add(Expr::Case(Box::new(case))),
        )
        .and_where(Expr::col(LC::Id).is_in(draws.iter().map(|d| d.lot)))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

/// Lots (id, customer, program, remaining) among `ids` whose expiry is at
/// or before `now_us` and that still hold points.
pub async fn expired_lots(
    db: &impl ConnectionTrait,
    ids: &[i64],
    now_us: i64,
) -> Result<Vec<lots::Model>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let q = Query::select()
        .columns([
            LC::Id,
            LC::Program,
            LC::Customer,
            LC::Amount,
            LC::Remaining,
            LC::EarnUs,
            LC::SpendableUs,
            LC::ExpireUs,
            LC::Txn,
        ])
        .from(lots::Entity)
        .and_where(Expr::col(LC::Id).is_in(ids.iter().copied()))
        .and_where(Expr::col(LC::ExpireUs).lte(now_us))
        .and_where(Expr::col(LC::Remaining).gt(0))
        .order_by(LC::Id, Order::Asc)
        .to_owned();
    all(db, &q).await
}

/// The (program, customer) owning each of the lots `ids`.
pub async fn lot_owners(db: &impl ConnectionTrait, ids: &[i64]) -> Result<Vec<(String, String)>> {
    #[derive(FromQueryResult)]
    struct Row {
        program: String,
        customer: String,
    }
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let q = Query::select()
        .columns([LC::Program, LC::Customer])
        .from(lots::Entity)
        .and_where(Expr::col(LC::Id).is_in(ids.iter().copied()))
        .to_owned();
    Ok(all::<Row>(db, &q)
        .await?
        .into_iter()
        .map(|r| (r.program, r.customer))
        .collect())
}

/// The expiry instants of `ids`.
pub async fn lot_expiries(
    db: &impl ConnectionTrait,
    ids: &[i64],
) -> Result<std::collections::HashMap<i64, i64>> {
    #[derive(FromQueryResult)]
    struct Row {
        id: i64,
        expire_us: i64,
    }
    if ids.is_empty() {
        return Ok(Default::default());
    }
    let q = Query::select()
        .columns([LC::Id, LC::ExpireUs])
        .from(lots::Entity)
        .and_where(Expr::col(LC::Id).is_in(ids.iter().copied()))
        .to_owned();
    Ok(all::<Row>(db, &q)
        .await?
        .into_iter()
        .map(|r| (r.id, r.expire_us))
        .collect())
}

// ------------------------------------------------------------ transactions

const TXN_COLS: [TC; 12] = [
    TC::Id,
    TC::Program,
    TC::Customer,
    TC::Kind,
    TC::Points,
    TC::Rule,
    TC::Reason,
    TC::Actor,
    TC::RequestId,
    TC::Source,
    TC::AtUs,
    TC::Lot,
];

/// A transaction's values in the order of `TXN_COLS[1..]` (its id aside).
fn txn_values(t: &transactions::Model) -> [sea_orm::Value; 11] {
    [
        t.program.clone().into(),
        t.customer.clone().into(),
        t.kind.into(),
        t.points.into(),
        t.rule.clone().into(),
        t.reason.clone().into(),
        t.actor.clone().into(),
        t.request_id.clone().into(),
        t.source.clone().into(),
        t.at_us.into(),
        t.lot.into(),
    ]
}

/// Inserts transactions (their `id`s are ignored) in set-based INSERTs;
/// a source that already made one is skipped (a replay). Returns the new
/// ids by (program, source).
pub async fn insert_txns(
    db: &impl ConnectionTrait,
    txns: &[transactions::Model],
) -> Result<HashMap<(String, String), i64>> {
    let mut out = HashMap::new();
    for part in txns.chunks(rows_per_statement(TXN_COLS.len())) {
        let mut q = Query::insert();
        q.into_table(transactions::Entity)
            .columns(TXN_COLS[1..].iter().copied());
        for t in part {
            q.values_panic(txn_values(t).map(Expr::val));
        }
        q.on_conflict(
            OnConflict::columns([TC::Program, TC::Source])
                .do_nothing()
                .to_owned(),
        )
        .returning(Query::returning().columns([TC::Id, TC::Program, TC::Source]));
        for row in db.query_all(&q).await? {
            out.insert(
                (
                    row.try_get("", TC::Program.as_str())?,
                    row.try_get("", TC::Source.as_str())?,
                ),
                row.try_get("", TC::Id.as_str())?,
            );
        }
    }
    Ok(out)
}

/// Inserts lots in set-based INSERTs; returns each new lot's id by the
/// transaction that created it.
pub async fn insert_lots(db: &impl ConnectionTrait, new: &[NewLot]) -> Result<HashMap<i64, i64>> {
    let mut out = HashMap::new();
    for part in new.chunks(rows_per_statement(8)) {
        let mut q = Query::insert();
        q.into_table(lots::Entity).columns([
            LC::Program,
            LC::Customer,
            LC::Amount,
            LC::Remaining,
            LC::EarnUs,
            LC::SpendableUs,
            LC::ExpireUs,
            LC::Txn,
        ]);
        for l in part {
            q.values_panic([
                l.program.clone().into(),
                l.customer.clone().into(),
                l.amount.into(),
                l.amount.into(),
                l.earn_us.into(),
                l.spendable_us.into(),
                l.expire_us.into(),
                l.txn.into(),
            ]);
        }
        q.returning(Query::returning().columns([LC::Id, LC::Txn]));
        for row in db.query_all(&q).await? {
            out.insert(
                row.try_get("", LC::Txn.as_str())?,
                row.try_get("", LC::Id.as_str())?,
            );
        }
    }
    Ok(out)
}

/// Points each transaction at the lot it created: one UPDATE per chunk
/// (`lot = CASE id WHEN .. END`).
pub async fn set_txn_lots(db: &impl ConnectionTrait, pairs: &[(i64, i64)]) -> Result<()> {
    for part in pairs.chunks(rows_per_statement(3)) {
        let mut case = CaseStatement::new();
        for (txn, lot) in part {
            case = case.case(Expr::col(TC::Id).eq(*txn), Expr::val(*lot));
        }
        case = case.finally(Expr::col(TC::Lot));
        let q = Query::update()
            .table(transactions::Entity)
            .value(TC::Lot, Expr::Case(Box::new(case)))
            .and_where(Expr::col(TC::Id).is_in(part.iter().map(|(t, _)| *t)))
            .to_owned();
        db.execute(&q).await?;
    }
    Ok(())
}

/// Which of the (program, source) pairs already made a transaction.
pub async fn sources_taken(
    db: &impl ConnectionTrait,
    wanted: &[(String, String)],
) -> Result<std::collections::HashSet<(String, String)>> {
    #[derive(FromQueryResult)]
    struct Row {
        program: String,
        source: String,
    }
    let mut out = std::collections::HashSet::new();
    let programs: std::collections::BTreeSet<&String> = wanted.iter().map(|(p, _)| p).collect();
    for part in wanted.chunks(rows_per_statement(1).saturating_sub(programs.len()).max(1)) {
        // The program leads the unique (program, source) index.
        let q = Query::select()
            .columns([TC::Program, TC::Source])
            .from(transactions::Entity)
            .and_where(Expr::col(TC::Program).is_in(programs.iter().map(|p| p.to_string())))
            .and_where(Expr::col(TC::Source).is_in(part.iter().map(|(_, s)| s.clone())))
            .to_owned();
        out.extend(
            all::<Row>(db, &q)
                .await?
                .into_iter()
                .map(|r| (r.program, r.source)),
        );
    }
    out.retain(|k| wanted.contains(k));
    Ok(out)
}

/// An earning of a rule: (program, customer, rule, earned at, points).
pub type Earning = (String, String, String, i64, i64);

/// The earnings (EARN transactions) of `customers` by any of `rules`
/// after `since_us`, in any of `programs` (what caps count): one query per
/// chunk of customers.
pub async fn earnings_of(
    db: &impl ConnectionTrait,
    programs: &[String],
    customers: &[String],
    rules: &[String],
    since_us: i64,
) -> Result<Vec<Earning>> {
    #[derive(FromQueryResult)]
    struct Row {
        program: String,
        customer: String,
        rule: String,
        at_us: i64,
        points: i64,
    }
    let mut out = Vec::new();
    if rules.is_empty() {
        return Ok(out);
    }
    let room = rows_per_statement(1).saturating_sub(rules.len() + programs.len());
    for part in customers.chunks(room.max(1)) {
        // (program, customer, at_us) is the index.
        let q = Query::select()
            .columns([TC::Program, TC::Customer, TC::Rule, TC::AtUs, TC::Points])
            .from(transactions::Entity)
            .and_where(Expr::col(TC::Program).is_in(programs.iter().cloned()))
            .and_where(Expr::col(TC::Customer).is_in(part.iter().cloned()))
            .and_where(Expr::col(TC::Rule).is_in(rules.iter().cloned()))
            .and_where(Expr::col(TC::Kind).eq(kind::EARN))
            .and_where(Expr::col(TC::AtUs).gt(since_us))
            .to_owned();
        out.extend(
            all::<Row>(db, &q)
                .await?
                .into_iter()
                .map(|r| (r.program, r.customer, r.rule, r.at_us, r.points)),
        );
    }
    Ok(out)
}

/// Inserts the member rows that do not exist yet, in set-based INSERTs;
/// returns the (program, customer) of those it created.
pub async fn insert_members(
    db: &impl ConnectionTrait,
    rows: &[members::Model],
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for part in rows.chunks(rows_per_statement(MEMBER_COLS.len())) {
        let mut q = Query::insert();
        q.into_table(members::Entity).columns(MEMBER_COLS);
        for m in part {
            q.values_panic([
                m.program.clone().into(),
                m.customer.clone().into(),
                m.tier.clone().into(),
                m.tier_us.into(),
                m.below_us.into(),
                m.enroll_us.into(),
                m.referral_code.clone().into(),
                m.referred_by.clone().into(),
            ]);
        }
        q.on_conflict(
            OnConflict::columns([MC::Program, MC::Customer])
                .do_nothing()
                .to_owned(),
        )
        .returning(Query::returning().columns([MC::Program, MC::Customer]));
        for row in db.query_all(&q).await? {
            out.push((
                row.try_get("", MC::Program.as_str())?,
                row.try_get("", MC::Customer.as_str())?,
            ));
        }
    }
    Ok(out)
}

/// Inserts a transaction (its `id` is ignored); `None` when its source
/// already made one (a replay).
pub async fn insert_txn(db: &impl ConnectionTrait, t: &transactions::Model) -> Result<Option<i64>> {
    let q = Query::insert()
        .into_table(transactions::Entity)
        .columns(TXN_COLS[1..].iter().copied())
        .values_panic(txn_values(t).map(Expr::val))
        .on_conflict(
            OnConflict::columns([TC::Program, TC::Source])
                .do_nothing()
                .to_owned(),
        )
        .returning_col(TC::Id)
        .to_owned();
    match db.query_one(&q).await? {
        Some(row) => Ok(Some(row.try_get("", TC::Id.as_str())?)),
        None => Ok(None),
    }
}

/// A spend's rows: the lots' remainders lowered by `draws`, transaction `t`
/// and its draws. Returns the transaction's id, or `None` if its source
/// already made one (nothing is written then). One statement on PostgreSQL
/// (data-modifying CTEs); three on SQLite.
pub async fn insert_spend(
    db: &impl ConnectionTrait,
    t: &transactions::Model,
    draws: &[Draw],
) -> Result<Option<i64>> {
    if !is_postgres(db) {
        move_points(db, draws, -1).await?;
        let Some(id) = insert_txn(db, t).await? else {
            return Ok(None);
        };
        insert_draws(db, id, draws).await?;
        return Ok(Some(id));
    }
    const SQL: &str = "WITH t AS ( \
           INSERT INTO loyalty_transactions (program, customer, kind, points, rule, reason, actor, \
             request_id, source, at_us, lot) \
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
           ON CONFLICT (program, source) DO NOTHING RETURNING id), \
         d AS (SELECT * FROM json_to_recordset($12::json) AS d(lot int8, amount int8)), \
         lowered AS ( \
           UPDATE loyalty_lots l SET remaining = l.remaining - d.amount FROM d, t WHERE l.id = d.lot), \
         drawn AS (INSERT INTO loyalty_draws (txn, lot, amount) SELECT t.id, d.lot, d.amount FROM t, d) \
         SELECT id FROM t";
    let row = db
        .query_one_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            SQL,
            txn_values(t)
                .into_iter()
                .chain([serde_json::Value::from(
                    draws
                        .iter()
                        .map(|d| serde_json::json!({"lot": d.lot, "amount": d.amount}))
                        .collect::<Vec<_>>(),
                )
                .to_string()
                .into()])
                .collect::<Vec<_>>(),
        ))
        .await?;
    match row {
        Some(row) => Ok(Some(row.try_get("", "id")?)),
        None => Ok(None),
    }
}

/// Points the created lot.
pub async fn set_txn_lot(db: &impl ConnectionTrait, id: i64, lot: i64) -> Result<()> {
    let q = Query::update()
        .table(transactions::Entity)
        .value(TC::Lot, lot)
        .and_where(Expr::col(TC::Id).eq(id))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

/// Records a transaction's draws (one INSERT).
pub async fn insert_draws(db: &impl ConnectionTrait, txn: i64, draws: &[Draw]) -> Result<()> {
    if draws.is_empty() {
        return Ok(());
    }
    let mut q = Query::insert();
    q.into_table(draws::Entity)
        .columns([DC::Txn, DC::Lot, DC::Amount]);
    for d in draws {
        q.values_panic([txn.into(), d.lot.into(), d.amount.into()]);
    }
    db.execute(&q).await?;
    Ok(())
}

/// The draws of transactions `txns`: (transaction, draw).
pub async fn draws_of(db: &impl ConnectionTrait, txns: &[i64]) -> Result<Vec<(i64, Draw)>> {
    #[derive(FromQueryResult)]
    struct Row {
        txn: i64,
        lot: i64,
        amount: i64,
    }
    if txns.is_empty() {
        return Ok(Vec::new());
    }
    let q = Query::select()
        .columns([DC::Txn, DC::Lot, DC::Amount])
        .from(draws::Entity)
        .and_where(Expr::col(DC::Txn).is_in(txns.iter().copied()))
        .order_by(DC::Txn, Order::Asc)
        .order_by(DC::Lot, Order::Asc)
        .to_owned();
    Ok(all::<Row>(db, &q)
        .await?
        .into_iter()
        .map(|r| {
            (
                r.txn,
                Draw {
                    lot: r.lot,
                    amount: r.amount,
                },
            )
        })
        .collect())
}

/// A transaction by id.
pub async fn txn(db: &impl ConnectionTrait, id: i64) -> Result<Option<transactions::Model>> {
    let q = Query::select()
        .columns(TXN_COLS)
        .from(transactions::Entity)
        .and_where(Expr::col(TC::Id).eq(id))
        .to_owned();
    one(db, &q).await
}

/// A page of a member's transactions, newest first, before id `before`.
pub async fn list_txns(
    db: &impl ConnectionTrait,
    program: &str,
    customer: &str,
    before: Option<i64>,
    limit: u64,
) -> Result<Vec<transactions::Model>> {
    let mut q = Query::select();
    q.columns(TXN_COLS)
        .from(transactions::Entity)
        .and_where(Expr::col(TC::Program).eq(program))
        .and_where(Expr::col(TC::Customer).eq(customer))
        .order_by(TC::Id, Order::Desc)
        .limit(limit);
    if let Some(b) = before {
        q.and_where(Expr::col(TC::Id).lt(b));
    }
    all(db, &q).await
}

/// Points the member earned (earn transactions) after `since_us`, of
/// `rule` if given.
pub async fn earned_since(
    db: &impl ConnectionTrait,
    program: &str,
    customer: &str,
    rule: Option<&str>,
    since_us: i64,
) -> Result<i64> {
    let mut q = Query::select();
    q.expr_as(
        sum_i64(TC::Points.as_str()),
        sea_orm::sea_query::Alias::new("total"),
    )
    .from(transactions::Entity)
    .and_where(Expr::col(TC::Program).eq(program))
    .and_where(Expr::col(TC::Customer).eq(customer))
    .and_where(Expr::col(TC::Kind).eq(kind::EARN))
    .and_where(Expr::col(TC::AtUs).gt(since_us));
    if let Some(r) = rule {
        q.and_where(Expr::col(TC::Rule).eq(r));
    }
    total(db, &q).await
}

/// Points the member earned (EARN transactions) after `since_us` whose
/// lot is spendable at `now_us` (what counts towards tiers).
pub async fn qualifying_earned(
    db: &impl ConnectionTrait,
    program: &str,
    customer: &str,
    since_us: i64,
    now_us: i64,
) -> Result<i64> {
    let spendable = Query::select()
        .column(LC::Id)
        .from(lots::Entity)
        .and_where(Expr::col(LC::Program).eq(program))
        .and_where(Expr::col(LC::Customer).eq(customer))
        .and_where(Expr::col(LC::SpendableUs).lte(now_us))
        .to_owned();
    let q = Query::select()
        .expr_as(
            sum_i64(TC::Points.as_str()),
            sea_orm::sea_query::Alias::new("total"),
        )
        .from(transactions::Entity)
        .and_where(Expr::col(TC::Program).eq(program))
        .and_where(Expr::col(TC::Customer).eq(customer))
        .and_where(Expr::col(TC::Kind).eq(kind::EARN))
        .and_where(Expr::col(TC::AtUs).gt(since_us))
        .and_where(Expr::col(TC::Lot).in_subquery(spendable))
        .to_owned();
    total(db, &q).await
}

/// The earliest earn after `since_us` of each of `customers` who has one
/// (when each rolling tier window next changes): one grouped query.
pub async fn first_earns_after(
    db: &impl ConnectionTrait,
    program: &str,
    customers: &[String],
    since_us: i64,
) -> Result<Vec<(String, i64)>> {
    #[derive(FromQueryResult)]
    struct Row {
        customer: String,
        first: i64,
    }
    let mut out = Vec::new();
    for part in customers.chunks(rows_per_statement(1)) {
        let q = Query::select()
            .column(TC::Customer)
            .expr_as(
                Func::min(Expr::col(TC::AtUs)),
                sea_orm::sea_query::Alias::new("first"),
            )
            .from(transactions::Entity)
            .and_where(Expr::col(TC::Program).eq(program))
            .and_where(Expr::col(TC::Customer).is_in(part.iter().cloned()))
            .and_where(Expr::col(TC::Kind).eq(kind::EARN))
            .and_where(Expr::col(TC::AtUs).gt(since_us))
            .group_by_col(TC::Customer)
            .to_owned();
        out.extend(
            all::<Row>(db, &q)
                .await?
                .into_iter()
                .map(|r| (r.customer, r.first)),
        );
    }
    Ok(out)
}

// ----------------------------------------------------------------- rewards

pub(crate) const REWARD_COLS: [WC; 10] = [
    WC::Program,
    WC::Id,
    WC::Body,
    WC::Cost,
    WC::Stock,
    WC::PerMemberLimit,
    WC::Campaign,
    WC::ValueMinor,
    WC::Version,
    WC::CreateUs,
];

/// Rewards as read: the `stock` column is what remains, the sum of the
/// reward's slots (NULL when it has none: unlimited), in the same read.
pub(crate) fn rewards_query() -> SelectStatement {
    let left = Query::select()
        .expr(Func::cast_as(
            Func::sum(Expr::col((reward_slots::Entity, SC::Stock))),
            sea_orm::sea_query::Alias::new("BIGINT"),
        ))
        .from(reward_slots::Entity)
        .and_where(
            Expr::col((reward_slots::Entity, SC::Program)).equals((rewards::Entity, WC::Program)),
        )
        .and_where(Expr::col((reward_slots::Entity, SC::Reward)).equals((rewards::Entity, WC::Id)))
        .to_owned();
    let mut q = Query::select();
    for c in REWARD_COLS {
        if matches!(c, WC::Stock) {
            q.expr_as(
                Expr::SubQuery(None, Box::new(left.clone().into())),
                WC::Stock,
            );
        } else {
            q.column((rewards::Entity, c));
        }
    }
    q.from(rewards::Entity).to_owned()
}

/// A reward's row (its stock: what remains).
pub async fn reward(
    db: &impl ConnectionTrait,
    program: &str,
    id: &str,
) -> Result<Option<rewards::Model>> {
    let q = rewards_query()
        .and_where(Expr::col((rewards::Entity, WC::Program)).eq(program))
        .and_where(Expr::col((rewards::Entity, WC::Id)).eq(id))
        .to_owned();
    one(db, &q).await
}

/// A reward's stored body (`clm.loyalty.v1.Reward` without name, etag
/// and stock), without the sum of its stock slots that [`reward`] adds:
/// what RedeemReward's segment check reads before its transaction.
pub async fn reward_body(
    db: &impl ConnectionTrait,
    program: &str,
    id: &str,
) -> Result<Option<Vec<u8>>> {
    #[derive(FromQueryResult)]
    struct Row {
        body: Vec<u8>,
    }
    let q = Query::select()
        .column(WC::Body)
        .from(rewards::Entity)
        .and_where(Expr::col(WC::Program).eq(program))
        .and_where(Expr::col(WC::Id).eq(id))
        .to_owned();
    Ok(one::<Row>(db, &q).await?.map(|r| r.body))
}

/// A page of a program's rewards after `after`.
pub async fn list_rewards(
    db: &impl ConnectionTrait,
    program: &str,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<rewards::Model>> {
    let mut q = rewards_query();
    q.and_where(Expr::col((rewards::Entity, WC::Program)).eq(program))
        .order_by((rewards::Entity, WC::Id), Order::Asc)
        .limit(limit);
    if let Some(a) = after {
        q.and_where(Expr::col((rewards::Entity, WC::Id)).gt(a));
    }
    all(db, &q).await
}

/// Inserts a reward; `false` if the id is taken.
pub async fn insert_reward(db: &impl ConnectionTrait, r: &rewards::Model) -> Result<bool> {
    let q = Query::insert()
        .into_table(rewards::Entity)
        .columns(REWARD_COLS)
        .values_panic([
            r.program.clone().into(),
            r.id.clone().into(),
            r.body.clone().into(),
            r.cost.into(),
            r.stock.into(),
            r.per_member_limit.into(),
            r.campaign.clone().into(),
            r.value_minor.into(),
            r.version.into(),
            r.create_us.into(),
        ])
        .on_conflict(
            OnConflict::columns([WC::Program, WC::Id])
                .do_nothing()
                .to_owned(),
        )
        .to_owned();
    Ok(db.execute(&q).await?.rows_affected() == 1)
}

/// Replaces a reward if its version is still `r.version - 1`. The stock
/// column (history: the stock last set) is written only when `set_stock`
/// (the update names it); what remains lives in the slots ([`set_stock`]).
pub async fn update_reward(
    db: &impl ConnectionTrait,
    r: &rewards::Model,
    set_stock: bool,
) -> Result<bool> {
    let mut q = Query::update();
    if set_stock {
        q.value(WC::Stock, r.stock);
    }
    let q = q
        .table(rewards::Entity)
        .value(WC::Body, r.body.clone())
        .value(WC::Cost, r.cost)
        .value(WC::PerMemberLimit, r.per_member_limit)
        .value(WC::Campaign, r.campaign.clone())
        .value(WC::ValueMinor, r.value_minor)
        .value(WC::Version, r.version)
        .and_where(Expr::col(WC::Program).eq(r.program.as_str()))
        .and_where(Expr::col(WC::Id).eq(r.id.as_str()))
        .and_where(Expr::col(WC::Version).eq(r.version - 1))
        .to_owned();
    Ok(db.execute(&q).await?.rows_affected() == 1)
}

/// A reward's stock: its slots in `loyalty_reward_slots` ([`slots`]).
pub fn stock<'a>(program: &'a str, reward: &'a str) -> slots::Counter<'a> {
    slots::Counter {
        table: reward_slots::Entity.table_name(),
        keys: [
            (SC::Program.as_str(), program),
            (SC::Reward.as_str(), reward),
        ],
        value: SC::Stock.as_str(),
    }
}

/// What is left of a campaign's total budget: its slots in
/// `loyalty_budget_slots` ([`slots`]).
pub fn budget<'a>(program: &'a str, campaign: &'a str) -> slots::Counter<'a> {
    slots::Counter {
        table: budget_slots::Entity.table_name(),
        keys: [
            (BSC::Program.as_str(), program),
            (BSC::Campaign.as_str(), campaign),
        ],
        value: BSC::LeftMinor.as_str(),
    }
}

// ------------------------------------------------------------- redemptions

const REDEMPTION_COLS: [RC; 17] = [
    RC::Id,
    RC::Program,
    RC::Customer,
    RC::Reward,
    RC::Campaign,
    RC::Cost,
    RC::ValueMinor,
    RC::SpendTxn,
    RC::State,
    RC::Code,
    RC::CodeKind,
    RC::CouponState,
    RC::CouponExpireUs,
    RC::UseUs,
    RC::CreateUs,
    RC::CancelUs,
    RC::BudgetMinor,
];

/// Redemption state: active.
pub const ACTIVE: i16 = 1;
/// Redemption state: cancelled.
pub const CANCELLED: i16 = 2;
/// Coupon state: issued.
pub const ISSUED: i16 = 1;
/// Coupon state: used.
pub const USED: i16 = 2;
/// Coupon state: expired.
pub const EXPIRED: i16 = 3;
/// Coupon state: void.
pub const VOID: i16 = 4;

/// Inserts a redemption.
pub async fn insert_redemption(db: &impl ConnectionTrait, r: &redemptions::Model) -> Result<()> {
    let q = Query::insert()
        .into_table(redemptions::Entity)
        .columns(REDEMPTION_COLS)
        .values_panic([
            r.id.clone().into(),
            r.program.clone().into(),
            r.customer.clone().into(),
            r.reward.clone().into(),
            r.campaign.clone().into(),
            r.cost.into(),
            r.value_minor.into(),
            r.spend_txn.into(),
            r.state.into(),
            r.code.clone().into(),
            r.code_kind.into(),
            r.coupon_state.into(),
            r.coupon_expire_us.into(),
            r.use_us.into(),
            r.create_us.into(),
            r.cancel_us.into(),
            r.budget_minor.into(),
        ])
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

/// A redemption by id, or by code.
pub async fn redemption(
    db: &impl ConnectionTrait,
    id: Option<&str>,
    code: Option<&str>,
) -> Result<Option<redemptions::Model>> {
    let mut q = Query::select();
    q.columns(REDEMPTION_COLS).from(redemptions::Entity);
    if let Some(id) = id {
        q.and_where(Expr::col(RC::Id).eq(id));
    }
    if let Some(code) = code {
        q.and_where(Expr::col(RC::Code).eq(code));
    }
    one(db, &q).await
}

/// Active redemptions of the member: how many of `reward`, and the value
/// of those of `campaign`.
pub async fn member_usage(
    db: &impl ConnectionTrait,
    program: &str,
    customer: &str,
    reward: &str,
    campaign: &str,
) -> Result<(i64, i64)> {
    #[derive(FromQueryResult)]
    struct Row {
        n: i64,
        v: i64,
    }
    let q = usage_query(
        Expr::val(program),
        Expr::val(customer),
        Expr::val(reward),
        Expr::val(campaign),
    );
    Ok(one::<Row>(db, &q).await?.map_or((0, 0), |r| (r.n, r.v)))
}

/// [`member_usage`]'s query (one row, `n` and `v`), the campaign an
/// expression (a value, or a scalar subquery).
pub(crate) fn usage_query(
    program: Expr,
    customer: Expr,
    reward: Expr,
    campaign: Expr,
) -> SelectStatement {
    let sum_when = |cond: Expr, then: Expr| -> Expr {
        let case = CaseStatement::new()
            .case(cond, then)
            .finally(Expr::val(0i64));
        Func::cast_as(
            Func::coalesce([
                Func::sum(Expr::Case(Box::new(case))).into(),
                Expr::val(0i64),
            ]),
            sea_orm::sea_query::Alias::new("BIGINT"),
        )
        .into()
    };
    Query::select()
        .expr_as(
            sum_when(Expr::col(RC::Reward).eq(reward), Expr::val(1i64)),
            sea_orm::sea_query::Alias::new("n"),
        )
        .expr_as(
            sum_when(
                Expr::col(RC::Campaign).eq(campaign),
                Expr::col(RC::ValueMinor),
            ),
            sea_orm::sea_query::Alias::new("v"),
        )
        .from(redemptions::Entity)
        .and_where(Expr::col(RC::Program).eq(program))
        .and_where(Expr::col(RC::Customer).eq(customer))
        .and_where(Expr::col(RC::State).eq(ACTIVE))
        .to_owned()
}

/// A member's active (not cancelled) redemptions per reward, in one
/// grouped query (ListEligibleRewards' per-member limits).
pub async fn usage_by_reward(
    db: &impl ConnectionTrait,
    program: &str,
    customer: &str,
) -> Result<std::collections::HashMap<String, i64>> {
    #[derive(FromQueryResult)]
    struct Row {
        reward: String,
        n: i64,
    }
    let q = Query::select()
        .column(RC::Reward)
        .expr_as(Expr::cust("COUNT(*)"), sea_orm::sea_query::Alias::new("n"))
        .from(redemptions::Entity)
        .and_where(Expr::col(RC::Program).eq(program))
        .and_where(Expr::col(RC::Customer).eq(customer))
        .and_where(Expr::col(RC::State).eq(ACTIVE))
        .group_by_col(RC::Reward)
        .to_owned();
    Ok(Row::find_by_statement(db.get_database_backend().build(&q))
        .all(db)
        .await?
        .into_iter()
        .map(|r| (r.reward, r.n))
        .collect())
}

/// Uses a code if it is issued and not expired at `now_us`; `false` otherwise.
pub async fn use_code(
    db: &impl ConnectionTrait,
    program: &str,
    code: &str,
    now_us: i64,
) -> Result<bool> {
    let q = Query::update()
        .table(redemptions::Entity)
        .value(RC::CouponState, USED)
        .value(RC::UseUs, now_us)
        .and_where(Expr::col(RC::Program).eq(program))
        .and_where(Expr::col(RC::Code).eq(code))
        .and_where(Expr::col(RC::CouponState).eq(ISSUED))
        .and_where(Expr::col(RC::CouponExpireUs).gt(now_us))
        .to_owned();
    Ok(db.execute(&q).await?.rows_affected() == 1)
}

/// Cancels an active redemption whose code was not used; `false` otherwise.
pub async fn cancel_redemption(db: &impl ConnectionTrait, id: &str, now_us: i64) -> Result<bool> {
    let q = Query::update()
        .table(redemptions::Entity)
        .value(RC::State, CANCELLED)
        .value(RC::CouponState, VOID)
        .value(RC::CancelUs, now_us)
        .and_where(Expr::col(RC::Id).eq(id))
        .and_where(Expr::col(RC::State).eq(ACTIVE))
        .and_where(Expr::col(RC::CouponState).ne(USED))
        .to_owned();
    Ok(db.execute(&q).await?.rows_affected() == 1)
}

/// Marks issued codes among `codes` expired at `now_us`.
pub async fn expire_codes(db: &impl ConnectionTrait, codes: &[String], now_us: i64) -> Result<()> {
    if codes.is_empty() {
        return Ok(());
    }
    let q = Query::update()
        .table(redemptions::Entity)
        .value(RC::CouponState, EXPIRED)
        .and_where(Expr::col(RC::Code).is_in(codes.iter().cloned()))
        .and_where(Expr::col(RC::CouponState).eq(ISSUED))
        .and_where(Expr::col(RC::CouponExpireUs).lte(now_us))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

// --------------------------------------------------------------- referrals

/// Records a referral claim; `false` if the referee already has one.
pub async fn insert_referral(db: &impl ConnectionTrait, r: &referrals::Model) -> Result<bool> {
    let q = Query::insert()
        .into_table(referrals::Entity)
        .columns([
            FC::Program,
            FC::Referee,
            FC::Referrer,
            FC::Code,
            FC::State,
            FC::ClaimUs,
            FC::RewardUs,
        ])
        .values_panic([
            r.program.clone().into(),
            r.referee.clone().into(),
            r.referrer.clone().into(),
            r.code.clone().into(),
            r.state.into(),
            r.claim_us.into(),
            r.reward_us.into(),
        ])
        .on_conflict(
            OnConflict::columns([FC::Program, FC::Referee])
                .do_nothing()
                .to_owned(),
        )
        .to_owned();
    Ok(db.execute(&q).await?.rows_affected() == 1)
}

/// Pending claims of `referee`, in every program.
pub async fn pending_referrals(
    db: &impl ConnectionTrait,
    referee: &str,
) -> Result<Vec<referrals::Model>> {
    let q = Query::select()
        .columns([
            FC::Program,
            FC::Referee,
            FC::Referrer,
            FC::Code,
            FC::State,
            FC::ClaimUs,
            FC::RewardUs,
        ])
        .from(referrals::Entity)
        .and_where(Expr::col(FC::Referee).eq(referee))
        .and_where(Expr::col(FC::State).eq(1i16))
        .order_by(FC::Program, Order::Asc)
        .to_owned();
    all(db, &q).await
}

/// Marks a pending claim rewarded; `false` if it was not pending (rewarded once).
pub async fn reward_referral(
    db: &impl ConnectionTrait,
    program: &str,
    referee: &str,
    now_us: i64,
) -> Result<bool> {
    let q = Query::update()
        .table(referrals::Entity)
        .value(FC::State, 2i16)
        .value(FC::RewardUs, now_us)
        .and_where(Expr::col(FC::Program).eq(program))
        .and_where(Expr::col(FC::Referee).eq(referee))
        .and_where(Expr::col(FC::State).eq(1i16))
        .to_owned();
    Ok(db.execute(&q).await?.rows_affected() == 1)
}

// ------------------------------------------------------- merge and erasure

/// Moves every row of `from` customers to `to` (lots, transactions,
/// redemptions, referral codes, referrals as referrer); drops the moved
/// customers' member rows and the referral claims that would name `to`
/// twice. Members of programs `to` is not in move as a whole.
pub async fn merge(db: &impl ConnectionTrait, from: &[String], to: &str) -> Result<()> {
    if from.is_empty() {
        return Ok(());
    }
    let list = || from.iter().cloned();
    // A merged member of a program the survivor is not in becomes the
    // survivor's membership (the first by customer name).
    let survivor_programs = Query::select()
        .column(MC::Program)
        .from(members::Entity)
        .and_where(Expr::col(MC::Customer).eq(to))
        .to_owned();
    let mut sorted: Vec<String> = from.to_vec();
    sorted.sort();
    for c in &sorted {
        let q = Query::update()
            .table(members::Entity)
            .value(MC::Customer, to)
            .and_where(Expr::col(MC::Customer).eq(c.as_str()))
            .and_where(Expr::col(MC::Program).not_in_subquery(survivor_programs.clone()))
            .to_owned();
        db.execute(&q).await?;
    }
    let del = Query::delete()
        .from_table(members::Entity)
        .and_where(Expr::col(MC::Customer).is_in(list()))
        .to_owned();
    db.execute(&del).await?;
    for (table, col) in [
        (lots::Entity.table_name(), LC::Customer.as_str()),
        (transactions::Entity.table_name(), TC::Customer.as_str()),
        (redemptions::Entity.table_name(), RC::Customer.as_str()),
        (referral_codes::Entity.table_name(), CC::Customer.as_str()),
        (referrals::Entity.table_name(), FC::Referrer.as_str()),
    ] {
        let q = Query::update()
            .table(sea_orm::sea_query::Alias::new(table))
            .value(sea_orm::sea_query::Alias::new(col), to)
            .and_where(Expr::col(sea_orm::sea_query::Alias::new(col)).is_in(list()))
            .to_owned();
        db.execute(&q).await?;
    }
    // A referee claim moves only where the survivor has none; the rest go.
    let survivor_claims = Query::select()
        .column(FC::Program)
        .from(referrals::Entity)
        .and_where(Expr::col(FC::Referee).eq(to))
        .to_owned();
    for c in &sorted {
        let q = Query::update()
            .table(referrals::Entity)
            .value(FC::Referee, to)
            .and_where(Expr::col(FC::Referee).eq(c.as_str()))
            .and_where(Expr::col(FC::Program).not_in_subquery(survivor_claims.clone()))
            .to_owned();
        db.execute(&q).await?;
    }
    let del = Query::delete()
        .from_table(referrals::Entity)
        .and_where(Expr::col(FC::Referee).is_in(list()))
        .to_owned();
    db.execute(&del).await?;
    // A survivor referred by itself (it referred the merged duplicate) earns nothing.
    let own = Query::delete()
        .from_table(referrals::Entity)
        .and_where(Expr::col(FC::Referee).eq(to))
        .and_where(Expr::col(FC::Referrer).eq(to))
        .to_owned();
    db.execute(&own).await?;
    Ok(())
}

/// Deletes everything of `customers`.
pub async fn erase(db: &impl ConnectionTrait, customers: &[String]) -> Result<()> {
    if customers.is_empty() {
        return Ok(());
    }
    let list = || customers.iter().cloned();
    let lot_ids = Query::select()
        .column(TC::Id)
        .from(transactions::Entity)
        .and_where(Expr::col(TC::Customer).is_in(list()))
        .to_owned();
    let q = Query::delete()
        .from_table(draws::Entity)
        .and_where(Expr::col(DC::Txn).in_subquery(lot_ids))
        .to_owned();
    db.execute(&q).await?;
    for (table, col) in [
        (lots::Entity.table_name(), LC::Customer.as_str()),
        (transactions::Entity.table_name(), TC::Customer.as_str()),
        (redemptions::Entity.table_name(), RC::Customer.as_str()),
        (referral_codes::Entity.table_name(), CC::Customer.as_str()),
        (members::Entity.table_name(), MC::Customer.as_str()),
    ] {
        let q = Query::delete()
            .from_table(sea_orm::sea_query::Alias::new(table))
            .and_where(Expr::col(sea_orm::sea_query::Alias::new(col)).is_in(list()))
            .to_owned();
        db.execute(&q).await?;
    }
    let q = Query::delete()
        .from_table(referrals::Entity)
        .cond_where(
            Cond::any()
                .add(Expr::col(FC::Referee).is_in(list()))
                .add(Expr::col(FC::Referrer).is_in(list())),
        )
        .to_owned();
    db.execute(&q).await?;
    // Members referred by an erased customer keep no trace of it.
    let q = Query::update()
        .table(members::Entity)
        .value(MC::ReferredBy, Option::<String>::None)
        .and_where(Expr::col(MC::ReferredBy).is_in(list()))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}
