//! What scoring keeps of each customer: `score_customers` (profile and
//! stage, for fit rules and thresholds) and `score_touchpoints` (every
//! touchpoint seen, for inactivity decay and re-scoring).

use super::entity::score_customers::{Column as CC, Entity as Customers};
use super::entity::score_touchpoints::{Column as TC, Entity as Touchpoints};
use super::{chunk, n};
use clm_platform::Result;
use clm_platform::bulk::{is_in_texts, text_list};
use clm_platform::db::is_postgres;
use sea_orm::IdenStatic;
use sea_orm::sea_query::{Expr, ExprTrait, Func, LockType, OnConflict, Order, Query};
use sea_orm::{ConnectionTrait, DbBackend, EntityName, FromQueryResult, Statement};

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
        let customer = CC::Customer.as_str();
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "INSERT INTO {} ({customer}) \
                 SELECT json_array_elements_text(CAST($1 AS json)) ON CONFLICT ({customer}) DO NOTHING",
                Customers.table_name()
            ),
            [text_list(&sorted)],
        ))
        .await?;
        let q = Query::select()
            .column(CC::Customer)
            .from(Customers)
            .and_where(is_in_texts(db, CC::Customer.as_str(), &sorted))
            .order_by(CC::Customer, Order::Asc)
            .lock(LockType::Update)
            .to_owned();
        db.query_all(&q).await?;
        return Ok(());
    }
    for part in sorted.chunks(chunk(1)) {
        let mut q = Query::insert();
        q.into_table(Customers).columns([CC::Customer]);
        for c in part {
            q.values_panic([c.clone().into()]);
        }
        q.on_conflict(OnConflict::column(CC::Customer).do_nothing().to_owned());
        db.execute(&q).await?;
    }
    Ok(())
}

/// Locks the rows of those of `customers` that scoring has (`FOR UPDATE`
/// on PostgreSQL, in the order [`ensure_and_lock`] takes them) and returns
/// them: a write for a customer that must already exist (AdjustScore)
/// checks under the lock, so an erasure committing meanwhile is seen and
/// the customer is never recreated.
pub async fn lock_existing(db: &impl ConnectionTrait, customers: &[String]) -> Result<Vec<String>> {
    let mut sorted: Vec<String> = customers.to_vec();
    sorted.sort();
    sorted.dedup();
    if sorted.is_empty() {
        return Ok(Vec::new());
    }
    let mut q = Query::select()
        .column(CC::Customer)
        .from(Customers)
        .and_where(is_in_texts(db, CC::Customer.as_str(), &sorted))
        .order_by(CC::Customer, Order::Asc)
        .to_owned();
    if is_postgres(db) {
        q.lock(LockType::Update);
    }
    db.query_all(&q)
        .await?
        .iter()
        .map(|r| Ok(r.try_get("", CC::Customer.as_str())?))
        .collect()
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
    q.table(Customers)
        .value(CC::Profile, profile)
        .and_where(Expr::col(CC::Customer).eq(customer));
    if let Some((s, at)) = stage {
        q.value(CC::Stage, s).value(CC::StageUs, at);
    }
    db.execute(&q).await?;
    Ok(())
}

/// A customer's profile to store: customer, encoded
/// `clm.customer.v1.Customer`, and its stage `(code, since µs)` when known.
pub type Profile = (String, Vec<u8>, Option<(i16, i64)>);

