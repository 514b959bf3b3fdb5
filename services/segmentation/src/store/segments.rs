//! Segments and their rule versions (sea-orm entities).

use super::entity::{segment_versions, segments};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, IntoActiveModel,
    QueryFilter, QueryOrder, QuerySelect,
};

/// A segment's membership state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Membership computed and kept up to date.
    Ready,
    /// A backfill is running.
    Backfilling,
    /// The last evaluation failed.
    Failed,
}

impl State {
    /// Storage code.
    pub fn code(self) -> i16 {
        match self {
            State::Ready => 1,
            State::Backfilling => 2,
            State::Failed => 3,
        }
    }

    /// Inverse of [`State::code`].
    pub fn from_code(code: i16) -> State {
        match code {
            1 => State::Ready,
            2 => State::Backfilling,
            _ => State::Failed,
        }
    }
}

/// A stored segment.
pub type Segment = segments::Model;

/// Inserts a new segment and its first rule version.
pub async fn insert(db: &impl ConnectionTrait, s: Segment, actor: &str) -> Result<(), DbErr> {
    let version = segment_versions::Model {
        segment_id: s.id.clone(),
        version: s.version,
        rule_text: s.rule_text.clone(),
        actor: actor.to_owned(),
        create_us: s.update_us,
    };
    segments::Entity::insert(s.into_active_model())
        .exec_without_returning(db)
        .await?;
    segment_versions::Entity::insert(version.into_active_model())
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// Writes a changed segment; a new rule version is recorded with `actor`.
pub async fn update(
    db: &impl ConnectionTrait,
    s: Segment,
    new_version: bool,
    actor: &str,
) -> Result<(), DbErr> {
    if new_version {
        segment_versions::Entity::insert(
            segment_versions::Model {
                segment_id: s.id.clone(),
                version: s.version,
                rule_text: s.rule_text.clone(),
                actor: actor.to_owned(),
                create_us: s.update_us,
            }
            .into_active_model(),
        )
        .exec_without_returning(db)
        .await?;
    }
    s.into_active_model().reset_all().update(db).await?;
    Ok(())
}

/// Sets a segment's state if its rule is still at `version`.
pub async fn set_state(
    db: &impl ConnectionTrait,
    id: &str,
    version: i64,
    state: State,
    failure: Option<String>,
    evaluate_us: Option<i64>,
) -> Result<(), DbErr> {
    let mut update = segments::Entity::update_many()
        .col_expr(segments::Column::State, state.code().into())
        .col_expr(segments::Column::FailureReason, failure.into())
        .filter(segments::Column::Id.eq(id))
        .filter(segments::Column::Version.eq(version));
    if let Some(at) = evaluate_us {
        update = update.col_expr(segments::Column::EvaluateUs, Some(at).into());
    }
    update.exec(db).await?;
    Ok(())
}

/// Names `operation` as the segment's backfill.
pub async fn set_operation(
    db: &impl ConnectionTrait,
    id: &str,
    operation: &str,
) -> Result<(), DbErr> {
    segments::Entity::update_many()
        .col_expr(
            segments::Column::Operation,
            Some(operation.to_owned()).into(),
        )
        .filter(segments::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

/// Segments still BACKFILLING that name no operation (left by a version
/// before backfills were operations).
pub async fn backfilling_without_operation(
    db: &impl ConnectionTrait,
) -> Result<Vec<Segment>, DbErr> {
    segments::Entity::find()
        .filter(segments::Column::State.eq(State::Backfilling.code()))
        .filter(segments::Column::Operation.is_null())
        .all(db)
        .await
}

/// Takes `id`'s row lock until the transaction ends (a no-op write; on
/// SQLite the one writer orders writes anyway), so writes that check the
/// segment (owner, etag, approval) and then change it are ordered: one
/// reads what the other committed. Taken before the membership lock
/// wherever both are (the order UpdateSegment has always had).
pub async fn lock(db: &impl ConnectionTrait, id: &str) -> Result<(), DbErr> {
    segments::Entity::update_many()
        .col_expr(
            segments::Column::Revision,
            sea_orm::sea_query::Expr::col(segments::Column::Revision),
        )
        .filter(segments::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

/// A segment by id.
pub async fn get(db: &impl ConnectionTrait, id: &str) -> Result<Option<Segment>, DbErr> {
    segments::Entity::find_by_id(id.to_owned()).one(db).await
}

/// Every segment (the registry: rules are small and few).
pub async fn all(db: &impl ConnectionTrait) -> Result<Vec<Segment>, DbErr> {
    segments::Entity::find()
        .order_by_asc(segments::Column::Id)
        .all(db)
        .await
}

/// A page of segments after `after` (id), by id, optionally of one owner
/// and one team.
pub async fn page(
    db: &impl ConnectionTrait,
    owner: Option<&str>,
    team: Option<&str>,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<Segment>, DbErr> {
    let mut q = segments::Entity::find().order_by_asc(segments::Column::Id);
    if let Some(o) = owner {
        q = q.filter(segments::Column::Owner.eq(o));
    }
    if let Some(t) = team {
        q = q.filter(segments::Column::Team.eq(t));
    }
    if let Some(a) = after {
        q = q.filter(segments::Column::Id.gt(a));
    }
    q.limit(limit).all(db).await
}

/// Deletes a segment and its versions.
pub async fn delete(db: &impl ConnectionTrait, id: &str) -> Result<(), DbErr> {
    segment_versions::Entity::delete_many()
        .filter(segment_versions::Column::SegmentId.eq(id))
        .exec(db)
        .await?;
    segments::Entity::delete_by_id(id.to_owned())
        .exec(db)
        .await?;
    Ok(())
}
