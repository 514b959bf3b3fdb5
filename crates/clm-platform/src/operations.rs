//! Long-running operations (`google.longrunning.Operation`) kept in the
//! service's own `operations` table: a service starts one in the write
//! transaction of the rpc that asks for the work, reports progress in
//! `metadata` as it goes, and finishes it with a response or an error;
//! `google.longrunning.Operations` (served by every service: Get, List,
//! Wait, Cancel, Delete) reads it back. The whole `Operation` message is
//! stored encoded, so any service's metadata and response types fit.
//!
//! # Leases: one replica runs each operation
//!
//! A service registers a [`Runner`] per operation kind in its descriptor
//! (`Parts::operation`). Every replica's [`Operations`] task looks for
//! unfinished operations nobody holds (never claimed, or whose lease lapsed
//! by the service clock: the replica running it died) and [`claim`]s them
//! with one conditional UPDATE, so exactly one replica wins. While the
//! runner works, the task renews the lease every third of it; a runner's
//! [`progress`] and its end ([`succeed`], [`fail`]) write only while this
//! replica still holds the lease (`ABORTED` otherwise), inside the runner's
//! own transaction, so a replica that lost its lease commits nothing more.
//! An rpc that starts an operation calls [`Operations::wake`] after its
//! commit instead of spawning the work itself. `CancelOperation` ends an
//! operation nobody runs at once, and flags a running one, whose renewal
//! then stops the runner and records `CANCELLED`. Finished operations are
//! purged after `operation_retention_days`.

use crate::auth::{Policy, Role, authorize};
use crate::db::to_micros;
use crate::error::Error;
use crate::page::Pager;
use clm_proto::google::longrunning::operations_server::Operations as OperationsRpc;
use clm_proto::google::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    ListOperationsResponse, Operation, WaitOperationRequest, operation,
};
use clm_proto::google::rpc::Status;
use futures::future::BoxFuture;
use prost::Message;
use sea_orm::sea_query::{Alias, Cond, Expr, ExprTrait, Order, Query};
use sea_orm::{ConnectionTrait, DbErr};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Name prefix of operations: `operations/{id}`.
pub const PREFIX: &str = "operations/";

/// How long a claim holds before another replica may take the operation
/// over (by the service clock).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Who may read and manage a service's operations (admin may too).
pub const OPERATIONS_POLICY: Policy = Policy {
    service: "google.longrunning.Operations",
    rules: &[
        (
            "ListOperations",
            &[
                Role::Marketer,
                Role::Analyst,
                Role::DataSteward,
                Role::SegmentOwner,
            ],
        ),
        (
            "GetOperation",
            &[
                Role::Marketer,
                Role::Analyst,
                Role::DataSteward,
                Role::SegmentOwner,
            ],
        ),
        (
            "WaitOperation",
            &[
                Role::Marketer,
                Role::Analyst,
                Role::DataSteward,
                Role::SegmentOwner,
            ],
        ),
        ("CancelOperation", &[Role::Marketer, Role::DataSteward]),
        ("DeleteOperation", &[Role::DataSteward]),
    ],
};

fn t() -> Alias {
    Alias::new("operations")
}

fn c(s: &str) -> Alias {
    Alias::new(s)
}

/// Runs an operation of one kind to its end: called on the replica that
/// claimed it, with the operation as last stored (resume from its
/// metadata) and a token that `CancelOperation` cancels (stop at the next
/// step, leaving what the work owns consistent, and return
/// [`Error::Cancelled`]). It reports with [`progress`] and ends with
/// [`succeed`] or [`fail`]; if it returns an error without ending the
/// operation, the operation fails with it (or is left to be resumed if the
/// service is stopping).
pub type Runner = Arc<
    dyn Fn(
            crate::Runtime,
            Operation,
            tokio_util::sync::CancellationToken,
        ) -> BoxFuture<'static, Result<(), Error>>
        + Send
        + Sync,
>;

/// This replica's view of the operations table: its identity for leases,
/// the lease length and the wake-up of its runner task.
#[derive(Debug, Clone)]
pub struct Operations {
    /// This replica (a fresh id per process start of the service).
    pub replica: Arc<str>,
    /// How long a claim holds.
    pub lease: Duration,
    wake: Arc<Notify>,
}

