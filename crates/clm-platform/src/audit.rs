//! The append-only audit trail every service keeps (`audit_entries`), and
//! `clm.common.v1.AuditService/ListAuditEntries`, which every service serves.
//!
//! # Convention
//!
//! Every mutating rpc records what it changed with [`record`], inside the
//! transaction of its idempotent write, so the entry commits with the change
//! or not at all and a retried `request_id` (answered from the idempotency
//! key) records nothing twice:
//!
//! ```ignore
//! idempotency::write(&rt, "UpdateThing", rid, &req, now, async |txn| {
//!     let before = store::get(txn, &id).await?;
//!     let after = store::update(txn, ...).await?;
//!     audit::record(txn, rt.service, now, Change::update(&name, &to_proto(&before), &to_proto(&after))
//!         .mask(&req.update_mask)).await?;
//!     Ok((to_proto(&after), events))
//! })
//! ```
//!
//! The caller (subject and roles), the rpc, the trace id and the request id
//! come from [`crate::call`]: [`crate::error::respond`] and
//! [`crate::idempotency::write`] set them, so a write path only says which
//! resource changed and how. `before` and `after` are the resource's API
//! messages, stored as proto3 JSON (proto field names) and bounded to
//! [`MAX_SNAPSHOT_BYTES`] each. Work not started by a call (timers, stream
//! handlers) is recorded as `system:<service>`.
//!
//! # Append-only
//!
//! No rpc updates or deletes an entry. On PostgreSQL a trigger refuses
//! UPDATE and DELETE on `audit_entries` unless the transaction set
//! `clm.audit_redaction` (only [`redact_customer`] does); on SQLite
//! (embedded, one process, no roles to grant) triggers refuse DELETE, and
//! any UPDATE except the one that marks an entry redacted and leaves who,
//! when, which rpc and which fields as they were. [`redact_customer`] is the erasure path: it replaces the erased
//! customer's values inside its entries by salted hashes (the salt is drawn
//! per erasure and kept nowhere, so the hashes cannot be reversed by
//! guessing) and records an entry of rpc [`ERASURE_RPC`] saying how many it
//! changed.

use crate::auth::{Policy, Role, authorize};
use crate::db::{from_micros, to_micros};
use crate::error::{Error, Result};
use crate::page::Pager;
use clm_proto::common::audit_service_server::AuditService;
use clm_proto::common::{AuditEntry, ListAuditEntriesRequest, ListAuditEntriesResponse};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Order, Query};
use sea_orm::{ConnectionTrait, DatabaseBackend, FromQueryResult};
use sha2::{Digest, Sha256};
use std::sync::OnceLock;
use tonic::{Request, Response, Status};

/// Largest `before` or `after` kept, in bytes of JSON.
pub const MAX_SNAPSHOT_BYTES: usize = 16 * 1024;
/// The rpc of the entry an erasure leaves.
pub const ERASURE_RPC: &str = "clm.erasure";
const TABLE: &str = "audit_entries";
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;

/// Who may read a service's audit trail (admin may too).
pub const AUDIT_POLICY: Policy = Policy {
    service: "clm.common.v1.AuditService",
    rules: &[("ListAuditEntries", &[Role::DataSteward])],
};

/// One change to record.
#[derive(Debug, Clone, Default)]
pub struct Change {
    resource: String,
    customer: Option<String>,
    mask: Vec<String>,
    before: Option<String>,
    after: Option<String>,
    rpc: Option<String>,
}

impl Change {
    /// `resource` was created as `after`.
    pub fn create<M: prost::Name>(resource: impl Into<String>, after: &M) -> Self {
        Self {
            resource: resource.into(),
            after: Some(snapshot(after)),
            ..Self::default()
        }
    }

    /// `resource` went from `before` to `after`.
    pub fn update<B: prost::Name, A: prost::Name>(
        resource: impl Into<String>,
        before: &B,
        after: &A,
    ) -> Self {
        Self {
            resource: resource.into(),
            before: Some(snapshot(before)),
            after: Some(snapshot(after)),
            ..Self::default()
        }
    }

    /// `resource`, which was `before`, was deleted.
    pub fn delete<M: prost::Name>(resource: impl Into<String>, before: &M) -> Self {
        Self {
            resource: resource.into(),
            before: Some(snapshot(before)),
            ..Self::default()
        }
    }

