//! Long-running operations (`google.longrunning.Operation`) kept in the
//! service's own `operations` table: a service starts one in the write
//! transaction of the rpc that asks for the work, reports progress in
//! `metadata` as it goes, and finishes it with a response or an error;
//! `GetOperation` reads it back. The whole `Operation` message is stored
//! encoded, so any service's metadata and response types fit.

use crate::db::to_micros;
use crate::error::Error;
use clm_proto::google::longrunning::{Operation, operation};
use clm_proto::google::rpc::Status;
use prost::Message;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
use sea_orm::{ConnectionTrait, DbErr};

/// Name prefix of operations: `operations/{id}`.
pub const PREFIX: &str = "operations/";

fn t() -> Alias {
    Alias::new("operations")
}

fn c(s: &str) -> Alias {
    Alias::new(s)
}

/// Starts operation `operations/{id}` of `kind` with its first `metadata`.
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

async fn store(
    db: &impl ConnectionTrait,
    op: &Operation,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), DbErr> {
    let id = op.name.strip_prefix(PREFIX).unwrap_or(&op.name);
    let update = Query::update()
        .table(t())
        .value(c("body"), op.encode_to_vec())
        .value(c("done"), op.done)
        .value(c("update_us"), to_micros(now))
        .and_where(Expr::col(c("id")).eq(id))
        .to_owned();
    db.execute(&update).await?;
    Ok(())
}

/// Replaces the progress `metadata` of a running operation.
pub async fn progress(
    db: &impl ConnectionTrait,
    op: &mut Operation,
    metadata: prost_types::Any,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), DbErr> {
    op.metadata = Some(metadata);
    store(db, op, now).await
}

/// Finishes an operation with `response` (and final `metadata`).
pub async fn succeed(
    db: &impl ConnectionTrait,
    op: &mut Operation,
    metadata: prost_types::Any,
    response: prost_types::Any,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), DbErr> {
    op.metadata = Some(metadata);
    op.done = true;
    op.result = Some(operation::Result::Response(response));
    store(db, op, now).await
}

/// Finishes an operation with an error.
pub async fn fail(
    db: &impl ConnectionTrait,
    op: &mut Operation,
    code: tonic::Code,
    message: String,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), DbErr> {
    op.done = true;
    op.result = Some(operation::Result::Error(Status {
        code: code as i32,
        message,
        details: Vec::new(),
    }));
    store(db, op, now).await
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

/// Operations not done (to resume after a restart), oldest first, of `kind`.
pub async fn unfinished(db: &impl ConnectionTrait, kind: &str) -> Result<Vec<Operation>, Error> {
    let select = Query::select()
        .column(c("body"))
        .from(t())
        .and_where(Expr::col(c("kind")).eq(kind))
        .and_where(Expr::col(c("done")).eq(false))
        .order_by(c("create_us"), sea_orm::sea_query::Order::Asc)
        .to_owned();
    let rows = db.query_all(&select).await?;
    rows.into_iter()
        .map(|r| {
            let body: Vec<u8> = r.try_get("", "body")?;
            Operation::decode(body.as_slice()).map_err(Error::internal)
        })
        .collect()
}
