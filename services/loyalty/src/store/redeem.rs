//! A redemption's statements on PostgreSQL (`crate::redeem::on_postgres`):
//! three in its transaction, whatever the member's lots.
//!
//! 1. [`claim_and_lock`]: the idempotency key's claim (a data-modifying
//!    CTE) and the member's row `FOR UPDATE`.
//! 2. [`read`], a new statement and so a snapshot taken after the lock
//!    (READ COMMITTED): the program, the reward with what remains of its
//!    stock, the member's open lots, its active redemptions, and the id of
//!    the spend transaction to write (`nextval`).
//! 3. [`write`]: every row, as data-modifying CTEs of one statement, each
//!    table's rows one JSON parameter, so the text is the same for every
//!    call and its prepared statement is reused: the spend transaction, the
//!    lots it lowers and its draws, the redemption, the coupon timer, the
//!    audit entry, the outbox events, the stored response, and a unit from
//!    a free stock slot ([`super::slots::Counter::pg_take_free_sql`]).

use super::entity::{lots, members, redemptions, rewards, transactions};
use super::{MEMBER_COLS, ProgramRow, REWARD_COLS, programs_query, rewards_query, usage_query};
use crate::ledger::Program;
use crate::redeem::Decided;
use clm_domain::loyalty::Lot;
use clm_platform::audit::{self, Change};
use clm_platform::db::JsonRows;
use clm_platform::idempotency::Inline;
use clm_platform::outbox::{self, NewEvent};
use clm_platform::timers;
use clm_platform::{Error, Result};
use sea_orm::sea_query::{Alias, Cond, Expr, ExprTrait, JoinType, PostgresQueryBuilder, Query};
use sea_orm::{ConnectionTrait, DbBackend, EntityName, FromQueryResult, IdenStatic, Statement};
use std::sync::LazyLock;

/// Claims the key of `w` and locks the member's row: whether the claim
/// inserted the key (`false`: a retry, answer [`Inline::replay`]) and the
/// member, if enrolled.
pub async fn claim_and_lock(
    w: &Inline,
    program: &str,
    customer: &str,
) -> Result<(bool, Option<members::Model>)> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        let cols = MEMBER_COLS
            .iter()
            .map(|c| format!("m.\"{}\"", c.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "WITH claimed AS ({claim}) \
             SELECT (SELECT count(*) FROM claimed) AS claimed, {cols} FROM (SELECT 1) AS one \
             LEFT JOIN (SELECT * FROM {table} WHERE program = $5 AND customer = $6 FOR UPDATE) AS m ON TRUE",
            claim = Inline::claim_sql(1),
            table = members::Entity.table_name(),
        )
    });
    let mut values = w.claim_values().to_vec();
    values.extend([program.into(), customer.into()]);
    let row = one_row(w.txn(), SQL.as_str(), values, "the claim").await?;
    let claimed: i64 = row.try_get("", "claimed")?;
    let member: Option<String> = row.try_get("", "customer")?;
    let member = match member {
        Some(_) => Some(members::Model::from_query_result(&row, "")?),
        None => None,
    };
    Ok((claimed == 1, member))
}

/// What [`read`] answers.
#[derive(Debug)]
pub struct Read {
    /// The program, if it exists.
    pub program: Option<Program>,
    /// The reward, if it exists (its stock: what remains).
    pub reward: Option<rewards::Model>,
    /// The member's open lots, soonest-expiring first.
    pub lots: Vec<Lot>,
    /// The member's active redemptions of the reward, and the value of
    /// those of the reward's campaign.
    pub usage: (i64, i64),
    /// The id the spend transaction takes.
    pub next_txn: i64,
}