    /// An action on `resource` (an adjustment, a re-scoring, a refresh)
    /// whose outcome is `after`.
    pub fn action<M: prost::Name>(resource: impl Into<String>, after: &M) -> Self {
        Self::create(resource, after)
    }

    /// The field paths the request asked to change.
    #[must_use]
    pub fn mask(mut self, mask: Option<&prost_types::FieldMask>) -> Self {
        self.mask = mask.map(|m| m.paths.clone()).unwrap_or_default();
        self
    }

    /// The customer (`customers/{id}`) whose data the entry holds: erasing
    /// that customer redacts it.
    #[must_use]
    pub fn customer(mut self, customer: impl Into<String>) -> Self {
        self.customer = Some(customer.into());
        self
    }

    /// What made the change when no rpc did (a timer kind, a handler).
    #[must_use]
    pub fn by(mut self, what: impl Into<String>) -> Self {
        self.rpc = Some(what.into());
        self
    }
}

/// Every CLM message's descriptor (for the JSON of snapshots).
fn pool() -> Option<&'static prost_reflect::DescriptorPool> {
    static POOL: OnceLock<Option<prost_reflect::DescriptorPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        prost_reflect::DescriptorPool::decode(clm_proto::FILE_DESCRIPTOR_SET)
            .map_err(|e| tracing::error!(error = %e, "audit: the descriptor set does not decode"))
            .ok()
    })
    .as_ref()
}

/// `message` as proto3 JSON with proto field names, bounded.
pub fn snapshot<M: prost::Name>(message: &M) -> String {
    let json = pool()
        .and_then(|p| p.get_message_by_name(&M::full_name()))
        .and_then(|desc| {
            let dynamic =
                prost_reflect::DynamicMessage::decode(desc, message.encode_to_vec().as_slice())
                    .ok()?;
            let options = prost_reflect::SerializeOptions::new()
                .use_proto_field_name(true)
                .stringify_64_bit_integers(false);
            let mut out = serde_json::Serializer::new(Vec::new());
            dynamic.serialize_with_options(&mut out, &options).ok()?;
            String::from_utf8(out.into_inner()).ok()
        })
        .unwrap_or_else(|| "{}".to_owned());
    bound(json)
}

fn bound(json: String) -> String {
    if json.len() <= MAX_SNAPSHOT_BYTES {
        json
    } else {
        serde_json::json!({"truncated": true, "bytes": json.len()}).to_string()
    }
}

fn a(s: &str) -> Alias {
    Alias::new(s)
}

/// Appends `change` to the trail in `db` (the write's transaction), made by
/// the current call's caller, or by `system:<service>` outside a call.
pub async fn record(
    db: &impl ConnectionTrait,
    service: &str,
    now: chrono::DateTime<chrono::Utc>,
    change: Change,
) -> Result<()> {
    record_all(db, service, now, vec![change]).await
}

/// Who made the changes of the current call: (actor, roles, rpc, trace id,
/// request id), or `system:<service>` outside a call.
fn made_by(service: &str) -> (String, String, String, Option<String>, Option<String>) {
    let (actor, roles, rpc) = match crate::call::current() {
        Some(c) => (
            c.principal.subject.clone(),
            c.principal
                .roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(","),
            c.rpc_path(),
        ),
        None => (format!("system:{service}"), String::new(), String::new()),
    };
    let request_id = crate::call::request_id().filter(|r| !r.is_empty());
    (actor, roles, rpc, crate::call::trace_id(), request_id)
}

/// Appends several changes of one write at once (one statement).
pub async fn record_all(
    db: &impl ConnectionTrait,
    service: &str,
    now: chrono::DateTime<chrono::Utc>,
    changes: Vec<Change>,
) -> Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let (actor, roles, rpc, trace_id, request_id) = made_by(service);
    // 12 columns a row: stay far below any bind-parameter limit.
    for part in changes.chunks(1000) {
        let mut insert = Query::insert();
        insert.into_table(a(TABLE)).columns(
            [
                "time_us",
                "actor",
                "roles",
                "rpc",
                "resource",
                "customer",
                "field_mask",
                "before_json",
                "after_json",
                "request_id",
                "trace_id",
            ]
            .map(a),
        );
        for c in part {
            let rpc = c.rpc.clone().unwrap_or_else(|| rpc.clone());
            insert.values_panic([
                to_micros(now).into(),
                actor.clone().into(),
                roles.clone().into(),
                rpc.into(),
                c.resource.clone().into(),
                c.customer.clone().into(),
                c.mask.join(",").into(),
                c.before.clone().into(),
                c.after.clone().into(),
                request_id.clone().into(),
                trace_id.clone().into(),
            ]);
        }
        db.execute(&insert).await?;
    }
    Ok(())
}

