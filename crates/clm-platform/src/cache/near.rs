//! A coherent in-process copy of the Redis hashes this process read lately
//! (server-assisted client-side caching), so a hot read answers without a
//! round trip to Redis.
//!
//! # Coherent, not merely recent
//!
//! A tracking connection asks Redis to tell it of every change of every key
//! under the cache's prefix, whoever makes it (`CLIENT TRACKING ON BCAST
//! PREFIX`, RESP3): a write from another replica, a script's delete, an
//! expiry. Each such message removes the key here. Three rules keep a stale
//! copy from ever being served after the change is known:
//!
//! * **Only while tracking.** Entries are served and stored only while the
//!   tracking connection is up; it is pinged every [`PING_EVERY`] and
//!   declared down when a ping is not answered within the cache's operation
//!   timeout or the connection reports a disconnection. Down clears
//!   everything; up again starts empty.
//! * **A reply older than an invalidation is not stored.** A read takes a
//!   [`Near::ticket`] (the invalidation generation) before it asks Redis and
//!   stores the reply only if no invalidation came since: a change that
//!   Redis applied after answering the read is announced after the answer,
//!   so either the reply is refused or the message removes it.
//! * **Own writes are seen at once.** A write through this cache removes its
//!   keys when Redis has answered it, without waiting for the message, so a
//!   read that starts after the write returned never finds the old copy.
//!
//! One Redis node only: a cluster's keys live on several nodes, each of
//! which would need its own tracking connection (not built; a cluster reads
//! from Redis every time).

use redis::aio::{AsyncPushSender, SendError};
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

/// How often the tracking connection is pinged.
pub const PING_EVERY: Duration = Duration::from_millis(200);

/// Keys kept at most.
const CAPACITY: u64 = 100_000;

/// A hash read whole is kept only up to this many fields (a segment's set
/// of members is not: it is read member by member).
const WHOLE_MAX: usize = 1024;

/// Fields read one by one kept per key at most.
const FIELDS_MAX: usize = 64;

/// Every field of a hash and its value, as `HGETALL` answers them.
pub(super) type Fields = Arc<Vec<(Vec<u8>, Vec<u8>)>>;

/// What is known of one hash.
#[derive(Debug, Default, Clone)]
struct Entry {
    /// Every field, when read whole (`HGETALL`).
    whole: Option<Fields>,
    /// Fields read one by one (`HMGET`): `None` when absent.
    fields: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Entry {
    fn field(&self, name: &[u8]) -> Option<Option<Vec<u8>>> {
        match &self.whole {
            Some(all) => Some(all.iter().find(|(f, _)| f == name).map(|(_, v)| v.clone())),
            None => self.fields.get(name).cloned(),
        }
    }
}

/// The copy; see the module docs.
pub(super) struct Near {
    entries: moka::sync::Cache<String, Arc<Entry>>,
    /// Bumped by every invalidation, under this lock; stores happen under
    /// it too, so a store and an invalidation never interleave.
    generation: Mutex<u64>,
    /// The tracking connection is up and subscribed.
    live: AtomicBool,
    /// Reads answered here.
    hits: AtomicU64,
}

impl Near {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            entries: moka::sync::Cache::new(CAPACITY),
            generation: Mutex::new(0),
            live: AtomicBool::new(false),
            hits: AtomicU64::new(0),
        })
    }

    fn generation(&self) -> std::sync::MutexGuard<'_, u64> {
        self.generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// What a read quotes to store its reply; `None` while not tracking.
    pub(super) fn ticket(&self) -> Option<u64> {
        let g = self.generation();
        self.live.load(Ordering::SeqCst).then_some(*g)
    }

    /// The values of `names` in `key` (`None` inside: absent), when all
    /// are known.
    pub(super) fn fields(&self, key: &str, names: &[&[u8]]) -> Option<Vec<Option<Vec<u8>>>> {
        if !self.live.load(Ordering::SeqCst) {
            return None;
        }
        let e = self.entries.get(key)?;
        let known: Option<Vec<_>> = names.iter().map(|n| e.field(n)).collect();
        if known.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        known
    }

    /// Every field of `key`, when it was read whole.
    pub(super) fn whole(&self, key: &str) -> Option<Fields> {
        if !self.live.load(Ordering::SeqCst) {
            return None;
        }
        let whole = self.entries.get(key)?.whole.clone();
        if whole.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        whole
    }

    /// Reads answered here so far.
    pub(super) fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Stores fields read with `ticket`, unless an invalidation came since.
    pub(super) fn store_fields(
        &self,
        ticket: Option<u64>,
        key: &str,
        read: impl IntoIterator<Item = (Vec<u8>, Option<Vec<u8>>)>,
    ) {
        self.store(ticket, key, |e| {
            if e.whole.is_none() && e.fields.len() < FIELDS_MAX {
                e.fields.extend(read);
            }
        });
    }

    /// Stores a whole hash read with `ticket`, unless an invalidation came
    /// since (or it is too large to keep).
    pub(super) fn store_whole(&self, ticket: Option<u64>, key: &str, all: &[(Vec<u8>, Vec<u8>)]) {
        if all.len() > WHOLE_MAX {
            return;
        }
        self.store(ticket, key, |e| {
            *e = Entry {
                whole: Some(Arc::new(all.to_vec())),
                fields: HashMap::new(),
            }
        });
    }

    fn store(&self, ticket: Option<u64>, key: &str, f: impl FnOnce(&mut Entry)) {
        let Some(ticket) = ticket else { return };
        let g = self.generation();
        if *g != ticket || !self.live.load(Ordering::SeqCst) {
            return;
        }
        let mut e = self
            .entries
            .get(key)
            .map(|e| (*e).clone())
            .unwrap_or_default();
        f(&mut e);
        self.entries.insert(key.to_owned(), Arc::new(e));
    }

    /// Forgets `keys` (changed, or written by this process).
    pub(super) fn invalidate<K: AsRef<str>>(&self, keys: impl IntoIterator<Item = K>) {
        let mut g = self.generation();
        *g += 1;
        for k in keys {
            self.entries.invalidate(k.as_ref());
        }
    }

    /// Forgets everything.
    pub(super) fn clear(&self) {
        let mut g = self.generation();
        *g += 1;
        self.entries.invalidate_all();
    }

    /// Tracking started (`live`: serve from an empty copy) or lost (serve
    /// nothing, keep nothing).
    fn set_live(&self, live: bool) {
        let mut g = self.generation();
        *g += 1;
        // Nothing is served while the copy empties, whichever way it goes.
        self.live.store(false, Ordering::SeqCst);
        self.entries.invalidate_all();
        self.live.store(live, Ordering::SeqCst);
    }

    fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    /// An `invalidate` message: its keys, or everything (a flush sends
    /// none, and a key that is not text cannot be ours).
    fn on_message(&self, data: &[Value]) {
        match data.first() {
            Some(Value::Array(keys)) => {
                let keys: Option<Vec<String>> = keys
                    .iter()
                    .map(|k| match k {
                        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
                        Value::SimpleString(s) => Some(s.clone()),
                        _ => None,
                    })
                    .collect();
                match keys {
                    Some(keys) => self.invalidate(keys),
                    None => self.clear(),
                }
            }
            _ => self.clear(),
        }
    }
}

