//! Touchpoints: a set-based, idempotent insert and the timeline query.

use super::n;
use chrono::{DateTime, Utc};
use clm_domain::ids::CustomerId;
use clm_domain::money::Money;
use clm_domain::touchpoint::{Touchpoint, TouchpointKind};
use clm_platform::Error;
use clm_platform::db::{from_micros, to_micros};
use sea_orm::ConnectionTrait;
use sea_orm::sea_query::{Cond, Expr, ExprTrait, OnConflict, Order, Query};
use std::collections::HashSet;

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
/// returns the event ids actually inserted.
pub async fn insert_new(
    db: &impl ConnectionTrait,
    records: &[TouchpointRecord],
) -> Result<HashSet<String>, Error> {
    if records.is_empty() {
        return Ok(HashSet::new());
    }
    let mut insert = Query::insert();
    insert.into_table(n("touchpoints")).columns(COLS.map(n));
    for r in records {
        let t = &r.touchpoint;
        let properties = if t.properties.is_empty() {
            None
        } else {
            serde_json::to_string(&t.properties).ok()
        };
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
            properties.into(),
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
    rows.iter()
        .map(|r| {
            let kind: i16 = r.try_get("", "kind")?;
            let revenue: Option<i64> = r.try_get("", "revenue_minor")?;
            let currency: Option<String> = r.try_get("", "currency")?;
            let properties: Option<String> = r.try_get("", "properties")?;
            Ok(TouchpointRecord {
                customer,
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
        })
        .collect()
}