impl Default for Operations {
    fn default() -> Self {
        Self::new(DEFAULT_LEASE)
    }
}

impl Operations {
    /// A new replica identity with leases of `lease`.
    pub fn new(lease: Duration) -> Self {
        Self {
            replica: uuid::Uuid::new_v4().simple().to_string().into(),
            lease,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Asks the runner task to look for work now (after an rpc committed a
    /// new operation).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn lease_us(&self) -> i64 {
        i64::try_from(self.lease.as_micros()).unwrap_or(i64::MAX)
    }
}

/// Starts operation `operations/{id}` of `kind` with its first `metadata`,
/// claimed by nobody yet: after the commit, [`Operations::wake`] lets a
/// replica's runner task take it.
pub async fn start(
    db: &impl ConnectionTrait,
    id: &str,
    kind: &str,
    metadata: prost_types::Any,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Operation, DbErr> {
    let op = Operation {
        name: format!("{PREFIX}{id}"),
        metadata: Some(metadata),
        done: false,
        result: None,
    };
    let insert = Query::insert()
        .into_table(t())
        .columns([
            c("id"),
            c("kind"),
            c("body"),
            c("done"),
            c("create_us"),
            c("update_us"),
        ])
        .values_panic([
            id.into(),
            kind.into(),
            op.encode_to_vec().into(),
            false.into(),
            to_micros(now).into(),
            to_micros(now).into(),
        ])
        .to_owned();
    db.execute(&insert).await?;
    Ok(op)
}

fn bare(name: &str) -> &str {
    name.strip_prefix(PREFIX).unwrap_or(name)
}

/// Stores `op` if this replica holds its lease (renewing it); ABORTED if
/// another replica took it over.
async fn store(
    db: &impl ConnectionTrait,
    ops: &Operations,
    op: &Operation,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), Error> {
    let now_us = to_micros(now);
    let update = Query::update()
        .table(t())
        .value(c("body"), op.encode_to_vec())
        .value(c("done"), op.done)
        .value(c("update_us"), now_us)
        .value(c("lease_until_us"), now_us.saturating_add(ops.lease_us()))
        .and_where(Expr::col(c("id")).eq(bare(&op.name)))
        .and_where(Expr::col(c("owner")).eq(ops.replica.as_ref()))
        .and_where(Expr::col(c("done")).eq(false))
        .to_owned();
    if db.execute(&update).await?.rows_affected() == 1 {
        Ok(())
    } else {
        Err(Error::Aborted(format!(
            "{} is no longer held by this replica",
            op.name
        )))
    }
}

/// Replaces the progress `metadata` of a running operation (in the
/// runner's transaction: it commits only while this replica holds the lease).
pub async fn progress(
    db: &impl ConnectionTrait,
    ops: &Operations,
    op: &mut Operation,
    metadata: prost_types::Any,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), Error> {
    op.metadata = Some(metadata);
    store(db, ops, op, now).await
}

/// Finishes an operation with `response` (and final `metadata`).
pub async fn succeed(
    db: &impl ConnectionTrait,
    ops: &Operations,
    op: &mut Operation,
    metadata: prost_types::Any,
    response: prost_types::Any,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), Error> {
    op.metadata = Some(metadata);
    op.done = true;
    op.result = Some(operation::Result::Response(response));
    store(db, ops, op, now).await
}

/// Finishes an operation with an error.
pub async fn fail(
    db: &impl ConnectionTrait,
    ops: &Operations,
    op: &mut Operation,
    code: tonic::Code,
    message: String,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), Error> {
    op.done = true;
    op.result = Some(operation::Result::Error(Status {
        code: code as i32,
        message,
        details: Vec::new(),
    }));
    store(db, ops, op, now).await
}

/// Claims `name` for this replica: true if it was unfinished and nobody
/// held it (or its lease lapsed, or this replica holds it already).
pub async fn claim(
    db: &impl ConnectionTrait,
    ops: &Operations,
    name: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<bool, DbErr> {
    let now_us = to_micros(now);
    let update = Query::update()
        .table(t())
        .value(c("owner"), ops.replica.as_ref())
        .value(c("lease_until_us"), now_us.saturating_add(ops.lease_us()))
        .and_where(Expr::col(c("id")).eq(bare(name)))
        .and_where(Expr::col(c("done")).eq(false))
        .cond_where(
            Cond::any()
                .add(Expr::col(c("owner")).is_null())
                .add(Expr::col(c("owner")).eq(ops.replica.as_ref()))
                .add(Expr::col(c("lease_until_us")).lt(now_us)),
        )
        .to_owned();
    Ok(db.execute(&update).await?.rows_affected() == 1)
}

/// Reads operation `name` (`operations/{id}`): NOT_FOUND if there is none.
pub async fn get(db: &impl ConnectionTrait, name: &str) -> Result<Operation, Error> {
    let id = name
        .strip_prefix(PREFIX)
        .filter(|id| !id.is_empty() && id.len() <= 128)
        .ok_or_else(|| Error::invalid("name", "must be operations/{id}"))?;
    let select = Query::select()
        .column(c("body"))
        .from(t())
        .and_where(Expr::col(c("id")).eq(id))
        .to_owned();
    let row = db
        .query_one(&select)
        .await?
        .ok_or_else(|| Error::NotFound(name.to_owned()))?;
    let body: Vec<u8> = row.try_get("", "body")?;
    Operation::decode(body.as_slice()).map_err(Error::internal)
}

/// Unfinished operations of `kinds` that nobody holds at `now`, oldest first.
async fn claimable(
    db: &impl ConnectionTrait,
    kinds: &[String],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<(String, String)>, DbErr> {
    let select = Query::select()
        .columns([c("id"), c("kind")])
        .from(t())
        .and_where(Expr::col(c("kind")).is_in(kinds.iter().cloned()))
        .and_where(Expr::col(c("done")).eq(false))
        .cond_where(
            Cond::any()
                .add(Expr::col(c("owner")).is_null())
                .add(Expr::col(c("lease_until_us")).lt(to_micros(now))),
        )
        .order_by(c("create_us"), Order::Asc)
        .limit(100)
        .to_owned();
    let rows = db.query_all(&select).await?;
    rows.iter()
        .map(|r| Ok((r.try_get("", "id")?, r.try_get("", "kind")?)))
        .collect()
}

/// Whether a cancel was asked for `name`, or this replica lost it.
async fn renew(
    db: &impl ConnectionTrait,
    ops: &Operations,
    name: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Renewal, DbErr> {
    let now_us = to_micros(now);
    let update = Query::update()
        .table(t())
        .value(c("lease_until_us"), now_us.saturating_add(ops.lease_us()))
        .and_where(Expr::col(c("id")).eq(bare(name)))
        .and_where(Expr::col(c("owner")).eq(ops.replica.as_ref()))
        .and_where(Expr::col(c("done")).eq(false))
        .to_owned();
    if db.execute(&update).await?.rows_affected() == 0 {
        return Ok(Renewal::Lost);
    }
    let select = Query::select()
        .column(c("cancel_requested"))
        .from(t())
        .and_where(Expr::col(c("id")).eq(bare(name)))
        .to_owned();
    let cancel = match db.query_one(&select).await? {
        Some(row) => row.try_get::<bool>("", "cancel_requested")?,
        None => false,
    };
    Ok(if cancel {
        Renewal::Cancel
    } else {
        Renewal::Held
    })
}

enum Renewal {
    Held,
    Lost,
    Cancel,
}

/// The runner task of a service: claims the operations of `runners`' kinds
/// nobody holds and runs each on this replica under a renewed lease, until
/// `rt.background` is cancelled.
pub async fn run(rt: crate::Runtime, runners: BTreeMap<String, Runner>) {
    if runners.is_empty() {
        return;
    }
    let kinds: Vec<String> = runners.keys().cloned().collect();
    let poll = (rt.operations.lease / 3).max(Duration::from_millis(10));
    let mut failures = 0u32;
    loop {
        match claimable(&rt.db, &kinds, rt.clock.now()).await {
            Ok(found) => {
                failures = 0;
                for (id, kind) in found {
                    let name = format!("{PREFIX}{id}");
                    match claim(&rt.db, &rt.operations, &name, rt.clock.now()).await {
                        Ok(true) => {
                            if let Some(runner) = runners.get(&kind) {
                                tokio::spawn(lease_and_run(rt.clone(), name, runner.clone()));
                            }
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(operation = %name, error = %e, "cannot claim an operation")
                        }
                    }
                }
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(service = rt.service, error = %e, "operations: cannot look for work; retrying");
                }
            }
        }
        tokio::select! {
            () = rt.operations.wake.notified() => {}
            () = tokio::time::sleep(poll) => {}
            () = rt.background.cancelled() => return,
        }
    }
}

/// Runs one claimed operation, renewing its lease; stops the runner when
/// the lease is lost, a cancel is asked, or the service stops.
async fn lease_and_run(rt: crate::Runtime, name: String, runner: Runner) {
    let op = match get(&rt.db, &name).await {
        Ok(op) if !op.done => op,
        Ok(_) => return,
        Err(e) => {
            tracing::warn!(operation = %name, error = %e, "cannot read a claimed operation");
            return;
        }
    };
    tracing::info!(service = rt.service, operation = %name, replica = %rt.operations.replica, "running an operation");
    // The work runs as its own task: a renewal waiting for a row or for
    // SQLite's writer that the work's open transaction holds must not stop
    // the work from reaching its commit.
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut work = tokio::spawn(runner(rt.clone(), op.clone(), cancel.clone()));
    let every = (rt.operations.lease / 3).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            biased;
            outcome = &mut work => {
                let outcome = outcome.unwrap_or_else(|e| Err(Error::internal(format!("the operation's task ended: {e}"))));
                let (code, message) = match outcome {
                    _ if cancel.is_cancelled() => {
                        (tonic::Code::Cancelled, "cancelled by CancelOperation".to_owned())
                    }
                    Ok(()) => return,
                    // Stopped with the service: resumed by the next claim.
                    Err(_) if rt.background.is_cancelled() => return,
                    Err(e) => {
                        tracing::warn!(operation = %name, error = %e, "operation failed");
                        match e {
                            Error::Internal(_) => (tonic::Code::Internal, "the operation failed; see the service log".to_owned()),
                            other => {
                                let message = other.to_string();
                                (tonic::Status::from(other).code(), message)
                            }
                        }
                    }
                };
                // Only if the runner did not end it itself.
                if let Ok(mut latest) = get(&rt.db, &name).await
                    && !latest.done
                {
                    let _ = fail(&rt.db, &rt.operations, &mut latest, code, message, rt.clock.now()).await;
                }
                return;
            }
            () = tokio::time::sleep(every) => {
                match renew(&rt.db, &rt.operations, &name, rt.clock.now()).await {
                    Ok(Renewal::Held) => {}
                    Ok(Renewal::Lost) => {
                        // Done meanwhile, or taken over: either way not ours.
                        if !work.is_finished() {
                            tracing::warn!(operation = %name, "lease lost: another replica runs it now");
                            work.abort();
                        }
                        return;
                    }
                    // The work stops at its next step; the lease stays
                    // renewed until it has.
                    Ok(Renewal::Cancel) => cancel.cancel(),
                    Err(e) => tracing::warn!(operation = %name, error = %e, "cannot renew an operation's lease"),
                }
            }
            () = rt.background.cancelled() => {
                work.abort();
                return;
            }
        }
    }
}

/// Deletes finished operations last changed before `cutoff`; returns how many.
pub async fn purge_older_than(
    db: &impl ConnectionTrait,
    cutoff: chrono::DateTime<chrono::Utc>,
) -> Result<u64, DbErr> {
    let delete = Query::delete()
        .from_table(t())
        .and_where(Expr::col(c("done")).eq(true))
        .and_where(Expr::col(c("update_us")).lt(to_micros(cutoff)))
        .to_owned();
    Ok(db.execute(&delete).await?.rows_affected())
}

/// The filter of `ListOperations`: `kind = "..."` and `done = true|false`,
/// joined by AND.
fn parse_filter(filter: &str) -> Result<(Option<String>, Option<bool>), Error> {
    let bad = |why: &str| Error::invalid("filter", why.to_owned());
    let (mut kind, mut done) = (None, None);
    if filter.trim().is_empty() {
        return Ok((kind, done));
    }
    if filter.len() > 256 {
        return Err(bad("must be at most 256 bytes"));
    }
    for part in filter.split(" AND ") {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            bad("must be `kind = \"...\"` and/or `done = true|false`, joined by AND")
        })?;
        match (k.trim(), v.trim()) {
            ("kind", v) if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') => {
                kind = Some(v[1..v.len() - 1].to_owned());
            }
            ("done", "true") => done = Some(true),
            ("done", "false") => done = Some(false),
            _ => {
                return Err(bad(
                    "must be `kind = \"...\"` and/or `done = true|false`, joined by AND",
                ));
            }
        }
    }
    Ok((kind, done))
}

