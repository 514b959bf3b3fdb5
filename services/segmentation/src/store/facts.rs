//! The facts projection: what segment rules read about customers, fed by
//! the customer change stream (`fact_*` tables). Writes are set-based (one
//! statement per batch and table); [`load`] reads the facts of a batch of
//! customers into [`FactSet`]s for the in-memory evaluator.

use super::{chunks, n};
use crate::catalog::{CHANNELS, PURPOSES, granted_by_default};
use crate::sql::attr_kind;
use chrono::NaiveDate;
use clm_domain::attributes::AttributeValue;
use clm_domain::demographics::Gender;
use clm_domain::lifecycle::Stage;
use clm_domain::money::Money;
use clm_domain::rules::FactSet;
use clm_domain::touchpoint::{Touchpoint, TouchpointKind};
use clm_platform::db::{from_micros, rows_per_statement, to_micros};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use sea_orm::{ConnectionTrait, DbErr};
use std::collections::{BTreeMap, HashMap};

/// A customer's profile facts (what the customer stream carries).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    /// Bare customer id.
    pub id: String,
    /// E-mail.
    pub email: Option<String>,
    /// Display name.
    pub display_name: Option<String>,
    /// Birth date.
    pub birth_date: Option<NaiveDate>,
    /// Gender.
    pub gender: Option<Gender>,
    /// Yearly income.
    pub income: Option<Money>,
    /// Occupation.
    pub occupation: Option<String>,
    /// Stage and when it was entered.
    pub stage: Option<(Stage, chrono::DateTime<chrono::Utc>)>,
    /// Custom attributes.
    pub attributes: BTreeMap<String, AttributeValue>,
}

/// A touchpoint of a customer.
#[derive(Debug, Clone, PartialEq)]
pub struct TouchRow {
    /// Bare customer id.
    pub customer: String,
    /// The touchpoint.
    pub touchpoint: Touchpoint,
}

const PROFILE_COLS: [&str; 10] = [
    "customer_id",
    "email",
    "display_name",
    "birth_date",
    "gender",
    "income_minor",
    "income_currency",
    "occupation",
    "stage",
    "stage_us",
];

/// Writes profiles (the last of each customer wins) and replaces their attributes.
pub async fn upsert_profiles(db: &impl ConnectionTrait, profiles: &[Profile]) -> Result<(), DbErr> {
    let mut last: BTreeMap<&str, &Profile> = BTreeMap::new();
    for p in profiles {
        last.insert(p.id.as_str(), p);
    }
    let rows: Vec<&Profile> = last.into_values().collect();
    for chunk in rows.chunks(rows_per_statement(PROFILE_COLS.len())) {
        let mut insert = Query::insert();
        insert
            .into_table(n("fact_customers"))
            .columns(PROFILE_COLS.map(n))
            .on_conflict(
                OnConflict::column(n("customer_id"))
                    .update_columns(PROFILE_COLS[1..].iter().map(|c| n(c)))
                    .to_owned(),
            );
        for p in chunk {
            insert.values_panic([
                p.id.clone().into(),
                p.email.clone().into(),
                p.display_name.clone().into(),
                p.birth_date
                    .map(|d| d.format("%Y-%m-%d").to_string())
                    .into(),
                p.gender.map(Gender::code).into(),
                p.income.as_ref().map(|m| m.amount_minor).into(),
                p.income.as_ref().map(|m| m.currency.clone()).into(),
                p.occupation.clone().into(),
                p.stage.map(|(s, _)| s.code()).into(),
                p.stage.map(|(_, t)| to_micros(t)).into(),
            ]);
        }
        db.execute(&insert).await?;
    }
    let ids: Vec<String> = rows.iter().map(|p| p.id.clone()).collect();
    delete_where_customer(db, "fact_attributes", &ids).await?;
    let attrs: Vec<(&str, &str, &AttributeValue)> = rows
        .iter()
        .flat_map(|p| {
            p.attributes
                .iter()
                .map(|(k, v)| (p.id.as_str(), k.as_str(), v))
        })
        .collect();
    for chunk in attrs.chunks(rows_per_statement(7)) {
        let mut insert = Query::insert();
        insert.into_table(n("fact_attributes")).columns(
            [
                "customer_id",
                "key",
                "kind",
                "str_value",
                "num_value",
                "bool_value",
                "time_us",
            ]
            .map(n),
        );
        for (id, key, v) in chunk {
            let (kind, s, num, b, time) = match v {
                AttributeValue::String(s) => (attr_kind::STRING, Some(s.clone()), None, None, None),
                AttributeValue::Number(x) => (attr_kind::NUMBER, None, Some(*x), None, None),
                AttributeValue::Bool(x) => (attr_kind::BOOL, None, None, Some(*x), None),
                AttributeValue::Timestamp(t) => {
                    (attr_kind::TIMESTAMP, None, None, None, Some(to_micros(*t)))
                }
            };
            insert.values_panic([
                (*id).into(),
                (*key).into(),
                kind.into(),
                s.into(),
                num.into(),
                b.into(),
                time.into(),
            ]);
        }
        db.execute(&insert).await?;
    }
    Ok(())
}

