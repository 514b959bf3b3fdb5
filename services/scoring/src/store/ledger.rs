//! The score ledger: one row per award. Hot path: sea-query over both backends.

use super::entity::score_ledger::{Column as C, Entity as Ledger};
use super::{chunk, n};
use clm_domain::scoring::{Decay, Entry};
use clm_platform::Result;
use clm_platform::bulk::is_in_texts;
use clm_platform::db::is_postgres;
use sea_orm::IdenStatic;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Order, Query};
use sea_orm::{ConnectionTrait, DbBackend, EntityName, FromQueryResult, Statement};

const COLUMNS: [C; 12] = [
    C::Customer,
    C::Model,
    C::ModelVersion,
    C::Score,
    C::Rule,
    C::Points,
    C::SourceEvent,
    C::AwardUs,
    C::DecayKind,
    C::DecayUs,
    C::Reason,
    C::Actor,
];

/// A ledger row: the entity's model.
pub type Row = super::entity::score_ledger::Model;

impl Row {
    /// Its decay.
    pub fn decay(&self) -> Decay {
        Decay::from_code(self.decay_kind, self.decay_us)
    }

    /// As the maths needs it.
    pub fn entry(&self) -> Entry {
        Entry {
            points: self.points,
            award_us: self.award_us,
            decay: self.decay(),
        }
    }
}

/// A new ledger row (no id yet).
#[derive(Debug, Clone)]
pub struct NewRow {
    /// `customers/{id}`.
    pub customer: String,
    /// Model id.
    pub model: String,
    /// Model version.
    pub model_version: i64,
    /// The award.
    pub award: clm_domain::scoring::Award,
    /// Why (manual).
    pub reason: String,
    /// Who (manual).
    pub actor: String,
}

impl NewRow {
    /// As a ledger row (for computing scores before it is read back; id
    /// `i64::MAX`).
    pub fn as_row(&self) -> Row {
        let (kind, param) = self.award.decay.code();
        Row {
            id: i64::MAX,
            customer: self.customer.clone(),
            model: self.model.clone(),
            model_version: self.model_version,
            score: self.award.score.clone(),
            rule: self.award.rule.clone(),
            points: self.award.points,
            source_event: self.award.source_event.clone(),
            award_us: self.award.award_us,
            decay_kind: kind,
            decay_us: param,
            reason: self.reason.clone(),
            actor: self.actor.clone(),
        }
    }
}

/// The entries of `customers` under `model` that re-scoring keeps: manual
/// adjustments (version 0) and the awards of the `keep` rules (score
/// columns only): one statement.
pub async fn kept(
    db: &impl ConnectionTrait,
    model: &str,
    customers: &[String],
    keep: &[String],
) -> Result<Vec<Row>> {
    if customers.is_empty() {
        return Ok(Vec::new());
    }
    let q = score_select()
        .and_where(Expr::col(C::Model).eq(model))
        .and_where(is_in_texts(db, C::Customer.as_str(), customers))
        .and_where(
            Expr::col(C::ModelVersion)
                .eq(0)
                .or(Expr::col(C::Rule).is_in(keep.iter().cloned())),
        )
        .to_owned();
    Ok(Row::find_by_statement(db.get_database_backend().build(&q))
        .all(db)
        .await?)
}

/// Deletes the rule-made entries (not manual adjustments, not the `keep`
/// rules' awards) of `customers` under `model`: a re-scoring's swap.
pub async fn delete_rule_made(
    db: &impl ConnectionTrait,
    model: &str,
    customers: &[String],
    keep: &[String],
) -> Result<()> {
    let mut del = Query::delete();
    del.from_table(Ledger)
        .and_where(Expr::col(C::Model).eq(model))
        .and_where(Expr::col(C::ModelVersion).ne(0))
        .and_where(is_in_texts(db, C::Customer.as_str(), customers));
    if !keep.is_empty() {
        del.and_where(Expr::col(C::Rule).is_not_in(keep.iter().cloned()));
    }
    db.execute(&del).await?;
    Ok(())
}

/// Inserts `rows`, skipping any whose (source event, rule, model, version)
/// is already in the ledger; one statement per chunk. Returns rows inserted.
pub async fn insert(db: &impl ConnectionTrait, rows: &[NewRow]) -> Result<u64> {
    Ok(insert_new(db, rows).await?.len() as u64)
}

