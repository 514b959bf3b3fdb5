//! Membership (current members with their entry time, closed intervals in
//! `member_history`), the next-change instants of timed rules (timers of
//! kind [`WINDOW`] in the platform's queue, keyed `{segment}|{customer}`),
//! and the `seg_meta` row (registry generation, membership version,
//! freshness).

use super::entity::fact_customers::{Column as FC, Entity as FactCustomers};
use super::entity::member_history::{Column as MH, Entity as MemberHistory};
use super::entity::members::{Column as M, Entity as Members};
use super::entity::seg_meta::{Column as SM, Entity as SegMeta};
use super::{chunks, n};
use clm_platform::db::rows_per_statement;
use clm_platform::timers;
use sea_orm::IdenStatic;
use sea_orm::sea_query::{Expr, ExprTrait, Func, OnConflict, Order, Query, SelectStatement};
use sea_orm::{ConnectionTrait, DbErr, EntityName};

/// A (segment id, customer id) pair, both bare ids.
pub type Pair = (String, String);

/// A membership change to write: the pair, the segment's rule version that
/// decided it and why (`MembershipReason` code).
pub type Stamped = (Pair, i64, i16);

/// Timer kind of a customer's next change by time alone: one timer per
/// customer (key and subject its id), due no later than the earliest
/// instant at which time alone changes the answer of any rule that reads
/// time. (Timers armed before were one per (segment, customer), keyed
/// `{segment}|{customer}`; they fire as the customer's.)
pub const WINDOW: &str = "segmentation.window";

/// Takes the next membership version, holding the `seg_meta` row lock
/// until the transaction ends: membership writers are serialised, so
/// versions grow in commit order (what the cache's versioned writes need).
pub async fn lock_version(db: &impl ConnectionTrait) -> Result<i64, DbErr> {
    let update = Query::update()
        .table(SegMeta)
        .value(
            SM::MembershipVersion,
            Expr::col(SM::MembershipVersion).add(1),
        )
        .and_where(Expr::col(SM::Id).eq(1))
        .to_owned();
    db.execute(&update).await?;
    meta_i64(db, SM::MembershipVersion).await
}

/// Takes the membership lock (the `seg_meta` row, on PostgreSQL; SQLite
/// has one writer) without taking a version: what every segmentation
/// writer takes first in its transaction.
pub async fn lock_membership(db: &impl ConnectionTrait) -> Result<(), DbErr> {
    if !clm_platform::db::is_postgres(db) {
        return Ok(());
    }
    let q = Query::select()
        .column(SM::Id)
        .from(SegMeta)
        .and_where(Expr::col(SM::Id).eq(1))
        .lock(sea_orm::sea_query::LockType::Update)
        .to_owned();
    db.query_one(&q).await?;
    Ok(())
}

/// The current membership version (to load the cache with).
pub async fn version(db: &impl ConnectionTrait) -> Result<i64, DbErr> {
    meta_i64(db, SM::MembershipVersion).await
}

/// The registry generation: changes whenever any segment's rule, state or
/// existence does.
pub async fn generation(db: &impl ConnectionTrait) -> Result<i64, DbErr> {
    meta_i64(db, SM::Generation).await
}

/// Bumps the registry generation (in the transaction changing a segment).
pub async fn bump_generation(db: &impl ConnectionTrait) -> Result<(), DbErr> {
    let update = Query::update()
        .table(SegMeta)
        .value(SM::Generation, Expr::col(SM::Generation).add(1))
        .and_where(Expr::col(SM::Id).eq(1))
        .to_owned();
    db.execute(&update).await?;
    Ok(())
}

async fn meta_i64(db: &impl ConnectionTrait, column: SM) -> Result<i64, DbErr> {
    let q = Query::select()
        .column(column)
        .from(SegMeta)
        .and_where(Expr::col(SM::Id).eq(1))
        .to_owned();
    match db.query_one(&q).await? {
        Some(row) => row.try_get("", column.as_str()),
        None => Err(DbErr::RecordNotFound(SegMeta.table_name().into())),
    }
}