/// Stores each customer's profile (and its stage, when known), as
/// [`set_profile`] one after the other would: on PostgreSQL one statement
/// of fixed text (the rows as arrays, the customers locked in name order),
/// elsewhere one customer at a time.
pub async fn set_profiles(db: &impl ConnectionTrait, profiles: &[Profile]) -> Result<()> {
    // The last profile of each customer, in name order.
    let mut last: std::collections::BTreeMap<&str, &Profile> = std::collections::BTreeMap::new();
    for p in profiles {
        last.insert(p.0.as_str(), p);
    }
    let rows: Vec<&Profile> = last.into_values().collect();
    if !is_postgres(db) {
        for (customer, profile, stage) in rows {
            set_profile(db, customer, profile.clone(), *stage).await?;
        }
        return Ok(());
    }
    if rows.is_empty() {
        return Ok(());
    }
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "INSERT INTO \"{table}\" AS t (\"{customer}\", \"{profile}\", \"{stage}\", \"{stage_us}\") \
             SELECT k.c, k.p, CASE WHEN k.known THEN k.s END, CASE WHEN k.known THEN k.at END \
             FROM unnest($1::text[], $2::bytea[], $3::bool[], $4::int2[], $5::int8[]) AS k(c, p, known, s, at) \
             ON CONFLICT (\"{customer}\") DO UPDATE SET \"{profile}\" = EXCLUDED.\"{profile}\", \
             \"{stage}\" = COALESCE(EXCLUDED.\"{stage}\", t.\"{stage}\"), \
             \"{stage_us}\" = CASE WHEN EXCLUDED.\"{stage}\" IS NULL THEN t.\"{stage_us}\" ELSE EXCLUDED.\"{stage_us}\" END",
            table = Customers.table_name(),
            customer = CC::Customer.as_str(),
            profile = CC::Profile.as_str(),
            stage = CC::Stage.as_str(),
            stage_us = CC::StageUs.as_str(),
        )
    });
    let values: Vec<sea_orm::Value> = vec![
        super::column(&rows, |r| r.0.clone()),
        super::column(&rows, |r| r.1.clone()),
        super::column(&rows, |r| r.2.is_some()),
        super::column(&rows, |r| r.2.map_or(0, |s| s.0)),
        super::column(&rows, |r| r.2.map_or(0, |s| s.1)),
    ];
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        SQL.as_str(),
        values,
    ))
    .await?;
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
        .table(Customers)
        .value(CC::Stage, stage)
        .value(CC::StageUs, at_us)
        .and_where(Expr::col(CC::Customer).eq(customer))
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
        .columns([CC::Customer, CC::Stage, CC::StageUs, CC::Profile])
        .from(Customers)
        .and_where(is_in_texts(db, CC::Customer.as_str(), customers))
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
        .column(CC::Customer)
        .from(Customers)
        .and_where(Expr::col(CC::Customer).gt(after))
        .order_by(CC::Customer, Order::Asc)
        .limit(limit)
        .to_owned();
    let rows = db.query_all(&q).await?;
    Ok(rows
        .iter()
        .filter_map(|r| r.try_get::<String>("", CC::Customer.as_str()).ok())
        .collect())
}

