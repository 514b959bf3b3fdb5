//! Change streams over NATS JetStream, chosen by config; `WatchChanges`
//! stays the public API and the default, and `clm up` needs no broker.
//!
//! * **The relay** (`nats.relay = true`) publishes this service's stamped
//!   outbox events, in position order, to the stream `<prefix>-<service>`
//!   (subject `<prefix>.<service>.events`, created if missing), each an
//!   encoded [`ChangeEvent`] with `Nats-Msg-Id: <service>:<position>` and a
//!   `Clm-Position` header. It resumes after the position of the stream's
//!   last message, so a relay that restarts republishes at most what it had
//!   not seen acknowledged, and the broker drops those copies within its
//!   duplicate window. Several replicas may relay at once: each publishes
//!   consecutive positions from the stream's last one, so the stream holds
//!   positions in order, a late copy at worst repeating an older one.
//! * **The subscriber** (`subscriber.source = "jetstream"`) reads a source's
//!   stream with an ordered consumer starting at the first message after its
//!   cursor (found by a binary search over the stream's sequences on the
//!   `Clm-Position` header), skips anything at or before the cursor, and
//!   applies batches exactly as from `WatchChanges`: the cursor is stored in
//!   the consumer's own transaction with the effect, so a redelivery after
//!   a crash or a broker restart changes nothing. JetStream's dedupe is a
//!   window, not a guarantee; the cursor is what makes delivery exactly once.

use crate::Runtime;
use crate::config::NatsConfig;
use crate::error::Error;
use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use clm_proto::common::ChangeEvent;
use futures::StreamExt;
use prost::Message;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Header carrying an event's outbox position.
pub const POSITION: &str = "Clm-Position";
/// Events a relay reads and publishes per round.
const RELAY_BATCH: u64 = 1_000;
/// The broker's duplicate window of the streams the relay creates.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

/// The stream and subject of a service's change stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// Stream name (`clm-customer`).
    pub stream: String,
    /// Subject (`clm.customer.events`).
    pub subject: String,
}

/// The names of `service`'s stream under `prefix`.
pub fn names(prefix: &str, service: &str) -> Names {
    Names {
        stream: format!("{prefix}-{service}"),
        subject: format!("{prefix}.{service}.events"),
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("nats: {what}: {e}"))
}

/// A JetStream context on `config.url`.
pub async fn connect(config: &NatsConfig) -> Result<jetstream::Context, Error> {
    let url = config
        .url
        .as_deref()
        .ok_or_else(|| Error::internal("nats.url is not set"))?;
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .retry_on_initial_connect()
        .connect(url)
        .await
        .map_err(|e| unavailable("connect", e))?;
    Ok(jetstream::new(client))
}

/// The position an event message carries.
fn position_of(headers: Option<&async_nats::HeaderMap>) -> Option<i64> {
    headers?.get(POSITION)?.as_str().parse().ok()
}

/// The position of the last event in `stream` (0 when it is empty).
pub async fn last_position(stream: &stream::Stream, subject: &str) -> Result<i64, Error> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => Ok(position_of(Some(&m.headers)).unwrap_or(0)),
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
        Err(e) => Err(unavailable("last message", e)),
    }
}

/// The stream of `names`, created (file storage, `retention` max age, the
/// duplicate window) if it does not exist.
pub async fn ensure_stream(
    js: &jetstream::Context,
    names: &Names,
    retention: Duration,
) -> Result<stream::Stream, Error> {
    js.get_or_create_stream(stream::Config {
        name: names.stream.clone(),
        subjects: vec![names.subject.clone()],
        max_age: retention,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    })
    .await
    .map_err(|e| unavailable("stream", e))
}

/// Publishes the events stamped after the stream's last one; returns how
/// many (each acknowledged by the broker before the next round).
pub async fn relay_round(
    rt: &Runtime,
    js: &jetstream::Context,
    stream: &stream::Stream,
    names: &Names,
) -> Result<usize, Error> {
    let after = last_position(stream, &names.subject).await?;
    let events = rt
        .outbox
        .read_after(&rt.db, after, &[], RELAY_BATCH)
        .await
        .map_err(Error::from)?;
    let mut acks = Vec::with_capacity(events.len());
    for e in &events {
        let publish = PublishMessage::build()
            .payload(e.encode_to_vec().into())
            .message_id(format!("{}:{}", rt.service, e.sequence))
            .header(POSITION, e.sequence.to_string().as_str());
        acks.push(
            js.send_publish(names.subject.clone(), publish)
                .await
                .map_err(|e| unavailable("publish", e))?,
        );
    }
    for ack in acks {
        ack.await.map_err(|e| unavailable("publish ack", e))?;
    }
    Ok(events.len())
}

/// Runs the relay of `rt`'s service until `shutdown`: a round after every
/// stamp of the outbox (and at least every `poll`), backing off while the
/// broker is unreachable.
pub async fn run_relay(rt: Runtime, poll: Duration, shutdown: CancellationToken) {
    let config = rt.config.nats.clone();
    let names = names(&config.stream_prefix, rt.service);
    let retention = Duration::from_secs(u64::from(rt.config.outbox_retention_days) * 86_400);
    let mut stamped = rt.outbox.subscribe();
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    loop {
        let round = async {
            let js = connect(&config).await?;
            let stream = ensure_stream(&js, &names, retention).await?;
            loop {
                while relay_round(&rt, &js, &stream, &names).await? > 0 {}
                tokio::select! {
                    _ = stamped.changed() => {}
                    () = tokio::time::sleep(poll) => {}
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), Error>(())
        };
        let failed = tokio::select! {
            r = round => r.err(),
            () = shutdown.cancelled() => return,
        };
        if let Some(e) = failed {
            if !failing {
                tracing::warn!(service = rt.service, stream = %names.stream, error = %e, "jetstream relay interrupted; retrying");
            }
            failing = true;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// The first stream sequence whose event comes after `cursor` (a binary
/// search on the `Clm-Position` header; positions grow with the sequence).
async fn start_sequence(stream: &mut stream::Stream, cursor: i64) -> Result<u64, Error> {
    let state = stream
        .info()
        .await
        .map_err(|e| unavailable("stream info", e))?
        .state
        .clone();
    let (mut lo, mut hi) = (state.first_sequence, state.last_sequence.saturating_add(1));
    if state.messages == 0 {
        return Ok(hi.max(1));
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let position = match stream.get_raw_message(mid).await {
            Ok(m) => position_of(Some(&m.headers)).unwrap_or(0),
            // A message removed meanwhile (age): look later.
            Err(_) => i64::MIN,
        };
        if position > cursor {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}

/// Change events of `names` after `cursor`, read with an ordered consumer
/// (no acks; it recreates itself across gaps and reconnects).
pub async fn events_after(
    js: &jetstream::Context,
    names: &Names,
    cursor: i64,
) -> Result<impl futures::Stream<Item = Result<ChangeEvent, Error>> + use<>, Error> {
    let mut stream = js
        .get_stream(&names.stream)
        .await
        .map_err(|e| unavailable(&format!("stream {}", names.stream), e))?;
    let start = start_sequence(&mut stream, cursor).await?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: names.subject.clone(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable("consumer", e))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| unavailable("messages", e))?;
    Ok(messages.map(|m| {
        let m = m.map_err(|e| unavailable("message", e))?;
        ChangeEvent::decode(m.payload.as_ref())
            .map_err(|e| Error::internal(format!("an undecodable change event on the stream: {e}")))
    }))
}
