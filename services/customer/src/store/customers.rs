//! Customers and their custom attributes.

use super::n;
use chrono::{DateTime, NaiveDate, Utc};
use clm_domain::attributes::{AttributeValue, Attributes};
use clm_domain::demographics::{Demographics, Gender};
use clm_domain::filter::{Comparison, Literal, Op};
use clm_domain::ids::CustomerId;
use clm_domain::lifecycle::Stage;
use clm_domain::money::Money;
use clm_domain::{Violation, Violations};
use clm_platform::Error;
use clm_platform::db::{from_micros, to_micros};
use sea_orm::sea_query::{Cond, Expr, ExprTrait, Order, Query, SelectStatement, SimpleExpr, Value};
use sea_orm::{ConnectionTrait, QueryResult};
use std::collections::HashMap;

/// A stored customer.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerRecord {
    /// Id.
    pub id: CustomerId,
    /// The caller's id.
    pub external_id: Option<String>,
    /// Lower-cased e-mail.
    pub email: Option<String>,
    /// Name to show.
    pub display_name: String,
    /// Demographics.
    pub demographics: Demographics,
    /// Custom attributes.
    pub attributes: Attributes,
    /// Current stage.
    pub stage: Stage,
    /// When the current stage was entered.
    pub stage_change_time: DateTime<Utc>,
    /// Creation time.
    pub create_time: DateTime<Utc>,
    /// Last update.
    pub update_time: DateTime<Utc>,
    /// Optimistic-concurrency version (the etag).
    pub version: i64,
}

/// A validated customer to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCustomer {
    /// The caller's id.
    pub external_id: Option<String>,
    /// E-mail.
    pub email: Option<String>,
    /// Name to show.
    pub display_name: String,
    /// Demographics.
    pub demographics: Demographics,
    /// Attributes.
    pub attributes: Attributes,
    /// Initial stage.
    pub stage: Stage,
}

const COLS: [&str; 14] = [
    "id",
    "external_id",
    "email",
    "display_name",
    "birth_date",
    "gender",
    "income_minor",
    "income_currency",
    "occupation",
    "stage",
    "stage_change_us",
    "create_us",
    "update_us",
    "version",
];

fn values(r: &CustomerRecord) -> [SimpleExpr; 14] {
    let d = &r.demographics;
    [
        r.id.to_string().into(),
        r.external_id.clone().into(),
        r.email.clone().into(),
        r.display_name.clone().into(),
        d.birth_date
            .map(|b| b.format("%Y-%m-%d").to_string())
            .into(),
        d.gender.map(Gender::code).into(),
        d.annual_income.as_ref().map(|m| m.amount_minor).into(),
        d.annual_income.as_ref().map(|m| m.currency.clone()).into(),
        d.occupation.clone().into(),
        r.stage.code().into(),
        to_micros(r.stage_change_time).into(),
        to_micros(r.create_time).into(),
        to_micros(r.update_time).into(),
        r.version.into(),
    ]
}

fn from_row(row: &QueryResult) -> Result<CustomerRecord, Error> {
    let id: String = row.try_get("", "id")?;
    let birth: Option<String> = row.try_get("", "birth_date")?;
    let gender: Option<i16> = row.try_get("", "gender")?;
    let income: Option<i64> = row.try_get("", "income_minor")?;
    let currency: Option<String> = row.try_get("", "income_currency")?;
    let stage: i16 = row.try_get("", "stage")?;
    Ok(CustomerRecord {
        id: CustomerId::parse_id("id", &id).map_err(Error::internal)?,
        external_id: row.try_get("", "external_id")?,
        email: row.try_get("", "email")?,
        display_name: row.try_get("", "display_name")?,
        demographics: Demographics {
            birth_date: birth.and_then(|b| NaiveDate::parse_from_str(&b, "%Y-%m-%d").ok()),
            gender: gender.and_then(Gender::from_code),
            annual_income: income.zip(currency).map(|(amount_minor, currency)| Money {
                currency,
                amount_minor,
            }),
            occupation: row.try_get("", "occupation")?,
        },
        attributes: Attributes::new(),
        stage: Stage::from_code(stage)
            .ok_or_else(|| Error::internal(format!("stored stage code {stage}")))?,
        stage_change_time: from_micros(row.try_get("", "stage_change_us")?),
        create_time: from_micros(row.try_get("", "create_us")?),
        update_time: from_micros(row.try_get("", "update_us")?),
        version: row.try_get("", "version")?,
    })
}