/// `google.longrunning.Operations` over the service's own operations.
#[derive(Debug, Clone)]
pub struct OperationsServer {
    rt: crate::Runtime,
}

impl OperationsServer {
    /// Serves `rt`'s operations.
    pub fn new(rt: crate::Runtime) -> Self {
        Self { rt }
    }

    async fn list(&self, req: ListOperationsRequest) -> Result<ListOperationsResponse, Error> {
        let size =
            clm_domain::validation::page_size("page_size", req.page_size, 50, 1000)? as usize;
        let (kind, done) = parse_filter(&req.filter)?;
        let pager = Pager::new(&["operations", &req.filter]);
        let after = pager.after::<i64>(&req.page_token)?;
        let mut q = Query::select();
        q.columns([c("id"), c("body"), c("create_us")]).from(t());
        if let Some(k) = kind {
            q.and_where(Expr::col(c("kind")).eq(k));
        }
        if let Some(d) = done {
            q.and_where(Expr::col(c("done")).eq(d));
        }
        if let Some((at, id)) = &after {
            q.cond_where(
                Cond::any().add(Expr::col(c("create_us")).lt(*at)).add(
                    Cond::all()
                        .add(Expr::col(c("create_us")).eq(*at))
                        .add(Expr::col(c("id")).lt(id.as_str())),
                ),
            );
        }
        q.order_by(c("create_us"), Order::Desc)
            .order_by(c("id"), Order::Desc)
            .limit(size as u64 + 1);
        let rows = self.rt.read.query_all(&q).await?;
        let mut ops = Vec::with_capacity(rows.len());
        for r in &rows {
            let body: Vec<u8> = r.try_get("", "body")?;
            let id: String = r.try_get("", "id")?;
            let at: i64 = r.try_get("", "create_us")?;
            ops.push((
                Operation::decode(body.as_slice()).map_err(Error::internal)?,
                at,
                id,
            ));
        }
        let (operations, next_page_token) = pager.page(
            &ops,
            size,
            |(o, _, _)| o.clone(),
            |(_, at, id)| (*at, id.clone()),
        );
        Ok(ListOperationsResponse {
            operations,
            next_page_token,
        })
    }

