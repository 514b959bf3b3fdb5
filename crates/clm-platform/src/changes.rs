//! Change streams: the `clm.common.v1.ChangeStreamService` server every
//! service mounts over its outbox, and the reconnecting [`Subscriber`] a
//! service runs for each stream it follows.
//!
//! A subscriber applies each event and stores its cursor in the *same*
//! transaction of its own database, so a crash or restart of either side
//! loses nothing and applies nothing twice.

use crate::auth::{Role, authorize};
use crate::client::ClientInterceptor;
use crate::db::{from_micros, to_micros};
use crate::error::Error;
use crate::outbox::Outbox;
use clm_proto::common::change_stream_service_client::ChangeStreamServiceClient;
use clm_proto::common::change_stream_service_server::ChangeStreamService;
use clm_proto::common::{ChangeEvent, WatchChangesRequest, WatchChangesResponse};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, OnConflict, Query};
use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr, TransactionTrait};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Events read from the outbox per query.
const READ_BATCH: u64 = 500;

/// Serves a service's outbox as `WatchChanges`.
#[derive(Clone, Debug)]
pub struct ChangeStreamServer {
    db: DatabaseConnection,
    outbox: Outbox,
    shutdown: CancellationToken,
    poll: Duration,
}

impl ChangeStreamServer {
    /// Serves `outbox` stored in `db`; open streams end with UNAVAILABLE on `shutdown`.
    pub fn new(db: DatabaseConnection, outbox: Outbox, shutdown: CancellationToken) -> Self {
        Self {
            db,
            outbox,
            shutdown,
            poll: Duration::from_secs(1),
        }
    }

    /// How often an idle stream re-reads the outbox even without a wake-up
    /// (a safety net: commits here and NOTIFY from other replicas wake it at once).
    #[must_use]
    pub fn with_poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }
}

#[tonic::async_trait]
impl ChangeStreamService for ChangeStreamServer {
    type WatchChangesStream = ReceiverStream<Result<WatchChangesResponse, Status>>;