/// Refuses e-mails or external ids that are already taken, naming the field
/// of the request that carries each (`fields[i]` is the prefix of `customers[i]`).
/// `except` is a customer allowed to hold them (the one being updated).
pub async fn check_unique(
    db: &impl ConnectionTrait,
    customers: &[(&str, Option<&str>, Option<&str>)],
    except: Option<CustomerId>,
) -> Result<(), Error> {
    let emails: Vec<&str> = customers.iter().filter_map(|c| c.1).collect();
    let externals: Vec<&str> = customers.iter().filter_map(|c| c.2).collect();
    if emails.is_empty() && externals.is_empty() {
        return Ok(());
    }
    let mut q = Query::select();
    q.columns([n("id"), n("email"), n("external_id")])
        .from(n("customers"))
        .cond_where(
            Cond::any()
                .add(Expr::col(n("email")).is_in(emails.iter().map(|s| (*s).to_owned())))
                .add(Expr::col(n("external_id")).is_in(externals.iter().map(|s| (*s).to_owned()))),
        );
    if let Some(id) = except {
        q.and_where(Expr::col(n("id")).ne(id.to_string()));
    }
    let rows = db.query_all(&q).await?;
    for row in rows {
        let email: Option<String> = row.try_get("", "email")?;
        let external: Option<String> = row.try_get("", "external_id")?;
        for (prefix, e, x) in customers {
            if email.is_some() && email.as_deref() == *e {
                return Err(taken(
                    "EMAIL_TAKEN",
                    &format!("{prefix}.email"),
                    e.unwrap_or_default(),
                ));
            }
            if external.is_some() && external.as_deref() == *x {
                return Err(taken(
                    "EXTERNAL_ID_TAKEN",
                    &format!("{prefix}.external_id"),
                    x.unwrap_or_default(),
                ));
            }
        }
    }
    Ok(())
}

fn taken(reason: &'static str, field: &str, value: &str) -> Error {
    Error::AlreadyExists {
        reason,
        message: format!("{field}: {value:?} is already used by another customer"),
    }
}

/// Maps a unique violation that slipped past [`check_unique`] (a race) to ALREADY_EXISTS.
pub fn map_unique(e: sea_orm::DbErr) -> Error {
    match clm_platform::db::unique_violation_detail(&e) {
        Some(m) if m.contains("email") => Error::AlreadyExists {
            reason: "EMAIL_TAKEN",
            message: "email is already used by another customer".into(),
        },
        Some(m) if m.contains("external_id") => Error::AlreadyExists {
            reason: "EXTERNAL_ID_TAKEN",
            message: "external_id is already used by another customer".into(),
        },
        _ => e.into(),
    }
}

/// Inserts customers (one statement for the rows, one for all attributes).
pub async fn insert_many(
    db: &impl ConnectionTrait,
    records: &[CustomerRecord],
) -> Result<(), Error> {
    if records.is_empty() {
        return Ok(());
    }
    let mut insert = Query::insert();
    insert.into_table(n("customers")).columns(COLS.map(n));
    for r in records {
        insert.values_panic(values(r));
    }
    db.execute(&insert).await.map_err(map_unique)?;
    insert_attributes(db, records.iter().map(|r| (r.id, &r.attributes))).await
}