/// Receives the tracking connection's push messages, on its reader, in
/// the order Redis sent them.
struct Messages(Weak<Near>);

impl AsyncPushSender for Messages {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        let near = self.0.upgrade().ok_or(SendError)?;
        match info.kind {
            PushKind::Invalidate => near.on_message(&info.data),
            PushKind::Disconnection => near.set_live(false),
            _ => {}
        }
        Ok(())
    }
}

/// Keeps the tracking connection to `client`'s node for keys under
/// `prefix`, reconnecting every `retry` while it is down; ends when `near`
/// is dropped.
pub(super) async fn track(
    near: Weak<Near>,
    client: &redis::Client,
    prefix: String,
    timeout: Duration,
    retry: Duration,
) {
    let info = client.get_connection_info().clone();
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let Ok(client) = redis::Client::open(info.set_redis_settings(settings)) else {
        return;
    };
    loop {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_push_sender(Messages(near.clone()));
        let connected = tokio::time::timeout(
            timeout,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await;
        if let Ok(Ok(mut conn)) = connected {
            let mut on = redis::cmd("CLIENT");
            on.arg("TRACKING")
                .arg("ON")
                .arg("BCAST")
                .arg("PREFIX")
                .arg(&prefix);
            let subscribed = tokio::time::timeout(timeout, on.exec_async(&mut conn)).await;
            if let Ok(Err(e)) = &subscribed
                && matches!(e.kind(), redis::ErrorKind::Server(_))
            {
                // A Redis before 6 (or one that forbids CLIENT): every read
                // goes to Redis, as on a cluster.
                tracing::warn!(error = %e, "redis refuses client tracking: no near copy of the cache");
                return;
            }
            if matches!(subscribed, Ok(Ok(()))) {
                let Some(n) = near.upgrade() else { return };
                n.set_live(true);
                drop(n);
                loop {
                    tokio::time::sleep(PING_EVERY).await;
                    let Some(n) = near.upgrade() else { return };
                    if !n.is_live() {
                        break;
                    }
                    let ping = redis::cmd("PING");
                    let answer = ping.query_async::<String>(&mut conn);
                    if !matches!(tokio::time::timeout(timeout, answer).await, Ok(Ok(_))) {
                        n.set_live(false);
                        break;
                    }
                }
            }
        }
        match near.upgrade() {
            Some(n) => n.set_live(false),
            None => return,
        }
        tokio::time::sleep(retry).await;
    }
}
