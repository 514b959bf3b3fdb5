//! `invitations`: one row per invitation; the fatigue cap and the recontact
//! cadence are counted from it (set-based, one statement per batch).

use super::entity::invitations::{self, Column as IC, Entity as Invitations};
use clm_platform::Result;
use clm_platform::db::is_postgres;
use clm_proto::feedback as pb;
use sea_orm::sea_query::{Expr, ExprTrait, LockType, Query};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect,
};
use std::collections::{HashMap, HashSet};

pub use invitations::Model as Row;

/// Inserts `rows` (a few statements for any number).
pub async fn insert(db: &impl ConnectionTrait, rows: &[Row]) -> Result<()> {
    for part in rows.chunks(super::chunk(10)) {
        Invitations::insert_many(part.iter().cloned().map(invitations::ActiveModel::from))
            .exec(db)
            .await?;
    }
    Ok(())
}

#[derive(FromQueryResult)]
struct Count {
    customer: String,
    n: i64,
}

/// How many invitations each of `customers` got after `since_us`, across
/// every survey (the fatigue cap).
pub async fn counts_since(
    db: &impl ConnectionTrait,
    customers: &[String],
    since_us: i64,
) -> Result<HashMap<String, i64>> {
    let q = Query::select()
        .column(IC::Customer)
        .expr_as(
            Expr::col(IC::Id).count(),
            sea_orm::sea_query::Alias::new("n"),
        )
        .from(Invitations)
        .and_where(Expr::col(IC::Customer).is_in(customers.iter().cloned()))
        .and_where(Expr::col(IC::CreateUs).gt(since_us))
        .group_by_col(IC::Customer)
        .to_owned();
    Ok(
        Count::find_by_statement(db.get_database_backend().build(&q))
            .all(db)
            .await?
            .into_iter()
            .map(|c| (c.customer, c.n))
            .collect(),
    )
}

/// Which of `customers` were invited to survey `survey` after `since_us`
/// (the recontact cadence).
pub async fn invited_since(
    db: &impl ConnectionTrait,
    survey: &str,
    customers: &[String],
    since_us: i64,
) -> Result<HashSet<String>> {
    Ok(Invitations::find()
        .select_only()
        .column(IC::Customer)
        .filter(IC::SurveyId.eq(survey))
        .filter(IC::Customer.is_in(customers.iter().cloned()))
        .filter(IC::CreateUs.gt(since_us))
        .into_tuple::<String>()
        .all(db)
        .await?
        .into_iter()
        .collect())
}

/// Invitation `id` of survey `survey`; on PostgreSQL locked for update
/// when `lock` (submissions of one invitation take turns).
pub async fn get(
    db: &impl ConnectionTrait,
    survey: &str,
    id: &str,
    lock: bool,
) -> Result<Option<Row>> {
    let mut q = Invitations::find()
        .filter(IC::Id.eq(id))
        .filter(IC::SurveyId.eq(survey));
    if lock && is_postgres(db) {
        q = q.lock(LockType::Update);
    }
    Ok(q.one(db).await?)
}

/// A page of invitations, oldest first: of survey `survey` (all surveys
/// when `None`), of `customer` when set, after `(create_us, id)`.
pub async fn list(
    db: &impl ConnectionTrait,
    survey: Option<&str>,
    customer: Option<&str>,
    after: Option<(i64, String)>,
    limit: u64,
) -> Result<Vec<Row>> {
    let mut q = Invitations::find();
    if let Some(s) = survey {
        q = q.filter(IC::SurveyId.eq(s));
    }
    if let Some(c) = customer {
        q = q.filter(IC::Customer.eq(c));
    }
    if let Some((us, id)) = after {
        q = q.filter(
            Condition::any()
                .add(IC::CreateUs.gt(us))
                .add(IC::CreateUs.eq(us).and(IC::Id.gt(id))),
        );
    }
    Ok(q.order_by_asc(IC::CreateUs)
        .order_by_asc(IC::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// Sets an invitation's state and response.
pub async fn set_state(
    db: &impl ConnectionTrait,
    id: &str,
    state: pb::InvitationState,
    response: Option<&str>,
) -> Result<()> {
    let q = Query::update()
        .table(Invitations)
        .value(IC::State, state as i16)
        .value(IC::ResponseId, response.map(str::to_owned))
        .and_where(Expr::col(IC::Id).eq(id.to_owned()))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

/// Expires those of `ids` still open whose time has come (at or before
/// `now_us`); returns the rows expired.
pub async fn expire(db: &impl ConnectionTrait, ids: &[String], now_us: i64) -> Result<Vec<Row>> {
    let open = [
        pb::InvitationState::Pending as i16,
        pb::InvitationState::Started as i16,
    ];
    let mut q = Invitations::find()
        .filter(IC::Id.is_in(ids.iter().cloned()))
        .filter(IC::State.is_in(open))
        .filter(IC::ExpireUs.lte(now_us))
        .order_by_asc(IC::Id);
    if is_postgres(db) {
        q = q.lock(LockType::Update);
    }
    let rows = q.all(db).await?;
    if rows.is_empty() {
        return Ok(rows);
    }
    let q = Query::update()
        .table(Invitations)
        .value(IC::State, pb::InvitationState::Expired as i16)
        .and_where(Expr::col(IC::Id).is_in(rows.iter().map(|r| r.id.clone())))
        .to_owned();
    db.execute(&q).await?;
    Ok(rows)
}

/// Moves the invitations of `merged` customers to `survivor`.
pub async fn reassign(db: &impl ConnectionTrait, merged: &[String], survivor: &str) -> Result<()> {
    let q = Query::update()
        .table(Invitations)
        .value(IC::Customer, survivor.to_owned())
        .and_where(Expr::col(IC::Customer).is_in(merged.iter().cloned()))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

/// Unlinks the invitations of `customers` from them (erasure): the rows
/// stay, anonymous, so response rates stay true.
pub async fn anonymize(db: &impl ConnectionTrait, customers: &[String]) -> Result<()> {
    let q = Query::update()
        .table(Invitations)
        .value(IC::Customer, String::new())
        .and_where(Expr::col(IC::Customer).is_in(customers.iter().cloned()))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}