/// Inserts `rows` like [`insert`] and returns the ones that were new (a
/// replayed award is left out): what the running sums may count.
pub async fn insert_new(db: &impl ConnectionTrait, rows: &[NewRow]) -> Result<Vec<NewRow>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let returned = if is_postgres(db) {
        db.query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            pg_insert(),
            pg_arrays(rows),
        ))
        .await?
    } else {
        let mut all = Vec::new();
        for part in rows.chunks(chunk(COLUMNS.len())) {
            let mut q = Query::insert();
            q.into_table(Ledger).columns(COLUMNS);
            for r in part {
                let (kind, param) = r.award.decay.code();
                q.values_panic([
                    r.customer.clone().into(),
                    r.model.clone().into(),
                    r.model_version.into(),
                    r.award.score.clone().into(),
                    r.award.rule.clone().into(),
                    r.award.points.into(),
                    r.award.source_event.clone().into(),
                    r.award.award_us.into(),
                    kind.into(),
                    param.into(),
                    r.reason.clone().into(),
                    r.actor.clone().into(),
                ]);
            }
            q.on_conflict(
                OnConflict::columns([C::SourceEvent, C::Rule, C::Model, C::ModelVersion])
                    .do_nothing()
                    .to_owned(),
            );
            q.returning(Query::returning().columns([C::SourceEvent, C::Rule, C::ModelVersion]));
            all.extend(db.query_all(&q).await?);
        }
        all
    };
    let mut fresh = std::collections::HashSet::new();
    for r in returned {
        fresh.insert((
            r.try_get::<String>("", C::SourceEvent.as_str())?,
            r.try_get::<String>("", C::Rule.as_str())?,
            r.try_get::<i64>("", C::ModelVersion.as_str())?,
        ));
    }
    Ok(rows
        .iter()
        .filter(|r| {
            fresh.contains(&(
                r.award.source_event.clone(),
                r.award.rule.clone(),
                r.model_version,
            ))
        })
        .cloned()
        .collect())
}

/// [`insert_new`]'s statement on PostgreSQL: every row in one statement of
/// fixed text (see [`super::unnest_insert`]).
fn pg_insert() -> &'static str {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let types = [
            "text", "text", "int8", "text", "text", "int8", "text", "int8", "int2", "int8", "text",
            "text",
        ];
        let cols: Vec<(&str, &str)> = COLUMNS.iter().map(|c| c.as_str()).zip(types).collect();
        let key = [C::SourceEvent, C::Rule, C::Model, C::ModelVersion]
            .map(|c| format!("\"{}\"", c.as_str()));
        super::unnest_insert(
            Ledger.table_name(),
            &cols,
            &format!(
                "ON CONFLICT ({}) DO NOTHING RETURNING {}, {}, {}",
                key.join(", "),
                key[0],
                key[1],
                key[3]
            ),
        )
    });
    &SQL
}

/// [`pg_insert`]'s parameters: one array per column of [`COLUMNS`].
fn pg_arrays(rows: &[NewRow]) -> Vec<sea_orm::Value> {
    use super::column;
    vec![
        column(rows, |r| r.customer.clone()),
        column(rows, |r| r.model.clone()),
        column(rows, |r| r.model_version),
        column(rows, |r| r.award.score.clone()),
        column(rows, |r| r.award.rule.clone()),
        column(rows, |r| r.award.points),
        column(rows, |r| r.award.source_event.clone()),
        column(rows, |r| r.award.award_us),
        column(rows, |r| r.award.decay.code().0),
        column(rows, |r| r.award.decay.code().1),
        column(rows, |r| r.reason.clone()),
        column(rows, |r| r.actor.clone()),
    ]
}

/// The score columns of a ledger select (what scores are computed from);
/// `source_event`, `reason` and `actor` come back empty.
fn score_select() -> sea_orm::sea_query::SelectStatement {
    Query::select()
        .columns([
            C::Id,
            C::Customer,
            C::Model,
            C::ModelVersion,
            C::Score,
            C::Rule,
            C::Points,
            C::AwardUs,
            C::DecayKind,
            C::DecayUs,
        ])
        .expr_as(Expr::val(""), C::SourceEvent)
        .expr_as(Expr::val(""), C::Reason)
        .expr_as(Expr::val(""), C::Actor)
        .from(Ledger)
        .to_owned()
}