    async fn cancel(&self, name: &str) -> Result<(), Error> {
        let op = get(&self.rt.db, name).await?;
        if op.done {
            return Ok(());
        }
        let now = self.rt.clock.now();
        // Nobody runs it: it ends here, now.
        let body = Operation {
            done: true,
            result: Some(operation::Result::Error(Status {
                code: tonic::Code::Cancelled as i32,
                message: "cancelled by CancelOperation".into(),
                details: Vec::new(),
            })),
            ..op
        };
        let idle = Query::update()
            .table(t())
            .value(c("body"), body.encode_to_vec())
            .value(c("done"), true)
            .value(c("update_us"), to_micros(now))
            .and_where(Expr::col(c("id")).eq(bare(name)))
            .and_where(Expr::col(c("done")).eq(false))
            .cond_where(
                Cond::any()
                    .add(Expr::col(c("owner")).is_null())
                    .add(Expr::col(c("lease_until_us")).lt(to_micros(now))),
            )
            .to_owned();
        if self.rt.db.execute(&idle).await?.rows_affected() == 1 {
            return Ok(());
        }
        // A replica runs it: its next renewal stops it.
        let flag = Query::update()
            .table(t())
            .value(c("cancel_requested"), true)
            .and_where(Expr::col(c("id")).eq(bare(name)))
            .and_where(Expr::col(c("done")).eq(false))
            .to_owned();
        self.rt.db.execute(&flag).await?;
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<(), Error> {
        let op = get(&self.rt.db, name).await?;
        if !op.done {
            return Err(Error::FailedPrecondition {
                reason: "OPERATION_RUNNING",
                message: format!("{name} is still running; cancel it first"),
            });
        }
        let delete = Query::delete()
            .from_table(t())
            .and_where(Expr::col(c("id")).eq(bare(name)))
            .and_where(Expr::col(c("done")).eq(true))
            .to_owned();
        self.rt.db.execute(&delete).await?;
        Ok(())
    }

    async fn wait(&self, req: WaitOperationRequest) -> Result<Operation, Error> {
        const MAX_WAIT: Duration = Duration::from_secs(60);
        let timeout = match &req.timeout {
            None => Duration::from_secs(30),
            Some(d) => {
                let ms = crate::convert::duration_millis("timeout", d)?;
                if ms < 0 {
                    return Err(Error::invalid("timeout", "must not be negative"));
                }
                Duration::from_millis(u64::try_from(ms).unwrap_or(0)).min(MAX_WAIT)
            }
        };
        // Never past the call's own deadline: answer the latest state
        // just before it instead of DEADLINE_EXCEEDED.
        let mut until = tokio::time::Instant::now() + timeout;
        if let Some(d) = crate::peer::deadline() {
            until = until.min(d.checked_sub(Duration::from_millis(10)).unwrap_or(d));
        }
        let mut pause = Duration::from_millis(10);
        loop {
            let op = get(&self.rt.read, &req.name).await?;
            if op.done || tokio::time::Instant::now() >= until {
                return Ok(op);
            }
            tokio::select! {
                () = tokio::time::sleep_until((tokio::time::Instant::now() + pause).min(until)) => {}
                () = self.rt.background.cancelled() => return Ok(op),
            }
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }
}

#[tonic::async_trait]
impl OperationsRpc for OperationsServer {
    async fn list_operations(
        &self,
        request: tonic::Request<ListOperationsRequest>,
    ) -> Result<tonic::Response<ListOperationsResponse>, tonic::Status> {
        authorize(&request, &OPERATIONS_POLICY)?;
        crate::error::known_enums(request.get_ref())?;
        Ok(tonic::Response::new(self.list(request.into_inner()).await?))
    }

    async fn get_operation(
        &self,
        request: tonic::Request<GetOperationRequest>,
    ) -> Result<tonic::Response<Operation>, tonic::Status> {
        authorize(&request, &OPERATIONS_POLICY)?;
        crate::error::known_enums(request.get_ref())?;
        Ok(tonic::Response::new(
            get(&self.rt.read, &request.get_ref().name).await?,
        ))
    }

    async fn delete_operation(
        &self,
        request: tonic::Request<DeleteOperationRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        authorize(&request, &OPERATIONS_POLICY)?;
        crate::error::known_enums(request.get_ref())?;
        self.delete(&request.get_ref().name).await?;
        Ok(tonic::Response::new(()))
    }

    async fn cancel_operation(
        &self,
        request: tonic::Request<CancelOperationRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        authorize(&request, &OPERATIONS_POLICY)?;
        crate::error::known_enums(request.get_ref())?;
        self.cancel(&request.get_ref().name).await?;
        Ok(tonic::Response::new(()))
    }

    async fn wait_operation(
        &self,
        request: tonic::Request<WaitOperationRequest>,
    ) -> Result<tonic::Response<Operation>, tonic::Status> {
        authorize(&request, &OPERATIONS_POLICY)?;
        crate::error::known_enums(request.get_ref())?;
        Ok(tonic::Response::new(self.wait(request.into_inner()).await?))
    }
}
