//! `surveys` and `survey_versions`: a survey's state and counters, and the
//! encoded `Survey` of each version.

use super::entity::survey_versions::{self, Entity as Versions};
use super::entity::surveys::{self, Column as SC, Entity as Surveys};
use clm_platform::db::is_postgres;
use clm_platform::{Error, Result};
use clm_proto::feedback as pb;
use prost::Message;
use sea_orm::sea_query::{Expr, ExprTrait, LockType, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};

pub use surveys::Model as Row;

/// A survey as stored: its row and the body of one version.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The row (state, latest version, counters).
    pub row: Row,
    /// The version's `Survey` (writable fields only).
    pub body: pb::Survey,
    /// Which version `body` is.
    pub version: i64,
}

/// How a reader locks the survey row (PostgreSQL; SQLite has one writer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// A plain read.
    None,
    /// Others may share it, nobody may change it (invitations, partial answers).
    Share,
    /// Exclusive (state changes, completions).
    Update,
}

/// The row of survey `id`, locked as asked.
pub async fn row(db: &impl ConnectionTrait, id: &str, lock: Lock) -> Result<Option<Row>> {
    let mut q = Surveys::find_by_id(id.to_owned());
    if is_postgres(db) {
        q = match lock {
            Lock::None => q,
            Lock::Share => q.lock(LockType::Share),
            Lock::Update => q.lock(LockType::Update),
        };
    }
    Ok(q.one(db).await?)
}

/// The body of `version` of survey `id`.
pub async fn body(db: &impl ConnectionTrait, id: &str, version: i64) -> Result<Option<pb::Survey>> {
    let Some(v) = Versions::find_by_id((id.to_owned(), version))
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(
        pb::Survey::decode(v.body.as_slice()).map_err(Error::internal)?,
    ))
}

/// Survey `id` with its latest version (or `version`, when not 0).
pub async fn get(
    db: &impl ConnectionTrait,
    id: &str,
    version: i64,
    lock: Lock,
) -> Result<Option<Stored>> {
    let Some(row) = row(db, id, lock).await? else {
        return Ok(None);
    };
    let version = if version == 0 { row.version } else { version };
    let Some(body) = body(db, id, version).await? else {
        return Ok(None);
    };
    Ok(Some(Stored { row, body, version }))
}

/// Inserts a new survey with version 1.
pub async fn insert(
    db: &impl ConnectionTrait,
    id: &str,
    body: &pb::Survey,
    now: i64,
) -> Result<Row> {
    let row = Row {
        id: id.to_owned(),
        state: pb::SurveyState::Draft as i16,
        version: 1,
        revision: 1,
        response_limit: body.response_limit,
        completed: 0,
        create_us: now,
        update_us: now,
    };
    Surveys::insert(surveys::ActiveModel::from(row.clone()))
        .exec(db)
        .await?;
    insert_version(db, id, 1, body).await?;
    Ok(row)
}

/// Stores `body` as `version` of survey `id`.
pub async fn insert_version(
    db: &impl ConnectionTrait,
    id: &str,
    version: i64,
    body: &pb::Survey,
) -> Result<()> {
    Versions::insert(survey_versions::ActiveModel {
        survey_id: Set(id.to_owned()),
        version: Set(version),
        body: Set(body.encode_to_vec()),
    })
    .exec(db)
    .await?;
    Ok(())
}

