//! Touchpoints: a set-based, idempotent insert, the lookup of a batch's
//! event ids that tells duplicates from conflicts, and the timeline query.

use super::n;
use chrono::{DateTime, Utc};
use clm_domain::ids::CustomerId;
use clm_domain::money::Money;
use clm_domain::touchpoint::{Touchpoint, TouchpointKind};
use clm_platform::Error;
use clm_platform::db::{from_micros, to_micros};
use sea_orm::ConnectionTrait;
use sea_orm::sea_query::{Cond, Expr, ExprTrait, OnConflict, Order, Query};
use std::collections::{HashMap, HashSet};

/// A stored touchpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TouchpointRecord {
    /// The customer.
    pub customer: CustomerId,
    /// The event.
    pub touchpoint: Touchpoint,
    /// When it was recorded.
    pub record_time: DateTime<Utc>,
}

const COLS: [&str; 14] = [
    "event_id",
    "customer_id",
    "kind",
    "custom_type",
    "occurred_us",
    "record_us",
    "usage_ms",
    "product",
    "feature",
    "revenue_minor",
    "currency",
    "campaign",
    "channel",
    "properties",
];

/// Inserts the touchpoints whose event id is new, in one statement, and
/// returns their event ids. Nothing else: the report rollups
/// ([`super::activity`], [`super::journeys`]) are kept by the report
/// projection ([`crate::projection`]) from the `TouchpointRecorded` events
/// the caller emits in the same transaction, so concurrent writers of the
/// same customers never wait on each other's rollup rows.
pub async fn insert_new(
    db: &impl ConnectionTrait,
    records: &[&TouchpointRecord],
) -> Result<HashSet<String>, Error> {
    if records.is_empty() {
        return Ok(HashSet::new());
    }
    if clm_platform::db::is_postgres(db) {
        insert_new_postgres(db, records).await
    } else {
        insert_new_sqlite(db, records).await
    }
}

async fn insert_new_sqlite(
    db: &impl ConnectionTrait,
    records: &[&TouchpointRecord],
) -> Result<HashSet<String>, Error> {
    let mut insert = Query::insert();
    insert.into_table(n("touchpoints")).columns(COLS.map(n));
    for r in records {
        let t = &r.touchpoint;
        insert.values_panic([
            t.event_id.clone().into(),
            r.customer.to_string().into(),
            t.kind.code().into(),
            t.custom_type.clone().into(),
            to_micros(t.occurred_time).into(),
            to_micros(r.record_time).into(),
            t.usage_millis.into(),
            t.product.clone().into(),
            t.feature.clone().into(),
            t.revenue.as_ref().map(|m| m.amount_minor).into(),
            t.revenue.as_ref().map(|m| m.currency.clone()).into(),
            t.campaign.clone().into(),
            t.channel.clone().into(),
            properties_json(t).into(),
        ]);
    }
    insert
        .on_conflict(OnConflict::column(n("event_id")).do_nothing().to_owned())
        .returning_col(n("event_id"));
    let rows = db.query_all(&insert).await?;
    rows.iter()
        .map(|r| r.try_get::<String>("", "event_id").map_err(Error::from))
        .collect()
}

fn properties_json(t: &Touchpoint) -> Option<String> {
    if t.properties.is_empty() {
        None
    } else {
        serde_json::to_string(&t.properties).ok()
    }
}

/// PostgreSQL: the whole batch as one JSON parameter expanded by
/// `json_to_recordset`: one small statement to parse and plan instead of
/// 14 bind parameters a row.
async fn insert_new_postgres(
    db: &impl ConnectionTrait,
    records: &[&TouchpointRecord],
) -> Result<HashSet<String>, Error> {
    #[derive(serde::Serialize)]
    struct Row<'a> {
        event_id: &'a str,
        customer_id: String,
        kind: i16,
        custom_type: Option<&'a str>,
        occurred_us: i64,
        record_us: i64,
        usage_ms: Option<i64>,
        product: Option<&'a str>,
        feature: Option<&'a str>,
        revenue_minor: Option<i64>,
        currency: Option<&'a str>,
        campaign: Option<&'a str>,
        channel: Option<&'a str>,
        properties: Option<String>,
    }
    // Serialized straight from borrowed rows: no JSON tree in between.
    let rows: Vec<Row<'_>> = records
        .iter()
        .map(|r| {
            let t = &r.touchpoint;
            Row {
                event_id: &t.event_id,
                customer_id: r.customer.to_string(),
                kind: t.kind.code(),
                custom_type: t.custom_type.as_deref(),
                occurred_us: to_micros(t.occurred_time),
                record_us: to_micros(r.record_time),
                usage_ms: t.usage_millis,
                product: t.product.as_deref(),
                feature: t.feature.as_deref(),
                revenue_minor: t.revenue.as_ref().map(|m| m.amount_minor),
                currency: t.revenue.as_ref().map(|m| m.currency.as_str()),
                campaign: t.campaign.as_deref(),
                channel: t.channel.as_deref(),
                properties: properties_json(t),
            }
        })
        .collect();
    let rows = serde_json::to_string(&rows).map_err(Error::internal)?;
    let cols = COLS.join(", ");
    let sql = format!(
        "INSERT INTO touchpoints ({cols}) SELECT {cols} FROM json_to_recordset($1::json) AS x(\
         event_id text, customer_id text, kind int2, custom_type text, occurred_us int8, record_us int8, \
         usage_ms int8, product text, feature text, revenue_minor int8, currency text, campaign text, \
         channel text, properties text) ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
    );
    let rows = db
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            sql,
            [rows.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| r.try_get::<String>("", "event_id").map_err(Error::from))
        .collect()
}

