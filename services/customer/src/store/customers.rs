//! Customers and their custom attributes, through the
//! [`customers`](super::entity::customers) and
//! [`customer_attributes`](super::entity::customer_attributes) entities.
//! A customer is read with its attributes in one statement (a LEFT JOIN),
//! a page of them too.

use super::entity::customer_attributes::{
    self as attr, KIND_BOOL, KIND_NUMBER, KIND_STRING, KIND_TIME,
};
use super::entity::customer_redirects as redirects;
use super::entity::customers::{self, Column};
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
use sea_orm::{
    ActiveModelTrait, ActiveValue, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel,
    QueryFilter, QueryOrder, QuerySelect,
};
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
    /// Customers merged into this one.
    pub merged_from: Vec<CustomerId>,
    /// Created with, or given, an identifier of an erased customer.
    pub reimported_after_erasure: bool,
    /// The explicit acquisition campaign, `campaigns/{id}`.
    pub acquisition_campaign: Option<String>,
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
    /// The explicit acquisition campaign, `campaigns/{id}` (checked to exist
    /// by the caller).
    pub acquisition_campaign: Option<String>,
}

impl CustomerRecord {
    /// The `customers` row of this record.
    pub(crate) fn to_model(&self) -> customers::Model {
        let d = &self.demographics;
        customers::Model {
            id: self.id.to_string(),
            external_id: self.external_id.clone(),
            email: self.email.clone(),
            display_name: self.display_name.clone(),
            birth_date: d.birth_date.map(|b| b.format("%Y-%m-%d").to_string()),
            gender: d.gender.map(Gender::code),
            income_minor: d.annual_income.as_ref().map(|m| m.amount_minor),
            income_currency: d.annual_income.as_ref().map(|m| m.currency.clone()),
            occupation: d.occupation.clone(),
            stage: self.stage.code(),
            stage_change_us: to_micros(self.stage_change_time),
            create_us: to_micros(self.create_time),
            update_us: to_micros(self.update_time),
            version: self.version,
            merged_from: (!self.merged_from.is_empty()).then(|| {
                self.merged_from
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            }),
            reimported_after_erasure: self.reimported_after_erasure,
            acquisition_campaign: self.acquisition_campaign.clone(),
        }
    }

    /// The record of a `customers` row and its attribute rows.
    fn from_model(m: customers::Model, attributes: Vec<attr::Model>) -> Result<Self, Error> {
        Ok(Self {
            id: CustomerId::parse_id("id", &m.id).map_err(Error::internal)?,
            external_id: m.external_id,
            email: m.email,
            display_name: m.display_name,
            demographics: Demographics {
                birth_date: m
                    .birth_date
                    .and_then(|b| NaiveDate::parse_from_str(&b, "%Y-%m-%d").ok()),
                gender: m.gender.and_then(Gender::from_code),
                annual_income: m.income_minor.zip(m.income_currency).map(
                    |(amount_minor, currency)| Money {
                        currency,
                        amount_minor,
                    },
                ),
                occupation: m.occupation,
            },
            attributes: attributes
                .into_iter()
                .map(|a| {
                    let v = attribute_value(&a);
                    (a.key, v)
                })
                .collect(),
            stage: Stage::from_code(m.stage)
                .ok_or_else(|| Error::internal(format!("stored stage code {}", m.stage)))?,
            stage_change_time: from_micros(m.stage_change_us),
            create_time: from_micros(m.create_us),
            update_time: from_micros(m.update_us),
            version: m.version,
            merged_from: m
                .merged_from
                .as_deref()
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| CustomerId::parse_id("merged_from", s).map_err(Error::internal))
                .collect::<Result<_, _>>()?,
            reimported_after_erasure: m.reimported_after_erasure,
            acquisition_campaign: m.acquisition_campaign,
        })
    }
}

/// The `customer_attributes` rows of one customer's attributes.
pub(crate) fn attribute_models(
    id: CustomerId,
    attrs: &Attributes,
) -> impl Iterator<Item = attr::Model> + '_ {
    let customer_id = id.to_string();
    attrs.iter().map(move |(k, v)| {
        let mut m = attr::Model {
            customer_id: customer_id.clone(),
            key: k.clone(),
            kind: KIND_STRING,
            string_value: None,
            number_value: None,
            bool_value: None,
            time_us: None,
        };
        match v {
            AttributeValue::String(s) => m.string_value = Some(s.clone()),
            AttributeValue::Number(x) => {
                m.kind = KIND_NUMBER;
                m.number_value = Some(*x);
            }
            AttributeValue::Bool(b) => {
                m.kind = KIND_BOOL;
                m.bool_value = Some(*b);
            }
            AttributeValue::Timestamp(t) => {
                m.kind = KIND_TIME;
                m.time_us = Some(to_micros(*t));
            }
        }
        m
    })
}

