//! Identifiers through the [`customer_identifiers`](super::entity::customer_identifiers)
//! entity: its primary key `(kind, value)` is what makes each identifier
//! belong to one customer at most.

use super::entity::customer_identifiers::{self, Column};
use super::n;
use chrono::{DateTime, Utc};
use clm_domain::contact::{Identifier, IdentifierKind, external_key};
use clm_domain::ids::CustomerId;
use clm_domain::validation::echo;
use clm_platform::Error;
use clm_platform::db::{from_micros, to_micros};
use sea_orm::sea_query::{Cond, Expr, ExprTrait, Query, UnionType};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};
use std::collections::HashMap;

/// An identifier held by a customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifierRecord {
    /// The holder.
    pub customer: CustomerId,
    /// The identifier.
    pub identifier: Identifier,
    /// Whether it mirrors the profile's `email` or `external_id`.
    pub profile: bool,
    /// When the customer got it.
    pub create_time: DateTime<Utc>,
}

impl IdentifierRecord {
    /// The `customer_identifiers` row of this record.
    pub(crate) fn to_model(&self) -> customer_identifiers::Model {
        customer_identifiers::Model {
            kind: self.identifier.kind.code(),
            value: self.identifier.value.clone(),
            customer_id: self.customer.to_string(),
            profile: self.profile,
            create_us: to_micros(self.create_time),
        }
    }

    fn from_model(m: customer_identifiers::Model) -> Result<Self, Error> {
        Ok(Self {
            customer: CustomerId::parse_id("customer_id", &m.customer_id)
                .map_err(Error::internal)?,
            identifier: Identifier {
                kind: IdentifierKind::from_code(m.kind)
                    .ok_or_else(|| Error::internal(format!("stored identifier kind {}", m.kind)))?,
                value: m.value,
            },
            profile: m.profile,
            create_time: from_micros(m.create_us),
        })
    }
}

/// The identifiers mirroring a profile's `email` and `external_id`.
pub fn profile_identifiers(email: Option<&str>, external_id: Option<&str>) -> Vec<Identifier> {
    let email = email.map(|e| Identifier {
        kind: IdentifierKind::Email,
        value: e.to_owned(),
    });
    let external = external_id.map(|x| Identifier {
        kind: IdentifierKind::External,
        value: external_key(x),
    });
    email.into_iter().chain(external).collect()
}

/// `WHERE (kind, value) IN (...)` for `ids`, one `value IN` per kind.
fn matching(ids: &[&Identifier]) -> Cond {
    let mut by_kind: HashMap<IdentifierKind, Vec<String>> = HashMap::new();
    for i in ids {
        by_kind.entry(i.kind).or_default().push(i.value.clone());
    }
    by_kind.into_iter().fold(Cond::any(), |c, (kind, values)| {
        c.add(
            Cond::all()
                .add(Column::Kind.eq(kind.code()))
                .add(Column::Value.is_in(values)),
        )
    })
}

/// Who holds each of `ids` that is held (one statement).
pub async fn holders(
    db: &impl ConnectionTrait,
    ids: &[&Identifier],
) -> Result<HashMap<Identifier, IdentifierRecord>, Error> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    customer_identifiers::Entity::find()
        .filter(matching(ids))
        .all(db)
        .await?
        .into_iter()
        .map(|m| {
            let r = IdentifierRecord::from_model(m)?;
            Ok((r.identifier.clone(), r))
        })
        .collect()
}

/// An identifier of a request that matches the salted hash kept of an
/// erased customer's identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasedMatch {
    /// The request field carrying it (`customer.email`).
    pub field: String,
    /// The start of its salted hash: what errors and logs may show
    /// instead of the value.
    pub hash_prefix: String,
}

impl ErasedMatch {
    /// FAILED_PRECONDITION: re-importing an erased person is refused
    /// (`erased_identifier_policy = "refuse"`). Names the field and a hash
    /// prefix, never the value.
    pub fn refused(&self) -> Error {
        Error::FailedPrecondition {
            reason: "IDENTIFIER_ERASED",
            message: format!(
                "{}: belongs to an erased customer (hash {}); \
                 re-importing an erased person is refused",
                self.field, self.hash_prefix
            ),
        }
    }
}

