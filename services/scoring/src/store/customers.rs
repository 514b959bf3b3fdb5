//! What scoring keeps of each customer: `score_customers` (profile and
//! stage, for fit rules and thresholds) and `score_touchpoints` (every
//! touchpoint seen, for inactivity decay and re-scoring).

use super::{chunk, n};
use clm_platform::Result;
use clm_platform::bulk::{is_in_texts, text_list};
use clm_platform::db::is_postgres;
use sea_orm::sea_query::{Expr, ExprTrait, Func, LockType, OnConflict, Order, Query};
use sea_orm::{ConnectionTrait, DbBackend, FromQueryResult, Statement};

/// A customer's row.
#[derive(Debug, Clone, FromQueryResult)]
pub struct CustomerRow {
    /// `customers/{id}`.
    pub customer: String,
    /// `Stage::code`.
    pub stage: Option<i16>,
    /// When the stage was entered (µs).
    pub stage_us: Option<i64>,
    /// Encoded `clm.customer.v1.Customer`.
    pub profile: Option<Vec<u8>>,
}

/// Makes sure every one of `customers` has a row; on PostgreSQL then locks
/// them (`FOR UPDATE`, in a stable order) so concurrent writers of one
/// customer's ledger (the stream follower, a re-scoring) take turns;
/// SQLite has one writer. One statement each.
pub async fn ensure_and_lock(db: &impl ConnectionTrait, customers: &[String]) -> Result<()> {
    let mut sorted: Vec<String> = customers.to_vec();
    sorted.sort();
    sorted.dedup();
    if sorted.is_empty() {
        return Ok(());
    }
    if is_postgres(db) {
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO score_customers (customer) \
             SELECT json_array_elements_text(CAST($1 AS json)) ON CONFLICT (customer) DO NOTHING",
            [text_list(&sorted)],
        ))
        .await?;
        let q = Query::select()
            .column(n("customer"))
            .from(n("score_customers"))
            .and_where(is_in_texts(db, "customer", &sorted))
            .order_by(n("customer"), Order::Asc)
            .lock(LockType::Update)
            .to_owned();
        db.query_all(&q).await?;
        return Ok(());
    }
    for part in sorted.chunks(chunk(1)) {
        let mut q = Query::insert();
        q.into_table(n("score_customers")).columns([n("customer")]);
        for c in part {
            q.values_panic([c.clone().into()]);
        }
        q.on_conflict(OnConflict::column(n("customer")).do_nothing().to_owned());
        db.execute(&q).await?;
    }
    Ok(())
}

/// Stores a customer's profile (and its stage, when known).
pub async fn set_profile(
    db: &impl ConnectionTrait,
    customer: &str,
    profile: Vec<u8>,
    stage: Option<(i16, i64)>,
) -> Result<()> {
    ensure_and_lock(db, &[customer.to_owned()]).await?;
    let mut q = Query::update();
    q.table(n("score_customers"))
        .value(n("profile"), profile)
        .and_where(Expr::col(n("customer")).eq(customer));
    if let Some((s, at)) = stage {
        q.value(n("stage"), s).value(n("stage_us"), at);
    }
    db.execute(&q).await?;
    Ok(())
}

