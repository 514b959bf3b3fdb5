//! Objectives of segments (`segment_objectives`, sea-orm) and their daily
//! values (`objective_snapshots`).

use super::entity::objective_snapshots as snap;
use super::entity::segment_objectives as obj;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, IntoActiveModel, QueryFilter, QueryOrder,
};
use std::collections::HashMap;

/// A stored objective.
pub type Objective = obj::Model;
/// A stored daily value of an objective.
pub type Snapshot = snap::Model;

/// The objectives of `segments`, each segment's in order.
pub async fn of_segments(
    db: &impl ConnectionTrait,
    segments: &[String],
) -> Result<HashMap<String, Vec<Objective>>, DbErr> {
    let mut out: HashMap<String, Vec<Objective>> = HashMap::new();
    for chunk in super::chunks(segments) {
        let rows = obj::Entity::find()
            .filter(obj::Column::SegmentId.is_in(chunk.iter().cloned()))
            .order_by_asc(obj::Column::SegmentId)
            .order_by_asc(obj::Column::Position)
            .all(db)
            .await?;
        for r in rows {
            out.entry(r.segment_id.clone()).or_default().push(r);
        }
    }
    Ok(out)
}

/// Replaces `segment`'s objectives by `rows`, keeping the stored status and
/// final value of each objective whose definition did not change.
pub async fn replace(
    db: &impl ConnectionTrait,
    segment: &str,
    mut rows: Vec<Objective>,
) -> Result<(), DbErr> {
    let old = of_segments(db, &[segment.to_owned()])
        .await?
        .remove(segment)
        .unwrap_or_default();
    for r in &mut rows {
        if let Some(o) = old.iter().find(|o| o.objective_id == r.objective_id)
            && same_definition(o, r)
        {
            r.status = o.status;
            r.final_value = o.final_value;
        }
    }
    obj::Entity::delete_many()
        .filter(obj::Column::SegmentId.eq(segment))
        .exec(db)
        .await?;
    if !rows.is_empty() {
        obj::Entity::insert_many(rows.into_iter().map(IntoActiveModel::into_active_model))
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

/// Whether two objectives measure the same thing against the same target.
pub fn same_definition(a: &Objective, b: &Objective) -> bool {
    a.metric == b.metric
        && a.stage == b.stage
        && a.target.to_bits() == b.target.to_bits()
        && a.direction == b.direction
        && a.deadline_us == b.deadline_us
        && a.currency == b.currency
        && a.window_us == b.window_us
}

/// Stores an evaluation's status (and, at the deadline, the final value).
pub async fn set_status(
    db: &impl ConnectionTrait,
    segment: &str,
    objective: &str,
    status: i16,
    final_value: Option<f64>,
) -> Result<(), DbErr> {
    let mut update = obj::Entity::update_many()
        .col_expr(obj::Column::Status, status.into())
        .filter(obj::Column::SegmentId.eq(segment))
        .filter(obj::Column::ObjectiveId.eq(objective));
    if let Some(v) = final_value {
        update = update.col_expr(obj::Column::FinalValue, Some(v).into());
    }
    update.exec(db).await?;
    Ok(())
}

/// Deletes a segment's objectives and their snapshots.
pub async fn delete_segment(db: &impl ConnectionTrait, segment: &str) -> Result<(), DbErr> {
    obj::Entity::delete_many()
        .filter(obj::Column::SegmentId.eq(segment))
        .exec(db)
        .await?;
    snap::Entity::delete_many()
        .filter(snap::Column::SegmentId.eq(segment))
        .exec(db)
        .await?;
    Ok(())
}

/// Records daily values (a second snapshot of the same day is ignored).
pub async fn insert_snapshots(db: &impl ConnectionTrait, rows: Vec<Snapshot>) -> Result<(), DbErr> {
    if rows.is_empty() {
        return Ok(());
    }
    snap::Entity::insert_many(rows.into_iter().map(IntoActiveModel::into_active_model))
        .on_conflict_do_nothing_on([
            snap::Column::SegmentId,
            snap::Column::ObjectiveId,
            snap::Column::DayUs,
        ])
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// Daily values of `segments`' objectives taken in `[from_us, to_us)`,
/// oldest first.
pub async fn snapshots(
    db: &impl ConnectionTrait,
    segments: &[String],
    from_us: i64,
    to_us: i64,
) -> Result<Vec<Snapshot>, DbErr> {
    let mut out = Vec::new();
    for chunk in super::chunks(segments) {
        out.extend(
            snap::Entity::find()
                .filter(snap::Column::SegmentId.is_in(chunk.iter().cloned()))
                .filter(snap::Column::TakenUs.gte(from_us))
                .filter(snap::Column::TakenUs.lt(to_us))
                .order_by_asc(snap::Column::TakenUs)
                .all(db)
                .await?,
        );
    }
    Ok(out)
}