fn attribute_value(a: &attr::Model) -> AttributeValue {
    match a.kind {
        KIND_STRING => AttributeValue::String(a.string_value.clone().unwrap_or_default()),
        KIND_NUMBER => AttributeValue::Number(a.number_value.unwrap_or_default()),
        KIND_BOOL => AttributeValue::Bool(a.bool_value.unwrap_or_default()),
        _ => AttributeValue::Timestamp(from_micros(a.time_us.unwrap_or_default())),
    }
}

/// Maps a unique violation of the profile's `email` or `external_id` (a
/// race past `identifiers::check_free`) to ALREADY_EXISTS.
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
    // 16 columns: a batch of 1,000 customers is far below MAX_BIND_PARAMS.
    for chunk in records.chunks(clm_platform::db::rows_per_statement(16)) {
        customers::Entity::insert_many(chunk.iter().map(|r| r.to_model().into_active_model()))
            .exec_without_returning(db)
            .await
            .map_err(map_unique)?;
    }
    insert_attributes(db, records.iter().map(|r| (r.id, &r.attributes))).await
}

async fn insert_attributes<'a>(
    db: &impl ConnectionTrait,
    sets: impl Iterator<Item = (CustomerId, &'a Attributes)>,
) -> Result<(), Error> {
    let rows: Vec<attr::ActiveModel> = sets
        .flat_map(|(id, attrs)| attribute_models(id, attrs))
        .map(IntoActiveModel::into_active_model)
        .collect();
    for chunk in rows.chunks(clm_platform::db::rows_per_statement(7)) {
        attr::Entity::insert_many(chunk.iter().cloned())
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

/// One customer with its attributes (one statement), or NOT_FOUND.
pub async fn get(db: &impl ConnectionTrait, id: CustomerId) -> Result<CustomerRecord, Error> {
    static SQL: std::sync::OnceLock<[String; 2]> = std::sync::OnceLock::new();
    let backend = db.get_database_backend();
    let sql = &SQL.get_or_init(|| {
        [sea_orm::DbBackend::Postgres, sea_orm::DbBackend::Sqlite]
            .map(|b| format!("{} WHERE {ID} = $1", with_attributes_sql(b)))
    })[usize::from(backend != sea_orm::DbBackend::Postgres)];
    let rows = db
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            backend,
            sql.as_str(),
            [sea_orm::Value::from(id.to_string())],
        ))
        .await?;
    match records_of(&rows)?.pop() {
        Some(r) => Ok(r),
        None => Err(missing(db, id).await),
    }
}

/// The customers among `ids` with their attributes, by id, in one
/// statement (on PostgreSQL one text for any number of ids, prepared once
/// per connection); absent ids (unknown, merged) are left out. What
/// GetCustomer's coalesced reads run (`clm_platform::coalesce`).
pub async fn get_found(
    db: &impl ConnectionTrait,
    ids: &[CustomerId],
) -> Result<HashMap<CustomerId, CustomerRecord>, Error> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let backend = db.get_database_backend();
    let texts: Vec<String> = ids.iter().map(ToString::to_string).collect();
    let (sql, values) = get_found_sql(backend, &texts);
    let rows = db
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            backend, sql, values,
        ))
        .await?;
    Ok(records_of(&rows)?.into_iter().map(|r| (r.id, r)).collect())
}

/// [`get_found`]'s statement and its values for the customers `ids`
/// (on PostgreSQL one text whatever their number, `$1` an array).
pub fn get_found_sql<S: AsRef<str>>(
    backend: sea_orm::DbBackend,
    ids: &[S],
) -> (String, Vec<sea_orm::Value>) {
    let postgres = backend == sea_orm::DbBackend::Postgres;
    let (condition, values) = clm_platform::bulk::any_text(postgres, ID, 1, ids);
    // The ids restrict the attributes too, in the join (ending the SQL):
    // PostgreSQL does not carry `id = ANY(..)` across the join as it does
    // `id = $1`, and without it a plan made before the tables' statistics
    // (say, just after an import) hashes every attribute row of every
    // customer: a full scan per statement.
    let (attr_condition, _) = clm_platform::bulk::any_text(postgres, ATTR_CUSTOMER_ID, 1, ids);
    let sql = format!(
        "{} AND {attr_condition} WHERE {condition}",
        with_attributes_sql(backend)
    );
    (sql, values)
}