/// Every entry of `customers` under every model (score columns only), in
/// ledger order per customer and model: one statement.
pub async fn of_customers_all_models(
    db: &impl ConnectionTrait,
    customers: &[String],
) -> Result<Vec<Row>> {
    if customers.is_empty() {
        return Ok(Vec::new());
    }
    let q = score_select()
        .and_where(is_in_texts(db, C::Customer.as_str(), customers))
        .order_by(C::Customer, Order::Asc)
        .order_by(C::Model, Order::Asc)
        .order_by(C::AwardUs, Order::Asc)
        .order_by(C::Id, Order::Asc)
        .to_owned();
    Ok(Row::find_by_statement(db.get_database_backend().build(&q))
        .all(db)
        .await?)
}

/// The linear-decay entries of `customers` under `model` awarded after
/// `since_us` (older ones count 0 by then): one statement.
pub async fn linear_since(
    db: &impl ConnectionTrait,
    model: &str,
    customers: &[String],
    since_us: i64,
) -> Result<Vec<Row>> {
    if customers.is_empty() {
        return Ok(Vec::new());
    }
    let (linear, _) = Decay::Linear {
        over: chrono::TimeDelta::microseconds(1),
    }
    .code();
    let q = of_model_customers(db, model, customers)
        .and_where(Expr::col(C::AwardUs).gt(since_us))
        .and_where(Expr::col(C::DecayKind).eq(linear))
        .to_owned();
    rows(db, &q).await
}

/// The rules whose earlier awards a batch needs, by what it needs of them.
#[derive(Debug, Default, Clone)]
pub struct RuleWindows {
    /// Once-per-customer rules: whether each scored, ever.
    pub once: Vec<String>,
    /// Rules capped per UTC day: points used per day.
    pub day: Vec<String>,
    /// Rules capped per ISO week: points used per week.
    pub week: Vec<String>,
    /// Rules capped over a rolling window: their awards one by one.
    pub rolling: Vec<String>,
}

impl RuleWindows {
    /// No rule needs anything.
    pub fn is_empty(&self) -> bool {
        self.once.is_empty()
            && self.day.is_empty()
            && self.week.is_empty()
            && self.rolling.is_empty()
    }
}

/// One customer's use of one rule: `used` = Σ |points| of its awards
/// bucketed at `at_us` (the window's start for a calendar cap, the award's
/// time for a rolling one, 0 for a once-only rule), as `(award time,
/// points)` entries of a `clm_domain::scoring::RuleHistory` that give the
/// same cap room and once-only answer as the awards themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleUse {
    /// `customers/{id}`.
    pub customer: String,
    /// Rule id.
    pub rule: String,
    /// Bucket time (µs).
    pub at_us: i64,
    /// Σ |points| in the bucket.
    pub used: i64,
}

/// What caps and once-per-customer rules of `model` version `version` need
/// to know of `customers`' earlier awards, summed by the database: per
/// customer and rule, the points used in each day or ISO week of a
/// calendar-capped rule in `[lo, hi)`, the awards of rolling-capped rules
/// in `[lo, hi)`, and one row per once-only rule that scored. One
/// statement; a few rows per customer and rule however many awards a
/// window holds.
pub async fn rule_usage(
    db: &impl ConnectionTrait,
    model: &str,
    version: i64,
    customers: &[String],
    rules: &RuleWindows,
    (lo, hi): (i64, i64),
) -> Result<Vec<RuleUse>> {
    const DAY: i64 = 86_400_000_000;
    if customers.is_empty() || rules.is_empty() {
        return Ok(Vec::new());
    }
    let capped: Vec<String> = [&rules.day, &rules.week, &rules.rolling]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let mut which = Expr::col(C::Rule).is_in(rules.once.iter().cloned());
    if !capped.is_empty() {
        which = which.or(Expr::col(C::Rule)
            .is_in(capped)
            .and(Expr::col(C::AwardUs).gte(lo))
            .and(Expr::col(C::AwardUs).lt(hi)));
    }
    // Floor division (times before 1970 too): the day's start, and the
    // Monday of its ISO week (1970-01-01 was a Thursday: weekday 3).
    let award = C::AwardUs.as_str();
    let day = format!("(\"{award}\" - ((\"{award}\" % {DAY}) + {DAY}) % {DAY})");
    let week = format!("(({day}) / {DAY} - ((({day}) / {DAY} + 3) % 7 + 7) % 7) * {DAY}");
    let bucket = Expr::case(
        Expr::col(C::Rule).is_in(rules.day.iter().cloned()),
        Expr::cust(day),
    )
    .case(
        Expr::col(C::Rule).is_in(rules.week.iter().cloned()),
        Expr::cust(week),
    )
    .case(
        Expr::col(C::Rule).is_in(rules.once.iter().cloned()),
        Expr::val(0i64),
    )
    .finally(Expr::col(C::AwardUs));
    let inner = Query::select()
        .columns([C::Customer, C::Rule, C::Points])
        .expr_as(bucket, n("bucket"))
        .from(Ledger)
        .and_where(Expr::col(C::Model).eq(model))
        .and_where(is_in_texts(db, C::Customer.as_str(), customers))
        .and_where(Expr::col(C::ModelVersion).eq(version))
        .and_where(which)
        .to_owned();
    let q = Query::select()
        .columns([C::Customer, C::Rule])
        .expr_as(Expr::cust("CAST(\"bucket\" AS BIGINT)"), n("at_us"))
        .expr_as(
            Expr::cust(format!(
                "CAST(ABS(SUM(\"{}\")) AS BIGINT)",
                C::Points.as_str()
            )),
            n("used"),
        )
        .from_subquery(inner, n("u"))
        .group_by_col(C::Customer)
        .group_by_col(C::Rule)
        .group_by_col(n("bucket"))
        // A correction cancelling an award nets it to nothing.
        .and_having(Expr::cust(format!("SUM(\"{}\") <> 0", C::Points.as_str())))
        .to_owned();
    db.query_all(&q)
        .await?
        .iter()
        .map(|r| {
            Ok(RuleUse {
                customer: r.try_get("", C::Customer.as_str())?,
                rule: r.try_get("", C::Rule.as_str())?,
                at_us: r.try_get("", "at_us")?,
                used: r.try_get("", "used")?,
            })
        })
        .collect()
}