/// [`record_all`] on PostgreSQL for a data-modifying CTE of a larger
/// statement: the entries are the JSON rows of [`pg_rows`] bound as `$param`.
pub fn pg_insert_sql(param: usize) -> String {
    format!(
        "INSERT INTO {TABLE} (time_us, actor, roles, rpc, resource, customer, field_mask, \
         before_json, after_json, request_id, trace_id) \
         SELECT time_us, actor, roles, rpc, resource, customer, field_mask, before_json, \
         after_json, request_id, trace_id FROM json_to_recordset(${param}::json) AS x(time_us int8, \
         actor text, roles text, rpc text, resource text, customer text, field_mask text, \
         before_json text, after_json text, request_id text, trace_id text)"
    )
}

/// The parameter of [`pg_insert_sql`] for `changes`, made by the current
/// call's caller (as [`record_all`] records them).
pub fn pg_rows(
    service: &str,
    now: chrono::DateTime<chrono::Utc>,
    changes: &[Change],
) -> Result<sea_orm::Value> {
    #[derive(serde::Serialize)]
    struct Entry<'a> {
        time_us: i64,
        actor: &'a str,
        roles: &'a str,
        rpc: &'a str,
        resource: &'a str,
        customer: Option<&'a str>,
        field_mask: String,
        before_json: Option<&'a str>,
        after_json: Option<&'a str>,
        request_id: Option<&'a str>,
        trace_id: Option<&'a str>,
    }
    let (actor, roles, rpc, trace_id, request_id) = made_by(service);
    let rows: Vec<Entry<'_>> = changes
        .iter()
        .map(|c| Entry {
            time_us: to_micros(now),
            actor: &actor,
            roles: &roles,
            rpc: c.rpc.as_deref().unwrap_or(&rpc),
            resource: &c.resource,
            customer: c.customer.as_deref(),
            field_mask: c.mask.join(","),
            before_json: c.before.as_deref(),
            after_json: c.after.as_deref(),
            request_id: request_id.as_deref(),
            trace_id: trace_id.as_deref(),
        })
        .collect();
    serde_json::to_string(&rows)
        .map(Into::into)
        .map_err(Error::internal)
}

#[derive(Debug, FromQueryResult)]
struct Row {
    id: i64,
    time_us: i64,
    actor: String,
    roles: String,
    rpc: String,
    resource: String,
    field_mask: String,
    before_json: Option<String>,
    after_json: Option<String>,
    request_id: Option<String>,
    trace_id: Option<String>,
    redacted_us: Option<i64>,
}

const COLUMNS: [&str; 12] = [
    "id",
    "time_us",
    "actor",
    "roles",
    "rpc",
    "resource",
    "field_mask",
    "before_json",
    "after_json",
    "request_id",
    "trace_id",
    "redacted_us",
];

fn to_proto(r: &Row) -> AuditEntry {
    let json = |s: &Option<String>| {
        s.as_deref()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
            .and_then(|v| match crate::convert::json_to_value(v).kind {
                Some(prost_types::value::Kind::StructValue(s)) => Some(s),
                _ => None,
            })
    };
    AuditEntry {
        name: format!("auditEntries/{}", r.id),
        actor: r.actor.clone(),
        roles: r
            .roles
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        create_time: Some(crate::convert::timestamp(from_micros(r.time_us))),
        rpc: r.rpc.clone(),
        resource: r.resource.clone(),
        update_mask: (!r.field_mask.is_empty()).then(|| prost_types::FieldMask {
            paths: r.field_mask.split(',').map(str::to_owned).collect(),
        }),
        before: json(&r.before_json),
        after: json(&r.after_json),
        request_id: r.request_id.clone().unwrap_or_default(),
        trace_id: r.trace_id.clone().unwrap_or_default(),
        redact_time: r
            .redacted_us
            .map(|t| crate::convert::timestamp(from_micros(t))),
    }
}