/// Writes the row's state, version, limit and times, bumping the revision.
pub async fn save(db: &impl ConnectionTrait, row: &Row) -> Result<()> {
    let q = Query::update()
        .table(Surveys)
        .value(SC::State, row.state)
        .value(SC::Version, row.version)
        .value(SC::Revision, row.revision)
        .value(SC::ResponseLimit, row.response_limit)
        .value(SC::UpdateUs, row.update_us)
        .and_where(Expr::col(SC::Id).eq(row.id.clone()))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

/// Counts one more completed response unless the limit is reached: false
/// when it is (the caller refuses the completion). One conditional UPDATE,
/// so concurrent completions never pass the limit.
pub async fn count_completion(db: &impl ConnectionTrait, id: &str) -> Result<bool> {
    let q = Query::update()
        .table(Surveys)
        .value(SC::Completed, Expr::col(SC::Completed).add(1))
        .and_where(Expr::col(SC::Id).eq(id.to_owned()))
        .and_where(
            Expr::col(SC::ResponseLimit)
                .eq(0)
                .or(Expr::col(SC::Completed).lt(Expr::col(SC::ResponseLimit))),
        )
        .to_owned();
    Ok(db.execute(&q).await?.rows_affected() == 1)
}

/// A page of surveys, newest first: `(create_us, id)` after `after`.
pub async fn list(
    db: &impl ConnectionTrait,
    state: Option<i16>,
    after: Option<(i64, String)>,
    limit: u64,
) -> Result<Vec<Row>> {
    let mut q = Surveys::find();
    if let Some(s) = state {
        q = q.filter(SC::State.eq(s));
    }
    if let Some((us, id)) = after {
        q = q.filter(
            SC::CreateUs
                .lt(us)
                .or(SC::CreateUs.eq(us).and(SC::Id.lt(id))),
        );
    }
    Ok(q.order_by_desc(SC::CreateUs)
        .order_by_desc(SC::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// Published surveys (for the stream's automatic invitations), with their
/// latest bodies. Few: a service holds tens of surveys, not millions.
pub async fn published(db: &impl ConnectionTrait) -> Result<Vec<Stored>> {
    let rows = Surveys::find()
        .filter(SC::State.eq(pb::SurveyState::Published as i16))
        .all(db)
        .await?;
    with_bodies(db, rows).await
}

/// `rows` with the bodies of their latest versions, in two queries.
pub async fn with_bodies(db: &impl ConnectionTrait, rows: Vec<Row>) -> Result<Vec<Stored>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let versions = Versions::find()
        .filter(survey_versions::Column::SurveyId.is_in(rows.iter().map(|r| r.id.clone())))
        .all(db)
        .await?;
    let mut bodies: std::collections::HashMap<(String, i64), Vec<u8>> = versions
        .into_iter()
        .map(|v| ((v.survey_id, v.version), v.body))
        .collect();
    rows.into_iter()
        .filter_map(|row| {
            let b = bodies.remove(&(row.id.clone(), row.version))?;
            Some((row, b))
        })
        .map(|(row, b)| {
            Ok(Stored {
                version: row.version,
                body: pb::Survey::decode(b.as_slice()).map_err(Error::internal)?,
                row,
            })
        })
        .collect()
}

/// Rewrites the body of `version` of survey `id` (state times, or fields
/// that do not make a new version).
pub async fn replace_body(
    db: &impl ConnectionTrait,
    id: &str,
    version: i64,
    body: &pb::Survey,
) -> Result<()> {
    Versions::update_many()
        .col_expr(
            survey_versions::Column::Body,
            Expr::val(body.encode_to_vec()),
        )
        .filter(survey_versions::Column::SurveyId.eq(id))
        .filter(survey_versions::Column::Version.eq(version))
        .exec(db)
        .await?;
    Ok(())
}

/// Every version of survey `id`: its question ids, in order.
pub async fn question_ids(
    db: &impl ConnectionTrait,
    id: &str,
) -> Result<std::collections::BTreeMap<i64, Vec<String>>> {
    Versions::find()
        .filter(survey_versions::Column::SurveyId.eq(id))
        .all(db)
        .await?
        .into_iter()
        .map(|v| {
            let body = pb::Survey::decode(v.body.as_slice()).map_err(Error::internal)?;
            Ok((
                v.version,
                body.questions.into_iter().map(|q| q.id).collect(),
            ))
        })
        .collect()
}