/// How many customers there are.
pub async fn count(db: &impl ConnectionTrait) -> Result<i64> {
    let q = Query::select()
        .expr_as(Func::count(Expr::col(CC::Customer)), n("n"))
        .from(Customers)
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
/// that were new (on PostgreSQL one statement of fixed text, see
/// [`super::unnest_insert`]; elsewhere one per chunk).
pub async fn insert_touchpoints(
    db: &impl ConnectionTrait,
    rows: &[TouchRow],
) -> Result<Vec<String>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut new = Vec::new();
    if is_postgres(db) {
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            let id = TC::EventId.as_str();
            super::unnest_insert(
                Touchpoints.table_name(),
                &[
                    (id, "text"),
                    (TC::Customer.as_str(), "text"),
                    (TC::OccurredUs.as_str(), "int8"),
                    (TC::Body.as_str(), "bytea"),
                ],
                &format!("ON CONFLICT (\"{id}\") DO NOTHING RETURNING \"{id}\""),
            )
        });
        let values: Vec<sea_orm::Value> = vec![
            super::column(rows, |r| r.event_id.clone()),
            super::column(rows, |r| r.customer.clone()),
            super::column(rows, |r| r.occurred_us),
            super::column(rows, |r| r.body.clone()),
        ];
        for r in db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                SQL.as_str(),
                values,
            ))
            .await?
        {
            new.push(r.try_get::<String>("", TC::EventId.as_str())?);
        }
        return Ok(new);
    }
    for part in rows.chunks(chunk(4)) {
        let mut q = Query::insert();
        q.into_table(Touchpoints)
            .columns([TC::EventId, TC::Customer, TC::OccurredUs, TC::Body]);
        for r in part {
            q.values_panic([
                r.event_id.clone().into(),
                r.customer.clone().into(),
                r.occurred_us.into(),
                r.body.clone().into(),
            ]);
        }
        q.on_conflict(OnConflict::column(TC::EventId).do_nothing().to_owned());
        q.returning_col(TC::EventId);
        for r in db.query_all(&q).await? {
            new.push(r.try_get::<String>("", TC::EventId.as_str())?);
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
        .columns([TC::Customer, TC::Body])
        .from(Touchpoints)
        .and_where(is_in_texts(db, TC::Customer.as_str(), customers))
        .order_by(TC::Customer, Order::Asc)
        .order_by(TC::OccurredUs, Order::Asc)
        .order_by(TC::EventId, Order::Asc)
        .to_owned();
    db.query_all(&q)
        .await?
        .into_iter()
        .map(|r| {
            Ok((
                r.try_get("", TC::Customer.as_str())?,
                r.try_get("", TC::Body.as_str())?,
            ))
        })
        .collect()
}

/// A kept touchpoint: customer, when it occurred (µs), event id, body.
pub type Kept = (String, i64, String, Vec<u8>);

/// Kept touchpoints of `customers` that occurred at or after `since_us`,
/// in (customer, time, event id) order (one statement).
pub async fn touchpoints_since(
    db: &impl ConnectionTrait,
    customers: &[String],
    since_us: i64,
) -> Result<Vec<Kept>> {
    if customers.is_empty() {
        return Ok(Vec::new());
    }
    let q = Query::select()
        .columns([TC::Customer, TC::OccurredUs, TC::EventId, TC::Body])
        .from(Touchpoints)
        .and_where(is_in_texts(db, TC::Customer.as_str(), customers))
        .and_where(Expr::col(TC::OccurredUs).gte(since_us))
        .order_by(TC::Customer, Order::Asc)
        .order_by(TC::OccurredUs, Order::Asc)
        .order_by(TC::EventId, Order::Asc)
        .to_owned();
    db.query_all(&q)
        .await?
        .into_iter()
        .map(|r| {
            Ok((
                r.try_get("", TC::Customer.as_str())?,
                r.try_get("", TC::OccurredUs.as_str())?,
                r.try_get("", TC::EventId.as_str())?,
                r.try_get("", TC::Body.as_str())?,
            ))
        })
        .collect()
}

/// Kept touchpoints of each `(customer, from, to)` that occurred in
/// `[from, to]`, in (customer, time, event id) order: one statement of
/// fixed text on PostgreSQL (the ranges as arrays joined to the
/// `(customer, occurred_us)` index), else [`touchpoints_since`] narrowed.
pub async fn touchpoints_in(
    db: &impl ConnectionTrait,
    ranges: &[(String, i64, i64)],
) -> Result<Vec<Kept>> {
    if ranges.is_empty() {
        return Ok(Vec::new());
    }
    if !is_postgres(db) {
        let custs: Vec<String> = ranges.iter().map(|r| r.0.clone()).collect();
        let since = ranges.iter().map(|r| r.1).min().unwrap_or(i64::MIN);
        let wanted: std::collections::HashMap<&str, (i64, i64)> =
            ranges.iter().map(|r| (r.0.as_str(), (r.1, r.2))).collect();
        return Ok(touchpoints_since(db, &custs, since)
            .await?
            .into_iter()
            .filter(|(c, at, _, _)| {
                wanted
                    .get(c.as_str())
                    .is_some_and(|(from, to)| at >= from && at <= to)
            })
            .collect());
    }
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT t.\"{customer}\", t.\"{at}\", t.\"{id}\", t.\"{body}\" \
             FROM unnest($1::text[], $2::int8[], $3::int8[]) AS k(c, lo, hi) \
             JOIN \"{table}\" t ON t.\"{customer}\" = k.c AND t.\"{at}\" >= k.lo AND t.\"{at}\" <= k.hi \
             ORDER BY 1, 2, 3",
            table = Touchpoints.table_name(),
            customer = TC::Customer.as_str(),
            at = TC::OccurredUs.as_str(),
            id = TC::EventId.as_str(),
            body = TC::Body.as_str(),
        )
    });
    let values: Vec<sea_orm::Value> = vec![
        super::column(ranges, |r| r.0.clone()),
        super::column(ranges, |r| r.1),
        super::column(ranges, |r| r.2),
    ];
    db.query_all_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        SQL.as_str(),
        values,
    ))
    .await?
    .into_iter()
    .map(|r| {
        Ok((
            r.try_get_by_index(0)?,
            r.try_get_by_index(1)?,
            r.try_get_by_index(2)?,
            r.try_get_by_index(3)?,
        ))
    })
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
        .column(TC::Customer)
        .expr_as(Func::max(Expr::col(TC::OccurredUs)), n("last"))
        .from(Touchpoints)
        .and_where(Expr::col(TC::OccurredUs).lte(at_us))
        .group_by_col(TC::Customer)
        .to_owned();
    if let Some(c) = customers {
        q.and_where(is_in_texts(db, TC::Customer.as_str(), c));
    }
    db.query_all(&q)
        .await?
        .into_iter()
        .map(|r| {
            Ok((
                r.try_get("", TC::Customer.as_str())?,
                r.try_get("", "last")?,
            ))
        })
        .collect()
}

/// Moves touchpoints of `from` to `to` and drops the `from` rows (a merge).
pub async fn merge(db: &impl ConnectionTrait, from: &[String], to: &str) -> Result<()> {
    ensure_and_lock(db, &[to.to_owned()]).await?;
    let q = Query::update()
        .table(Touchpoints)
        .value(TC::Customer, to)
        .and_where(is_in_texts(db, TC::Customer.as_str(), from))
        .to_owned();
    db.execute(&q).await?;
    let q = Query::delete()
        .from_table(Customers)
        .and_where(is_in_texts(db, CC::Customer.as_str(), from))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

/// Deletes everything kept of `customers` (erasure).
pub async fn delete(db: &impl ConnectionTrait, customers: &[String]) -> Result<()> {
    let q = Query::delete()
        .from_table(Touchpoints)
        .and_where(is_in_texts(db, TC::Customer.as_str(), customers))
        .to_owned();
    db.execute(&q).await?;
    let q = Query::delete()
        .from_table(Customers)
        .and_where(is_in_texts(db, CC::Customer.as_str(), customers))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}