/// Up to `limit` touchpoints of `customer`, newest first, after the
/// position `(occurred_us, event_id)`, optionally of one kind.
pub async fn list(
    db: &impl ConnectionTrait,
    customer: CustomerId,
    kind: Option<TouchpointKind>,
    after: Option<(i64, String)>,
    limit: u64,
) -> Result<Vec<TouchpointRecord>, Error> {
    let mut q = Query::select();
    q.columns(COLS.map(n))
        .from(n("touchpoints"))
        .and_where(Expr::col(n("customer_id")).eq(customer.to_string()));
    if let Some(k) = kind {
        q.and_where(Expr::col(n("kind")).eq(k.code()));
    }
    if let Some((t, id)) = after {
        q.cond_where(
            Cond::any().add(Expr::col(n("occurred_us")).lt(t)).add(
                Cond::all()
                    .add(Expr::col(n("occurred_us")).eq(t))
                    .add(Expr::col(n("event_id")).lt(id)),
            ),
        );
    }
    q.order_by(n("occurred_us"), Order::Desc)
        .order_by(n("event_id"), Order::Desc)
        .limit(limit);
    let rows = db.query_all(&q).await?;
    rows.iter().map(from_row).collect()
}

/// The stored touchpoints holding any of `event_ids`, by event id (one query).
pub async fn existing(
    db: &impl ConnectionTrait,
    event_ids: &[&str],
) -> Result<HashMap<String, TouchpointRecord>, Error> {
    if event_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let mut q = Query::select();
    q.columns(COLS.map(n))
        .from(n("touchpoints"))
        .and_where(clm_platform::bulk::is_in_texts(
            db,
            "event_id",
            &event_ids
                .iter()
                .map(|s| (*s).to_owned())
                .collect::<Vec<_>>(),
        ));
    let rows = db.query_all(&q).await?;
    rows.iter()
        .map(|r| from_row(r).map(|t| (t.touchpoint.event_id.clone(), t)))
        .collect()
}

fn from_row(r: &sea_orm::QueryResult) -> Result<TouchpointRecord, Error> {
    let customer: String = r.try_get("", "customer_id")?;
    let kind: i16 = r.try_get("", "kind")?;
    let revenue: Option<i64> = r.try_get("", "revenue_minor")?;
    let currency: Option<String> = r.try_get("", "currency")?;
    let properties: Option<String> = r.try_get("", "properties")?;
    Ok(TouchpointRecord {
        customer: CustomerId::parse_id("customer_id", &customer).map_err(Error::internal)?,
        record_time: from_micros(r.try_get("", "record_us")?),
        touchpoint: Touchpoint {
            event_id: r.try_get("", "event_id")?,
            kind: TouchpointKind::from_code(kind)
                .ok_or_else(|| Error::internal(format!("stored kind {kind}")))?,
            custom_type: r.try_get("", "custom_type")?,
            occurred_time: from_micros(r.try_get("", "occurred_us")?),
            usage_millis: r.try_get("", "usage_ms")?,
            product: r.try_get("", "product")?,
            feature: r.try_get("", "feature")?,
            revenue: revenue.zip(currency).map(|(amount_minor, currency)| Money {
                currency,
                amount_minor,
            }),
            campaign: r.try_get("", "campaign")?,
            channel: r.try_get("", "channel")?,
            properties: properties
                .and_then(|p| serde_json::from_str(&p).ok())
                .unwrap_or_default(),
        },
    })
}
