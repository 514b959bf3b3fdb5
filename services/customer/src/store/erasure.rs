//! Erasure: the request with its receipts
//! ([`erasure_requests`](super::entity::erasure_requests),
//! [`erasure_receipts`](super::entity::erasure_receipts)), the salted hashes
//! of erased identifiers, and [`forget`], which deletes and scrubs
//! everything the service holds about a customer.

use super::entity::{erasure_receipts as receipts, erasure_requests as requests};
use super::n;
use chrono::{DateTime, Utc};
use clm_domain::contact::Identifier;
use clm_domain::ids::CustomerId;
use clm_platform::Error;
use clm_platform::db::{from_micros, is_postgres, to_micros};
use sea_orm::sea_query::{Cond, Expr, ExprTrait, OnConflict, Query};
use sea_orm::{
    ActiveValue, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect,
};
use sha2::{Digest, Sha256};

clm_domain::resource_id!(
    /// Id of an erasure request.
    ErasureRequestId,
    "erasureRequests",
    "erasure request"
);

/// A stored erasure request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureRecord {
    /// Id.
    pub id: ErasureRequestId,
    /// The erased customer.
    pub customer: CustomerId,
    /// Who asked.
    pub requester: String,
    /// When.
    pub create_time: DateTime<Utc>,
    /// When the last expected receipt arrived.
    pub complete_time: Option<DateTime<Utc>>,
    /// The services whose receipts complete it.
    pub expected: Vec<String>,
    /// Receipts (service, when), in arrival order.
    pub receipts: Vec<(String, DateTime<Utc>)>,
}

/// Whether `receipts` hold one from every service of `expected`.
pub fn covers(expected: &[String], receipts: &[(String, DateTime<Utc>)]) -> bool {
    expected
        .iter()
        .all(|e| receipts.iter().any(|(service, _)| service == e))
}

impl ErasureRecord {
    fn from_model(m: requests::Model, mut r: Vec<receipts::Model>) -> Result<Self, Error> {
        r.sort_by_key(|x| (x.erase_us, x.service.clone()));
        Ok(Self {
            id: ErasureRequestId::parse_id("id", &m.id).map_err(Error::internal)?,
            customer: CustomerId::parse_id("customer_id", &m.customer_id)
                .map_err(Error::internal)?,
            requester: m.requester,
            create_time: from_micros(m.create_us),
            complete_time: m.complete_us.map(from_micros),
            expected: split_services(&m.expected_services),
            receipts: r
                .into_iter()
                .map(|x| (x.service, from_micros(x.erase_us)))
                .collect(),
        })
    }
}

/// Stores a new request with its receipts.
pub async fn insert(db: &impl ConnectionTrait, r: &ErasureRecord) -> Result<(), Error> {
    requests::Entity::insert(requests::ActiveModel {
        id: ActiveValue::Set(r.id.to_string()),
        customer_id: ActiveValue::Set(r.customer.to_string()),
        requester: ActiveValue::Set(r.requester.clone()),
        create_us: ActiveValue::Set(to_micros(r.create_time)),
        complete_us: ActiveValue::Set(r.complete_time.map(to_micros)),
        expected_services: ActiveValue::Set(r.expected.join(",")),
    })
    .exec_without_returning(db)
    .await?;
    if !r.receipts.is_empty() {
        receipts::Entity::insert_many(r.receipts.iter().map(|(service, at)| {
            receipts::ActiveModel {
                erasure_id: ActiveValue::Set(r.id.to_string()),
                service: ActiveValue::Set(service.clone()),
                erase_us: ActiveValue::Set(to_micros(*at)),
            }
        }))
        .exec_without_returning(db)
        .await?;
    }
    Ok(())
}

/// The request erasing `customer`, if there is one (one statement).
pub async fn of_customer(
    db: &impl ConnectionTrait,
    customer: CustomerId,
) -> Result<Option<ErasureRecord>, Error> {
    requests::Entity::find()
        .filter(requests::Column::CustomerId.eq(customer.to_string()))
        .find_with_related(receipts::Entity)
        .all(db)
        .await?
        .pop()
        .map(|(m, r)| ErasureRecord::from_model(m, r))
        .transpose()
}

/// One request with its receipts (one statement), or NOT_FOUND.
pub async fn get(db: &impl ConnectionTrait, id: ErasureRequestId) -> Result<ErasureRecord, Error> {
    let (m, r) = requests::Entity::find_by_id(id.to_string())
        .find_with_related(receipts::Entity)
        .all(db)
        .await?
        .pop()
        .ok_or_else(|| Error::NotFound(id.name()))?;
    ErasureRecord::from_model(m, r)
}