/// The newest applied event's occurrence and its application time.
pub async fn freshness(db: &impl ConnectionTrait) -> Result<Option<(i64, i64)>, DbErr> {
    let q = Query::select()
        .columns([SM::FreshEventUs, SM::FreshApplyUs])
        .from(SegMeta)
        .and_where(Expr::col(SM::Id).eq(1))
        .to_owned();
    let Some(row) = db.query_one(&q).await? else {
        return Ok(None);
    };
    let e: Option<i64> = row.try_get("", SM::FreshEventUs.as_str())?;
    let a: Option<i64> = row.try_get("", SM::FreshApplyUs.as_str())?;
    Ok(e.zip(a))
}

fn pair_in(pairs: &[Pair]) -> Expr {
    Expr::tuple([Expr::col(M::SegmentId), Expr::col(M::CustomerId)]).is_in(
        pairs
            .iter()
            .map(|(s, c)| Expr::tuple([Expr::val(s.as_str()), Expr::val(c.as_str())])),
    )
}

/// Adds members entering at `enter_us`, each with the rule version and
/// reason that decided it.
pub async fn enter(
    db: &impl ConnectionTrait,
    rows: &[Stamped],
    enter_us: i64,
    version: i64,
) -> Result<(), DbErr> {
    if rows.is_empty() {
        return Ok(());
    }
    if clm_platform::db::is_postgres(db) {
        return enter_postgres(db, rows, enter_us, version).await;
    }
    for chunk in rows.chunks(rows_per_statement(6)) {
        let mut insert = Query::insert();
        insert
            .into_table(Members)
            .columns([
                M::SegmentId,
                M::CustomerId,
                M::EnterUs,
                M::Version,
                M::RuleVersion,
                M::Reason,
            ])
            .on_conflict(
                OnConflict::columns([M::SegmentId, M::CustomerId])
                    .do_nothing()
                    .to_owned(),
            );
        for ((s, c), rule_version, reason) in chunk {
            insert.values_panic([
                s.clone().into(),
                c.clone().into(),
                enter_us.into(),
                version.into(),
                (*rule_version).into(),
                (*reason).into(),
            ]);
        }
        db.execute(&insert).await?;
    }
    Ok(())
}

/// [`enter`] on PostgreSQL: the pairs as one array parameter per column
/// (`clm_platform::bulk::rows`), so the statement has one text whatever the
/// batch holds and each connection prepares it once. The multi-row
/// `VALUES` it replaces had six bind parameters a row: a batch entering
/// 20,000 pairs spent ~20 ms parsing and binding it per 5,000 rows, and
/// building it cost the service as much again.
async fn enter_postgres(
    db: &impl ConnectionTrait,
    rows: &[Stamped],
    enter_us: i64,
    version: i64,
) -> Result<(), DbErr> {
    use clm_platform::bulk;
    let (source, arrays) = bulk::rows(
        true,
        3,
        vec![
            (
                "text",
                rows.iter().map(|((s, _), _, _)| s.clone().into()).collect(),
            ),
            (
                "text",
                rows.iter().map(|((_, c), _, _)| c.clone().into()).collect(),
            ),
            ("int8", rows.iter().map(|(_, v, _)| (*v).into()).collect()),
            ("int2", rows.iter().map(|(_, _, r)| (*r).into()).collect()),
        ],
    );
    let sql = format!(
        "INSERT INTO members (segment_id, customer_id, enter_us, version, rule_version, reason) \
         SELECT s, c, $1, $2, v, r FROM ({source}) AS x (s, c, v, r) \
         ON CONFLICT (segment_id, customer_id) DO NOTHING"
    );
    let mut values = vec![enter_us.into(), version.into()];
    values.extend(arrays);
    db.execute_raw(sea_orm::Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        sql,
        values,
    ))
    .await?;
    Ok(())
}

