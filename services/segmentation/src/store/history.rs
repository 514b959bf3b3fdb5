//! Membership history read from the membership tables themselves: an
//! entry is a `members` row (current) or the entry of a `member_history`
//! row (closed interval), an exit is the exit of a `member_history` row.
//! The write path records nothing more than it did (the rule version and
//! reason ride on the rows it already writes); [`purge`] keeps it to the
//! configured retention. Also the daily size snapshots
//! (`segment_snapshots`).

use super::entity::member_history::{Column as MH, Entity as MemberHistory};
use super::entity::members::{Column as M, Entity as Members};
use super::entity::segment_snapshots as snap;
use super::n;
use sea_orm::sea_query::{
    Asterisk, Expr, ExprTrait, Func, Order, Query, SelectStatement, UnionType,
};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, IdenStatic, IntoActiveModel, QueryFilter,
    QueryOrder,
};
use std::collections::BTreeMap;

/// A day in µs.
pub const DAY_US: i64 = 86_400_000_000;

/// One entry or exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Bare segment id.
    pub segment: String,
    /// Bare customer id.
    pub customer: String,
    /// When, µs.
    pub at_us: i64,
    /// 1 entered, 2 exited (`MembershipChange`).
    pub change: i16,
    /// The rule version that decided it (0: not recorded).
    pub version: i64,
    /// `MembershipReason` code (0: not recorded).
    pub reason: i16,
}

/// The page position after an entry: (time, segment, customer, change).
pub type After = (i64, String, String, i16);

/// Who to list: one segment, one customer, or both.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Bare segment id.
    pub segment: Option<String>,
    /// Bare customer id.
    pub customer: Option<String>,
    /// Changes at or after, µs.
    pub from_us: i64,
    /// Changes before, µs.
    pub to_us: i64,
}

/// One side of the history: from `table`, columns `[segment, customer,
/// time, rule version, reason]`, as `change` (1 entered, 2 exited): its
/// first `limit` rows after `after` in (time, segment, customer) order.
/// With a segment, the keyset is written in the order of the
/// `(segment, time, customer)` indexes, so a page is an index range scan
/// even when a backfill entered a million customers at one instant.
fn part<C: IdenStatic + Copy>(
    table: impl sea_orm::sea_query::IntoTableRef,
    [seg, cust, at, version, reason]: [C; 5],
    change: i16,
    f: &Filter,
    after: Option<&After>,
    limit: u64,
) -> SelectStatement {
    let mut q = Query::select();
    q.expr_as(Expr::col(seg), n("seg"))
        .expr_as(Expr::col(cust), n("cust"))
        .expr_as(Expr::col(at), n("at_us"))
        .expr_as(Expr::val(change), n("change"))
        .expr_as(
            Func::coalesce([Expr::col(version), Expr::val(0i64)]),
            n("version"),
        )
        .expr_as(
            Func::coalesce([Expr::col(reason), Expr::val(0i16)]),
            n("reason"),
        )
        .from(table)
        .and_where(Expr::col(at).gte(f.from_us))
        .and_where(Expr::col(at).lt(f.to_us))
        .order_by(at, Order::Asc)
        .order_by(seg, Order::Asc)
        .order_by(cust, Order::Asc)
        .limit(limit);
    if let Some(s) = &f.segment {
        q.and_where(Expr::col(seg).eq(s.as_str()));
    }
    if let Some(c) = &f.customer {
        q.and_where(Expr::col(cust).eq(c.as_str()));
    }
    if let Some((a, s, c, ch)) = after {
        // Rows at the same (time, segment, customer) as the last one come
        // after it only if their change sorts after its change.
        let (cols, vals) = if f.segment.is_some() {
            (
                [Expr::col(seg), Expr::col(at), Expr::col(cust)],
                [Expr::val(s.as_str()), Expr::val(*a), Expr::val(c.as_str())],
            )
        } else {
            (
                [Expr::col(at), Expr::col(seg), Expr::col(cust)],
                [Expr::val(*a), Expr::val(s.as_str()), Expr::val(c.as_str())],
            )
        };
        let (left, right) = (Expr::tuple(cols), Expr::tuple(vals));
        q.and_where(if change > *ch {
            left.gte(right)
        } else {
            left.gt(right)
        });
    }
    q
}

/// The side `part` as a subquery (a compound select's parts cannot carry
/// their own ORDER BY and LIMIT on SQLite).
fn wrapped(part: SelectStatement, alias: &str) -> SelectStatement {
    Query::select()
        .column(Asterisk)
        .from_subquery(part, n(alias))
        .to_owned()
}