async fn insert_attributes<'a>(
    db: &impl ConnectionTrait,
    sets: impl Iterator<Item = (CustomerId, &'a Attributes)>,
) -> Result<(), Error> {
    let rows: Vec<[SimpleExpr; 7]> = sets
        .flat_map(|(id, attrs)| {
            attrs.iter().map(move |(k, v)| {
                let (kind, s, num, b, t): (
                    i16,
                    Option<String>,
                    Option<f64>,
                    Option<bool>,
                    Option<i64>,
                ) = match v {
                    AttributeValue::String(s) => (1, Some(s.clone()), None, None, None),
                    AttributeValue::Number(x) => (2, None, Some(*x), None, None),
                    AttributeValue::Bool(x) => (3, None, None, Some(*x), None),
                    AttributeValue::Timestamp(x) => (4, None, None, None, Some(to_micros(*x))),
                };
                [
                    id.to_string().into(),
                    k.clone().into(),
                    kind.into(),
                    s.into(),
                    num.into(),
                    b.into(),
                    t.into(),
                ]
            })
        })
        .collect();
    for chunk in rows.chunks(clm_platform::db::rows_per_statement(7)) {
        let mut insert = Query::insert();
        insert.into_table(n("customer_attributes")).columns(
            [
                "customer_id",
                "key",
                "kind",
                "string_value",
                "number_value",
                "bool_value",
                "time_us",
            ]
            .map(n),
        );
        for row in chunk {
            insert.values_panic(row.clone());
        }
        db.execute(&insert).await?;
    }
    Ok(())
}

/// Loads the attributes of `records` (one query) into them.
async fn load_attributes(
    db: &impl ConnectionTrait,
    records: &mut [CustomerRecord],
) -> Result<(), Error> {
    if records.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = records.iter().map(|r| r.id.to_string()).collect();
    let rows = db
        .query_all(
            Query::select()
                .columns(
                    [
                        "customer_id",
                        "key",
                        "kind",
                        "string_value",
                        "number_value",
                        "bool_value",
                        "time_us",
                    ]
                    .map(n),
                )
                .from(n("customer_attributes"))
                .and_where(Expr::col(n("customer_id")).is_in(ids)),
        )
        .await?;
    let mut by_id: HashMap<String, Attributes> = HashMap::new();
    for row in rows {
        let id: String = row.try_get("", "customer_id")?;
        let key: String = row.try_get("", "key")?;
        let kind: i16 = row.try_get("", "kind")?;
        let v = match kind {
            1 => AttributeValue::String(
                row.try_get::<Option<String>>("", "string_value")?
                    .unwrap_or_default(),
            ),
            2 => AttributeValue::Number(
                row.try_get::<Option<f64>>("", "number_value")?
                    .unwrap_or_default(),
            ),
            3 => AttributeValue::Bool(
                row.try_get::<Option<bool>>("", "bool_value")?
                    .unwrap_or_default(),
            ),
            _ => AttributeValue::Timestamp(from_micros(
                row.try_get::<Option<i64>>("", "time_us")?
                    .unwrap_or_default(),
            )),
        };
        by_id.entry(id).or_default().insert(key, v);
    }
    for r in records {
        r.attributes = by_id.remove(&r.id.to_string()).unwrap_or_default();
    }
    Ok(())
}

/// One customer, or NOT_FOUND.
pub async fn get(db: &impl ConnectionTrait, id: CustomerId) -> Result<CustomerRecord, Error> {
    let row = db
        .query_one(
            Query::select()
                .columns(COLS.map(n))
                .from(n("customers"))
                .and_where(Expr::col(n("id")).eq(id.to_string())),
        )
        .await?
        .ok_or_else(|| Error::NotFound(id.name()))?;
    let mut records = [from_row(&row)?];
    load_attributes(db, &mut records).await?;
    let [r] = records;
    Ok(r)
}

/// Which of `ids` exist.
pub async fn existing_ids(db: &impl ConnectionTrait, ids: &[String]) -> Result<Vec<String>, Error> {
    let rows = db
        .query_all(
            Query::select()
                .column(n("id"))
                .from(n("customers"))
                .and_where(Expr::col(n("id")).is_in(ids.iter().cloned())),
        )
        .await?;
    rows.iter()
        .map(|r| r.try_get::<String>("", "id").map_err(Error::from))
        .collect()
}