    async fn watch_changes(
        &self,
        request: Request<WatchChangesRequest>,
    ) -> Result<Response<Self::WatchChangesStream>, Status> {
        authorize(&request, &[Role::Service, Role::Analyst])?;
        let req = request.into_inner();
        if req.after_sequence < 0 {
            return Err(Error::invalid("after_sequence", "must not be negative").into());
        }
        let (tx, rx) = mpsc::channel(2 * READ_BATCH as usize);
        let this = self.clone();
        tokio::spawn(async move {
            let mut cursor = req.after_sequence;
            let mut wake = this.outbox.subscribe();
            loop {
                wake.mark_unchanged();
                match this
                    .outbox
                    .read_after(&this.db, cursor, &req.event_types, READ_BATCH)
                    .await
                {
                    Ok(events) if !events.is_empty() => {
                        for event in events {
                            cursor = event.sequence;
                            if tx
                                .send(Ok(WatchChangesResponse { event: Some(event) }))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(Error::from(e).into())).await;
                        return;
                    }
                }
                tokio::select! {
                    _ = wake.changed() => {}
                    () = tokio::time::sleep(this.poll) => {}
                    () = tx.closed() => return,
                    () = this.shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("server is shutting down; resume from your last sequence"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Applies the events of one stream. Called inside the transaction that
/// also advances the cursor.
#[async_trait::async_trait]
pub trait EventHandler: Send + Sync + 'static {
    /// Applies `event`. An error rolls the transaction back. `Error::Unavailable`
    /// (a dependency is down) is retried forever; any other error is retried
    /// up to the subscriber's `max_attempts`, then the event is parked in
    /// `dead_letters` and the stream moves on.
    async fn handle(&self, txn: &DatabaseTransaction, event: &ChangeEvent) -> Result<(), Error>;
}

/// Follows another service's change stream, forever, from the cursor it
/// keeps in `consumer_cursors`.
#[derive(Debug)]
pub struct Subscriber<H> {
    /// Cursor key, usually the source service name.
    pub source: String,
    /// `http://host:port` of the source service.
    pub endpoint: String,
    /// Only these event types (empty = all).
    pub event_types: Vec<String>,
    /// Bearer token for the source, if it checks auth.
    pub token: Option<String>,
    /// This service's database (holds the cursor).
    pub db: DatabaseConnection,
    /// What to do with each event.
    pub handler: H,
    /// First retry delay; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Attempts at one event before it is parked in `dead_letters`.
    pub max_attempts: u32,
}

struct Instruments {
    lag: opentelemetry::metrics::Histogram<f64>,
    dead_letters: opentelemetry::metrics::Counter<u64>,
    attrs: [opentelemetry::KeyValue; 1],
}

impl<H: EventHandler> Subscriber<H> {
    /// A subscriber with default backoff (100 ms doubling to 10 s) and 10 attempts per event.
    pub fn new(
        source: impl Into<String>,
        endpoint: impl Into<String>,
        db: DatabaseConnection,
        handler: H,
    ) -> Self {
        Self {
            source: source.into(),
            endpoint: endpoint.into(),
            event_types: Vec::new(),
            token: None,
            db,
            handler,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_attempts: 10,
        }
    }

    /// Runs until `shutdown`, reconnecting with backoff after any failure.
    pub async fn run(self, shutdown: CancellationToken) {
        let meter = opentelemetry::global::meter("clm");
        let instruments = Instruments {
            lag: meter
                .f64_histogram("clm.subscriber.lag")
                .with_unit("s")
                .with_description(
                    "Seconds between an event's commit at the source and its application here",
                )
                .build(),
            dead_letters: meter
                .u64_counter("clm.subscriber.dead_letters")
                .with_description("Events parked after failing max_attempts times")
                .build(),
            attrs: [opentelemetry::KeyValue::new("source", self.source.clone())],
        };
        let mut backoff = self.min_backoff;
        loop {
            let mut progressed = false;
            let outcome = tokio::select! {
                r = self.follow(&instruments, &mut progressed) => r,
                () = shutdown.cancelled() => return,
            };
            if progressed {
                backoff = self.min_backoff;
            }
            match outcome {
                Ok(()) => {
                    tracing::info!(source = %self.source, "change stream ended; reconnecting")
                }
                Err(e) => {
                    tracing::warn!(source = %self.source, error = %e, ?backoff, "change stream failed; reconnecting")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }

    async fn follow(&self, inst: &Instruments, progressed: &mut bool) -> Result<(), Error> {
        let mut cursor = load_cursor(&self.db, &self.source).await?;
        let channel = crate::client::channel(&self.endpoint)
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        let mut client = ChangeStreamServiceClient::with_interceptor(
            channel,
            ClientInterceptor::new(self.token.as_deref()),
        );
        let mut stream = client
            .watch_changes(WatchChangesRequest {
                after_sequence: cursor,
                event_types: self.event_types.clone(),
            })
            .await
            .map_err(|s| Error::Unavailable(s.to_string()))?
            .into_inner();
        while let Some(msg) = stream.next().await {
            let event = msg
                .map_err(|s| Error::Unavailable(s.to_string()))?
                .event
                .unwrap_or_default();
            if event.sequence <= cursor {
                continue;
            }
            self.apply(&event, inst).await?;
            cursor = event.sequence;
            *progressed = true;
            if let Some(t) = &event.occurred_time {
                let at = from_micros(t.seconds * 1_000_000 + i64::from(t.nanos) / 1000);
                inst.lag.record(
                    (chrono::Utc::now() - at).as_seconds_f64().max(0.0),
                    &inst.attrs,
                );
            }
        }
        Ok(())
    }

    /// Applies one event with its cursor, retrying handler failures and
    /// parking the event after `max_attempts`.
    async fn apply(&self, event: &ChangeEvent, inst: &Instruments) -> Result<(), Error> {
        let mut attempt = 0;
        let mut backoff = self.min_backoff;
        loop {
            attempt += 1;
            let txn = self.db.begin().await?;
            let failure = match self.handler.handle(&txn, event).await {
                Ok(()) => {
                    save_cursor(&txn, &self.source, event.sequence).await?;
                    txn.commit().await?;
                    return Ok(());
                }
                Err(e @ Error::Unavailable(_)) => return Err(e),
                Err(e) => e,
            };
            drop(txn);
            if attempt >= Ord::max(self.max_attempts, 1) {
                tracing::error!(source = %self.source, sequence = event.sequence, event_type = %event.event_type, error = %failure, attempt, "event parked in dead_letters");
                let txn = self.db.begin().await?;
                park(&txn, &self.source, event, &failure.to_string(), attempt).await?;
                save_cursor(&txn, &self.source, event.sequence).await?;
                txn.commit().await?;
                inst.dead_letters.add(1, &inst.attrs);
                return Ok(());
            }
            tracing::warn!(source = %self.source, sequence = event.sequence, error = %failure, attempt, "event failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }
}

/// Stores an event that could not be applied, for inspection and replay.
async fn park(
    txn: &DatabaseTransaction,
    source: &str,
    event: &ChangeEvent,
    error: &str,
    attempts: u32,
) -> Result<(), DbErr> {
    let payload = event
        .payload
        .as_ref()
        .map(|p| p.value.clone())
        .unwrap_or_default();
    let mut insert = Query::insert();
    insert
        .into_table(Alias::new("dead_letters"))
        .columns(
            [
                "source",
                "sequence",
                "event_id",
                "event_type",
                "subject",
                "payload",
                "error",
                "attempts",
                "create_us",
            ]
            .map(Alias::new),
        )
        .values_panic([
            source.into(),
            event.sequence.into(),
            event.event_id.clone().into(),
            event.event_type.clone().into(),
            event.subject.clone().into(),
            payload.into(),
            error.into(),
            i64::from(attempts).into(),
            to_micros(chrono::Utc::now()).into(),
        ])
        .on_conflict(
            OnConflict::columns([Alias::new("source"), Alias::new("sequence")])
                .do_nothing()
                .to_owned(),
        );
    txn.execute(&insert).await?;
    Ok(())
}

/// The last sequence applied from `source` (0 if none).
pub async fn load_cursor(db: &impl ConnectionTrait, source: &str) -> Result<i64, DbErr> {
    let row = db
        .query_one(
            Query::select()
                .column(Alias::new("sequence"))
                .from(Alias::new("consumer_cursors"))
                .and_where(Expr::col(Alias::new("source")).eq(source)),
        )
        .await?;
    row.map_or(Ok(0), |r| r.try_get("", "sequence"))
}

/// Stores the cursor of `source` (inside the caller's transaction).
pub async fn save_cursor(
    txn: &impl ConnectionTrait,
    source: &str,
    sequence: i64,
) -> Result<(), DbErr> {
    let mut upsert = Query::insert();
    upsert
        .into_table(Alias::new("consumer_cursors"))
        .columns(["source", "sequence", "update_us"].map(Alias::new))
        .values_panic([
            source.into(),
            sequence.into(),
            to_micros(chrono::Utc::now()).into(),
        ])
        .on_conflict(
            OnConflict::column(Alias::new("source"))
                .update_columns([Alias::new("sequence"), Alias::new("update_us")])
                .to_owned(),
        );
    txn.execute(&upsert).await?;
    Ok(())
}