/// The customer's id column in [`with_attributes_sql`].
const ID: &str = "\"customers\".\"id\"";
/// The attribute's customer column in [`with_attributes_sql`].
const ATTR_CUSTOMER_ID: &str = "\"customer_attributes\".\"customer_id\"";

/// The customers of `rows` (of [`with_attributes_sql`]), each with its
/// attributes, in the order each first appears.
fn records_of(rows: &[sea_orm::QueryResult]) -> Result<Vec<CustomerRecord>, Error> {
    use sea_orm::FromQueryResult as _;
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut found: Vec<(customers::Model, Vec<attr::Model>)> = Vec::new();
    for row in rows {
        let id: String = row.try_get("", "id")?;
        let i = match at.get(&id) {
            Some(&i) => i,
            None => {
                found.push((customers::Model::from_query_result(row, "")?, Vec::new()));
                at.insert(id, found.len() - 1);
                found.len() - 1
            }
        };
        if let Some(a) = attr::Model::from_query_result_optional(row, "")? {
            found[i].1.push(a);
        }
    }
    found
        .into_iter()
        .map(|(m, attributes)| CustomerRecord::from_model(m, attributes))
        .collect()
}

/// Customers and their attributes in one LEFT JOIN, every column of both
/// entities under its own name (the two tables share none, so no
/// per-column prefix to format when a row is read), without a condition;
/// the text ends with the join's `ON` condition, which a caller may extend
/// with `AND …`.
/// Built once per backend from the entities (no column list by hand), so
/// the statements made from it keep one text and each pooled connection
/// prepares them once.
fn with_attributes_sql(backend: sea_orm::DbBackend) -> &'static str {
    use sea_orm::Iterable as _;
    static POSTGRES: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static OTHER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let cell = if backend == sea_orm::DbBackend::Postgres {
        &POSTGRES
    } else {
        &OTHER
    };
    cell.get_or_init(|| {
        let mut q = Query::select();
        for c in customers::Column::iter() {
            q.column((customers::Entity, c));
        }
        for c in attr::Column::iter() {
            q.column((attr::Entity, c));
        }
        q.from(customers::Entity).left_join(
            attr::Entity,
            Expr::col((attr::Entity, attr::Column::CustomerId))
                .equals((customers::Entity, Column::Id)),
        );
        backend.build(&q).sql
    })
}

/// Customers with their attributes (one statement), in any order; absent
/// ids are left out.
pub async fn get_many(
    db: &impl ConnectionTrait,
    ids: &[CustomerId],
) -> Result<Vec<CustomerRecord>, Error> {
    customers::Entity::find()
        .filter(Column::Id.is_in(ids.iter().map(ToString::to_string)))
        .find_with_related(attr::Entity)
        .all(db)
        .await?
        .into_iter()
        .map(|(m, attributes)| CustomerRecord::from_model(m, attributes))
        .collect()
}

/// The customer `id` was merged into, if it was.
pub async fn redirect_of(
    db: &impl ConnectionTrait,
    id: CustomerId,
) -> Result<Option<CustomerId>, Error> {
    redirects::Entity::find_by_id(id.to_string())
        .one(db)
        .await?
        .map(|r| CustomerId::parse_id("survivor_id", &r.survivor_id).map_err(Error::internal))
        .transpose()
}

/// Why `id` is not there: merged into another customer (FAILED_PRECONDITION
/// naming the survivor) or unknown (NOT_FOUND).
pub async fn missing(db: &impl ConnectionTrait, id: CustomerId) -> Error {
    match redirect_of(db, id).await {
        Ok(Some(survivor)) => merged(id, survivor),
        Ok(None) => Error::NotFound(id.name()),
        Err(e) => e,
    }
}

/// Reason of the error for a write to a merged customer.
pub const MERGED: &str = "CUSTOMER_MERGED";

/// FAILED_PRECONDITION: `id` was merged into `survivor`.
pub fn merged(id: CustomerId, survivor: CustomerId) -> Error {
    Error::FailedPrecondition {
        reason: MERGED,
        message: format!(
            "{} was merged into {}; use the survivor",
            id.name(),
            survivor.name()
        ),
    }
}