/// Writes a changed customer if its version is still `expected_version`;
/// `false` means someone else changed it first. Attributes are rewritten
/// when `attributes_changed`.
pub async fn update(
    db: &impl ConnectionTrait,
    r: &CustomerRecord,
    expected_version: i64,
    attributes_changed: bool,
) -> Result<bool, Error> {
    let mut update = Query::update();
    update.table(n("customers"));
    for (col, v) in COLS.iter().zip(values(r)).skip(1) {
        update.value(n(col), v);
    }
    update
        .and_where(Expr::col(n("id")).eq(r.id.to_string()))
        .and_where(Expr::col(n("version")).eq(expected_version));
    let changed = db
        .execute(&update)
        .await
        .map_err(map_unique)?
        .rows_affected()
        == 1;
    if changed && attributes_changed {
        db.execute(
            Query::delete()
                .from_table(n("customer_attributes"))
                .and_where(Expr::col(n("customer_id")).eq(r.id.to_string())),
        )
        .await?;
        insert_attributes(db, std::iter::once((r.id, &r.attributes))).await?;
    }
    Ok(changed)
}

/// Sort orders of ListCustomers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// `create_time`.
    CreateTime,
    /// `update_time`.
    UpdateTime,
    /// `display_name`.
    DisplayName,
}

impl SortKey {
    fn column(self) -> &'static str {
        match self {
            SortKey::CreateTime => "create_us",
            SortKey::UpdateTime => "update_us",
            SortKey::DisplayName => "display_name",
        }
    }

    /// The sort value of `r`, as stored in a page token.
    pub fn value_of(self, r: &CustomerRecord) -> serde_json::Value {
        match self {
            SortKey::CreateTime => to_micros(r.create_time).into(),
            SortKey::UpdateTime => to_micros(r.update_time).into(),
            SortKey::DisplayName => r.display_name.clone().into(),
        }
    }
}

/// Parses `order_by`: `create_time`, `update_time` or `display_name`, optionally `desc`/`asc`.
pub fn parse_order_by(field: &str, s: &str) -> Result<(SortKey, bool), Violation> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let (key, desc) = match parts.as_slice() {
        [] => return Ok((SortKey::CreateTime, false)),
        [k] => (*k, false),
        [k, d] if d.eq_ignore_ascii_case("desc") => (*k, true),
        [k, a] if a.eq_ignore_ascii_case("asc") => (*k, false),
        _ => {
            return Err(Violation::new(
                field,
                "must be a field optionally followed by asc or desc",
            ));
        }
    };
    let key = match key {
        "create_time" => SortKey::CreateTime,
        "update_time" => SortKey::UpdateTime,
        "display_name" => SortKey::DisplayName,
        other => {
            return Err(Violation::new(
                field,
                format!("cannot order by {other:?}; use create_time, update_time or display_name"),
            ));
        }
    };
    Ok((key, desc))
}

fn op_expr(col: Expr, op: Op, v: impl Into<Value>) -> SimpleExpr {
    let v: Value = v.into();
    match op {
        Op::Eq => col.eq(v),
        Op::Ne => col.ne(v),
        Op::Lt => col.lt(v),
        Op::Le => col.lte(v),
        Op::Gt => col.gt(v),
        Op::Ge => col.gte(v),
    }
}

/// Compiles parsed filter comparisons to a condition on `customers`.
pub fn compile_filter(field: &str, comparisons: &[Comparison]) -> Result<Cond, Violations> {
    let mut cond = Cond::all();
    let mut v = Violations::new();
    for c in comparisons {
        match compile_one(field, c) {
            Ok(e) => cond = cond.add(e),
            Err(e) => v.push(e),
        }
    }
    v.into_result().map(|()| cond)
}

fn text<'a>(field: &str, c: &'a Comparison) -> Result<&'a str, Violation> {
    c.value
        .as_text()
        .ok_or_else(|| Violation::new(field, format!("{} must be compared with a string", c.field)))
}

