//! `score_sums`: a running sum per (customer, model, score, decay) of the
//! ledger (see [`clm_domain::scoring::Sum`]), kept in the transaction that
//! writes the ledger, so a stream batch learns each touched customer's
//! scores from a few rows instead of every entry they ever earned.
//!
//! Writers: [`crate::scorer::apply`] adds the awards it inserted;
//! re-scoring and merges [`rebuild`] the sums of the customers whose
//! ledger they rewrote; erasure deletes them. Readers fall back to the
//! entries wherever a sum cannot tell (linear decay, a future-dated award).

use super::chunk;
use super::entity::score_sums::{Column as C, Entity as Sums};
use super::ledger::{self, Row};
use clm_domain::scoring::{Decay, Sum};
use clm_platform::Result;
use clm_platform::bulk::is_in_texts;
use clm_platform::db::is_postgres;
use sea_orm::IdenStatic;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Order, Query};
use sea_orm::{ConnectionTrait, DbBackend, EntityName, FromQueryResult, Statement};
use std::collections::BTreeMap;

const COLUMNS: [C; 9] = [
    C::Customer,
    C::Model,
    C::Score,
    C::DecayKind,
    C::DecayUs,
    C::AnchorUs,
    C::Total,
    C::Entries,
    C::NewestUs,
];

/// One stored sum: the entity's model.
pub type SumRow = super::entity::score_sums::Model;

impl SumRow {
    /// As the maths needs it.
    pub fn sum(&self) -> Sum {
        Sum {
            decay: Decay::from_code(self.decay_kind, self.decay_us),
            anchor_us: self.anchor_us,
            total: self.total,
            entries: self.entries,
            newest_us: self.newest_us,
        }
    }

    /// A row for `sum` of (customer, model, score).
    pub fn new(customer: &str, model: &str, score: &str, sum: &Sum) -> Self {
        let (kind, param) = sum.decay.code();
        SumRow {
            customer: customer.to_owned(),
            model: model.to_owned(),
            score: score.to_owned(),
            decay_kind: kind,
            decay_us: param,
            anchor_us: sum.anchor_us,
            total: sum.total,
            entries: sum.entries,
            newest_us: sum.newest_us,
        }
    }
}

/// The sums of `customers` under `model`, by customer: one statement.
pub async fn load(
    db: &impl ConnectionTrait,
    model: &str,
    customers: &[String],
) -> Result<Vec<SumRow>> {
    if customers.is_empty() {
        return Ok(Vec::new());
    }
    select(db, model, Some(customers)).await
}

/// Every sum of `model`, by customer (ListTopCustomers): one statement.
pub async fn of_model(db: &impl ConnectionTrait, model: &str) -> Result<Vec<SumRow>> {
    select(db, model, None).await
}

async fn select(
    db: &impl ConnectionTrait,
    model: &str,
    customers: Option<&[String]>,
) -> Result<Vec<SumRow>> {
    let mut q = Query::select()
        .columns(COLUMNS)
        .from(Sums)
        .and_where(Expr::col(C::Model).eq(model))
        .order_by(C::Customer, Order::Asc)
        .to_owned();
    if let Some(c) = customers {
        q.and_where(is_in_texts(db, C::Customer.as_str(), c));
    }
    Ok(
        SumRow::find_by_statement(db.get_database_backend().build(&q))
            .all(db)
            .await?,
    )
}

/// The customers with a sum under `model`: one statement.
pub async fn customers_of_model(db: &impl ConnectionTrait, model: &str) -> Result<Vec<String>> {
    let q = Query::select()
        .distinct()
        .column(C::Customer)
        .from(Sums)
        .and_where(Expr::col(C::Model).eq(model))
        .order_by(C::Customer, Order::Asc)
        .to_owned();
    let mut out = Vec::new();
    for row in db.query_all(&q).await? {
        out.push(row.try_get::<String>("", C::Customer.as_str())?);
    }
    Ok(out)
}