/// ALREADY_EXISTS naming the holder if any of `ids` (each with the request
/// field carrying it) is held by a customer other than `except`; otherwise
/// the ones that belonged to an erased customer (when `salt` is given), for
/// the caller's `erased_identifier_policy` to refuse or flag. One
/// statement: the holders and the erased hashes are read together
/// (`UNION ALL`).
pub async fn check_free(
    db: &impl ConnectionTrait,
    ids: &[(String, Identifier)],
    except: Option<CustomerId>,
    salt: Option<&str>,
) -> Result<Vec<ErasedMatch>, Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let wanted: Vec<&Identifier> = ids.iter().map(|(_, i)| i).collect();
    let mut held = Query::select();
    held.expr_as(Expr::col(Column::Kind), n("k"))
        .expr_as(Expr::col(Column::Value), n("v"))
        .expr_as(Expr::col(Column::CustomerId), n("c"))
        .from(customer_identifiers::Entity)
        .cond_where(matching(&wanted));
    let hashes: Vec<(String, &Identifier)> = salt
        .map(|s| {
            wanted
                .iter()
                .map(|i| (super::erasure::identifier_hash(s, i), *i))
                .collect()
        })
        .unwrap_or_default();
    if !hashes.is_empty() {
        let mut erased = Query::select();
        erased
            .expr_as(Expr::col(n("kind")), n("k"))
            .expr_as(Expr::col(n("hash")), n("v"))
            .expr_as(Expr::val(""), n("c"))
            .from(n("erased_identifiers"))
            .and_where(Expr::col(n("hash")).is_in(hashes.iter().map(|(h, _)| h.clone())));
        held.union(UnionType::All, erased);
    }
    let mut erased: Vec<(&str, &Identifier)> = Vec::new();
    let mut own: Vec<(i16, String)> = Vec::new();
    for row in db.query_all(&held).await? {
        let kind: i16 = row.try_get("", "k")?;
        let value: String = row.try_get("", "v")?;
        let holder: String = row.try_get("", "c")?;
        if holder.is_empty() {
            // An erased identifier's hash.
            erased.extend(
                hashes
                    .iter()
                    .filter(|(h, _)| *h == value)
                    .map(|(h, i)| (h.as_str(), *i)),
            );
            continue;
        }
        let holder = CustomerId::parse_id("customer_id", &holder).map_err(Error::internal)?;
        if Some(holder) == except {
            own.push((kind, value));
            continue;
        }
        if let Some((field, id)) = ids
            .iter()
            .find(|(_, i)| i.kind.code() == kind && i.value == value)
        {
            return Err(taken(field, id, holder));
        }
    }
    // One the customer already holds came back earlier (flagged then): it
    // is not brought back by this write.
    let mut matches: Vec<ErasedMatch> = erased
        .into_iter()
        .filter(|(_, i)| {
            !own.iter()
                .any(|(k, v)| *k == i.kind.code() && *v == i.value)
        })
        .flat_map(|(hash, id)| {
            ids.iter()
                .filter(move |(_, i)| i == id)
                .map(move |(field, _)| ErasedMatch {
                    field: field.clone(),
                    hash_prefix: hash[..12].to_owned(),
                })
        })
        .collect();
    matches.sort_by(|a, b| a.field.cmp(&b.field));
    matches.dedup();
    Ok(matches)
}

/// ALREADY_EXISTS: `field`'s identifier is held by `holder`.
pub fn taken(field: &str, id: &Identifier, holder: CustomerId) -> Error {
    let reason = match id.kind {
        IdentifierKind::Email => "EMAIL_TAKEN",
        IdentifierKind::Phone => "PHONE_TAKEN",
        IdentifierKind::External => "EXTERNAL_ID_TAKEN",
    };
    Error::AlreadyExists {
        reason,
        message: format!(
            "{field}: {} is already held by {}",
            echo(&id.value),
            holder.name()
        ),
    }
}

/// Inserts identifiers (one statement per chunk). A unique violation (a
/// concurrent writer took one first) is ALREADY_EXISTS.
pub async fn insert_many(
    db: &impl ConnectionTrait,
    rows: &[IdentifierRecord],
) -> Result<(), Error> {
    for chunk in rows.chunks(clm_platform::db::rows_per_statement(5)) {
        customer_identifiers::Entity::insert_many(
            chunk
                .iter()
                .map(|r| sea_orm::IntoActiveModel::into_active_model(r.to_model())),
        )
        .exec_without_returning(db)
        .await
        .map_err(|e| {
            if clm_platform::db::is_unique_violation(&e) {
                raced()
            } else {
                e.into()
            }
        })?;
    }
    Ok(())
}

/// ALREADY_EXISTS: an identifier was taken by a concurrent writer (a
/// unique violation past [`check_free`]).
pub fn raced() -> Error {
    Error::AlreadyExists {
        reason: "IDENTIFIER_TAKEN",
        message: "an identifier was taken by another customer at the same time".into(),
    }
}