/// Locks a customer's row until the transaction ends (`FOR UPDATE` on
/// PostgreSQL; SQLite has one writer), so changes of what hangs off it
/// (consent, identifiers) are serialised per customer. NOT_FOUND if absent.
pub async fn lock(db: &impl ConnectionTrait, id: CustomerId) -> Result<(), Error> {
    let found = customers::Entity::find_by_id(id.to_string())
        .select_only()
        .column(Column::Id)
        .lock_exclusive()
        .into_tuple::<String>()
        .one(db)
        .await?;
    if found.is_none() {
        return Err(missing(db, id).await);
    }
    Ok(())
}

/// Locks customers' rows (in id order, so overlapping lockers cannot
/// deadlock) and returns the ids that exist.
pub async fn lock_many(
    db: &impl ConnectionTrait,
    ids: &[CustomerId],
) -> Result<Vec<String>, Error> {
    Ok(customers::Entity::find()
        .select_only()
        .column(Column::Id)
        .filter(Column::Id.is_in(ids.iter().map(ToString::to_string)))
        .order_by_asc(Column::Id)
        .lock_exclusive()
        .into_tuple::<String>()
        .all(db)
        .await?)
}

/// Which of `ids` exist, each kept until the transaction ends under a lock
/// that concurrent writers share (`FOR KEY SHARE`, in id order, as a
/// foreign key takes on PostgreSQL; SQLite has one writer): ingests of the
/// same customers never wait on each other, and an erasure or a merge
/// (`FOR UPDATE`, [`lock`], [`lock_many`]) waits for them, or they for it,
/// then find the customer gone. The ingest path's one customer lock.
pub async fn share_existing(
    db: &impl ConnectionTrait,
    ids: &[String],
) -> Result<Vec<String>, Error> {
    Ok(share_existing_query(ids)
        .into_tuple::<String>()
        .all(db)
        .await?)
}

fn share_existing_query(ids: &[String]) -> sea_orm::Select<customers::Entity> {
    customers::Entity::find()
        .select_only()
        .column(Column::Id)
        .filter(Column::Id.is_in(ids.iter().cloned()))
        .order_by_asc(Column::Id)
        .lock(sea_orm::sea_query::LockType::KeyShare)
}

/// Which of `ids` exist.
pub async fn existing_ids(db: &impl ConnectionTrait, ids: &[String]) -> Result<Vec<String>, Error> {
    Ok(customers::Entity::find()
        .select_only()
        .column(Column::Id)
        .filter(Column::Id.is_in(ids.iter().cloned()))
        .into_tuple::<String>()
        .all(db)
        .await?)
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
    // Every column but the key is written (`reset_all` marks them Set).
    let mut row = r.to_model().into_active_model().reset_all();
    row.id = ActiveValue::NotSet;
    let changed = customers::Entity::update_many()
        .set(row)
        .filter(Column::Id.eq(r.id.to_string()))
        .filter(Column::Version.eq(expected_version))
        .exec(db)
        .await
        .map_err(map_unique)?
        .rows_affected
        == 1;
    if changed && attributes_changed {
        attr::Entity::delete_many()
            .filter(attr::Column::CustomerId.eq(r.id.to_string()))
            .exec(db)
            .await?;
        insert_attributes(db, std::iter::once((r.id, &r.attributes))).await?;
    }
    Ok(changed)
}

