//! `scoring_models`: one row per model version (a sea-orm entity); `body`
//! is the encoded `ScoringModel` as written, `active` marks the version
//! that scores.

use clm_platform::{Error, Result};
use clm_proto::scoring as pb;
use prost::Message;
use sea_orm::entity::prelude::*;
use sea_orm::{ConnectionTrait, QueryOrder, QuerySelect, Set};

/// A row of `scoring_models`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "scoring_models")]
pub struct Model {
    /// Model id (`scoringModels/{id}`).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// Version, from 1.
    #[sea_orm(primary_key, auto_increment = false)]
    pub version: i64,
    /// Display name.
    pub display_name: String,
    /// Encoded `clm.scoring.v1.ScoringModel` of this version.
    pub body: Vec<u8>,
    /// Whether this version scores events.
    pub active: bool,
    /// When the version was created (µs).
    pub create_us: i64,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

/// A stored version, decoded.
#[derive(Debug, Clone)]
pub struct Version {
    /// Model id.
    pub id: String,
    /// Version.
    pub version: i64,
    /// Whether it is active.
    pub active: bool,
    /// The definition as stored.
    pub body: pb::ScoringModel,
}

fn decode(m: Model) -> Result<Version> {
    Ok(Version {
        body: pb::ScoringModel::decode(m.body.as_slice()).map_err(Error::internal)?,
        id: m.id,
        version: m.version,
        active: m.active,
    })
}

/// Inserts a version.
pub async fn insert(
    db: &impl ConnectionTrait,
    id: &str,
    version: i64,
    body: &pb::ScoringModel,
    active: bool,
    create_us: i64,
) -> Result<()> {
    Entity::insert(ActiveModel {
        id: Set(id.to_owned()),
        version: Set(version),
        display_name: Set(body.display_name.clone()),
        body: Set(body.encode_to_vec()),
        active: Set(active),
        create_us: Set(create_us),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// A version (0: the active one).
pub async fn get(db: &impl ConnectionTrait, id: &str, version: i64) -> Result<Option<Version>> {
    let mut q = Entity::find().filter(Column::Id.eq(id));
    q = if version == 0 {
        q.filter(Column::Active.eq(true))
    } else {
        q.filter(Column::Version.eq(version))
    };
    q.one(db).await?.map(decode).transpose()
}

/// The newest version number of a model (0 if none).
pub async fn latest_version(db: &impl ConnectionTrait, id: &str) -> Result<i64> {
    Ok(Entity::find()
        .filter(Column::Id.eq(id))
        .order_by_desc(Column::Version)
        .one(db)
        .await?
        .map_or(0, |m| m.version))
}

/// Makes `version` the active one.
pub async fn activate(db: &impl ConnectionTrait, id: &str, version: i64) -> Result<()> {
    Entity::update_many()
        .col_expr(Column::Active, Expr::value(false))
        .filter(Column::Id.eq(id))
        .exec(db)
        .await?;
    Entity::update_many()
        .col_expr(Column::Active, Expr::value(true))
        .filter(Column::Id.eq(id))
        .filter(Column::Version.eq(version))
        .exec(db)
        .await?;
    Ok(())
}

/// Active versions of every model, by id, after `after`, at most `limit`.
pub async fn list_active(
    db: &impl ConnectionTrait,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<Version>> {
    let mut q = Entity::find().filter(Column::Active.eq(true));
    if let Some(a) = after {
        q = q.filter(Column::Id.gt(a));
    }
    q.order_by_asc(Column::Id)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(decode)
        .collect()
}