/// Inserts one identifier unless someone holds it already; `false` means
/// it is held (a concurrent writer may have just taken it: on PostgreSQL the
/// insert waits for that writer's commit, and a read after it sees the holder).
pub async fn insert_if_free(
    db: &impl ConnectionTrait,
    row: &IdentifierRecord,
) -> Result<bool, Error> {
    let inserted = customer_identifiers::Entity::insert(
        sea_orm::IntoActiveModel::into_active_model(row.to_model()),
    )
    .on_conflict(
        sea_orm::sea_query::OnConflict::columns([Column::Kind, Column::Value])
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(db)
    .await?;
    Ok(inserted == 1)
}

/// Removes `ids` from `customer` (one statement); returns how many were removed.
pub async fn remove(
    db: &impl ConnectionTrait,
    customer: CustomerId,
    ids: &[&Identifier],
) -> Result<u64, Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    Ok(customer_identifiers::Entity::delete_many()
        .filter(Column::CustomerId.eq(customer.to_string()))
        .filter(matching(ids))
        .exec(db)
        .await?
        .rows_affected)
}

/// Every identifier of `customer`, by kind then value (one statement).
pub async fn list(
    db: &impl ConnectionTrait,
    customer: CustomerId,
) -> Result<Vec<IdentifierRecord>, Error> {
    customer_identifiers::Entity::find()
        .filter(Column::CustomerId.eq(customer.to_string()))
        .order_by_asc(Column::Kind)
        .order_by_asc(Column::Value)
        .all(db)
        .await?
        .into_iter()
        .map(IdentifierRecord::from_model)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::store::customers::{self, CustomerRecord};
    use clm_platform::db::from_micros;
    use sea_orm_migration::MigratorTrait;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_batch_lookup_and_a_holder_check_are_each_one_statement() {
        let dir = tempfile::tempdir().unwrap();
        let config = clm_platform::config::Config::defaults("customer", dir.path());
        let mut db = clm_platform::db::connect(&config.database).await.unwrap();
        crate::store::Migrator::up(&db, None).await.unwrap();
        let statements = Arc::new(AtomicUsize::new(0));
        let counter = statements.clone();
        db.set_metric_callback(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let now = from_micros(1_764_000_000_000_000);
        let records: Vec<CustomerRecord> = (0..300)
            .map(|i| CustomerRecord {
                id: CustomerId::new(),
                external_id: None,
                email: Some(format!("c{i}@example.com")),
                display_name: String::new(),
                demographics: Default::default(),
                attributes: Default::default(),
                stage: clm_domain::lifecycle::Stage::Approach,
                stage_change_time: now,
                create_time: now,
                update_time: now,
                version: 1,
                merged_from: Vec::new(),
                reimported_after_erasure: false,
                acquisition_campaign: None,
            })
            .collect();
        customers::insert_many(&db, &records).await.unwrap();
        let rows: Vec<IdentifierRecord> = records
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                [
                    Identifier {
                        kind: IdentifierKind::Email,
                        value: r.email.clone().unwrap(),
                    },
                    Identifier {
                        kind: IdentifierKind::Phone,
                        value: format!("+4930{}", 1_000_000 + i),
                    },
                ]
                .map(|identifier| IdentifierRecord {
                    customer: r.id,
                    identifier,
                    profile: false,
                    create_time: now,
                })
            })
            .collect();
        insert_many(&db, &rows).await.unwrap();

        // 1,000 identifiers of two kinds, some unknown: one statement.
        let wanted: Vec<Identifier> = rows
            .iter()
            .map(|r| r.identifier.clone())
            .chain((0..400).map(|i| Identifier {
                kind: IdentifierKind::Email,
                value: format!("nobody{i}@example.com"),
            }))
            .collect();
        assert_eq!(wanted.len(), 1000);
        let refs: Vec<&Identifier> = wanted.iter().collect();
        statements.store(0, Ordering::SeqCst);
        let held = holders(&db, &refs).await.unwrap();
        assert_eq!(statements.load(Ordering::SeqCst), 1, "BatchLookupCustomers");
        assert_eq!(held.len(), 600);
        assert_eq!(held[&rows[3].identifier].customer, rows[3].customer);

        // Holders and erased hashes together: one statement.
        let ids = vec![("customer.email".to_owned(), rows[0].identifier.clone())];
        statements.store(0, Ordering::SeqCst);
        let e = check_free(&db, &ids, None, Some("salt")).await.unwrap_err();
        assert_eq!(statements.load(Ordering::SeqCst), 1, "check_free");
        assert!(e.to_string().contains(&rows[0].customer.name()), "{e}");
        check_free(&db, &ids, Some(rows[0].customer), Some("salt"))
            .await
            .unwrap();
    }
}