/// Marks `id` `reimported_after_erasure` (a new version) unless it already
/// is; `true` when it changed.
pub async fn mark_reimported(
    db: &impl ConnectionTrait,
    id: CustomerId,
    now: DateTime<Utc>,
) -> Result<bool, Error> {
    Ok(customers::Entity::update_many()
        .col_expr(Column::ReimportedAfterErasure, Expr::value(true))
        .col_expr(Column::Version, Expr::col(Column::Version).add(1))
        .col_expr(Column::UpdateUs, Expr::value(to_micros(now)))
        .filter(Column::Id.eq(id.to_string()))
        .filter(Column::ReimportedAfterErasure.eq(false))
        .exec(db)
        .await?
        .rows_affected
        == 1)
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
    fn column(self) -> Column {
        match self {
            SortKey::CreateTime => Column::CreateUs,
            SortKey::UpdateTime => Column::UpdateUs,
            SortKey::DisplayName => Column::DisplayName,
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

/// `customers.<col>`, qualified: filters also run inside subqueries.
fn customer_col(col: Column) -> Expr {
    Expr::col((customers::Entity, col))
}

fn compile_one(field: &str, c: &Comparison) -> Result<SimpleExpr, Violation> {
    match c.field.as_str() {
        "stage" => {
            let stage = Stage::parse(field, text(field, c)?)?;
            match c.op {
                Op::Eq | Op::Ne => Ok(op_expr(customer_col(Column::Stage), c.op, stage.code())),
                _ => Err(Violation::new(field, "stage only supports = and !=")),
            }
        }
        "email" | "external_id" | "display_name" => {
            let mut value = text(field, c)?.to_owned();
            let col = match c.field.as_str() {
                "email" => {
                    value = value.to_lowercase();
                    Column::Email
                }
                "external_id" => Column::ExternalId,
                _ => Column::DisplayName,
            };
            Ok(op_expr(customer_col(col), c.op, value))
        }
        "create_time" | "update_time" => {
            let t = clm_platform::convert::parse_rfc3339(field, text(field, c)?)?;
            let col = if c.field == "create_time" {
                Column::CreateUs
            } else {
                Column::UpdateUs
            };
            Ok(op_expr(customer_col(col), c.op, to_micros(t)))
        }
        "reimported_after_erasure" => match (&c.value, c.op) {
            (Literal::Bool(b), Op::Eq | Op::Ne) => Ok(op_expr(
                customer_col(Column::ReimportedAfterErasure),
                c.op,
                *b,
            )),
            _ => Err(Violation::new(
                field,
                "reimported_after_erasure is compared with = or != and true or false",
            )),
        },
        f if f.starts_with("attributes.") => {
            let key = clm_domain::attributes::key(field, &f["attributes.".len()..])?;
            let (col, value): (attr::Column, Value) = match &c.value {
                Literal::Number(x) => (attr::Column::NumberValue, (*x).into()),
                Literal::Bool(b) => (attr::Column::BoolValue, (*b).into()),
                Literal::String(s) | Literal::Word(s) => {
                    match chrono::DateTime::parse_from_rfc3339(s) {
                        Ok(t) => (
                            attr::Column::TimeUs,
                            to_micros(t.with_timezone(&Utc)).into(),
                        ),
                        Err(_) => (attr::Column::StringValue, s.clone().into()),
                    }
                }
            };
            let mut sub = Query::select();
            sub.expr(Expr::val(1))
                .from_as(attr::Entity, n("a"))
                .and_where(
                    Expr::col((n("a"), attr::Column::CustomerId))
                        .equals((customers::Entity, Column::Id)),
                )
                .and_where(Expr::col((n("a"), attr::Column::Key)).eq(key))
                .and_where(op_expr(Expr::col((n("a"), col)), c.op, value));
            Ok(Expr::exists(sub))
        }
        other => Err(Violation::new(
            field,
            format!(
                "cannot filter on {other:?}; use stage, email, external_id, display_name, create_time, update_time, reimported_after_erasure or attributes.<key>"
            ),
        )),
    }
}

/// One page of customers matching `cond`, after `after` (sort value, id),
/// with their attributes: one statement (the page as a subquery, joined
/// with the attributes).
pub async fn list(
    db: &impl ConnectionTrait,
    cond: Cond,
    sort: SortKey,
    desc: bool,
    after: Option<(serde_json::Value, String)>,
    limit: u64,
) -> Result<Vec<CustomerRecord>, Error> {
    let col = sort.column();
    let mut page: SelectStatement = Query::select();
    page.column((customers::Entity, Column::Id))
        .from(customers::Entity)
        .cond_where(cond);
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
        let c = Expr::col((customers::Entity, col));
        let i = Expr::col((customers::Entity, Column::Id));
        let keyset = if desc {
            Cond::any()
                .add(c.clone().lt(value.clone()))
                .add(Cond::all().add(c.eq(value)).add(i.lt(id)))
        } else {
            Cond::any()
                .add(c.clone().gt(value.clone()))
                .add(Cond::all().add(c.eq(value)).add(i.gt(id)))
        };
        page.cond_where(keyset);
    }
    let order = if desc { Order::Desc } else { Order::Asc };
    page.order_by((customers::Entity, col), order.clone())
        .order_by((customers::Entity, Column::Id), order.clone())
        .limit(limit);
    customers::Entity::find()
        .filter(Column::Id.in_subquery(page))
        .order_by(col, order.clone())
        .order_by(Column::Id, order)
        .find_with_related(attr::Entity)
        .all(db)
        .await?
        .into_iter()
        .map(|(m, attributes)| CustomerRecord::from_model(m, attributes))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use sea_orm::DatabaseConnection;
    use sea_orm_migration::MigratorTrait;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The ingest path's one customer lock is shared among writers: it
    /// conflicts with erasure's and merge's `FOR UPDATE`, never with
    /// another ingest.
    #[test]
    fn the_ingest_lock_is_a_key_share_lock() {
        use sea_orm::QueryTrait;
        let sql = share_existing_query(&["a".into(), "b".into()])
            .build(sea_orm::DbBackend::Postgres)
            .to_string();
        assert!(sql.ends_with("FOR KEY SHARE"), "{sql}");
        assert!(sql.contains("ORDER BY"), "{sql}");
        assert!(
            !sql.contains("FOR UPDATE") && !sql.contains("NO KEY UPDATE"),
            "{sql}"
        );
    }

    fn record(email: &str, attrs: &[(&str, AttributeValue)]) -> CustomerRecord {
        let now = from_micros(1_764_000_000_000_000);
        CustomerRecord {
            id: CustomerId::new(),
            external_id: None,
            email: Some(email.into()),
            display_name: format!("Customer {email}"),
            demographics: Demographics {
                occupation: Some("pilot".into()),
                gender: Some(Gender::Female),
                ..Default::default()
            },
            attributes: attrs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            stage: Stage::Approach,
            stage_change_time: now,
            create_time: now,
            update_time: now,
            version: 1,
            merged_from: Vec::new(),
            reimported_after_erasure: false,
            acquisition_campaign: None,
        }
    }

    /// A migrated SQLite database whose statements are counted.
    async fn counted_db(dir: &std::path::Path) -> (DatabaseConnection, Arc<AtomicUsize>) {
        let config = clm_platform::config::Config::defaults("customer", dir);
        let mut db = clm_platform::db::connect(&config.database).await.unwrap();
        crate::store::Migrator::up(&db, None).await.unwrap();
        let statements = Arc::new(AtomicUsize::new(0));
        let counter = statements.clone();
        db.set_metric_callback(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        (db, statements)
    }

    #[tokio::test]
    async fn a_customer_and_a_page_are_each_read_in_one_statement() {
        let dir = tempfile::tempdir().unwrap();
        let (db, statements) = counted_db(dir.path()).await;
        let with_attrs = record(
            "a@example.com",
            &[
                ("plan", AttributeValue::String("pro".into())),
                ("seats", AttributeValue::Number(12.0)),
                ("trial", AttributeValue::Bool(false)),
            ],
        );
        let without = record("b@example.com", &[]);
        insert_many(&db, &[with_attrs.clone(), without.clone()])
            .await
            .unwrap();

        statements.store(0, Ordering::SeqCst);
        assert_eq!(get(&db, with_attrs.id).await.unwrap(), with_attrs);
        assert_eq!(statements.load(Ordering::SeqCst), 1, "GetCustomer");
        assert_eq!(get(&db, without.id).await.unwrap(), without);

        statements.store(0, Ordering::SeqCst);
        let page = list(&db, Cond::all(), SortKey::CreateTime, false, None, 10)
            .await
            .unwrap();
        assert_eq!(statements.load(Ordering::SeqCst), 1, "ListCustomers");
        let mut expected = vec![with_attrs, without];
        expected.sort_by_key(|r| r.id.to_string());
        assert_eq!(page, expected, "same create time: ordered by id");

        assert!(matches!(
            get(&db, CustomerId::new()).await,
            Err(Error::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn a_page_limits_customers_not_attribute_rows() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _) = counted_db(dir.path()).await;
        let attrs: Vec<(String, AttributeValue)> = (0..5)
            .map(|i| (format!("k{i}"), AttributeValue::Number(f64::from(i))))
            .collect();
        let attrs: Vec<(&str, AttributeValue)> =
            attrs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let records: Vec<CustomerRecord> = (0..3)
            .map(|i| record(&format!("c{i}@example.com"), &attrs))
            .collect();
        insert_many(&db, &records).await.unwrap();
        let page = list(&db, Cond::all(), SortKey::CreateTime, false, None, 2)
            .await
            .unwrap();
        assert_eq!(page.len(), 2, "two customers, not two joined rows");
        assert!(page.iter().all(|r| r.attributes.len() == 5));
    }
}