fn compile_one(field: &str, c: &Comparison) -> Result<SimpleExpr, Violation> {
    match c.field.as_str() {
        "stage" => {
            let stage = Stage::parse(field, text(field, c)?)?;
            match c.op {
                Op::Eq | Op::Ne => Ok(op_expr(Expr::col(n("stage")), c.op, stage.code())),
                _ => Err(Violation::new(field, "stage only supports = and !=")),
            }
        }
        "email" | "external_id" | "display_name" => {
            let mut value = text(field, c)?.to_owned();
            if c.field == "email" {
                value = value.to_lowercase();
            }
            Ok(op_expr(Expr::col(n(&c.field)), c.op, value))
        }
        "create_time" | "update_time" => {
            let t = clm_platform::convert::parse_rfc3339(field, text(field, c)?)?;
            let col = if c.field == "create_time" {
                "create_us"
            } else {
                "update_us"
            };
            Ok(op_expr(Expr::col(n(col)), c.op, to_micros(t)))
        }
        f if f.starts_with("attributes.") => {
            let key = clm_domain::attributes::key(field, &f["attributes.".len()..])?;
            let (col, value): (&str, Value) = match &c.value {
                Literal::Number(x) => ("number_value", (*x).into()),
                Literal::Bool(b) => ("bool_value", (*b).into()),
                Literal::String(s) | Literal::Word(s) => {
                    match chrono::DateTime::parse_from_rfc3339(s) {
                        Ok(t) => ("time_us", to_micros(t.with_timezone(&Utc)).into()),
                        Err(_) => ("string_value", s.clone().into()),
                    }
                }
            };
            let mut sub = Query::select();
            sub.expr(Expr::val(1))
                .from_as(n("customer_attributes"), n("a"))
                .and_where(Expr::col((n("a"), n("customer_id"))).equals((n("customers"), n("id"))))
                .and_where(Expr::col((n("a"), n("key"))).eq(key))
                .and_where(op_expr(Expr::col((n("a"), n(col))), c.op, value));
            Ok(Expr::exists(sub))
        }
        other => Err(Violation::new(
            field,
            format!(
                "cannot filter on {other:?}; use stage, email, external_id, display_name, create_time, update_time or attributes.<key>"
            ),
        )),
    }
}

/// One page of customers matching `cond`, after `after` (sort value, id).
pub async fn list(
    db: &impl ConnectionTrait,
    cond: Cond,
    sort: SortKey,
    desc: bool,
    after: Option<(serde_json::Value, String)>,
    limit: u64,
) -> Result<Vec<CustomerRecord>, Error> {
    let mut q: SelectStatement = Query::select();
    q.columns(COLS.map(|c| (n("customers"), n(c))))
        .from(n("customers"))
        .cond_where(cond);
    let col = sort.column();
    if let Some((v, id)) = after {
        let value: Value = match v {
            serde_json::Value::Number(x) => x.as_i64().unwrap_or_default().into(),
            serde_json::Value::String(s) => s.into(),
            _ => {
                return Err(Error::invalid(
                    "page_token",
                    "is not a page token returned by this list call",
                ));
            }
        };
        let c = Expr::col((n("customers"), n(col)));
        let i = Expr::col((n("customers"), n("id")));
        let keyset = if desc {
            Cond::any()
                .add(c.clone().lt(value.clone()))
                .add(Cond::all().add(c.eq(value)).add(i.lt(id)))
        } else {
            Cond::any()
                .add(c.clone().gt(value.clone()))
                .add(Cond::all().add(c.eq(value)).add(i.gt(id)))
        };
        q.cond_where(keyset);
    }
    let order = if desc { Order::Desc } else { Order::Asc };
    q.order_by((n("customers"), n(col)), order.clone())
        .order_by((n("customers"), n("id")), order)
        .limit(limit);
    let rows = db.query_all(&q).await?;
    let mut records = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    load_attributes(db, &mut records).await?;
    Ok(records)
}