/// Removes members leaving at `exit_us`, keeping the closed interval in
/// the history with the entry's and the exit's rule version and reason and
/// the exit's membership `version` (one statement per rule version and
/// reason, per chunk).
pub async fn exit(
    db: &impl ConnectionTrait,
    rows: &[Stamped],
    exit_us: i64,
    version: i64,
) -> Result<(), DbErr> {
    let mut groups: std::collections::BTreeMap<(i64, i16), Vec<Pair>> = Default::default();
    for (pair, v, r) in rows {
        groups.entry((*v, *r)).or_default().push(pair.clone());
    }
    for ((exit_version, exit_reason), pairs) in groups {
        for chunk in pairs.chunks(rows_per_statement(2).min(2000)) {
            let closed = Query::select()
                .columns([
                    M::SegmentId,
                    M::CustomerId,
                    M::EnterUs,
                    M::RuleVersion,
                    M::Reason,
                ])
                .expr(Expr::val(exit_us))
                .expr(Expr::val(exit_version))
                .expr(Expr::val(exit_reason))
                .expr(Expr::val(version))
                .from(Members)
                .and_where(pair_in(chunk))
                .to_owned();
            let insert = Query::insert()
                .into_table(MemberHistory)
                .columns([
                    MH::SegmentId,
                    MH::CustomerId,
                    MH::EnterUs,
                    MH::EnterVersion,
                    MH::EnterReason,
                    MH::ExitUs,
                    MH::ExitVersion,
                    MH::ExitReason,
                    MH::ExitMembershipVersion,
                ])
                .select_from(closed)
                .map_err(|e| DbErr::Custom(e.to_string()))?
                .to_owned();
            db.execute(&insert).await?;
            let delete = Query::delete()
                .from_table(Members)
                .and_where(pair_in(chunk))
                .to_owned();
            db.execute(&delete).await?;
        }
    }
    Ok(())
}

/// A membership change read back from the rows that record it: the pair,
/// whether the customer is now a member, and the change's membership
/// version.
pub type Written = (Pair, bool, i64);

/// Entries made at a membership version in `versions` that are still
/// current, after `after` in (segment, customer) order, at most `limit`
/// (one page of what a transaction wrote: [`crate::cache::write_back`]).
pub async fn entries_between(
    db: &impl ConnectionTrait,
    versions: &std::ops::RangeInclusive<i64>,
    after: Option<&Pair>,
    limit: u64,
) -> Result<Vec<Written>, DbErr> {
    let mut q = Query::select();
    q.columns([M::SegmentId, M::CustomerId, M::Version])
        .from(Members)
        .and_where(Expr::col(M::Version).between(*versions.start(), *versions.end()))
        .order_by(M::SegmentId, Order::Asc)
        .order_by(M::CustomerId, Order::Asc)
        .limit(limit);
    if let Some((s, c)) = after {
        q.and_where(
            Expr::col(M::SegmentId)
                .gt(s.as_str())
                .or(Expr::col(M::SegmentId)
                    .eq(s.as_str())
                    .and(Expr::col(M::CustomerId).gt(c.as_str()))),
        );
    }
    db.query_all(&q)
        .await?
        .iter()
        .map(|r| {
            Ok((
                (
                    r.try_get("", M::SegmentId.as_str())?,
                    r.try_get("", M::CustomerId.as_str())?,
                ),
                true,
                r.try_get("", M::Version.as_str())?,
            ))
        })
        .collect()
}

/// Exits made at a membership version in `versions`, after history row
/// `after` by row id, at most `limit`: (row id, change).
pub async fn exits_between(
    db: &impl ConnectionTrait,
    versions: &std::ops::RangeInclusive<i64>,
    after: i64,
    limit: u64,
) -> Result<Vec<(i64, Written)>, DbErr> {
    let q = Query::select()
        .columns([
            MH::Id,
            MH::SegmentId,
            MH::CustomerId,
            MH::ExitMembershipVersion,
        ])
        .from(MemberHistory)
        .and_where(Expr::col(MH::ExitMembershipVersion).between(*versions.start(), *versions.end()))
        .and_where(Expr::col(MH::Id).gt(after))
        .order_by(MH::Id, Order::Asc)
        .limit(limit)
        .to_owned();
    db.query_all(&q)
        .await?
        .iter()
        .map(|r| {
            Ok((
                r.try_get("", MH::Id.as_str())?,
                (
                    (
                        r.try_get("", MH::SegmentId.as_str())?,
                        r.try_get("", MH::CustomerId.as_str())?,
                    ),
                    false,
                    r.try_get("", MH::ExitMembershipVersion.as_str())?,
                ),
            ))
        })
        .collect()
}