/// Stores a customer's stage.
pub async fn set_stage(
    db: &impl ConnectionTrait,
    customer: &str,
    stage: i16,
    at_us: i64,
) -> Result<()> {
    ensure_and_lock(db, &[customer.to_owned()]).await?;
    let q = Query::update()
        .table(n("score_customers"))
        .value(n("stage"), stage)
        .value(n("stage_us"), at_us)
        .and_where(Expr::col(n("customer")).eq(customer))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

/// The rows of `customers`.
pub async fn get(db: &impl ConnectionTrait, customers: &[String]) -> Result<Vec<CustomerRow>> {
    if customers.is_empty() {
        return Ok(Vec::new());
    }
    let q = Query::select()
        .columns(["customer", "stage", "stage_us", "profile"].map(n))
        .from(n("score_customers"))
        .and_where(is_in_texts(db, "customer", customers))
        .to_owned();
    Ok(
        CustomerRow::find_by_statement(db.get_database_backend().build(&q))
            .all(db)
            .await?,
    )
}

/// Customers after `after`, by name, at most `limit` (re-scoring walks them).
pub async fn ids_after(db: &impl ConnectionTrait, after: &str, limit: u64) -> Result<Vec<String>> {
    let q = Query::select()
        .column(n("customer"))
        .from(n("score_customers"))
        .and_where(Expr::col(n("customer")).gt(after))
        .order_by(n("customer"), Order::Asc)
        .limit(limit)
        .to_owned();
    let rows = db.query_all(&q).await?;
    Ok(rows
        .iter()
        .filter_map(|r| r.try_get::<String>("", "customer").ok())
        .collect())
}

/// How many customers there are.
pub async fn count(db: &impl ConnectionTrait) -> Result<i64> {
    let q = Query::select()
        .expr_as(Func::count(Expr::col(n("customer"))), n("n"))
        .from(n("score_customers"))
        .to_owned();
    Ok(db
        .query_one(&q)
        .await?
        .and_then(|r| r.try_get::<i64>("", "n").ok())
        .unwrap_or(0))
}

/// A touchpoint to keep.
#[derive(Debug, Clone)]
pub struct TouchRow {
    /// Event id (unique).
    pub event_id: String,
    /// `customers/{id}`.
    pub customer: String,
    /// When it occurred (µs).
    pub occurred_us: i64,
    /// Encoded `clm.customer.v1.Touchpoint`.
    pub body: Vec<u8>,
}

/// Keeps `rows`, skipping event ids already kept; returns the event ids
/// that were new (one statement per chunk).
pub async fn insert_touchpoints(
    db: &impl ConnectionTrait,
    rows: &[TouchRow],
) -> Result<Vec<String>> {
    let mut new = Vec::new();
    for part in rows.chunks(chunk(4)) {
        let mut q = Query::insert();
        q.into_table(n("score_touchpoints"))
            .columns(["event_id", "customer", "occurred_us", "body"].map(n));
        for r in part {
            q.values_panic([
                r.event_id.clone().into(),
                r.customer.clone().into(),
                r.occurred_us.into(),
                r.body.clone().into(),
            ]);
        }
        q.on_conflict(OnConflict::column(n("event_id")).do_nothing().to_owned());
        q.returning_col(n("event_id"));
        for r in db.query_all(&q).await? {
            new.push(r.try_get::<String>("", "event_id")?);
        }
    }
    Ok(new)
}

/// Kept touchpoints of `customers` (encoded), oldest first.
pub async fn touchpoints(
    db: &impl ConnectionTrait,
    customers: &[String],
) -> Result<Vec<(String, Vec<u8>)>> {
    if customers.is_empty() {
        return Ok(Vec::new());
    }
    let q = Query::select()
        .columns(["customer", "body"].map(n))
        .from(n("score_touchpoints"))
        .and_where(is_in_texts(db, "customer", customers))
        .order_by(n("customer"), Order::Asc)
        .order_by(n("occurred_us"), Order::Asc)
        .order_by(n("event_id"), Order::Asc)
        .to_owned();
    db.query_all(&q)
        .await?
        .into_iter()
        .map(|r| Ok((r.try_get("", "customer")?, r.try_get("", "body")?)))
        .collect()
}

/// Each customer's newest touchpoint at or before `at_us` (inactivity).
pub async fn last_activity(
    db: &impl ConnectionTrait,
    customers: &[String],
    at_us: i64,
) -> Result<std::collections::HashMap<String, i64>> {
    if customers.is_empty() {
        return Ok(Default::default());
    }
    newest_touch(db, Some(customers), at_us).await
}

/// Every customer's newest touchpoint at or before `at_us` (ListTopCustomers
/// with inactivity decay): one grouped statement.
pub async fn last_activity_all(
    db: &impl ConnectionTrait,
    at_us: i64,
) -> Result<std::collections::HashMap<String, i64>> {
    newest_touch(db, None, at_us).await
}

async fn newest_touch(
    db: &impl ConnectionTrait,
    customers: Option<&[String]>,
    at_us: i64,
) -> Result<std::collections::HashMap<String, i64>> {
    let mut q = Query::select()
        .column(n("customer"))
        .expr_as(Func::max(Expr::col(n("occurred_us"))), n("last"))
        .from(n("score_touchpoints"))
        .and_where(Expr::col(n("occurred_us")).lte(at_us))
        .group_by_col(n("customer"))
        .to_owned();
    if let Some(c) = customers {
        q.and_where(is_in_texts(db, "customer", c));
    }
    db.query_all(&q)
        .await?
        .into_iter()
        .map(|r| Ok((r.try_get("", "customer")?, r.try_get("", "last")?)))
        .collect()
}

/// Moves touchpoints of `from` to `to` and drops the `from` rows (a merge).
pub async fn merge(db: &impl ConnectionTrait, from: &[String], to: &str) -> Result<()> {
    ensure_and_lock(db, &[to.to_owned()]).await?;
    let q = Query::update()
        .table(n("score_touchpoints"))
        .value(n("customer"), to)
        .and_where(is_in_texts(db, "customer", from))
        .to_owned();
    db.execute(&q).await?;
    let q = Query::delete()
        .from_table(n("score_customers"))
        .and_where(is_in_texts(db, "customer", from))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

/// Deletes everything kept of `customers` (erasure).
pub async fn delete(db: &impl ConnectionTrait, customers: &[String]) -> Result<()> {
    for table in ["score_touchpoints", "score_customers"] {
        let q = Query::delete()
            .from_table(n(table))
            .and_where(is_in_texts(db, "customer", customers))
            .to_owned();
        db.execute(&q).await?;
    }
    Ok(())
}