/// Writes `rows` (insert or replace): on PostgreSQL one statement of fixed
/// text (see [`super::unnest_insert`]), elsewhere one per chunk.
pub async fn save(db: &impl ConnectionTrait, rows: &[SumRow]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    if is_postgres(db) {
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            pg_save(),
            pg_arrays(rows),
        ))
        .await?;
        return Ok(());
    }
    for part in rows.chunks(chunk(COLUMNS.len())) {
        let mut q = Query::insert();
        q.into_table(Sums).columns(COLUMNS);
        for r in part {
            q.values_panic([
                r.customer.clone().into(),
                r.model.clone().into(),
                r.score.clone().into(),
                r.decay_kind.into(),
                r.decay_us.into(),
                r.anchor_us.into(),
                r.total.into(),
                r.entries.into(),
                r.newest_us.into(),
            ]);
        }
        q.on_conflict(OnConflict::columns(KEY).update_columns(VALUES).to_owned());
        db.execute(&q).await?;
    }
    Ok(())
}

/// A sum's key columns, and the ones [`save`] replaces.
const KEY: [C; 5] = [C::Customer, C::Model, C::Score, C::DecayKind, C::DecayUs];
const VALUES: [C; 4] = [C::AnchorUs, C::Total, C::Entries, C::NewestUs];

/// [`save`]'s statement on PostgreSQL.
fn pg_save() -> &'static str {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let types = [
            "text", "text", "text", "int2", "int8", "int8", "float8", "int8", "int8",
        ];
        let cols: Vec<(&str, &str)> = COLUMNS.iter().map(|c| c.as_str()).zip(types).collect();
        let key: Vec<String> = KEY.iter().map(|c| format!("\"{}\"", c.as_str())).collect();
        let set: Vec<String> = VALUES
            .iter()
            .map(|c| format!("\"{0}\" = EXCLUDED.\"{0}\"", c.as_str()))
            .collect();
        super::unnest_insert(
            Sums.table_name(),
            &cols,
            &format!(
                "ON CONFLICT ({}) DO UPDATE SET {}",
                key.join(", "),
                set.join(", ")
            ),
        )
    });
    &SQL
}

/// [`pg_save`]'s parameters: one array per column of [`COLUMNS`].
fn pg_arrays(rows: &[SumRow]) -> Vec<sea_orm::Value> {
    use super::column;
    vec![
        column(rows, |r| r.customer.clone()),
        column(rows, |r| r.model.clone()),
        column(rows, |r| r.score.clone()),
        column(rows, |r| r.decay_kind),
        column(rows, |r| r.decay_us),
        column(rows, |r| r.anchor_us),
        column(rows, |r| r.total),
        column(rows, |r| r.entries),
        column(rows, |r| r.newest_us),
    ]
}

/// Deletes every sum of `customers`.
pub async fn delete_customers(db: &impl ConnectionTrait, customers: &[String]) -> Result<()> {
    if customers.is_empty() {
        return Ok(());
    }
    let q = Query::delete()
        .from_table(Sums)
        .and_where(is_in_texts(db, C::Customer.as_str(), customers))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

/// Replaces every sum of `customers` under `model` with `rows`
/// (re-scoring, which knows the model's new entries): two statements per
/// chunk.
pub async fn replace_model(
    db: &impl ConnectionTrait,
    model: &str,
    customers: &[String],
    rows: &[SumRow],
) -> Result<()> {
    if customers.is_empty() {
        return Ok(());
    }
    let q = Query::delete()
        .from_table(Sums)
        .and_where(Expr::col(C::Model).eq(model))
        .and_where(is_in_texts(db, C::Customer.as_str(), customers))
        .to_owned();
    db.execute(&q).await?;
    save(db, rows).await
}

/// The sums of `rows` (any customers, models and order).
pub fn of_rows<'a>(rows: impl IntoIterator<Item = &'a Row>) -> Vec<SumRow> {
    let mut sums: BTreeMap<(&str, &str, &str, i16, i64), Sum> = BTreeMap::new();
    for r in rows {
        sums.entry((&r.customer, &r.model, &r.score, r.decay_kind, r.decay_us))
            .or_insert_with(|| Sum::new(r.decay()))
            .add(r.points, r.award_us);
    }
    sums.iter()
        .map(|((c, m, s, _, _), sum)| SumRow::new(c, m, s, sum))
        .collect()
}

/// Recomputes the sums of `customers` (every model) from their ledger
/// entries: after a re-scoring or a merge rewrote them, and to fill the
/// table the first time. Three statements per chunk of customers.
pub async fn rebuild(db: &impl ConnectionTrait, customers: &[String]) -> Result<()> {
    delete_customers(db, customers).await?;
    let rows = ledger::of_customers_all_models(db, customers).await?;
    save(db, &of_rows(&rows)).await
}