fn select() -> sea_orm::sea_query::SelectStatement {
    let mut cols = vec![C::Id];
    cols.extend(COLUMNS);
    Query::select().columns(cols).from(Ledger).to_owned()
}

/// The score columns of `customers`' entries under `model`, in ledger
/// order (customer, award time, id), for a reader to narrow down.
fn of_model_customers(
    db: &impl ConnectionTrait,
    model: &str,
    customers: &[String],
) -> sea_orm::sea_query::SelectStatement {
    score_select()
        .and_where(Expr::col(C::Model).eq(model))
        .and_where(is_in_texts(db, C::Customer.as_str(), customers))
        .order_by(C::Customer, Order::Asc)
        .order_by(C::AwardUs, Order::Asc)
        .order_by(C::Id, Order::Asc)
        .to_owned()
}

/// Runs a ledger select.
async fn rows(
    db: &impl ConnectionTrait,
    q: &sea_orm::sea_query::SelectStatement,
) -> Result<Vec<Row>> {
    Ok(Row::find_by_statement(db.get_database_backend().build(q))
        .all(db)
        .await?)
}

/// Every entry of `customers` under `model`, in ledger order (customer,
/// award time, id): one statement. Only what scores are computed from is
/// read; `source_event`, `reason` and `actor` come back empty.
pub async fn of_customers(
    db: &impl ConnectionTrait,
    model: &str,
    customers: &[String],
) -> Result<Vec<Row>> {
    if customers.is_empty() {
        return Ok(Vec::new());
    }
    rows(db, &of_model_customers(db, model, customers)).await
}

/// One page of a customer's entries after row `after`, oldest award first.
pub async fn page(
    db: &impl ConnectionTrait,
    customer: &str,
    model: &str,
    after: Option<(i64, i64)>,
    limit: u64,
) -> Result<Vec<Row>> {
    let mut q = select()
        .and_where(Expr::col(C::Customer).eq(customer))
        .and_where(Expr::col(C::Model).eq(model))
        .order_by(C::AwardUs, Order::Asc)
        .order_by(C::Id, Order::Asc)
        .limit(limit)
        .to_owned();
    if let Some((award, id)) = after {
        q.and_where(
            Expr::col(C::AwardUs)
                .gt(award)
                .or(Expr::col(C::AwardUs).eq(award).and(Expr::col(C::Id).gt(id))),
        );
    }
    Ok(Row::find_by_statement(db.get_database_backend().build(&q))
        .all(db)
        .await?)
}