/// A page of entries and exits matching `f`, by (time, segment, customer,
/// change), after `after`: each side reads at most `limit` rows in index
/// order, then the sides are merged.
pub async fn list(
    db: &impl ConnectionTrait,
    f: &Filter,
    after: Option<&After>,
    limit: u64,
) -> Result<Vec<Entry>, DbErr> {
    let mut union = wrapped(
        part(
            Members,
            [
                M::SegmentId,
                M::CustomerId,
                M::EnterUs,
                M::RuleVersion,
                M::Reason,
            ],
            1,
            f,
            after,
            limit,
        ),
        "cur",
    );
    union.union(
        UnionType::All,
        wrapped(
            part(
                MemberHistory,
                [
                    MH::SegmentId,
                    MH::CustomerId,
                    MH::EnterUs,
                    MH::EnterVersion,
                    MH::EnterReason,
                ],
                1,
                f,
                after,
                limit,
            ),
            "ent",
        ),
    );
    union.union(
        UnionType::All,
        wrapped(
            part(
                MemberHistory,
                [
                    MH::SegmentId,
                    MH::CustomerId,
                    MH::ExitUs,
                    MH::ExitVersion,
                    MH::ExitReason,
                ],
                2,
                f,
                after,
                limit,
            ),
            "ex",
        ),
    );
    let mut q = Query::select();
    q.column(Asterisk)
        .from_subquery(union, n("u"))
        .order_by(n("at_us"), Order::Asc)
        .order_by(n("seg"), Order::Asc)
        .order_by(n("cust"), Order::Asc)
        .order_by(n("change"), Order::Asc)
        .limit(limit);
    db.query_all(&q)
        .await?
        .iter()
        .map(|r| {
            Ok(Entry {
                segment: r.try_get("", "seg")?,
                customer: r.try_get("", "cust")?,
                at_us: r.try_get("", "at_us")?,
                change: r.try_get("", "change")?,
                version: r.try_get("", "version")?,
                reason: r.try_get("", "reason")?,
            })
        })
        .collect()
}

fn day_of(col: &str) -> Expr {
    Expr::cust(format!("(\"{col}\" - \"{col}\" % {DAY_US})"))
}

async fn per_day(
    db: &impl ConnectionTrait,
    union: SelectStatement,
) -> Result<BTreeMap<i64, i64>, DbErr> {
    let q = Query::select()
        .column(n("day"))
        .expr_as(Func::count(Expr::val(1)), n("n"))
        .from_subquery(union, n("d"))
        .group_by_col(n("day"))
        .to_owned();
    let mut out = BTreeMap::new();
    for r in db.query_all(&q).await? {
        out.insert(r.try_get("", "day")?, r.try_get("", "n")?);
    }
    Ok(out)
}

/// Entries and exits of `segment` per day (00:00 UTC, µs) in
/// `[from_us, to_us)`: two grouped queries.
pub async fn daily_movement(
    db: &impl ConnectionTrait,
    segment: &str,
    from_us: i64,
    to_us: i64,
) -> Result<(BTreeMap<i64, i64>, BTreeMap<i64, i64>), DbErr> {
    let mut entries = Query::select();
    entries
        .expr_as(day_of(M::EnterUs.as_str()), n("day"))
        .from(Members)
        .and_where(Expr::col(M::SegmentId).eq(segment))
        .and_where(Expr::col(M::EnterUs).gte(from_us))
        .and_where(Expr::col(M::EnterUs).lt(to_us));
    entries.union(
        UnionType::All,
        Query::select()
            .expr_as(day_of(MH::EnterUs.as_str()), n("day"))
            .from(MemberHistory)
            .and_where(Expr::col(MH::SegmentId).eq(segment))
            .and_where(Expr::col(MH::EnterUs).gte(from_us))
            .and_where(Expr::col(MH::EnterUs).lt(to_us))
            .to_owned(),
    );
    let exits = Query::select()
        .expr_as(day_of(MH::ExitUs.as_str()), n("day"))
        .from(MemberHistory)
        .and_where(Expr::col(MH::SegmentId).eq(segment))
        .and_where(Expr::col(MH::ExitUs).gte(from_us))
        .and_where(Expr::col(MH::ExitUs).lt(to_us))
        .to_owned();
    Ok((per_day(db, entries).await?, per_day(db, exits).await?))
}

/// Deletes closed intervals that ended before `before_us` (retention);
/// returns how many.
pub async fn purge(db: &impl ConnectionTrait, before_us: i64) -> Result<u64, DbErr> {
    let delete = Query::delete()
        .from_table(MemberHistory)
        .and_where(Expr::col(MH::ExitUs).lt(before_us))
        .to_owned();
    Ok(db.execute(&delete).await?.rows_affected())
}

/// Records a segment's size at its daily snapshot (a second snapshot of
/// the same day is ignored).
pub async fn insert_size(
    db: &impl ConnectionTrait,
    segment: &str,
    day_us: i64,
    size: i64,
    taken_us: i64,
) -> Result<(), DbErr> {
    let row = snap::Model {
        segment_id: segment.to_owned(),
        day_us,
        size,
        taken_us,
    };
    snap::Entity::insert(row.into_active_model())
        .on_conflict_do_nothing_on([snap::Column::SegmentId, snap::Column::DayUs])
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// A segment's daily sizes in `[from_us, to_us)` by day.
pub async fn sizes(
    db: &impl ConnectionTrait,
    segment: &str,
    from_us: i64,
    to_us: i64,
) -> Result<BTreeMap<i64, i64>, DbErr> {
    Ok(snap::Entity::find()
        .filter(snap::Column::SegmentId.eq(segment))
        .filter(snap::Column::DayUs.gte(from_us))
        .filter(snap::Column::DayUs.lt(to_us))
        .order_by_asc(snap::Column::DayUs)
        .all(db)
        .await?
        .into_iter()
        .map(|s| (s.day_us, s.size))
        .collect())
}

/// Deletes a segment's size snapshots.
pub async fn delete_segment(db: &impl ConnectionTrait, segment: &str) -> Result<(), DbErr> {
    snap::Entity::delete_many()
        .filter(snap::Column::SegmentId.eq(segment))
        .exec(db)
        .await?;
    Ok(())
}