/// One page of entries, newest first (see `ListAuditEntries`).
pub async fn list(
    db: &impl ConnectionTrait,
    req: &ListAuditEntriesRequest,
) -> Result<ListAuditEntriesResponse> {
    list_filtered(db, req, None).await
}

/// One page of the entries about resource `name` and the resources under
/// it (`segments/abc` and `segments/abc/changeRequests/x`), newest first;
/// `req.resource` is ignored. A service's own API serves a resource's
/// trail with it.
pub async fn list_under(
    db: &impl ConnectionTrait,
    req: &ListAuditEntriesRequest,
    name: &str,
) -> Result<ListAuditEntriesResponse> {
    let mut req = req.clone();
    req.resource = String::new();
    list_filtered(db, &req, Some(name)).await
}

async fn list_filtered(
    db: &impl ConnectionTrait,
    req: &ListAuditEntriesRequest,
    under: Option<&str>,
) -> Result<ListAuditEntriesResponse> {
    let size =
        clm_domain::validation::page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)?
            as usize;
    let start = req
        .start_time
        .as_ref()
        .map(|t| crate::convert::from_timestamp("start_time", t))
        .transpose()?;
    let end = req
        .end_time
        .as_ref()
        .map(|t| crate::convert::from_timestamp("end_time", t))
        .transpose()?;
    if let (Some(s), Some(e)) = (start, end)
        && e < s
    {
        return Err(Error::invalid("end_time", "must not be before start_time"));
    }
    for (field, value) in [
        ("resource", &req.resource),
        ("actor", &req.actor),
        ("rpc", &req.rpc),
    ] {
        if value.len() > 512 {
            return Err(Error::invalid(field, "must be at most 512 bytes"));
        }
    }
    let shape = format!(
        "{:?}|{:?}",
        req.start_time.as_ref().map(|t| (t.seconds, t.nanos)),
        req.end_time.as_ref().map(|t| (t.seconds, t.nanos))
    );
    let pager = Pager::new(&[
        "auditEntries",
        &req.resource,
        &req.actor,
        &req.rpc,
        &shape,
        under.unwrap_or_default(),
    ]);
    let after = pager.after::<i64>(&req.page_token)?;
    let mut q = Query::select();
    q.columns(COLUMNS.map(a)).from(a(TABLE));
    if !req.resource.is_empty() {
        q.and_where(Expr::col(a("resource")).eq(req.resource.as_str()));
    }
    if let Some(name) = under {
        q.and_where(
            Expr::col(a("resource"))
                .eq(name)
                .or(Expr::col(a("resource")).like(crate::db::like_literal("", name, "/%"))),
        );
    }
    if !req.actor.is_empty() {
        q.and_where(Expr::col(a("actor")).eq(req.actor.as_str()));
    }
    if !req.rpc.is_empty() {
        if req.rpc.contains('/') {
            q.and_where(Expr::col(a("rpc")).eq(req.rpc.as_str()));
        } else {
            q.and_where(Expr::col(a("rpc")).like(crate::db::like_literal("%/", &req.rpc, "")));
        }
    }
    if let Some(s) = start {
        q.and_where(Expr::col(a("time_us")).gte(to_micros(s)));
    }
    if let Some(e) = end {
        q.and_where(Expr::col(a("time_us")).lt(to_micros(e)));
    }
    if let Some((id, _)) = after {
        q.and_where(Expr::col(a("id")).lt(id));
    }
    q.order_by(a("id"), Order::Desc).limit(size as u64 + 1);
    let rows = Row::find_by_statement(db.get_database_backend().build(&q))
        .all(db)
        .await?;
    let (audit_entries, next_page_token) =
        pager.page(&rows, size, to_proto, |r| (r.id, r.id.to_string()));
    Ok(ListAuditEntriesResponse {
        audit_entries,
        next_page_token,
    })
}