/// Sets customers' stages (the last of each customer wins).
pub async fn set_stages(
    db: &impl ConnectionTrait,
    stages: &[(String, Stage, chrono::DateTime<chrono::Utc>)],
) -> Result<(), DbErr> {
    let mut last = BTreeMap::new();
    for (id, s, t) in stages {
        last.insert(id.as_str(), (*s, *t));
    }
    let rows: Vec<_> = last.into_iter().collect();
    for chunk in rows.chunks(rows_per_statement(3)) {
        let mut insert = Query::insert();
        insert
            .into_table(n("fact_customers"))
            .columns(["customer_id", "stage", "stage_us"].map(n))
            .on_conflict(
                OnConflict::column(n("customer_id"))
                    .update_columns([n("stage"), n("stage_us")])
                    .to_owned(),
            );
        for (id, (s, t)) in chunk {
            insert.values_panic([(*id).into(), s.code().into(), to_micros(*t).into()]);
        }
        db.execute(&insert).await?;
    }
    Ok(())
}

/// One score value of a customer: (customer, score name, value, grade).
pub type ScoreRow = (String, String, f64, String);

/// Applies score values in order (the last per customer and score wins),
/// and each customer's latest grade, set-based. Only customers the
/// projection holds are touched: a score that arrives after the customer's
/// erasure (the two streams are independent) must not bring a row back.
/// Returns the customers updated.
pub async fn set_scores(
    db: &impl ConnectionTrait,
    rows: &[ScoreRow],
) -> Result<Vec<String>, DbErr> {
    let ids: Vec<String> = rows
        .iter()
        .map(|(id, ..)| id.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut known = std::collections::BTreeSet::new();
    for chunk in chunks(&ids) {
        let q = Query::select()
            .column(n("customer_id"))
            .from(n("fact_customers"))
            .and_where(Expr::col(n("customer_id")).is_in(chunk.iter().cloned()))
            .to_owned();
        for row in db.query_all(&q).await? {
            known.insert(row.try_get::<String>("", "customer_id")?);
        }
    }
    let mut values = BTreeMap::new();
    let mut grades = BTreeMap::new();
    for (id, name, value, grade) in rows.iter().filter(|(id, ..)| known.contains(id)) {
        values.insert((id.as_str(), name.as_str()), *value);
        if !grade.is_empty() {
            grades.insert(id.as_str(), grade.as_str());
        }
    }
    let values: Vec<_> = values.into_iter().collect();
    for chunk in values.chunks(rows_per_statement(3)) {
        let mut insert = Query::insert();
        insert
            .into_table(n("fact_scores"))
            .columns(["customer_id", "name", "value"].map(n))
            .on_conflict(
                OnConflict::columns([n("customer_id"), n("name")])
                    .update_column(n("value"))
                    .to_owned(),
            );
        for ((id, name), value) in chunk {
            insert.values_panic([(*id).into(), (*name).into(), (*value).into()]);
        }
        db.execute(&insert).await?;
    }
    let grades: Vec<_> = grades.into_iter().collect();
    for chunk in grades.chunks(rows_per_statement(2)) {
        let mut insert = Query::insert();
        insert
            .into_table(n("fact_customers"))
            .columns(["customer_id", "grade"].map(n))
            .on_conflict(
                OnConflict::column(n("customer_id"))
                    .update_column(n("grade"))
                    .to_owned(),
            );
        for (id, grade) in chunk {
            insert.values_panic([(*id).into(), (*grade).into()]);
        }
        db.execute(&insert).await?;
    }
    Ok(known.into_iter().collect())
}

/// One consent cell: granted, denied, or unset (`None`, the row is removed).
pub type ConsentCell = (String, String, String, Option<bool>);

/// Applies consent cells (customer, purpose, channel, state) in order.
pub async fn set_consents(db: &impl ConnectionTrait, cells: &[ConsentCell]) -> Result<(), DbErr> {
    let mut last = BTreeMap::new();
    for (c, p, ch, g) in cells {
        last.insert((c.as_str(), p.as_str(), ch.as_str()), *g);
    }
    let (set, unset): (Vec<_>, Vec<_>) = last.into_iter().partition(|(_, g)| g.is_some());
    for chunk in set.chunks(rows_per_statement(4)) {
        let mut insert = Query::insert();
        insert
            .into_table(n("fact_consents"))
            .columns(["customer_id", "purpose", "channel", "granted"].map(n))
            .on_conflict(
                OnConflict::columns([n("customer_id"), n("purpose"), n("channel")])
                    .update_column(n("granted"))
                    .to_owned(),
            );
        for ((c, p, ch), g) in chunk {
            insert.values_panic([
                (*c).into(),
                (*p).into(),
                (*ch).into(),
                g.unwrap_or(false).into(),
            ]);
        }
        db.execute(&insert).await?;
    }
    for chunk in unset.chunks(rows_per_statement(3)) {
        let tuples = chunk
            .iter()
            .map(|((c, p, ch), _)| Expr::tuple([Expr::val(*c), Expr::val(*p), Expr::val(*ch)]));
        let delete = Query::delete()
            .from_table(n("fact_consents"))
            .and_where(
                Expr::tuple([
                    Expr::col(n("customer_id")),
                    Expr::col(n("purpose")),
                    Expr::col(n("channel")),
                ])
                .is_in(tuples),
            )
            .to_owned();
        db.execute(&delete).await?;
    }
    Ok(())
}

/// The columns of `fact_touchpoints`, as inserted and as loaded.
const TOUCH_COLS: [&str; 12] = [
    "event_id",
    "customer_id",
    "kind",
    "custom_type",
    "occurred_us",
    "product",
    "feature",
    "campaign",
    "channel",
    "revenue_minor",
    "revenue_currency",
    "usage_ms",
];

/// Inserts touchpoints (idempotent by event id) and their properties.
pub async fn insert_touchpoints(db: &impl ConnectionTrait, rows: &[TouchRow]) -> Result<(), DbErr> {
    for chunk in rows.chunks(rows_per_statement(TOUCH_COLS.len())) {
        let mut insert = Query::insert();
        insert
            .into_table(n("fact_touchpoints"))
            .columns(TOUCH_COLS.map(n))
            .on_conflict(OnConflict::column(n("event_id")).do_nothing().to_owned());
        for r in chunk {
            let tp = &r.touchpoint;
            insert.values_panic([
                tp.event_id.clone().into(),
                r.customer.clone().into(),
                tp.kind.code().into(),
                tp.custom_type.clone().into(),
                to_micros(tp.occurred_time).into(),
                tp.product.clone().into(),
                tp.feature.clone().into(),
                tp.campaign.clone().into(),
                tp.channel.clone().into(),
                tp.revenue.as_ref().map(|m| m.amount_minor).into(),
                tp.revenue.as_ref().map(|m| m.currency.clone()).into(),
                tp.usage_millis.into(),
            ]);
        }
        db.execute(&insert).await?;
    }
    let props: Vec<(&str, &str, &str)> = rows
        .iter()
        .flat_map(|r| {
            r.touchpoint
                .properties
                .iter()
                .map(|(k, v)| (r.touchpoint.event_id.as_str(), k.as_str(), v.as_str()))
        })
        .collect();
    for chunk in props.chunks(rows_per_statement(3)) {
        let mut insert = Query::insert();
        insert
            .into_table(n("fact_touch_props"))
            .columns(["event_id", "key", "value"].map(n))
            .on_conflict(
                OnConflict::columns([n("event_id"), n("key")])
                    .do_nothing()
                    .to_owned(),
            );
        for (e, k, v) in chunk {
            insert.values_panic([(*e).into(), (*k).into(), (*v).into()]);
        }
        db.execute(&insert).await?;
    }
    Ok(())
}

async fn delete_where_customer(
    db: &impl ConnectionTrait,
    table: &str,
    ids: &[String],
) -> Result<(), DbErr> {
    for chunk in chunks(ids) {
        let delete = Query::delete()
            .from_table(n(table))
            .and_where(Expr::col(n("customer_id")).is_in(chunk.iter().cloned()))
            .to_owned();
        db.execute(&delete).await?;
    }
    Ok(())
}

/// Moves the touchpoints of `merged` to `survivor` and forgets the merged
/// customers' other facts (the survivor's profile arrives with the merge).
pub async fn merge(
    db: &impl ConnectionTrait,
    survivor: &str,
    merged: &[String],
) -> Result<(), DbErr> {
    for chunk in chunks(merged) {
        let update = Query::update()
            .table(n("fact_touchpoints"))
            .value(n("customer_id"), survivor)
            .and_where(Expr::col(n("customer_id")).is_in(chunk.iter().cloned()))
            .to_owned();
        db.execute(&update).await?;
    }
    for table in [
        "fact_customers",
        "fact_attributes",
        "fact_consents",
        "fact_scores",
    ] {
        delete_where_customer(db, table, merged).await?;
    }
    Ok(())
}

/// Deletes every fact of `ids`.
pub async fn erase(db: &impl ConnectionTrait, ids: &[String]) -> Result<(), DbErr> {
    for chunk in chunks(ids) {
        let events = Query::select()
            .column(n("event_id"))
            .from(n("fact_touchpoints"))
            .and_where(Expr::col(n("customer_id")).is_in(chunk.iter().cloned()))
            .to_owned();
        let delete = Query::delete()
            .from_table(n("fact_touch_props"))
            .and_where(Expr::col(n("event_id")).in_subquery(events))
            .to_owned();
        db.execute(&delete).await?;
    }
    for table in [
        "fact_touchpoints",
        "fact_customers",
        "fact_attributes",
        "fact_consents",
        "fact_scores",
    ] {
        delete_where_customer(db, table, ids).await?;
    }
    Ok(())
}

/// The facts of those of `ids` that have a profile row, including their current segment memberships (`segments/{id}`).
pub async fn load(
    db: &impl ConnectionTrait,
    ids: &[String],
) -> Result<HashMap<String, FactSet>, DbErr> {
    // Only customers with a profile row: the backfill query starts there too.
    let mut out: HashMap<String, FactSet> = HashMap::with_capacity(ids.len());
    for chunk in chunks(ids) {
        let within = || Expr::col(n("customer_id")).is_in(chunk.iter().cloned());
        let q = Query::select()
            .columns(
                [
                    "customer_id",
                    "email",
                    "display_name",
                    "birth_date",
                    "gender",
                    "income_minor",
                    "income_currency",
                    "occupation",
                    "stage",
                    "stage_us",
                    "grade",
                    "nps_last",
                    "csat_last",
                    "loyalty_tier",
                    "loyalty_balance",
                ]
                .map(n),
            )
            .from(n("fact_customers"))
            .and_where(within())
            .to_owned();
        for row in db.query_all(&q).await? {
            let id: String = row.try_get("", "customer_id")?;
            let fs = out.entry(id).or_insert_with(default_facts);
            fs.email = row.try_get("", "email")?;
            fs.display_name = row.try_get("", "display_name")?;
            let birth: Option<String> = row.try_get("", "birth_date")?;
            fs.demographics.birth_date =
                birth.and_then(|b| NaiveDate::parse_from_str(&b, "%Y-%m-%d").ok());
            let gender: Option<i16> = row.try_get("", "gender")?;
            fs.demographics.gender = gender.and_then(Gender::from_code);
            let minor: Option<i64> = row.try_get("", "income_minor")?;
            let currency: Option<String> = row.try_get("", "income_currency")?;
            fs.demographics.annual_income =
                minor.zip(currency).map(|(amount_minor, currency)| Money {
                    currency,
                    amount_minor,
                });
            fs.demographics.occupation = row.try_get("", "occupation")?;
            let stage: Option<i16> = row.try_get("", "stage")?;
            let stage_us: Option<i64> = row.try_get("", "stage_us")?;
            fs.stage = stage
                .and_then(Stage::from_code)
                .zip(stage_us.map(from_micros));
            fs.grade = row.try_get("", "grade")?;
            let nps: Option<i16> = row.try_get("", "nps_last")?;
            fs.nps_last = nps.and_then(|x| u8::try_from(x).ok());
            fs.csat_last = row.try_get("", "csat_last")?;
            fs.loyalty_tier = row.try_get("", "loyalty_tier")?;
            fs.loyalty_balance = row.try_get("", "loyalty_balance")?;
        }
        let q = Query::select()
            .columns(
                [
                    "customer_id",
                    "key",
                    "kind",
                    "str_value",
                    "num_value",
                    "bool_value",
                    "time_us",
                ]
                .map(n),
            )
            .from(n("fact_attributes"))
            .and_where(within())
            .to_owned();
        for row in db.query_all(&q).await? {
            let id: String = row.try_get("", "customer_id")?;
            let Some(fs) = out.get_mut(&id) else { continue };
            let key: String = row.try_get("", "key")?;
            let kind: i16 = row.try_get("", "kind")?;
            let v = match kind {
                attr_kind::STRING => row
                    .try_get::<Option<String>>("", "str_value")?
                    .map(AttributeValue::String),
                attr_kind::NUMBER => row
                    .try_get::<Option<f64>>("", "num_value")?
                    .map(AttributeValue::Number),
                attr_kind::BOOL => row
                    .try_get::<Option<bool>>("", "bool_value")?
                    .map(AttributeValue::Bool),
                _ => row
                    .try_get::<Option<i64>>("", "time_us")?
                    .map(|t| AttributeValue::Timestamp(from_micros(t))),
            };
            if let Some(v) = v {
                fs.attributes.insert(key, v);
            }
        }
        let q = Query::select()
            .columns(["customer_id", "purpose", "channel", "granted"].map(n))
            .from(n("fact_consents"))
            .and_where(within())
            .to_owned();
        for row in db.query_all(&q).await? {
            let id: String = row.try_get("", "customer_id")?;
            let Some(fs) = out.get_mut(&id) else { continue };
            let purpose: String = row.try_get("", "purpose")?;
            let channel: String = row.try_get("", "channel")?;
            let granted: bool = row.try_get("", "granted")?;
            if granted {
                fs.grant(&purpose, &channel);
            } else if let Some(set) = fs.consents.get_mut(&purpose) {
                set.remove(&channel);
            }
        }
        let q = Query::select()
            .columns(["customer_id", "name", "value"].map(n))
            .from(n("fact_scores"))
            .and_where(within())
            .to_owned();
        for row in db.query_all(&q).await? {
            let id: String = row.try_get("", "customer_id")?;
            let Some(fs) = out.get_mut(&id) else { continue };
            fs.scores
                .insert(row.try_get("", "name")?, row.try_get("", "value")?);
        }
        let q = Query::select()
            .columns(TOUCH_COLS.map(n))
            .from(n("fact_touchpoints"))
            .and_where(within())
            .to_owned();
        let mut by_event: HashMap<String, (String, usize)> = HashMap::new();
        for row in db.query_all(&q).await? {
            let id: String = row.try_get("", "customer_id")?;
            let Some(fs) = out.get_mut(&id) else { continue };
            let kind: i16 = row.try_get("", "kind")?;
            let Some(kind) = TouchpointKind::from_code(kind) else {
                continue;
            };
            let minor: Option<i64> = row.try_get("", "revenue_minor")?;
            let currency: Option<String> = row.try_get("", "revenue_currency")?;
            let event_id: String = row.try_get("", "event_id")?;
            by_event.insert(event_id.clone(), (id.clone(), fs.touchpoints.len()));
            fs.touchpoints.push(Touchpoint {
                event_id,
                kind,
                custom_type: row.try_get("", "custom_type")?,
                occurred_time: from_micros(row.try_get("", "occurred_us")?),
                usage_millis: row.try_get("", "usage_ms")?,
                product: row.try_get("", "product")?,
                feature: row.try_get("", "feature")?,
                revenue: minor.zip(currency).map(|(amount_minor, currency)| Money {
                    currency,
                    amount_minor,
                }),
                campaign: row.try_get("", "campaign")?,
                channel: row.try_get("", "channel")?,
                properties: BTreeMap::new(),
            });
        }
        if !by_event.is_empty() {
            let events = Query::select()
                .column(n("event_id"))
                .from(n("fact_touchpoints"))
                .and_where(within())
                .to_owned();
            let q = Query::select()
                .columns(["event_id", "key", "value"].map(n))
                .from(n("fact_touch_props"))
                .and_where(Expr::col(n("event_id")).in_subquery(events))
                .to_owned();
            for row in db.query_all(&q).await? {
                let event: String = row.try_get("", "event_id")?;
                if let Some((id, i)) = by_event.get(&event)
                    && let Some(tp) = out.get_mut(id).and_then(|fs| fs.touchpoints.get_mut(*i))
                {
                    tp.properties
                        .insert(row.try_get("", "key")?, row.try_get("", "value")?);
                }
            }
        }
        let q = Query::select()
            .columns(["customer_id", "segment_id"].map(n))
            .from(n("members"))
            .and_where(within())
            .to_owned();
        for row in db.query_all(&q).await? {
            let id: String = row.try_get("", "customer_id")?;
            let Some(fs) = out.get_mut(&id) else { continue };
            let seg: String = row.try_get("", "segment_id")?;
            fs.segments.insert(format!("segments/{seg}"));
        }
    }
    Ok(out)
}

/// The facts of a customer nobody told us anything about: the consents
/// granted by default (opt-out purposes) on every channel.
pub fn default_facts() -> FactSet {
    let mut fs = FactSet::default();
    for (p, _) in PURPOSES {
        if granted_by_default(p) {
            for (c, _) in CHANNELS {
                fs.grant(p, c);
            }
        }
    }
    fs
}

/// Records how fresh the facts are: the newest applied event's occurrence
/// and when it was applied.
pub async fn mark_fresh(
    db: &impl ConnectionTrait,
    event_us: i64,
    apply_us: i64,
) -> Result<(), DbErr> {
    let update = Query::update()
        .table(n("seg_meta"))
        .value(n("fresh_event_us"), event_us)
        .value(n("fresh_apply_us"), apply_us)
        .and_where(Expr::col(n("id")).eq(1))
        .to_owned();
    db.execute(&update).await?;
    Ok(())
}
