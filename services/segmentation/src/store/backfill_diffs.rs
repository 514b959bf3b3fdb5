//! A backfill's diff taken outside the membership lock
//! (`backfill_diffs`, `backfill_seen`).
//!
//! A backfill computes which customers enter and leave its segment with
//! one long query and no lock, then applies that diff in a short
//! transaction under the membership lock. Meanwhile the subscribers and
//! timers go on deciding memberships; for a segment [`start`]ed here,
//! each evaluation records whom it decided ([`mark_seen`]), and
//! [`still_to_apply`] keeps from the diff only customers nobody decided
//! since it started, who still exist and whose membership is still the
//! one the diff saw: the newer decision stands, the diff fills in the rest.

use super::entity::backfill_diffs::{Column as BD, Entity as BackfillDiffs};
use super::entity::backfill_seen::{Column as BS, Entity as BackfillSeen};
use super::entity::fact_customers::{Column as FC, Entity as FactCustomers};
use super::entity::members::{Column as M, Entity as Members};
use super::members::Pair;
use clm_platform::db::rows_per_statement;
use sea_orm::IdenStatic;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use sea_orm::{ConnectionTrait, DbErr};
use std::collections::{BTreeSet, HashSet};

/// Starts a diff of `segment` after membership version `since` (in the
/// transaction that took it, under the membership lock): evaluations
/// from then on record whom they decide for it.
pub async fn start(db: &impl ConnectionTrait, segment: &str, since: i64) -> Result<(), DbErr> {
    finish(db, segment).await?;
    let insert = Query::insert()
        .into_table(BackfillDiffs)
        .columns([BD::SegmentId, BD::SinceVersion])
        .values_panic([segment.into(), since.into()])
        .to_owned();
    db.execute(&insert).await?;
    Ok(())
}

/// Ends the diff of `segment`: its rows go.
pub async fn finish(db: &impl ConnectionTrait, segment: &str) -> Result<(), DbErr> {
    let delete = Query::delete()
        .from_table(BackfillSeen)
        .and_where(Expr::col(BS::SegmentId).eq(segment))
        .to_owned();
    db.execute(&delete).await?;
    let delete = Query::delete()
        .from_table(BackfillDiffs)
        .and_where(Expr::col(BD::SegmentId).eq(segment))
        .to_owned();
    db.execute(&delete).await?;
    Ok(())
}

/// The segments whose diff is being computed (the registry marks them).
pub async fn diffing(db: &impl ConnectionTrait) -> Result<BTreeSet<String>, DbErr> {
    let q = Query::select()
        .column(BD::SegmentId)
        .from(BackfillDiffs)
        .to_owned();
    db.query_all(&q)
        .await?
        .iter()
        .map(|r| r.try_get::<String>("", BD::SegmentId.as_str()))
        .collect()
}

/// Records that the evaluation at membership version `version` decided
/// each (segment, customer) of `pairs`.
pub async fn mark_seen(
    db: &impl ConnectionTrait,
    pairs: &[Pair],
    version: i64,
) -> Result<(), DbErr> {
    for chunk in pairs.chunks(rows_per_statement(3)) {
        let mut insert = Query::insert();
        insert
            .into_table(BackfillSeen)
            .columns([BS::SegmentId, BS::CustomerId, BS::Version])
            .on_conflict(
                OnConflict::columns([BS::SegmentId, BS::CustomerId])
                    .update_column(BS::Version)
                    .to_owned(),
            );
        for (s, c) in chunk {
            insert.values_panic([s.as_str().into(), c.as_str().into(), version.into()]);
        }
        db.execute(&insert).await?;
    }
    Ok(())
}

/// Of a diff's `entering` and `leaving` customers (one chunk of each, at
/// most a few thousand), those it still decides, under the membership
/// lock: nobody decided them since the diff started, and an entering one
/// still exists and is not a member, a leaving one still is.
pub async fn still_to_apply(
    db: &impl ConnectionTrait,
    segment: &str,
    entering: &[String],
    leaving: &[String],
) -> Result<(Vec<String>, Vec<String>), DbErr> {
    let all: Vec<String> = entering.iter().chain(leaving).cloned().collect();
    if all.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let seen = ids(
        db,
        Query::select()
            .column(BS::CustomerId)
            .from(BackfillSeen)
            .and_where(Expr::col(BS::SegmentId).eq(segment))
            .and_where(Expr::col(BS::CustomerId).is_in(all.iter().map(String::as_str))),
        BS::CustomerId.as_str(),
    )
    .await?;
    let members = ids(
        db,
        Query::select()
            .column(M::CustomerId)
            .from(Members)
            .and_where(Expr::col(M::SegmentId).eq(segment))
            .and_where(Expr::col(M::CustomerId).is_in(all.iter().map(String::as_str))),
        M::CustomerId.as_str(),
    )
    .await?;
    let existing = if entering.is_empty() {
        HashSet::new()
    } else {
        ids(
            db,
            Query::select()
                .column(FC::CustomerId)
                .from(FactCustomers)
                .and_where(Expr::col(FC::Profiled).eq(true))
                .and_where(Expr::col(FC::CustomerId).is_in(entering.iter().map(String::as_str))),
            FC::CustomerId.as_str(),
        )
        .await?
    };
    let enter = entering
        .iter()
        .filter(|c| !seen.contains(*c) && existing.contains(*c) && !members.contains(*c))
        .cloned()
        .collect();
    let exit = leaving
        .iter()
        .filter(|c| !seen.contains(*c) && members.contains(*c))
        .cloned()
        .collect();
    Ok((enter, exit))
}

async fn ids(
    db: &impl ConnectionTrait,
    q: &mut sea_orm::sea_query::SelectStatement,
    column: &str,
) -> Result<HashSet<String>, DbErr> {
    db.query_all(&*q)
        .await?
        .iter()
        .map(|r| r.try_get::<String>("", column))
        .collect()
}