/// [`read`]'s statement, built once: `$1` the program, `$2` the customer,
/// `$3` the reward, `$4` the instant (µs).
static READ: LazyLock<String> =
    LazyLock::new(|| {
        let (program, customer, reward, now) = (
            || Expr::cust("$1"),
            || Expr::cust("$2"),
            || Expr::cust("$3"),
            || Expr::cust("$4"),
        );
        let (p, r, u, l) = (
            Alias::new("p"),
            Alias::new("r"),
            Alias::new("u"),
            Alias::new("l"),
        );
        let mut q = Query::select();
        for c in super::PROGRAM_COLS
            .iter()
            .map(|c| c.as_str())
            .chain(["leads"])
        {
            q.expr_as(
                Expr::col((p.clone(), Alias::new(c))),
                Alias::new(format!("p_{c}")),
            );
        }
        for c in REWARD_COLS.iter().map(|c| c.as_str()) {
            q.expr_as(
                Expr::col((r.clone(), Alias::new(c))),
                Alias::new(format!("r_{c}")),
            );
        }
        let the_reward = |q: &mut sea_orm::sea_query::SelectStatement| {
            q.and_where(Expr::col((rewards::Entity, rewards::Column::Program)).eq(program()))
                .and_where(Expr::col((rewards::Entity, rewards::Column::Id)).eq(reward()));
        };
        let mut campaign = Query::select();
        campaign
            .column(rewards::Column::Campaign)
            .from(rewards::Entity);
        the_reward(&mut campaign);
        // Counted only when the reward has a limit or a campaign (whose
        // budget may have a per-member part): one row either way.
        let mut gate = Query::select();
        gate.expr(Expr::val(1)).from(rewards::Entity).cond_where(
            Cond::any()
                .add(Expr::col(rewards::Column::PerMemberLimit).gt(0))
                .add(Expr::col(rewards::Column::Campaign).ne("")),
        );
        the_reward(&mut gate);
        let usage = usage_query(
            program(),
            customer(),
            reward(),
            Expr::SubQuery(None, Box::new(campaign.into())),
        )
        .and_where(Expr::exists(gate))
        .to_owned();
        let lots_json = Query::select()
        .expr(Expr::cust(
            "COALESCE(json_agg(json_build_array(l.id, l.remaining, l.spendable_us, l.expire_us) \
             ORDER BY l.expire_us, l.id), '[]'::json)::text",
        ))
        .from_subquery(super::open_lots_query(program(), customer(), now()), l.clone())
        .to_owned();
        let mut the_rewards = rewards_query();
        the_reward(&mut the_rewards);
        q.expr_as(
            Expr::col((u.clone(), Alias::new("n"))),
            Alias::new("used_n"),
        )
        .expr_as(
            Expr::col((u.clone(), Alias::new("v"))),
            Alias::new("used_v"),
        )
        .expr_as(
            Expr::SubQuery(None, Box::new(lots_json.into())),
            Alias::new("lots"),
        )
        .expr_as(
            Expr::cust(format!(
                "nextval('{}_id_seq')",
                transactions::Entity.table_name()
            )),
            Alias::new("next_txn"),
        )
        .from_subquery(
            programs_query()
                .and_where(Expr::col((super::programs::Entity, super::PC::Id)).eq(program()))
                .to_owned(),
            p,
        )
        .join_subquery(JoinType::LeftJoin, the_rewards, r, Expr::cust("TRUE"))
        .join_subquery(JoinType::LeftJoin, usage, u, Expr::cust("TRUE"));
        q.to_string(PostgresQueryBuilder)
    });

/// Reads, in one statement after the member's lock, what the redemption
/// decides on (see the module docs).
pub async fn read(
    db: &impl ConnectionTrait,
    program: &str,
    customer: &str,
    reward: &str,
    now_us: i64,
) -> Result<Read> {
    let values: [sea_orm::Value; 4] = [
        program.into(),
        customer.into(),
        reward.into(),
        now_us.into(),
    ];
    let (sql, values) = (READ.as_str(), values);
    let Some(row) = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            values,
        ))
        .await?
    else {
        return Ok(Read {
            program: None,
            reward: None,
            lots: Vec::new(),
            usage: (0, 0),
            next_txn: 0,
        });
    };
    let (pr, primary) = ProgramRow::from_query_result(&row, "p_")?.split();
    let has_reward: Option<String> = row.try_get("", "r_id")?;
    let reward = match has_reward {
        Some(_) => Some(rewards::Model::from_query_result(&row, "r_")?),
        None => None,
    };
    let lots: String = row.try_get("", "lots")?;
    let lots: Vec<[i64; 4]> = serde_json::from_str(&lots).map_err(Error::internal)?;
    Ok(Read {
        program: Some(Program::from_row(&pr, primary)?),
        reward,
        lots: lots
            .into_iter()
            .map(|[id, remaining, spendable_us, expire_us]| Lot {
                id,
                remaining,
                spendable_us,
                expire_us,
            })
            .collect(),
        usage: (row.try_get("", "used_n")?, row.try_get("", "used_v")?),
        next_txn: row.try_get("", "next_txn")?,
    })
}