/// The entry awarded for `source_event` by `rule` (manual adjustments).
pub async fn by_source(db: &impl ConnectionTrait, source: &str, rule: &str) -> Result<Option<Row>> {
    let q = select()
        .and_where(Expr::col(C::SourceEvent).eq(source))
        .and_where(Expr::col(C::Rule).eq(rule))
        .to_owned();
    Ok(Row::find_by_statement(db.get_database_backend().build(&q))
        .one(db)
        .await?)
}

/// Moves the entries of `from` customers to `to` (a merge).
pub async fn move_to(db: &impl ConnectionTrait, from: &[String], to: &str) -> Result<u64> {
    let q = Query::update()
        .table(Ledger)
        .value(C::Customer, to)
        .and_where(is_in_texts(db, C::Customer.as_str(), from))
        .to_owned();
    Ok(db.execute(&q).await?.rows_affected())
}

/// Deletes every entry of `customers`.
pub async fn delete_customers(db: &impl ConnectionTrait, customers: &[String]) -> Result<u64> {
    let q = Query::delete()
        .from_table(Ledger)
        .and_where(is_in_texts(db, C::Customer.as_str(), customers))
        .to_owned();
    Ok(db.execute(&q).await?.rows_affected())
}

/// The newest award time of each `(customer, rule)` among `rules` of
/// `model` version `version` (one grouped statement): a touchpoint earlier
/// than its rule's newest award arrived late, and the rule's awards after it
/// are evaluated again (see `crate::recap`).
pub async fn newest_awards(
    db: &impl ConnectionTrait,
    model: &str,
    version: i64,
    customers: &[String],
    rules: &[String],
) -> Result<std::collections::HashMap<(String, String), i64>> {
    if customers.is_empty() || rules.is_empty() {
        return Ok(Default::default());
    }
    let q = Query::select()
        .columns([C::Customer, C::Rule])
        .expr_as(Expr::col(C::AwardUs).max(), n("newest"))
        .from(Ledger)
        .and_where(Expr::col(C::Model).eq(model))
        .and_where(Expr::col(C::ModelVersion).eq(version))
        .and_where(is_in_texts(db, C::Customer.as_str(), customers))
        .and_where(Expr::col(C::Rule).is_in(rules.iter().cloned()))
        .group_by_col(C::Customer)
        .group_by_col(C::Rule)
        .to_owned();
    db.query_all(&q)
        .await?
        .iter()
        .map(|r| {
            Ok((
                (
                    r.try_get("", C::Customer.as_str())?,
                    r.try_get("", C::Rule.as_str())?,
                ),
                r.try_get("", "newest")?,
            ))
        })
        .collect()
}

/// What re-evaluating a limited rule needs of one of its entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleEntry {
    /// `customers/{id}`.
    pub customer: String,
    /// Rule id.
    pub rule: String,
    /// The source event (a correction names its event first).
    pub source_event: String,
    /// Points.
    pub points: i64,
    /// Award time (µs).
    pub award_us: i64,
}

impl RuleEntry {
    /// A row whose first five columns are customer, rule, source event,
    /// points and award time, in that order.
    pub(crate) fn from_row(r: &sea_orm::QueryResult) -> Result<Self> {
        Ok(Self {
            customer: r.try_get_by_index(0)?,
            rule: r.try_get_by_index(1)?,
            source_event: r.try_get_by_index(2)?,
            points: r.try_get_by_index(3)?,
            award_us: r.try_get_by_index(4)?,
        })
    }
}

/// Every entry of `rules` of `model` version `version` for `customers`
/// awarded at or after `since_us`: the columns of [`RuleEntry`] only, read
/// by position (one statement).
pub async fn rule_entries(
    db: &impl ConnectionTrait,
    model: &str,
    version: i64,
    customers: &[String],
    rules: &[String],
    since_us: i64,
) -> Result<Vec<RuleEntry>> {
    if customers.is_empty() || rules.is_empty() {
        return Ok(Vec::new());
    }
    let q = Query::select()
        .columns([C::Customer, C::Rule, C::SourceEvent, C::Points, C::AwardUs])
        .from(Ledger)
        .and_where(Expr::col(C::Model).eq(model))
        .and_where(Expr::col(C::ModelVersion).eq(version))
        .and_where(is_in_texts(db, C::Customer.as_str(), customers))
        .and_where(Expr::col(C::Rule).is_in(rules.iter().cloned()))
        .and_where(Expr::col(C::AwardUs).gte(since_us))
        .to_owned();
    db.query_all(&q)
        .await?
        .iter()
        .map(RuleEntry::from_row)
        .collect()
}
