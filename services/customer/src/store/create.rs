//! Creating customers on PostgreSQL in one statement, its own implicit
//! transaction, for one call or for several calls at once (CreateCustomer
//! calls gathered by a [`clm_platform::coalesce::Batcher`]): the identifier check, the idempotency key (with the
//! response, known before the statement runs) and every insert (the
//! profiles, their attributes, the stage history's first entries, the
//! identifiers they hold, the `CustomerCreated` outbox events) as
//! data-modifying CTEs of one statement, each table's rows one JSON
//! parameter ([`JsonRows`]), so the SQL text is the same for every call and
//! its prepared statement is reused on each connection. No BEGIN, no
//! COMMIT: one round trip.
//!
//! The inserts go ahead only when none of the identifiers is held, none
//! matches an erased customer's hash and every request id is new.
//! Otherwise nothing is written and the caller takes the general path
//! (`idempotency::write`: a replay answers the stored response; else
//! [`super::identifiers::check_free`], then the inserts one table at a
//! time), which names the holder in ALREADY_EXISTS or applies the
//! erased-identifier policy. A concurrent creation of the same identifier
//! fails the statement on the unique indexes; that maps to ALREADY_EXISTS
//! as on the general path.

use super::customers::{self, CustomerRecord};
use super::entity::{customer_attributes, customer_identifiers, customers as customer_rows};
use super::entity::{stage_history, stage_history::Column as HistoryColumn};
use super::identifiers::IdentifierRecord;
use super::stages::StageChangeRecord;
use clm_domain::contact::Identifier;
use clm_platform::Error;
use clm_platform::db::JsonRows;
use clm_platform::idempotency::{self, PgClaim};
use clm_platform::outbox::{self, Traced};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use std::sync::LazyLock;

/// The statement: `$1` the outbox rows, `$2` the identifiers to check
/// (`kind`, `value`), `$3` their erased-identifier hashes (`kind`, `hash`),
/// `$4`..`$7` the rows of `customers`, `customer_attributes`,
/// `stage_history` and `customer_identifiers`, `$8` the idempotency keys
/// and responses ([`idempotency::pg_claims_value`]), `$9` how many keys.
/// It answers how many of the identifiers are held or erased and whether
/// it wrote. Some keys claimed but not all (a key seen before, or by a
/// concurrent writer, among new ones) would leave those keys stored with
/// no customers: `whole` then divides by zero, which fails the statement
/// and rolls its claims back (only a statement of several calls can
/// claim some; the batcher sends each of them back to try alone).
static SQL: LazyLock<String> = LazyLock::new(|| {
    let none = JsonRows::of::<customer_rows::Entity>(&[], &[]);
    let attrs = JsonRows::of::<customer_attributes::Entity>(&[], &[]);
    let history = JsonRows::of::<stage_history::Entity>(&[], &[HistoryColumn::Id]);
    let held = JsonRows::of::<customer_identifiers::Entity>(&[], &[]);
    const GO: &str = " WHERE (SELECT ok FROM go)";
    format!(
        "WITH want AS (SELECT * FROM json_to_recordset($2::json) AS w(kind int2, value text)), \
         erased AS (SELECT * FROM json_to_recordset($3::json) AS e(kind int2, hash text)), \
         held AS (SELECT 1 FROM customer_identifiers i JOIN want w ON i.kind = w.kind AND i.value = w.value \
           UNION ALL SELECT 1 FROM erased_identifiers x JOIN erased e ON x.kind = e.kind AND x.hash = e.hash), \
         free AS (SELECT NOT EXISTS (SELECT 1 FROM held) AS ok), \
         k AS ({claim}), \
         go AS (SELECT (SELECT ok FROM free) AND (SELECT COUNT(*) FROM k) = $9::int8 AS ok), \
         c AS ({customers}{GO}), a AS ({attrs}{GO}), h AS ({history}{GO}), \
         i AS ({held}{GO}), o AS ({outbox}{GO}) \
         SELECT (SELECT COUNT(*) FROM held) AS held, (SELECT ok FROM go) AS done, \
           1 / (CASE WHEN (SELECT COUNT(*) FROM k) IN (0, $9::int8) THEN 1 ELSE 0 END) AS whole",
        claim = idempotency::pg_claims_sql(8, "SELECT ok FROM free"),
        customers = none.insert_sql(4),
        attrs = attrs.insert_sql(5),
        history = history.insert_sql(6),
        held = held.insert_sql(7),
        outbox = outbox::PG_INSERT,
    )
});