/// Current members of `segment` among the customers `rule` selects that
/// are not members yet (`entering`), and members it no longer selects
/// (`leaving`): the diff of a backfill, each one set-based query.
pub async fn diff(
    db: &impl ConnectionTrait,
    segment: &str,
    rule: SelectStatement,
) -> Result<(Vec<String>, Vec<String>), DbErr> {
    let members = || {
        Query::select()
            .column(M::CustomerId)
            .from(Members)
            .and_where(Expr::col(M::SegmentId).eq(segment))
            .to_owned()
    };
    let entering = Query::select()
        .column(M::CustomerId)
        .from_subquery(rule.clone(), n("r"))
        .and_where(Expr::col(M::CustomerId).not_in_subquery(members()))
        .to_owned();
    let leaving = Query::select()
        .column(M::CustomerId)
        .from(Members)
        .and_where(Expr::col(M::SegmentId).eq(segment))
        .and_where(Expr::col(M::CustomerId).not_in_subquery(rule))
        .to_owned();
    let ids = |rows: Vec<sea_orm::QueryResult>| {
        rows.iter()
            .map(|r| r.try_get::<String>("", M::CustomerId.as_str()))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok((
        ids(db.query_all(&entering).await?)?,
        ids(db.query_all(&leaving).await?)?,
    ))
}

/// Members of any of `ids` (customers), as pairs.
pub async fn of_customers(db: &impl ConnectionTrait, ids: &[String]) -> Result<Vec<Pair>, DbErr> {
    let mut out = Vec::new();
    for chunk in chunks(ids) {
        let q = Query::select()
            .columns([M::SegmentId, M::CustomerId])
            .from(Members)
            .and_where(Expr::col(M::CustomerId).is_in(chunk.iter().cloned()))
            .to_owned();
        for r in db.query_all(&q).await? {
            out.push((
                r.try_get("", M::SegmentId.as_str())?,
                r.try_get("", M::CustomerId.as_str())?,
            ));
        }
    }
    Ok(out)
}

/// Every member of `segment`.
pub async fn of_segment(db: &impl ConnectionTrait, segment: &str) -> Result<Vec<String>, DbErr> {
    let q = Query::select()
        .column(M::CustomerId)
        .from(Members)
        .and_where(Expr::col(M::SegmentId).eq(segment))
        .order_by(M::CustomerId, Order::Asc)
        .to_owned();
    db.query_all(&q)
        .await?
        .iter()
        .map(|r| r.try_get("", M::CustomerId.as_str()))
        .collect()
}

/// Whether each pair is a current membership.
pub async fn contains(db: &impl ConnectionTrait, pairs: &[Pair]) -> Result<Vec<bool>, DbErr> {
    let mut found = std::collections::HashSet::new();
    for chunk in pairs.chunks(500) {
        let q = Query::select()
            .columns([M::SegmentId, M::CustomerId])
            .from(Members)
            .and_where(pair_in(chunk))
            .to_owned();
        for r in db.query_all(&q).await? {
            found.insert((
                r.try_get::<String>("", M::SegmentId.as_str())?,
                r.try_get::<String>("", M::CustomerId.as_str())?,
            ));
        }
    }
    Ok(pairs.iter().map(|p| found.contains(p)).collect())
}

/// A page of `segment`'s members after `after` (customer id), by customer id.
pub async fn page(
    db: &impl ConnectionTrait,
    segment: &str,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<(String, i64)>, DbErr> {
    let mut q = Query::select();
    q.columns([M::CustomerId, M::EnterUs])
        .from(Members)
        .and_where(Expr::col(M::SegmentId).eq(segment))
        .order_by(M::CustomerId, Order::Asc)
        .limit(limit);
    if let Some(after) = after {
        q.and_where(Expr::col(M::CustomerId).gt(after));
    }
    db.query_all(&q)
        .await?
        .iter()
        .map(|r| {
            Ok((
                r.try_get("", M::CustomerId.as_str())?,
                r.try_get("", M::EnterUs.as_str())?,
            ))
        })
        .collect()
}

/// Member counts of `segments`.
pub async fn counts(
    db: &impl ConnectionTrait,
    segments: &[String],
) -> Result<std::collections::HashMap<String, i64>, DbErr> {
    let mut out = std::collections::HashMap::new();
    for chunk in chunks(segments) {
        let q = Query::select()
            .column(M::SegmentId)
            .expr_as(Func::count(Expr::val(1)), n("n"))
            .from(Members)
            .and_where(Expr::col(M::SegmentId).is_in(chunk.iter().cloned()))
            .group_by_col(M::SegmentId)
            .to_owned();
        for r in db.query_all(&q).await? {
            out.insert(r.try_get("", M::SegmentId.as_str())?, r.try_get("", "n")?);
        }
    }
    Ok(out)
}

/// Deletes every membership, history and timer of `segment`.
pub async fn delete_segment(db: &impl ConnectionTrait, segment: &str) -> Result<(), DbErr> {
    let delete = Query::delete()
        .from_table(Members)
        .and_where(Expr::col(M::SegmentId).eq(segment))
        .to_owned();
    db.execute(&delete).await?;
    let delete = Query::delete()
        .from_table(MemberHistory)
        .and_where(Expr::col(MH::SegmentId).eq(segment))
        .to_owned();
    db.execute(&delete).await?;
    // Its customers' timers stay: each fires, finds what is left
    // unchanged and arms the customer's next change.
    Ok(())
}

/// Deletes every membership, history and timer of `ids` (erasure).
pub async fn delete_customers(db: &impl ConnectionTrait, ids: &[String]) -> Result<(), DbErr> {
    for chunk in chunks(ids) {
        let delete = Query::delete()
            .from_table(Members)
            .and_where(Expr::col(M::CustomerId).is_in(chunk.iter().cloned()))
            .to_owned();
        db.execute(&delete).await?;
        let delete = Query::delete()
            .from_table(MemberHistory)
            .and_where(Expr::col(MH::CustomerId).is_in(chunk.iter().cloned()))
            .to_owned();
        db.execute(&delete).await?;
    }
    timers::disarm_subjects(db, Some(WINDOW), ids).await
}

/// Sets customers' timers (customer, due).
pub async fn set_timers(db: &impl ConnectionTrait, set: &[(String, i64)]) -> Result<(), DbErr> {
    let arms: Vec<timers::Arm> = set
        .iter()
        .map(|(c, d)| timers::Arm::new(c.clone(), c.clone(), *d))
        .collect();
    timers::arm(db, WINDOW, &arms).await
}

/// Every customer id in the projection after `after`, by id (a chunk of
/// the timer computation after a backfill).
pub async fn customers_after(
    db: &impl ConnectionTrait,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<String>, DbErr> {
    let mut q = Query::select();
    q.column(FC::CustomerId)
        .from(FactCustomers)
        .and_where(Expr::col(FC::Profiled).eq(true))
        .order_by(FC::CustomerId, Order::Asc)
        .limit(limit);
    if let Some(a) = after {
        q.and_where(Expr::col(FC::CustomerId).gt(a));
    }
    db.query_all(&q)
        .await?
        .iter()
        .map(|r| r.try_get("", FC::CustomerId.as_str()))
        .collect()
}

/// Customers in the projection.
pub async fn customer_count(db: &impl ConnectionTrait) -> Result<i64, DbErr> {
    let q = Query::select()
        .expr_as(Func::count(Expr::val(1)), n("n"))
        .from(FactCustomers)
        .and_where(Expr::col(FC::Profiled).eq(true))
        .to_owned();
    match db.query_one(&q).await? {
        Some(r) => r.try_get("", "n"),
        None => Ok(0),
    }
}

/// Moves the membership history of `merged` to `survivor`.
pub async fn rekey_history(
    db: &impl ConnectionTrait,
    survivor: &str,
    merged: &[String],
) -> Result<(), DbErr> {
    for chunk in chunks(merged) {
        let update = Query::update()
            .table(MemberHistory)
            .value(MH::CustomerId, survivor)
            .and_where(Expr::col(MH::CustomerId).is_in(chunk.iter().cloned()))
            .to_owned();
        db.execute(&update).await?;
    }
    Ok(())
}

/// The timers of `ids` (customers): customer to due instant (the earliest,
/// where timers of the earlier per-pair form are left too).
pub async fn timers_of(
    db: &impl ConnectionTrait,
    ids: &[String],
) -> Result<std::collections::HashMap<String, i64>, DbErr> {
    let mut out = std::collections::HashMap::new();
    for (subject, due) in timers::due_of_subjects(db, WINDOW, ids).await? {
        out.entry(subject)
            .and_modify(|d: &mut i64| *d = Ord::min(*d, due))
            .or_insert(due);
    }
    Ok(out)
}
