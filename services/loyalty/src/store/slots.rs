//! Counters spread over slot rows, so concurrent writers change different
//! rows instead of queuing on one: a limited reward's stock (units left)
//! and a campaign's total budget (minor units left). The counter's value
//! is the sum of its slots; a counter without slots does not exist
//! (unlimited stock, a campaign without a total).
//!
//! Taking `n` never lets the sum go below zero and never takes from a
//! slot without the units on it (`value >= n` on the rows it changes):
//!
//! 1. PostgreSQL: one UPDATE of a random free slot holding `n`
//!    (`FOR UPDATE SKIP LOCKED`): the common case.
//! 2. Every slot holding `n` is held by writers in flight: wait for a
//!    random one of them (its `value >= n` is checked again after the
//!    wait), inside a savepoint that is rolled back when the units went
//!    meanwhile, which also releases that row's lock.
//! 3. Still nothing (or `n` is spread over several slots, none holding
//!    it): lock every slot in slot order, and take `n` from them, largest
//!    first, if their sum holds it.
//!
//! A writer waits for one slot only while holding none (step 2), or takes
//! all of them in one order (step 3); a unit held by a transaction that
//! rolls back is never refused. SQLite has one writer: step 3 at once.
//!
//! One deadlock remains possible: when step 1's `SKIP LOCKED` locks a slot
//! whose newest version no longer holds `n` (a concurrent take committed
//! after the statement's snapshot), PostgreSQL keeps that row locked
//! although the statement does not return it, and the writer then waits in
//! step 3 while holding it. PostgreSQL breaks the deadlock after its
//! `deadlock_timeout`; the redemption that lost runs again
//! (`clm_platform::db::retry_conflicts`). It takes the last units of a
//! stock, with writers racing for them, to happen.

use super::{all, one};
use clm_platform::Result;
use clm_platform::db::{is_postgres, rows_per_statement};
use sea_orm::sea_query::{
    Alias, CaseStatement, Expr, ExprTrait, Func, LockBehavior, LockType, Order, Query,
    SelectStatement,
};
use sea_orm::{ConnectionTrait, FromQueryResult};

/// One counter: its table, the two key columns with their values, and the
/// value column.
#[derive(Debug, Clone)]
pub struct Counter<'a> {
    /// The slots' table.
    pub table: &'static str,
    /// The counter's key: (column, value) × 2.
    pub keys: [(&'static str, &'a str); 2],
    /// The column holding each slot's part.
    pub value: &'static str,
}

#[derive(Debug, FromQueryResult)]
struct Slot {
    slot: i16,
    value: i64,
}

fn a(s: &str) -> Alias {
    Alias::new(s)
}

/// `total` over `slots` rows ([`clm_domain::loyalty::spread`]); a negative
/// total (a budget lowered below what was spent) stays whole in slot 0, so
/// raising the total later counts from it.
pub fn parts(total: i64, slots: usize) -> Vec<i64> {
    if total < 0 {
        let mut v = vec![0; slots.max(1)];
        v[0] = total;
        v
    } else {
        clm_domain::loyalty::spread(total, slots)
    }
}