/// Up to `limit` requests before `after` (create µs, id), newest first,
/// with their receipts (one statement).
pub async fn list(
    db: &impl ConnectionTrait,
    after: Option<(i64, String)>,
    limit: u64,
) -> Result<Vec<ErasureRecord>, Error> {
    let mut page = Query::select();
    page.column((requests::Entity, requests::Column::Id))
        .from(requests::Entity);
    if let Some((us, id)) = after {
        page.cond_where(
            Cond::any()
                .add(Expr::col((requests::Entity, requests::Column::CreateUs)).lt(us))
                .add(
                    Cond::all()
                        .add(Expr::col((requests::Entity, requests::Column::CreateUs)).eq(us))
                        .add(Expr::col((requests::Entity, requests::Column::Id)).lt(id)),
                ),
        );
    }
    page.order_by(
        (requests::Entity, requests::Column::CreateUs),
        sea_orm::sea_query::Order::Desc,
    )
    .order_by(
        (requests::Entity, requests::Column::Id),
        sea_orm::sea_query::Order::Desc,
    )
    .limit(limit);
    requests::Entity::find()
        .filter(requests::Column::Id.in_subquery(page))
        .order_by_desc(requests::Column::CreateUs)
        .order_by_desc(requests::Column::Id)
        .find_with_related(receipts::Entity)
        .all(db)
        .await?
        .into_iter()
        .map(|(m, r)| ErasureRecord::from_model(m, r))
        .collect()
}

fn split_services(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect()
}

/// One service's receipt for an erasure request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The request it answers.
    pub erasure: ErasureRequestId,
    /// The service that erased its data.
    pub service: String,
    /// When it did.
    pub erase_time: DateTime<Utc>,
}