/// What one call creates: the rows of every table, the events and the
/// idempotency key.
#[derive(Debug)]
pub struct NewCustomers<'a> {
    /// The profiles.
    pub records: &'a [CustomerRecord],
    /// Their first stage-history entries.
    pub history: &'a [StageChangeRecord],
    /// The identifiers they hold.
    pub identifiers: &'a [IdentifierRecord],
    /// The identifiers to check, each with its erased-identifier hash when
    /// the installation has a salt.
    pub checks: &'a [(Identifier, Option<String>)],
    /// Their `CustomerCreated` events.
    pub events: Traced<'a>,
    /// The call's idempotency key and response, if it has a request id.
    pub claim: Option<&'a PgClaim>,
}

/// Inserts what every call of `calls` creates in one statement
/// (PostgreSQL only, outside any transaction: the statement is its own)
/// and stores each call's claim under its key, when none of the
/// identifiers is held or erased and every key is new; `false` when
/// nothing was written (take the general path). A unique violation (a
/// concurrent writer, or two of the calls holding one identifier) writes
/// nothing and maps to ALREADY_EXISTS.
pub async fn insert_at_once(
    db: &impl ConnectionTrait,
    calls: &[NewCustomers<'_>],
) -> Result<bool, Error> {
    write(db, calls).await.map_err(|e| {
        if clm_platform::db::unique_violation_detail(&e)
            .is_some_and(|m| m.contains("email") || m.contains("external_id"))
        {
            customers::map_unique(e)
        } else if clm_platform::db::is_unique_violation(&e) {
            super::identifiers::raced()
        } else {
            e.into()
        }
    })
}

/// [`insert_at_once`] with the database's own error: a statement of
/// several calls tells a refusal (nothing written: each call may try
/// alone) from an unknown outcome ([`clm_platform::db::is_refused_by_database`]).
pub async fn write(
    db: &impl ConnectionTrait,
    calls: &[NewCustomers<'_>],
) -> Result<bool, sea_orm::DbErr> {
    let records = || calls.iter().flat_map(|c| c.records);
    let models: Vec<_> = records().map(CustomerRecord::to_model).collect();
    let attrs: Vec<_> = records()
        .flat_map(|r| customers::attribute_models(r.id, &r.attributes))
        .collect();
    let history: Vec<_> = calls
        .iter()
        .flat_map(|c| c.history)
        .map(StageChangeRecord::to_model)
        .collect();
    let held: Vec<_> = calls
        .iter()
        .flat_map(|c| c.identifiers)
        .map(IdentifierRecord::to_model)
        .collect();
    let checks = || calls.iter().flat_map(|c| c.checks);
    let want: Vec<serde_json::Value> = checks()
        .map(|(i, _)| serde_json::json!({"kind": i.kind.code(), "value": i.value}))
        .collect();
    let erased: Vec<serde_json::Value> = checks()
        .filter_map(|(i, h)| {
            h.as_ref()
                .map(|h| serde_json::json!({"kind": i.kind.code(), "hash": h}))
        })
        .collect();
    let events: Vec<Traced<'_>> = calls.iter().map(|c| c.events.clone()).collect();
    let claims: Vec<&PgClaim> = calls.iter().filter_map(|c| c.claim).collect();
    let claimed = i64::try_from(claims.len()).unwrap_or(i64::MAX);
    let values = vec![
        outbox::pg_rows_of(&events)?,
        serde_json::Value::Array(want).to_string().into(),
        serde_json::Value::Array(erased).to_string().into(),
        JsonRows::of::<customer_rows::Entity>(&models, &[]).value(),
        JsonRows::of::<customer_attributes::Entity>(&attrs, &[]).value(),
        JsonRows::of::<stage_history::Entity>(&history, &[HistoryColumn::Id]).value(),
        JsonRows::of::<customer_identifiers::Entity>(&held, &[]).value(),
        idempotency::pg_claims_value(claims),
        claimed.into(),
    ];
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            SQL.as_str(),
            values,
        ))
        .await?
        .ok_or_else(|| sea_orm::DbErr::Custom("the create statement answered no row".into()))?;
    row.try_get("", "done")
}