/// What [`write`] did.
#[derive(Debug, Clone, Copy)]
pub struct Wrote {
    /// The spend transaction was inserted (`false`: its source existed,
    /// nothing else is right; roll back).
    pub made: bool,
    /// A unit was taken from a free stock slot.
    pub taken: bool,
}

/// Writes the decided redemption in one statement (see the module docs).
pub async fn write<R: prost::Message>(
    w: &Inline,
    d: &Decided,
    events: &[NewEvent],
    change: &Change,
    response: &R,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Wrote> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        let txns = JsonRows::of::<transactions::Entity>(&[], &[]);
        let redemptions = JsonRows::of::<redemptions::Entity>(&[], &[]);
        format!(
            "WITH o AS ({outbox}), \
             t AS ({txn} ON CONFLICT (program, source) DO NOTHING RETURNING id), \
             d AS (SELECT * FROM json_to_recordset($3::json) AS d(lot int8, amount int8)), \
             lowered AS (UPDATE {lots} l SET remaining = l.remaining - d.amount FROM d, t WHERE l.id = d.lot), \
             drawn AS (INSERT INTO {draws} (txn, lot, amount) SELECT t.id, d.lot, d.amount FROM t, d), \
             r AS ({redemption}), \
             armed AS ({arm}), \
             audited AS ({audit}), \
             k AS ({complete}), \
             s AS ({take}) \
             SELECT (SELECT count(*) FROM t) AS made, (SELECT count(*) FROM s) AS taken",
            outbox = outbox::PG_INSERT,
            txn = txns.insert_sql(2),
            lots = lots::Entity.table_name(),
            draws = super::draws::Entity.table_name(),
            redemption = redemptions.insert_sql(4),
            arm = timers::pg_arm_sql(5),
            audit = audit::pg_insert_sql(6),
            complete = Inline::complete_sql(7),
            take = super::stock("", "").pg_take_free_sql((10, 11), 12),
        )
    });
    let draws = serde_json::Value::from(
        d.spent
            .draws
            .iter()
            .map(|d| serde_json::json!({"lot": d.lot, "amount": d.amount}))
            .collect::<Vec<_>>(),
    )
    .to_string();
    let mut values = vec![
        outbox::pg_rows(events, now)?,
        JsonRows::of::<transactions::Entity>(std::slice::from_ref(&d.spent.txn), &[]).value(),
        draws.into(),
        JsonRows::of::<redemptions::Entity>(std::slice::from_ref(&d.row), &[]).value(),
        timers::pg_rows(crate::ledger::COUPON_EXPIRY, &[d.coupon_timer()])?,
        audit::pg_rows(crate::SERVICE, now, std::slice::from_ref(change))?,
    ];
    values.extend(w.complete_values(response));
    values.extend([
        d.row.program.as_str().into(),
        d.row.reward.as_str().into(),
        1i64.into(),
    ]);
    let row = one_row(w.txn(), SQL.as_str(), values, "the redemption's write").await?;
    let made: i64 = row.try_get("", "made")?;
    let taken: i64 = row.try_get("", "taken")?;
    Ok(Wrote {
        made: made == 1,
        taken: taken == 1,
    })
}

/// Runs `sql` on PostgreSQL and answers its one row (`what` names the
/// statement in the error when it answers none).
async fn one_row(
    db: &impl ConnectionTrait,
    sql: &str,
    values: Vec<sea_orm::Value>,
    what: &str,
) -> Result<sea_orm::QueryResult> {
    db.query_one_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        values,
    ))
    .await?
    .ok_or_else(|| Error::internal(format!("{what} answered no row")))
}