/// Erasure: in every entry about `customer` (`customers/{id}`), replaces
/// each string value and the resource and customer names by a salted hash,
/// marks the entry redacted, and records an entry saying how many it
/// changed. Runs in the erasure's transaction. Returns how many it changed.
pub async fn redact_customer(
    db: &impl ConnectionTrait,
    service: &str,
    customer: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<u64> {
    let salt = uuid::Uuid::new_v4().to_string();
    let hash = |s: &str| -> String {
        let d = Sha256::digest(format!("{salt}:{s}"));
        let hex: String = d.iter().take(16).map(|b| format!("{b:02x}")).collect();
        format!("erased:{hex}")
    };
    let select = Query::select()
        .columns(COLUMNS.map(a))
        .from(a(TABLE))
        .and_where(Expr::col(a("customer")).eq(customer))
        .and_where(Expr::col(a("redacted_us")).is_null())
        .to_owned();
    let rows = Row::find_by_statement(db.get_database_backend().build(&select))
        .all(db)
        .await?;
    if db.get_database_backend() == DatabaseBackend::Postgres {
        db.execute_unprepared("SELECT set_config('clm.audit_redaction', 'on', true)")
            .await?;
    }
    let hashed_customer = hash(customer);
    let redact = |json: &Option<String>| {
        json.as_deref()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
            .map(|mut v| {
                hash_strings(&mut v, &hash);
                v.to_string()
            })
    };
    for r in &rows {
        let resource = if r
            .resource
            .contains(customer.trim_start_matches("customers/"))
        {
            hash(&r.resource)
        } else {
            r.resource.clone()
        };
        let update = Query::update()
            .table(a(TABLE))
            .value(a("resource"), resource)
            .value(a("customer"), hashed_customer.clone())
            .value(a("before_json"), redact(&r.before_json))
            .value(a("after_json"), redact(&r.after_json))
            .value(a("redacted_us"), to_micros(now))
            .and_where(Expr::col(a("id")).eq(r.id))
            .to_owned();
        db.execute(&update).await?;
    }
    if db.get_database_backend() == DatabaseBackend::Postgres {
        db.execute_unprepared("SELECT set_config('clm.audit_redaction', 'off', true)")
            .await?;
    }
    let n = rows.len() as u64;
    let receipt = Change {
        resource: hashed_customer,
        after: Some(serde_json::json!({ "entries_redacted": n }).to_string()),
        rpc: Some(ERASURE_RPC.to_owned()),
        ..Change::default()
    };
    record(db, service, now, receipt).await?;
    Ok(n)
}

/// Replaces every string inside `v` (keys stay: they are field names).
fn hash_strings(v: &mut serde_json::Value, hash: &impl Fn(&str) -> String) {
    match v {
        serde_json::Value::String(s) => *s = hash(s),
        serde_json::Value::Array(items) => items.iter_mut().for_each(|i| hash_strings(i, hash)),
        serde_json::Value::Object(map) => map.values_mut().for_each(|i| hash_strings(i, hash)),
        _ => {}
    }
}

/// `clm.common.v1.AuditService` over the service's own trail.
#[derive(Debug, Clone)]
pub struct AuditServer {
    rt: crate::Runtime,
}

impl AuditServer {
    /// Serves `rt`'s trail.
    pub fn new(rt: crate::Runtime) -> Self {
        Self { rt }
    }
}

#[tonic::async_trait]
impl AuditService for AuditServer {
    async fn list_audit_entries(
        &self,
        request: Request<ListAuditEntriesRequest>,
    ) -> std::result::Result<Response<ListAuditEntriesResponse>, Status> {
        authorize(&request, &AUDIT_POLICY)?;
        crate::error::known_enums(request.get_ref())?;
        Ok(Response::new(list(&self.rt.read, request.get_ref()).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_are_proto_json_with_field_names_and_bounded() {
        let entry = AuditEntry {
            name: "auditEntries/1".into(),
            request_id: "r".into(),
            ..AuditEntry::default()
        };
        let json: serde_json::Value = serde_json::from_str(&snapshot(&entry)).expect("json");
        assert_eq!(json["name"], "auditEntries/1");
        assert_eq!(json["request_id"], "r");
        let huge = AuditEntry {
            actor: "x".repeat(MAX_SNAPSHOT_BYTES * 2),
            ..AuditEntry::default()
        };
        let json: serde_json::Value = serde_json::from_str(&snapshot(&huge)).expect("json");
        assert_eq!(json["truncated"], true);
    }

    #[test]
    fn redaction_hashes_values_not_keys() {
        let mut v = serde_json::json!({"email": "a@b.c", "n": 3, "tags": ["x"]});
        hash_strings(&mut v, &|s: &str| format!("h({s})"));
        assert_eq!(
            v,
            serde_json::json!({"email": "h(a@b.c)", "n": 3, "tags": ["h(x)"]})
        );
    }
}
