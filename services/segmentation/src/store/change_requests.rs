//! Change requests of segments (`segment_change_requests`, sea-orm): the
//! request is kept as its API message, with the segment, state and time
//! beside it for lists.

use super::entity::segment_change_requests as cr;
use clm_proto::segmentation as pb;
use prost::Message;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, IntoActiveModel,
    QueryFilter, QueryOrder, QuerySelect,
};

/// Stores a new request.
pub async fn insert(
    db: &impl ConnectionTrait,
    id: &str,
    segment: &str,
    create_us: i64,
    request: &pb::SegmentChangeRequest,
) -> Result<(), DbErr> {
    cr::Model {
        id: id.to_owned(),
        segment_id: segment.to_owned(),
        state: request.state as i16,
        create_us,
        body: request.encode_to_vec(),
    }
    .into_active_model()
    .insert(db)
    .await?;
    Ok(())
}

fn decode(row: &cr::Model) -> Result<pb::SegmentChangeRequest, DbErr> {
    pb::SegmentChangeRequest::decode(row.body.as_slice())
        .map_err(|e| DbErr::Custom(format!("change request {}: {e}", row.id)))
}

/// A request of `segment` by id.
pub async fn get(
    db: &impl ConnectionTrait,
    segment: &str,
    id: &str,
) -> Result<Option<pb::SegmentChangeRequest>, DbErr> {
    match cr::Entity::find_by_id(id.to_owned())
        .filter(cr::Column::SegmentId.eq(segment))
        .one(db)
        .await?
    {
        Some(row) => Ok(Some(decode(&row)?)),
        None => Ok(None),
    }
}

/// Writes a reviewed request back.
pub async fn update(
    db: &impl ConnectionTrait,
    id: &str,
    request: &pb::SegmentChangeRequest,
) -> Result<(), DbErr> {
    cr::Entity::update_many()
        .col_expr(cr::Column::State, (request.state as i16).into())
        .col_expr(cr::Column::Body, request.encode_to_vec().into())
        .filter(cr::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

/// A page of `segment`'s requests, newest first (ids are time-ordered),
/// before id `before`, optionally in one state.
pub async fn page(
    db: &impl ConnectionTrait,
    segment: &str,
    state: Option<i16>,
    before: Option<&str>,
    limit: u64,
) -> Result<Vec<(String, pb::SegmentChangeRequest)>, DbErr> {
    let mut q = cr::Entity::find()
        .filter(cr::Column::SegmentId.eq(segment))
        .order_by_desc(cr::Column::Id);
    if let Some(s) = state {
        q = q.filter(cr::Column::State.eq(s));
    }
    if let Some(b) = before {
        q = q.filter(cr::Column::Id.lt(b));
    }
    q.limit(limit)
        .all(db)
        .await?
        .iter()
        .map(|r| Ok((r.id.clone(), decode(r)?)))
        .collect()
}

/// Deletes a segment's requests (with the segment).
pub async fn delete_segment(db: &impl ConnectionTrait, segment: &str) -> Result<(), DbErr> {
    cr::Entity::delete_many()
        .filter(cr::Column::SegmentId.eq(segment))
        .exec(db)
        .await?;
    Ok(())
}