impl Counter<'_> {
    fn keyed(&self, mut q: SelectStatement) -> SelectStatement {
        for (col, v) in self.keys {
            q.and_where(Expr::col(a(col)).eq(v));
        }
        q
    }

    fn slots(&self) -> SelectStatement {
        self.keyed(
            Query::select()
                .column(a("slot"))
                .expr_as(Expr::col(a(self.value)), a("value"))
                .from(a(self.table))
                .to_owned(),
        )
    }

    /// Adds `delta` to the slots `which` selects; a take (`delta < 0`)
    /// only where the units are. `true` when a row changed.
    async fn change(&self, db: &impl ConnectionTrait, which: Expr, delta: i64) -> Result<bool> {
        let mut q = Query::update();
        q.table(a(self.table))
            .value(a(self.value), Expr::col(a(self.value)).add(delta))
            .and_where(which);
        for (col, v) in self.keys {
            q.and_where(Expr::col(a(col)).eq(v));
        }
        if delta < 0 {
            q.and_where(Expr::col(a(self.value)).gte(-delta));
        }
        Ok(db.execute(&q).await?.rows_affected() == 1)
    }

    /// Locks every slot in slot order (PostgreSQL `FOR UPDATE`); `None`
    /// when the counter has no slots.
    async fn lock_all(&self, db: &impl ConnectionTrait) -> Result<Option<Vec<Slot>>> {
        let mut q = self.slots().order_by(a("slot"), Order::Asc).to_owned();
        if is_postgres(db) {
            q.lock(LockType::Update);
        }
        let rows = all::<Slot>(db, &q).await?;
        Ok((!rows.is_empty()).then_some(rows))
    }

    /// Locks the slots (in slot order) and answers their sum; `None`: no slots.
    pub async fn lock_sum(&self, db: &impl ConnectionTrait) -> Result<Option<i64>> {
        Ok(self
            .lock_all(db)
            .await?
            .map(|s| s.iter().map(|s| s.value).sum()))
    }

    /// Replaces the counter by `total` spread over `slots` rows (`None`:
    /// no rows), after locking the old ones, so writers in flight finish
    /// first and the result is exactly `total`.
    pub async fn replace(
        &self,
        db: &impl ConnectionTrait,
        total: Option<i64>,
        slots: usize,
    ) -> Result<()> {
        self.lock_all(db).await?;
        let mut del = Query::delete();
        del.from_table(a(self.table));
        for (col, v) in self.keys {
            del.and_where(Expr::col(a(col)).eq(v));
        }
        db.execute(&del).await?;
        let Some(total) = total else {
            return Ok(());
        };
        let rows: Vec<(i16, i64)> = parts(total, slots)
            .into_iter()
            .enumerate()
            .map(|(i, v)| Ok((i16::try_from(i).map_err(clm_platform::Error::internal)?, v)))
            .collect::<Result<_>>()?;
        for part in rows.chunks(rows_per_statement(4)) {
            let mut q = Query::insert();
            q.into_table(a(self.table)).columns([
                a(self.keys[0].0),
                a(self.keys[1].0),
                a("slot"),
                a(self.value),
            ]);
            for (slot, v) in part {
                q.values_panic([
                    self.keys[0].1.into(),
                    self.keys[1].1.into(),
                    (*slot).into(),
                    (*v).into(),
                ]);
            }
            db.execute(&q).await?;
        }
        Ok(())
    }

    /// Step 1 of [`Self::take`] as a data-modifying CTE of a larger
    /// statement (PostgreSQL): `n` from a random free slot holding it,
    /// `RETURNING 1` when one was taken. Binds the key values as `$keys.0`
    /// and `$keys.1`, and `n` as `$n`. When it returns no row, the caller
    /// goes on with [`Self::take`] (which waits for a held slot).
    pub fn pg_take_free_sql(&self, keys: (usize, usize), n: usize) -> String {
        let (t, v) = (self.table, self.value);
        let [(k0, _), (k1, _)] = self.keys;
        let (p0, p1) = keys;
        format!(
            "UPDATE {t} SET {v} = {v} - ${n} WHERE {k0} = ${p0} AND {k1} = ${p1} AND slot = \
             (SELECT slot FROM {t} WHERE {k0} = ${p0} AND {k1} = ${p1} AND {v} >= ${n} \
             ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED) AND {v} >= ${n} RETURNING 1"
        )
    }

    /// Takes `n` (> 0); `false` when the slots together hold less (or
    /// there are none). See the module docs for the steps.
    pub async fn take(&self, db: &impl ConnectionTrait, n: i64) -> Result<bool> {
        if is_postgres(db) {
            let free = self
                .keyed(
                    Query::select()
                        .column(a("slot"))
                        .from(a(self.table))
                        .and_where(Expr::col(a(self.value)).gte(n))
                        .order_by_expr(Func::random().into(), Order::Asc)
                        .limit(1)
                        .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
                        .to_owned(),
                )
                .to_owned();
            // A scalar subquery runs once per statement (an InitPlan).
            let free = Expr::col(a("slot")).eq(Expr::SubQuery(None, Box::new(free.into())));
            if self.change(db, free, -n).await? {
                return Ok(true);
            }
            let holding = self
                .slots()
                .and_where(Expr::col(a(self.value)).gte(n))
                .to_owned();
            let candidates = all::<Slot>(db, &holding).await?;
            if !candidates.is_empty() {
                let wait_for = candidates[pick(candidates.len())].slot;
                db.execute_unprepared("SAVEPOINT counter_wait").await?;
                if self
                    .change(db, Expr::col(a("slot")).eq(wait_for), -n)
                    .await?
                {
                    db.execute_unprepared("RELEASE SAVEPOINT counter_wait")
                        .await?;
                    return Ok(true);
                }
                // Lost it: drop the row's lock before locking them all in order.
                db.execute_unprepared("ROLLBACK TO SAVEPOINT counter_wait")
                    .await?;
            }
        }
        let Some(mut slots) = self.lock_all(db).await? else {
            return Ok(false);
        };
        if slots.iter().map(|s| std::cmp::max(s.value, 0)).sum::<i64>() < n {
            return Ok(false);
        }
        slots.sort_by_key(|s| std::cmp::Reverse(s.value));
        let mut left = n;
        let mut case = CaseStatement::new();
        let mut touched = Vec::new();
        for s in slots.iter().filter(|s| s.value > 0) {
            if left == 0 {
                break;
            }
            let take = std::cmp::min(s.value, left);
            left -= take;
            case = case.case(Expr::col(a("slot")).eq(s.slot), Expr::val(take));
            touched.push(s.slot);
        }
        let mut q = Query::update();
        q.table(a(self.table))
            .value(
                a(self.value),
                Expr::col(a(self.value)).sub(Expr::Case(Box::new(case.finally(Expr::val(0i64))))),
            )
            .and_where(Expr::col(a("slot")).is_in(touched));
        for (col, v) in self.keys {
            q.and_where(Expr::col(a(col)).eq(v));
        }
        db.execute(&q).await?;
        Ok(true)
    }

    /// Gives `n` back into the emptiest slot; nothing when there are none.
    pub async fn give_back(&self, db: &impl ConnectionTrait, n: i64) -> Result<()> {
        let q = self
            .slots()
            .order_by(a(self.value), Order::Asc)
            .order_by(a("slot"), Order::Asc)
            .limit(1)
            .to_owned();
        if let Some(s) = one::<Slot>(db, &q).await? {
            self.change(db, Expr::col(a("slot")).eq(s.slot), n).await?;
        }
        Ok(())
    }
}

/// A random index below `n` (which busy slot to wait for).
fn pick(n: usize) -> usize {
    usize::try_from(uuid::Uuid::new_v4().as_u128() % (n.max(1) as u128)).unwrap_or(0)
}