/// Records `receipts` on their requests and completes (at `now`) every
/// request whose expected receipts are then all in. A receipt already
/// recorded for the same request and service is kept as it was, so a
/// redelivered event changes nothing. Answers the receipts whose request
/// is unknown (they are not recorded). Set-based: one statement each to
/// read the requests, insert the receipts, read the receipts of the
/// requests still open and complete them, whatever the batch size.
pub async fn record_receipts(
    db: &impl ConnectionTrait,
    receipts: &[Receipt],
    now: DateTime<Utc>,
) -> Result<Vec<Receipt>, Error> {
    if receipts.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids: Vec<String> = receipts.iter().map(|r| r.erasure.to_string()).collect();
    ids.sort();
    ids.dedup();
    // The requests are locked (in id order) until the transaction ends:
    // receipts from two services arriving at once then take turns, and the
    // second sees the first's receipt when it counts them. Without the
    // lock each could count the other's as missing and neither complete it.
    let mut find = requests::Entity::find()
        .filter(requests::Column::Id.is_in(ids))
        .order_by_asc(requests::Column::Id);
    if clm_platform::db::is_postgres(db) {
        find = find.lock_exclusive();
    }
    let known: Vec<requests::Model> = find.all(db).await?;
    let (found, unknown): (Vec<&Receipt>, Vec<&Receipt>) = receipts
        .iter()
        .partition(|r| known.iter().any(|k| k.id == r.erasure.to_string()));
    if !found.is_empty() {
        for chunk in found.chunks(clm_platform::db::rows_per_statement(3)) {
            receipts::Entity::insert_many(chunk.iter().map(|r| receipts::ActiveModel {
                erasure_id: ActiveValue::Set(r.erasure.to_string()),
                service: ActiveValue::Set(r.service.clone()),
                erase_us: ActiveValue::Set(to_micros(r.erase_time)),
            }))
            .on_conflict(
                OnConflict::columns([receipts::Column::ErasureId, receipts::Column::Service])
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
        }
        let open: Vec<&requests::Model> =
            known.iter().filter(|k| k.complete_us.is_none()).collect();
        if !open.is_empty() {
            let held: Vec<(String, String)> = receipts::Entity::find()
                .select_only()
                .column(receipts::Column::ErasureId)
                .column(receipts::Column::Service)
                .filter(receipts::Column::ErasureId.is_in(open.iter().map(|k| k.id.clone())))
                .into_tuple()
                .all(db)
                .await?;
            let complete: Vec<String> = open
                .iter()
                .filter(|k| {
                    split_services(&k.expected_services)
                        .iter()
                        .all(|e| held.iter().any(|(id, s)| *id == k.id && s == e))
                })
                .map(|k| k.id.clone())
                .collect();
            if !complete.is_empty() {
                requests::Entity::update_many()
                    .col_expr(requests::Column::CompleteUs, Expr::value(to_micros(now)))
                    .filter(requests::Column::Id.is_in(complete))
                    .filter(requests::Column::CompleteUs.is_null())
                    .exec(db)
                    .await?;
            }
        }
    }
    Ok(unknown.into_iter().cloned().collect())
}

/// This installation's salt for identifier hashes, made on first use.
pub async fn salt(db: &impl ConnectionTrait) -> Result<String, Error> {
    let fresh = format!(
        "{}{}",
        clm_domain::ids::Uuid::new_v4().simple(),
        clm_domain::ids::Uuid::new_v4().simple()
    );
    let mut insert = Query::insert();
    insert
        .into_table(n("erasure_salt"))
        .columns([n("id"), n("salt")])
        .values_panic([1.into(), fresh.into()])
        .on_conflict(OnConflict::column(n("id")).do_nothing().to_owned());
    db.execute(&insert).await?;
    let row = db
        .query_one(
            Query::select()
                .column(n("salt"))
                .from(n("erasure_salt"))
                .and_where(Expr::col(n("id")).eq(1)),
        )
        .await?
        .ok_or_else(|| Error::internal("erasure salt missing"))?;
    Ok(row.try_get("", "salt")?)
}

/// The salt, if the schema has made it (read-only: safe on a reader).
pub async fn existing_salt(db: &impl ConnectionTrait) -> Result<Option<String>, Error> {
    let row = db
        .query_one(
            Query::select()
                .column(n("salt"))
                .from(n("erasure_salt"))
                .and_where(Expr::col(n("id")).eq(1)),
        )
        .await?;
    Ok(row.map(|r| r.try_get("", "salt")).transpose()?)
}

/// The salted hash kept of an erased identifier.
pub fn identifier_hash(salt: &str, i: &Identifier) -> String {
    let digest = Sha256::new()
        .chain_update(salt.as_bytes())
        .chain_update([0u8])
        .chain_update(i.kind.code().to_be_bytes())
        .chain_update(i.value.as_bytes())
        .finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Keeps the salted hashes of `ids` for erasure `erasure` (one statement).
pub async fn keep_hashes(
    db: &impl ConnectionTrait,
    erasure: ErasureRequestId,
    salt: &str,
    ids: &[Identifier],
) -> Result<(), Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut insert = Query::insert();
    insert
        .into_table(n("erased_identifiers"))
        .columns([n("kind"), n("hash"), n("erasure_id")])
        .on_conflict(
            OnConflict::columns([n("kind"), n("hash")])
                .do_nothing()
                .to_owned(),
        );
    for i in ids {
        insert.values_panic([
            i.kind.code().into(),
            identifier_hash(salt, i).into(),
            erasure.to_string().into(),
        ]);
    }
    db.execute(&insert).await?;
    Ok(())
}

/// Deletes everything held about `customer` and the customers merged into
/// it (`merged`): rows of every customer table, the payloads of their
/// outbox events (replaced by `scrubbed(event_type, subject)`, which names
/// only the subject), and stored idempotent responses that mention them.
pub async fn forget(
    db: &impl ConnectionTrait,
    customer: CustomerId,
    merged: &[CustomerId],
    event_types: &[&str],
    scrubbed: impl Fn(&str, &str) -> Vec<u8>,
) -> Result<(), Error> {
    let id = customer.to_string();
    let mut all: Vec<String> = merged.iter().map(ToString::to_string).collect();
    all.push(id.clone());
    for table in [
        "touchpoints",
        "stage_history",
        "consent_history",
        "customer_consent",
        "customer_attributes",
        "customer_identifiers",
    ] {
        let mut del = Query::delete();
        del.from_table(n(table))
            .and_where(Expr::col(n("customer_id")).eq(id.clone()));
        db.execute(&del).await?;
    }
    // The report projection's rows go now too (of the duplicates as well:
    // a merge's fold may not have run yet); the projection deletes again
    // whatever it adds for them before it reaches the erasure's event.
    super::projection::forget(db, &all).await?;
    let mut del = Query::delete();
    del.from_table(n("customer_redirects"))
        .and_where(Expr::col(n("survivor_id")).eq(id.clone()));
    db.execute(&del).await?;
    let mut del = Query::delete();
    del.from_table(n("customers"))
        .and_where(Expr::col(n("id")).eq(id));
    db.execute(&del).await?;

    // The events stay (consumers must see that they happened and that the
    // customer is gone), but carry nothing but the id.
    let subjects: Vec<String> = all.iter().map(|i| format!("customers/{i}")).collect();
    for subject in &subjects {
        for t in event_types {
            let mut up = Query::update();
            up.table(n("outbox"))
                .value(n("payload"), scrubbed(t, subject))
                .and_where(Expr::col(n("subject")).eq(subject.clone()))
                .and_where(Expr::col(n("event_type")).eq(*t));
            db.execute(&up).await?;
        }
        let mut up = Query::update();
        up.table(n("outbox"))
            .value(n("payload"), Vec::<u8>::new())
            .and_where(Expr::col(n("subject")).eq(subject.clone()))
            .and_where(Expr::col(n("event_type")).is_not_in(event_types.iter().copied()));
        db.execute(&up).await?;
    }

    // Stored answers to earlier writes (a CreateCustomer's carries the
    // e-mail) go: a search in the encoded bytes for the id.
    let find = if is_postgres(db) {
        "position($1::bytea in response) > 0"
    } else {
        "instr(response, ?) > 0"
    };
    for i in &all {
        let mut del = Query::delete();
        del.from_table(n("idempotency_keys"))
            .and_where(Expr::col(n("response")).is_not_null())
            .and_where(Expr::cust_with_values(find, [i.as_bytes().to_vec()]));
        db.execute(&del).await?;
    }
    Ok(())
}

/// How many requests made before `before` are still missing receipts.
pub async fn count_overdue(db: &impl ConnectionTrait, before: DateTime<Utc>) -> Result<u64, Error> {
    Ok(requests::Entity::find()
        .filter(requests::Column::CompleteUs.is_null())
        .filter(requests::Column::CreateUs.lt(to_micros(before)))
        .count(db)
        .await?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use sea_orm_migration::MigratorTrait;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_batch_of_receipts_is_a_few_statements_and_a_redelivery_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let config = clm_platform::config::Config::defaults("customer", dir.path());
        let mut db = clm_platform::db::connect(&config.database).await.unwrap();
        crate::store::Migrator::up(&db, None).await.unwrap();
        let t0 = from_micros(1_764_000_000_000_000);
        let expected: Vec<String> = ["customer", "scoring", "loyalty"]
            .map(str::to_owned)
            .to_vec();
        let mut requests = Vec::new();
        for _ in 0..200 {
            let r = ErasureRecord {
                id: ErasureRequestId::new(),
                customer: CustomerId::new(),
                requester: "steward".into(),
                create_time: t0,
                complete_time: None,
                expected: expected.clone(),
                receipts: vec![("customer".into(), t0)],
            };
            insert(&db, &r).await.unwrap();
            requests.push(r.id);
        }
        // Scoring answers all; loyalty all but the last 50; and one receipt
        // names a request nobody made.
        let stranger = ErasureRequestId::new();
        let batch: Vec<Receipt> = requests
            .iter()
            .map(|id| (id, "scoring"))
            .chain(requests[..150].iter().map(|id| (id, "loyalty")))
            .chain(std::iter::once((&stranger, "loyalty")))
            .map(|(id, s)| Receipt {
                erasure: *id,
                service: s.into(),
                erase_time: t0,
            })
            .collect();
        let statements = Arc::new(AtomicUsize::new(0));
        let counter = statements.clone();
        db.set_metric_callback(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let t1 = t0 + chrono::Duration::minutes(5);
        let unknown = record_receipts(&db, &batch, t1).await.unwrap();
        assert_eq!(statements.load(Ordering::SeqCst), 4, "351 receipts");
        assert_eq!(unknown.len(), 1);
        assert_eq!(unknown[0].erasure, stranger);

        let done = get(&db, requests[0]).await.unwrap();
        assert_eq!(done.complete_time, Some(t1));
        assert_eq!(done.receipts.len(), 3);
        let open = get(&db, requests[199]).await.unwrap();
        assert_eq!(open.complete_time, None);
        assert_eq!(open.receipts.len(), 2);

        // Redelivered, later: the first receipts and completions stand.
        let later: Vec<Receipt> = batch
            .iter()
            .map(|r| Receipt {
                erase_time: t1,
                ..r.clone()
            })
            .collect();
        record_receipts(&db, &later, t1 + chrono::Duration::minutes(5))
            .await
            .unwrap();
        assert_eq!(get(&db, requests[0]).await.unwrap(), done);
        assert_eq!(get(&db, requests[199]).await.unwrap(), open);
    }
}
