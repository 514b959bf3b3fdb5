//! A cache that can say "unknown": Redis (the `redis` crate's
//! `ConnectionManager`) or, without a Redis URL, an in-process moka cache
//! with the same semantics. Built for segment membership (a set per segment
//! and a set per customer) and for versioned values.
//!
//! # The cache is never the truth
//!
//! Every read answers a [`Lookup`]:
//!
//! * [`Lookup::Hit`]: the cache knows the answer.
//! * [`Lookup::Miss`]: the key is cold (never loaded, deleted, evicted):
//!   read the database, then load the key ([`Cache::set_replace`],
//!   [`Cache::put`]) so the next read hits.
//! * [`Lookup::Unavailable`]: Redis is down, slow (every operation is bounded
//!   by [`OP_TIMEOUT`]) or still being repaired after an outage: read the
//!   database and do not try to load the key.
//!
//! A cold or unreachable cache therefore never reads as "not a member":
//! [`Cache::set_contains`] answers `Hit(false)` only when the member was
//! removed (a tombstone) or when the whole set is known complete.
//!
//! # Versions: an older write landing late never wins
//!
//! Every write carries a version (`>= 1`), written after the database commit
//! it reflects. Versions of one key must come from one source that grows in
//! commit order for each member, and a load's version must cover every
//! change it saw (the service's own outbox sequence or a version column
//! bumped in the same `UPDATE` both work). A key keeps, atomically (a Lua
//! script on Redis, a mutex in memory):
//!
//! * a **floor**: writes at or below it are refused. [`Cache::set_replace`]
//!   raises it to the load's version, [`Cache::delete`] to the highest
//!   version the key has seen (and at least the given one).
//! * per set member, the **version of its last change** and whether it is
//!   present (a removal is a tombstone, not a deletion): a member write wins
//!   only with a higher version than both the member's and the floor.
//! * whether the set is **complete** (loaded by [`Cache::set_replace`]): only
//!   a complete set answers `Hit(false)` for a member it has no entry for,
//!   and only a complete set lists its members.
//!
//! [`Cache::delete`] keeps the fence: the key reads `Miss` afterwards, but a
//! late write with a version at or below the deletion's is still refused.
//! It takes O(1) whatever the set's size (the highest version is kept as it
//! goes; Redis frees the hash with `UNLINK`, off its main thread).
//!
//! Tombstones do not pile up: once a set holds more than
//! [`TOMBSTONE_SLACK`] of them and they are over half its entries, the
//! write that tips it forgets the key as [`Cache::delete`] does (fenced, so
//! no late write resurrects a removed member; it reads `Miss` until loaded
//! again). A set that churns (members entering and leaving a segment for
//! years) stays about the size of its live members.
//! Writes answer whether they were applied (`false` / `0` = refused as
//! older); callers need not act on that.
//!
//! # Redis down: start, serve, repair
//!
//! [`Cache::connect`] never waits for Redis: the service starts and serves
//! with Redis down, and a background task reconnects. While Redis is
//! unhealthy, reads answer `Unavailable` at once and writes fail at once with
//! [`CacheError::Unavailable`]; a call never waits longer than
//! [`OP_TIMEOUT`].
//!
//! A write that failed (or timed out, and so may or may not have landed) left
//! Redis possibly stale. The cache remembers that key with the write's
//! version, and before it answers reads again it deletes each such key with
//! that version (fenced, see above), so a stale value is never served and a
//! late copy of the lost write cannot land. The caller of a failed write has
//! nothing to do. Past [`MAX_PENDING_REPAIRS`] keys it stops counting and
//! invalidates every key under its prefix instead (SCAN). What this cannot
//! cover: a process that dies with repairs pending (a peer replica may then
//! read stale entries until the next change of those keys), and a Redis that
//! loses keys by itself (restart with old persistence, eviction): run it
//! without persistence (`--save ""`) and with `maxmemory-policy noeviction`.
//!
//! # Keys
//!
//! Every key is stored under the configured prefix (`clm:<service>:`) and is
//! otherwise passed untouched, so callers may put a Redis Cluster hash tag
//! in it: `seg:{42}` and `seg:{42}:x` land in one slot. Each key is a Redis
//! hash whose field names starting with a NUL byte are reserved; members
//! must be non-empty and must not start with NUL. A key holds either a value
//! or a set, never both.
//!
//! # In-process cache
//!
//! Same semantics, never `Unavailable`. Its capacity counts set members;
//! when an entry is evicted, its highest version becomes the floor of every
//! key created afterwards, so eviction cannot lift a fence either (a fresh
//! key may refuse writes older than that until it is loaded: it stays cold,
//! which is safe).
//!
//! # Near copy
//!
//! On one Redis node, the cache also keeps an in-process copy of the
//! hashes it read lately and answers [`Cache::set_contains`] and
//! [`Cache::set_members`] from it without a round trip. Redis keeps it
//! coherent: a tracking connection hears of every change of every key
//! under the prefix, whoever makes it, and the copy answers only while
//! that connection is up (see `near.rs` for the rules that keep a stale
//! copy from being served). A replica therefore reads another's write as
//! soon as Redis's message reaches it, typically well under a millisecond
//! on a LAN; during a network partition that leaves both connections open
//! but silent, it may answer from the copy until a ping of the tracking
//! connection goes unanswered (a ping every 200 ms, each within
//! [`OP_TIMEOUT`]).
//!
//! # Scripts
//!
//! Each Lua script is built once ([`std::sync::LazyLock`]) and called by
//! `EVALSHA`, loaded again only when Redis answers `NOSCRIPT` (after a
//! restart).

mod near;

use moka::future::Cache as Moka;
use moka::notification::RemovalCause;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot as HashSlot};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

/// The longest any cache operation waits for Redis.
pub const OP_TIMEOUT: Duration = Duration::from_millis(250);

/// Keys awaiting repair that are remembered one by one; beyond this the
/// whole prefix is invalidated once Redis is back.
pub const MAX_PENDING_REPAIRS: usize = 100_000;

/// How often an unhealthy Redis is probed (and repaired once it answers).
const REPAIR_INTERVAL: Duration = Duration::from_millis(200);

/// A connection whose replies stop is declared dead after this (the
/// per-call [`OP_TIMEOUT`] answers the caller long before).
const CONNECTION_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Operations sent in one pipeline round trip.
const PIPELINE_CHUNK: usize = 512;

/// Default capacity of the in-process cache, in set members (plus one per key).
const MEMORY_CAPACITY: u64 = 10_000_000;

/// Reserved hash fields (NUL-prefixed, so no member can collide).
const FLOOR: &str = "\u{0}f";
const COMPLETE: &str = "\u{0}c";
const BYTES: &str = "\u{0}b";

/// What a read knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<T> {
    /// The cache knows the answer.
    Hit(T),
    /// The key is cold: read the database and load it.
    Miss,
    /// The cache cannot answer now (Redis down, slow or under repair): read
    /// the database, do not load.
    Unavailable,
}

impl<T> Lookup<T> {
    /// The answer of a hit.
    pub fn hit(self) -> Option<T> {
        match self {
            Lookup::Hit(t) => Some(t),
            _ => None,
        }
    }

    /// Whether the cache answered.
    pub fn is_hit(&self) -> bool {
        matches!(self, Lookup::Hit(_))
    }

    /// Maps a hit's answer.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Lookup<U> {
        match self {
            Lookup::Hit(t) => Lookup::Hit(f(t)),
            Lookup::Miss => Lookup::Miss,
            Lookup::Unavailable => Lookup::Unavailable,
        }
    }
}

/// A value with the version it was written at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// Version of the write that stored it.
    pub version: u64,
    /// The value.
    pub bytes: Vec<u8>,
}

/// One change of one set member, for [`Cache::set_apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetWrite {
    /// The set.
    pub key: String,
    /// The member.
    pub member: String,
    /// Version of the change.
    pub version: u64,
    /// Added (`true`) or removed (`false`).
    pub present: bool,
}

/// Why a cache write did not happen. Callers usually log it and go on: a
/// failed write is repaired by the cache itself (see the module docs).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Redis is down, slow or being repaired.
    #[error("cache unavailable: {0}")]
    Unavailable(String),
    /// A bad argument (version 0, empty member, malformed URL).
    #[error("cache: {0}")]
    Invalid(String),
}

/// The cache: Redis or in-process. Cheap to clone.
#[derive(Clone)]
pub struct Cache(Backend);

#[derive(Clone)]
enum Backend {
    Redis(Arc<RedisCache>),
    Memory(Arc<MemoryCache>),
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Backend::Redis(r) => write!(
                f,
                "Cache::Redis({}, available: {})",
                r.prefix,
                r.healthy.load(Ordering::SeqCst)
            ),
            Backend::Memory(_) => f.write_str("Cache::Memory"),
        }
    }
}

fn check_version(version: u64) -> Result<(), CacheError> {
    if version == 0 {
        return Err(CacheError::Invalid("versions start at 1".into()));
    }
    Ok(())
}

fn check_member(member: &str) -> Result<(), CacheError> {
    if member.is_empty() || member.starts_with('\u{0}') {
        return Err(CacheError::Invalid(
            "a set member must be non-empty and must not start with NUL".into(),
        ));
    }
    Ok(())
}

impl Cache {
    /// Redis at `redis_url` with every key under `prefix`, or the in-process
    /// cache when `redis_url` is `None`. Never waits for Redis: an
    /// unreachable Redis is reconnected in the background. Fails only on a
    /// malformed URL.
    pub async fn connect(redis_url: Option<&str>, prefix: &str) -> Result<Self, CacheError> {
        match redis_url {
            Some(url) => Ok(Cache(Backend::Redis(
                RedisCache::connect(url, false, prefix).await?,
            ))),
            None => Ok(Cache::memory()),
        }
    }

    /// A Redis Cluster reached through `seeds` (comma-separated
    /// `redis://host:port` of one or more of its nodes; the others are
    /// discovered), every key under `prefix`. Keys carry hash tags
    /// (`{seg:ID}`) and every script touches one key, so each command and
    /// each pipeline stays in one slot. Never waits: the slot map is read in
    /// the background until a node answers.
    pub async fn connect_cluster(seeds: &str, prefix: &str) -> Result<Self, CacheError> {
        Ok(Cache(Backend::Redis(
            RedisCache::connect(seeds, true, prefix).await?,
        )))
    }

    /// An in-process cache.
    pub fn memory() -> Self {
        Self::memory_with_capacity(MEMORY_CAPACITY)
    }

    /// An in-process cache holding about `capacity` set members (each key
    /// counts one more).
    pub fn memory_with_capacity(capacity: u64) -> Self {
        Cache(Backend::Memory(Arc::new(MemoryCache::new(capacity))))
    }

    /// How many reads the in-process copy of a Redis node's hashes answered
    /// without asking Redis (see "Near copy" in the module docs); `None`
    /// for the in-process cache and a Redis Cluster, which keep none.
    pub fn near_hits(&self) -> Option<u64> {
        match &self.0 {
            Backend::Redis(r) => r.near.as_ref().map(|n| n.hits()),
            Backend::Memory(_) => None,
        }
    }

    /// Whether reads can currently hit (always true in process).
    pub fn is_available(&self) -> bool {
        match &self.0 {
            Backend::Redis(r) => r.healthy.load(Ordering::SeqCst),
            Backend::Memory(_) => true,
        }
    }

    /// The value stored at `key` by [`Cache::put`].
    pub async fn get(&self, key: &str) -> Lookup<Versioned> {
        match &self.0 {
            Backend::Redis(r) => r.get(key).await,
            Backend::Memory(m) => m.read(key, KeyState::get).await,
        }
    }

    /// Stores `bytes` at `key` unless the key has seen `version` or a newer
    /// one. Returns whether it was stored.
    pub async fn put(&self, key: &str, version: u64, bytes: &[u8]) -> Result<bool, CacheError> {
        check_version(version)?;
        match &self.0 {
            Backend::Redis(r) => r.put(key, version, bytes).await,
            Backend::Memory(m) => Ok(m.write(key, |s| s.put(version, bytes)).await),
        }
    }

    /// Forgets `key` (value or set) while keeping its fence: it reads `Miss`
    /// until loaded again, and writes at or below `version` (or below any
    /// version the key had seen) are refused. `version` 0 just invalidates.
    pub async fn delete(&self, key: &str, version: u64) -> Result<(), CacheError> {
        match &self.0 {
            Backend::Redis(r) => r.delete(key, version).await,
            Backend::Memory(m) => {
                m.write(key, |s| s.delete(version)).await;
                Ok(())
            }
        }
    }

    /// Adds `members` to the set `key` at `version`. Returns how many
    /// changes were applied (the others were older than what the key holds).
    pub async fn set_add<S: AsRef<str>>(
        &self,
        key: &str,
        version: u64,
        members: &[S],
    ) -> Result<usize, CacheError> {
        self.set_write(key, version, members, true).await
    }

    /// Removes `members` from the set `key` at `version` (tombstones).
    /// Returns how many changes were applied.
    pub async fn set_remove<S: AsRef<str>>(
        &self,
        key: &str,
        version: u64,
        members: &[S],
    ) -> Result<usize, CacheError> {
        self.set_write(key, version, members, false).await
    }

    async fn set_write<S: AsRef<str>>(
        &self,
        key: &str,
        version: u64,
        members: &[S],
        present: bool,
    ) -> Result<usize, CacheError> {
        check_version(version)?;
        for m in members {
            check_member(m.as_ref())?;
        }
        if members.is_empty() {
            return Ok(0);
        }
        match &self.0 {
            Backend::Redis(r) => r.set_write(key, version, members, present).await,
            Backend::Memory(m) => Ok(m
                .write(key, |s| {
                    s.write_members(version, members.iter().map(|m| (m.as_ref(), present)))
                })
                .await),
        }
    }

    /// Applies member changes to many sets in one round trip (a subscriber's
    /// batch). Returns how many were applied.
    pub async fn set_apply(&self, writes: &[SetWrite]) -> Result<usize, CacheError> {
        for w in writes {
            check_version(w.version)?;
            check_member(&w.member)?;
        }
        match &self.0 {
            Backend::Redis(r) => r.set_apply(writes).await,
            Backend::Memory(m) => {
                let mut applied = 0;
                for w in writes {
                    applied += m
                        .write(&w.key, |s| {
                            s.write_members(
                                w.version,
                                std::iter::once((w.member.as_str(), w.present)),
                            )
                        })
                        .await;
                }
                Ok(applied)
            }
        }
    }

    /// Loads the complete set `key` as of `version`: `members` are present,
    /// every other member is absent, except changes newer than `version`,
    /// which are kept. Refused (`false`) if the key's floor is above
    /// `version`.
    pub async fn set_replace<S: AsRef<str>>(
        &self,
        key: &str,
        version: u64,
        members: &[S],
    ) -> Result<bool, CacheError> {
        check_version(version)?;
        for m in members {
            check_member(m.as_ref())?;
        }
        match &self.0 {
            Backend::Redis(r) => r.set_replace(key, version, members).await,
            Backend::Memory(m) => {
                let applied = m.write(key, |s| s.replace(version, members)).await;
                m.reweigh(key).await;
                Ok(applied)
            }
        }
    }

    /// Whether `member` is in the set `key`: `Hit(false)` only from a
    /// tombstone or a complete set.
    pub async fn set_contains(&self, key: &str, member: &str) -> Lookup<bool> {
        match &self.0 {
            Backend::Redis(r) => r.set_contains(key, member).await,
            Backend::Memory(m) => m.read(key, |s| s.contains(member)).await,
        }
    }

    /// Every member of the set `key`, sorted; a hit only for a complete set.
    pub async fn set_members(&self, key: &str) -> Lookup<Vec<String>> {
        match &self.0 {
            Backend::Redis(r) => r.set_members(key).await,
            Backend::Memory(m) => m.read(key, KeyState::members).await,
        }
    }
}

// ---------------------------------------------------------------------------
// In-process implementation.

#[derive(Debug, Clone, Copy)]
struct Member {
    version: u64,
    present: bool,
}

/// One key's state; the Lua scripts below implement the same rules on Redis.
#[derive(Debug, Default)]
struct KeyState {
    floor: u64,
    complete: bool,
    members: HashMap<String, Member>,
    /// How many of `members` are tombstones.
    tombstones: usize,
    value: Option<Arc<[u8]>>,
    /// Removed from the cache by eviction: writers must take a fresh entry.
    evicted: bool,
}

impl KeyState {
    fn max_version(&self) -> u64 {
        self.members
            .values()
            .map(|m| m.version)
            .fold(self.floor, u64::max)
    }

    fn get(&self) -> Lookup<Versioned> {
        match &self.value {
            Some(b) => Lookup::Hit(Versioned {
                version: self.floor,
                bytes: b.to_vec(),
            }),
            None => Lookup::Miss,
        }
    }

    fn put(&mut self, version: u64, bytes: &[u8]) -> bool {
        if version <= self.floor {
            return false;
        }
        self.floor = version;
        self.value = Some(Arc::from(bytes));
        true
    }

    fn delete(&mut self, version: u64) {
        self.floor = self.max_version().max(version);
        self.members.clear();
        self.tombstones = 0;
        self.complete = false;
        self.value = None;
    }

    fn write_members<'a>(
        &mut self,
        version: u64,
        changes: impl Iterator<Item = (&'a str, bool)>,
    ) -> usize {
        if version <= self.floor {
            return 0;
        }
        let mut applied = 0;
        for (member, present) in changes {
            let newer = self
                .members
                .get(member)
                .is_none_or(|cur| cur.version < version);
            if newer {
                let was_tombstone = self
                    .members
                    .insert(member.to_owned(), Member { version, present })
                    .is_some_and(|old| !old.present);
                match (was_tombstone, present) {
                    (false, false) => self.tombstones += 1,
                    (true, true) => self.tombstones -= 1,
                    _ => {}
                }
                applied += 1;
            }
        }
        // A set that churns is forgotten (fenced) rather than left to grow,
        // as on Redis.
        if self.tombstones > TOMBSTONE_SLACK && self.tombstones * 2 > self.members.len() {
            self.delete(0);
        }
        applied
    }

    fn replace<S: AsRef<str>>(&mut self, version: u64, members: &[S]) -> bool {
        if self.floor > version {
            return false;
        }
        let loaded: std::collections::HashSet<&str> = members.iter().map(AsRef::as_ref).collect();
        self.members
            .retain(|m, cur| cur.version > version || loaded.contains(m.as_str()));
        for m in members {
            let m = m.as_ref();
            if self.members.get(m).is_none_or(|cur| cur.version <= version) {
                self.members.insert(
                    m.to_owned(),
                    Member {
                        version,
                        present: true,
                    },
                );
            }
        }
        self.floor = version;
        self.complete = true;
        self.tombstones = self.members.values().filter(|m| !m.present).count();
        true
    }

    fn contains(&self, member: &str) -> Lookup<bool> {
        match self.members.get(member) {
            Some(m) => Lookup::Hit(m.present),
            None if self.complete => Lookup::Hit(false),
            None => Lookup::Miss,
        }
    }

    fn members(&self) -> Lookup<Vec<String>> {
        if !self.complete {
            return Lookup::Miss;
        }
        let mut out: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.present)
            .map(|(k, _)| k.clone())
            .collect();
        out.sort();
        Lookup::Hit(out)
    }

    fn weight(&self) -> u32 {
        let bytes = self.value.as_ref().map_or(0, |b| b.len() / 64);
        u32::try_from(self.members.len().saturating_add(bytes).saturating_add(1))
            .unwrap_or(u32::MAX)
    }
}

type Slot = Arc<Mutex<KeyState>>;

fn lock(slot: &Mutex<KeyState>) -> std::sync::MutexGuard<'_, KeyState> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

struct MemoryCache {
    entries: Moka<String, Slot>,
    /// Highest version of any evicted entry: the floor of new entries.
    evicted_floor: Arc<AtomicU64>,
}

impl MemoryCache {
    fn new(capacity: u64) -> Self {
        let evicted_floor = Arc::new(AtomicU64::new(0));
        let floor = evicted_floor.clone();
        let entries = Moka::builder()
            .max_capacity(capacity)
            .weigher(|_k: &String, slot: &Slot| lock(slot).weight())
            .eviction_listener(move |_k, slot: Slot, cause| {
                if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                    let mut s = lock(&slot);
                    s.evicted = true;
                    floor.fetch_max(s.max_version(), Ordering::SeqCst);
                }
            })
            .build();
        Self {
            entries,
            evicted_floor,
        }
    }

    async fn read<T>(&self, key: &str, f: impl FnOnce(&KeyState) -> Lookup<T>) -> Lookup<T> {
        match self.entries.get(key).await {
            Some(slot) => {
                let s = lock(&slot);
                if s.evicted { Lookup::Miss } else { f(&s) }
            }
            None => Lookup::Miss,
        }
    }

    async fn write<T>(&self, key: &str, mut f: impl FnMut(&mut KeyState) -> T) -> T {
        loop {
            let floor = self.evicted_floor.load(Ordering::SeqCst);
            let slot = self
                .entries
                .get_with(key.to_owned(), async move {
                    Arc::new(Mutex::new(KeyState {
                        floor,
                        ..KeyState::default()
                    }))
                })
                .await;
            let mut s = lock(&slot);
            if !s.evicted {
                return f(&mut s);
            }
        }
    }

    /// Re-inserts `key` so the cache counts its new size.
    async fn reweigh(&self, key: &str) {
        if let Some(slot) = self.entries.get(key).await {
            self.entries.insert(key.to_owned(), slot).await;
        }
    }
}

// ---------------------------------------------------------------------------
// Redis implementation.

/// Versions are stored as 20-digit decimal strings: Lua compares them as
/// strings, exactly, for every u64 (Lua numbers are doubles).
fn pad(version: u64) -> String {
    format!("{version:020}")
}

fn parse_version(s: &[u8]) -> u64 {
    std::str::from_utf8(s.get(..20).unwrap_or(s))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Member changes of one key at one version. ARGV: version, then
/// (member, flag) pairs; the flag is `+` (present) or `-` (removed).
///
/// Keeps `\0m` (the highest version the key has seen) and `\0t` (its
/// tombstones), and forgets the key (fenced at `\0m`, as [`DELETE`] does)
/// once tombstones pass [`TOMBSTONE_SLACK`] and half its fields: a set that
/// churns stays bounded. `UNLINK` frees the old hash off Redis's main
/// thread. Keys written before `\0m` existed are left as they were.
static SET_WRITE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r"
local key, v = KEYS[1], ARGV[1]
local floor = redis.call('HGET', key, '\0f')
if floor and floor >= v then return 0 end
local top = redis.call('HGET', key, '\0m')
local tracked = top or redis.call('EXISTS', key) == 0
local tombs = tonumber(redis.call('HGET', key, '\0t') or '0')
local n = 0
for i = 2, #ARGV, 2 do
  local cur = redis.call('HGET', key, ARGV[i])
  if not cur or string.sub(cur, 1, 20) < v then
    redis.call('HSET', key, ARGV[i], v .. ARGV[i + 1])
    local was_tomb = cur and string.sub(cur, 21) == '-'
    if ARGV[i + 1] == '-' and not was_tomb then tombs = tombs + 1 end
    if ARGV[i + 1] == '+' and was_tomb then tombs = tombs - 1 end
    n = n + 1
  end
end
if n > 0 and tracked then
  if not top or top < v then top = v end
  if tombs > {slack} and tombs * 2 > redis.call('HLEN', key) then
    redis.call('UNLINK', key)
    redis.call('HSET', key, '\0f', top, '\0m', top)
  else
    redis.call('HSET', key, '\0m', top, '\0t', tombs)
  end
end
return n
",
        slack = TOMBSTONE_SLACK
    ))
});

/// Tombstones a set keeps before it may be forgotten (see [`SET_WRITE`]).
pub const TOMBSTONE_SLACK: usize = 64;

/// A complete load as of ARGV[1]; ARGV[2..] are the members.
static SET_REPLACE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local key, v = KEYS[1], ARGV[1]
local floor = redis.call('HGET', key, '\0f')
if floor and floor > v then return 0 end
local loaded = {}
for i = 2, #ARGV do loaded[ARGV[i]] = true end
local top, tombs = redis.call('HGET', key, '\0m') or v, 0
if top < v then top = v end
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local field, version = all[i], string.sub(all[i + 1], 1, 20)
  if string.byte(field, 1) ~= 0 then
    if version > top then top = version end
    if not loaded[field] and version <= v then
      redis.call('HDEL', key, field)
    elseif not loaded[field] and string.sub(all[i + 1], 21) == '-' then
      tombs = tombs + 1
    end
  end
end
for i = 2, #ARGV do
  local cur = redis.call('HGET', key, ARGV[i])
  if not cur or string.sub(cur, 1, 20) <= v then
    redis.call('HSET', key, ARGV[i], v .. '+')
  elseif string.sub(cur, 21) == '-' then
    tombs = tombs + 1
  end
end
redis.call('HSET', key, '\0f', v, '\0c', '1', '\0m', top, '\0t', tombs)
return 1
",
    )
});

/// Forgets the key, keeping as floor the highest version it has seen (and
/// at least ARGV[1]). O(1) on a key that keeps `\0m` (every set written
/// since it existed) or holds a value, whatever its size: `UNLINK` frees the
/// hash off Redis's main thread. Only a set written before `\0m` existed
/// is scanned for its highest version.
static DELETE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local key, top = KEYS[1], ARGV[1]
if redis.call('TYPE', key).ok == 'hash' then
  local known = redis.call('HMGET', key, '\0m', '\0f', '\0b')
  if known[1] or known[3] then
    for i = 1, 2 do
      if known[i] and known[i] > top then top = known[i] end
    end
  else
    local all = redis.call('HGETALL', key)
    for i = 1, #all, 2 do
      local field, val, version = all[i], all[i + 1], nil
      if field == '\0f' then version = val
      elseif string.byte(field, 1) ~= 0 then version = string.sub(val, 1, 20) end
      if version and version > top then top = version end
    end
  end
end
redis.call('UNLINK', key)
redis.call('HSET', key, '\0f', top, '\0m', top)
return 1
",
    )
});

/// A versioned value: ARGV[1] version, ARGV[2] bytes.
static PUT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local key, v = KEYS[1], ARGV[1]
local floor = redis.call('HGET', key, '\0f')
if floor and floor >= v then return 0 end
redis.call('HSET', key, '\0f', v, '\0b', ARGV[2])
return 1
",
    )
});

/// Keys whose last write failed, with the highest version that failed.
#[derive(Debug, Default)]
struct Repairs {
    pending: HashMap<String, u64>,
    /// More than [`MAX_PENDING_REPAIRS`] keys failed: invalidate the prefix.
    overflow: bool,
    /// Bumped at every overflow, so a repair pass clears only what it covered.
    overflow_generation: u64,
}

/// How to reach Redis: one node, or a Redis Cluster from seed nodes.
#[derive(Clone)]
enum Client {
    Node(redis::Client),
    Cluster(Box<ClusterClient>),
}

/// A connection to one node (a `ConnectionManager`) or to a cluster (the
/// redis crate's async cluster connection, which routes each command to
/// the node serving its key's slot and follows MOVED/ASK).
#[derive(Clone)]
enum Conn {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Client {
    /// A fresh connection: lazy for one node (it connects on first use);
    /// for a cluster, the slot map is read from a seed now.
    async fn connect(&self) -> Result<Conn, CacheError> {
        match self {
            Client::Node(c) => ConnectionManager::new_lazy_with_config(c.clone(), manager_config())
                .map(Conn::Node)
                .map_err(|e| CacheError::Invalid(format!("redis: {e}"))),
            Client::Cluster(c) => {
                let conn = tokio::time::timeout(OP_TIMEOUT, c.get_async_connection())
                    .await
                    .map_err(|_| unavailable("no redis cluster node answered"))?
                    .map_err(unavailable)?;
                Ok(Conn::Cluster(conn))
            }
        }
    }
}

struct RedisCache {
    client: Client,
    /// `None` until a cluster's slot map could be read.
    conn: RwLock<Option<Conn>>,
    prefix: String,
    /// Reads and writes are allowed (connected, nothing to repair).
    healthy: AtomicBool,
    repairs: Mutex<Repairs>,
    /// The in-process copy of hashes read lately (one node only).
    near: Option<Arc<near::Near>>,
}

type Call = (String, Vec<Vec<u8>>);

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(OP_TIMEOUT))
        .set_response_timeout(Some(CONNECTION_RESPONSE_TIMEOUT))
        // One attempt per reconnect: the repair loop is the retry.
        .set_number_of_retries(0)
}

fn unavailable(e: impl std::fmt::Display) -> CacheError {
    CacheError::Unavailable(e.to_string())
}

/// Runs `calls` of `script` (one key each) in one pipeline of `EVALSHA`s
/// (on a cluster, one pipeline per slot: a cluster pipeline may not cross
/// slots), loading the script once if Redis does not know it. Retrying a
/// partly applied pipeline is safe: every script is idempotent per version.
async fn eval_pipeline(
    conn: &mut Conn,
    script: &redis::Script,
    calls: &[Call],
) -> Result<Vec<i64>, CacheError> {
    if !matches!(conn, Conn::Cluster(_)) {
        return eval_slot_pipeline(conn, script, calls).await;
    }
    let mut by_slot: std::collections::HashMap<HashSlot, Vec<usize>> = Default::default();
    for (i, (key, _)) in calls.iter().enumerate() {
        by_slot.entry(HashSlot::for_key(key)).or_default().push(i);
    }
    let mut out = vec![0; calls.len()];
    for indices in by_slot.values() {
        let part: Vec<Call> = indices.iter().map(|i| calls[*i].clone()).collect();
        for (i, v) in indices
            .iter()
            .zip(eval_slot_pipeline(conn, script, &part).await?)
        {
            out[*i] = v;
        }
    }
    Ok(out)
}

/// [`eval_pipeline`] for calls a single pipeline may carry.
async fn eval_slot_pipeline(
    conn: &mut Conn,
    script: &redis::Script,
    calls: &[Call],
) -> Result<Vec<i64>, CacheError> {
    let mut pipe = redis::pipe();
    for (key, args) in calls {
        pipe.cmd("EVALSHA").arg(script.get_hash()).arg(1).arg(key);
        for a in args {
            pipe.arg(a);
        }
    }
    pipe.ignore_errors();
    let mut values: Vec<redis::Value> = pipe.query_async(conn).await.map_err(unavailable)?;
    let noscript = |v: &redis::Value| matches!(v, redis::Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::NoScript));
    if values.iter().any(noscript) {
        script.load_async(conn).await.map_err(unavailable)?;
        values = pipe.query_async(conn).await.map_err(unavailable)?;
    }
    values
        .into_iter()
        .map(|v| match v {
            redis::Value::Int(n) => Ok(n),
            other => Err(unavailable(format!("unexpected script reply {other:?}"))),
        })
        .collect()
}

impl RedisCache {
    async fn connect(url: &str, cluster: bool, prefix: &str) -> Result<Arc<Self>, CacheError> {
        let invalid = |e: redis::RedisError| CacheError::Invalid(format!("redis url: {e}"));
        let client = if cluster {
            let seeds: Vec<&str> = url.split(',').map(str::trim).collect();
            Client::Cluster(Box::new(
                ClusterClient::builder(seeds)
                    .connection_timeout(OP_TIMEOUT)
                    .response_timeout(CONNECTION_RESPONSE_TIMEOUT)
                    .retries(0)
                    .build()
                    .map_err(invalid)?,
            ))
        } else {
            Client::Node(redis::Client::open(url).map_err(invalid)?)
        };
        let conn = match &client {
            Client::Node(_) => Some(client.connect().await?),
            Client::Cluster(_) => None,
        };
        let near = match &client {
            Client::Node(c) => {
                let near = near::Near::new();
                let (c, weak, prefix) = (c.clone(), Arc::downgrade(&near), prefix.to_owned());
                tokio::spawn(async move {
                    near::track(weak, &c, prefix, OP_TIMEOUT, REPAIR_INTERVAL).await;
                });
                Some(near)
            }
            Client::Cluster(_) => None,
        };
        let cache = Arc::new(Self {
            client,
            conn: RwLock::new(conn),
            prefix: prefix.to_owned(),
            healthy: AtomicBool::new(false),
            repairs: Mutex::default(),
            near,
        });
        cache.repair().await;
        if !cache.healthy.load(Ordering::SeqCst) {
            tracing::warn!(
                prefix,
                "redis is unreachable: serving without the cache and reconnecting in the background"
            );
        }
        tokio::spawn(repair_loop(Arc::downgrade(&cache)));
        Ok(cache)
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The connection; an error while a cluster's slot map is unknown
    /// (the repair loop keeps trying).
    fn conn(&self) -> redis::RedisResult<Conn> {
        self.conn
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| {
                redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "no redis cluster node answered yet",
                ))
            })
    }

    fn repairs(&self) -> std::sync::MutexGuard<'_, Repairs> {
        self.repairs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks Redis unhealthy and remembers the keys whose write failed.
    fn failed(&self, why: &str, keys: impl IntoIterator<Item = (String, u64)>) {
        if let Some(near) = &self.near {
            near.clear();
        }
        let mut r = self.repairs();
        for (key, version) in keys {
            if let Some(v) = r.pending.get_mut(&key) {
                *v = (*v).max(version);
            } else if r.pending.len() < MAX_PENDING_REPAIRS {
                r.pending.insert(key, version);
            } else {
                r.overflow = true;
                r.overflow_generation += 1;
            }
        }
        if self.healthy.swap(false, Ordering::SeqCst) {
            tracing::warn!(prefix = %self.prefix, error = why, "redis cache unavailable: reads say Unavailable until it is repaired");
        }
    }

    /// Runs a read, bounded by [`OP_TIMEOUT`].
    async fn read<T>(&self, op: impl Future<Output = redis::RedisResult<Lookup<T>>>) -> Lookup<T> {
        if !self.healthy.load(Ordering::SeqCst) {
            return Lookup::Unavailable;
        }
        match tokio::time::timeout(OP_TIMEOUT, op).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                self.failed(&e.to_string(), []);
                Lookup::Unavailable
            }
            Err(_) => {
                self.failed("timed out", []);
                Lookup::Unavailable
            }
        }
    }

    /// Runs a write, bounded by [`OP_TIMEOUT`]; on failure the written keys
    /// are remembered for repair.
    async fn write<T>(
        &self,
        keys: impl Fn() -> Vec<(String, u64)>,
        op: impl Future<Output = Result<T, CacheError>>,
    ) -> Result<T, CacheError> {
        if !self.healthy.load(Ordering::SeqCst) {
            self.failed("unavailable", keys());
            return Err(CacheError::Unavailable(
                "redis is unavailable or being repaired".into(),
            ));
        }
        match tokio::time::timeout(OP_TIMEOUT, op).await {
            Ok(Ok(v)) => {
                // Redis has the write: a read that starts now must not find
                // the copy from before it (Redis's own message may come later).
                if let Some(near) = &self.near {
                    near.invalidate(keys().into_iter().map(|(k, _)| k));
                }
                Ok(v)
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string(), keys());
                Err(e)
            }
            Err(_) => {
                self.failed("timed out", keys());
                Err(CacheError::Unavailable(format!(
                    "no answer from redis within {OP_TIMEOUT:?}"
                )))
            }
        }
    }

    async fn script(
        &self,
        script: &redis::Script,
        key: &str,
        args: Vec<Vec<u8>>,
    ) -> Result<i64, CacheError> {
        let mut inv = script.key(key);
        for a in args {
            inv.arg(a);
        }
        inv.invoke_async(&mut self.conn().map_err(unavailable)?)
            .await
            .map_err(unavailable)
    }

    async fn get(&self, key: &str) -> Lookup<Versioned> {
        let k = self.key(key);
        let conn = self.conn();
        self.read(async move {
            let mut conn = conn?;
            let (floor, bytes): (Option<Vec<u8>>, Option<Vec<u8>>) = redis::cmd("HMGET")
                .arg(&k)
                .arg(FLOOR)
                .arg(BYTES)
                .query_async(&mut conn)
                .await?;
            Ok(match (floor, bytes) {
                (Some(v), Some(bytes)) => Lookup::Hit(Versioned {
                    version: parse_version(&v),
                    bytes,
                }),
                _ => Lookup::Miss,
            })
        })
        .await
    }

    async fn put(&self, key: &str, version: u64, bytes: &[u8]) -> Result<bool, CacheError> {
        let k = self.key(key);
        let args = vec![pad(version).into_bytes(), bytes.to_vec()];
        self.write(|| vec![(k.clone(), version)], self.script(&PUT, &k, args))
            .await
            .map(|n| n == 1)
    }

    async fn delete(&self, key: &str, version: u64) -> Result<(), CacheError> {
        let k = self.key(key);
        self.write(
            || vec![(k.clone(), version)],
            self.script(&DELETE, &k, vec![pad(version).into_bytes()]),
        )
        .await
        .map(|_| ())
    }

    async fn set_write<S: AsRef<str>>(
        &self,
        key: &str,
        version: u64,
        members: &[S],
        present: bool,
    ) -> Result<usize, CacheError> {
        let k = self.key(key);
        let flag: &[u8] = if present { b"+" } else { b"-" };
        let mut args = Vec::with_capacity(1 + 2 * members.len());
        args.push(pad(version).into_bytes());
        for m in members {
            args.push(m.as_ref().as_bytes().to_vec());
            args.push(flag.to_vec());
        }
        self.write(
            || vec![(k.clone(), version)],
            self.script(&SET_WRITE, &k, args),
        )
        .await
        .map(|n| usize::try_from(n).unwrap_or(0))
    }

    async fn set_apply(&self, writes: &[SetWrite]) -> Result<usize, CacheError> {
        let mut applied = 0;
        for (i, chunk) in writes.chunks(PIPELINE_CHUNK).enumerate() {
            let calls: Vec<Call> = chunk
                .iter()
                .map(|w| {
                    (
                        self.key(&w.key),
                        vec![
                            pad(w.version).into_bytes(),
                            w.member.as_bytes().to_vec(),
                            if w.present {
                                b"+".to_vec()
                            } else {
                                b"-".to_vec()
                            },
                        ],
                    )
                })
                .collect();
            let keys = || {
                calls
                    .iter()
                    .zip(chunk)
                    .map(|((k, _), w)| (k.clone(), w.version))
                    .collect()
            };
            let conn = self.conn();
            let results = self
                .write(keys, async {
                    eval_pipeline(&mut conn.map_err(unavailable)?, &SET_WRITE, &calls).await
                })
                .await;
            match results {
                Ok(r) => applied += r.iter().filter(|n| **n > 0).count(),
                Err(e) => {
                    // The chunks not sent yet are stale in Redis too.
                    let rest = writes
                        .iter()
                        .skip((i + 1) * PIPELINE_CHUNK)
                        .map(|w| (self.key(&w.key), w.version));
                    self.failed(&e.to_string(), rest);
                    return Err(e);
                }
            }
        }
        Ok(applied)
    }

    async fn set_replace<S: AsRef<str>>(
        &self,
        key: &str,
        version: u64,
        members: &[S],
    ) -> Result<bool, CacheError> {
        let k = self.key(key);
        let mut args = Vec::with_capacity(1 + members.len());
        args.push(pad(version).into_bytes());
        args.extend(members.iter().map(|m| m.as_ref().as_bytes().to_vec()));
        self.write(
            || vec![(k.clone(), version)],
            self.script(&SET_REPLACE, &k, args),
        )
        .await
        .map(|n| n == 1)
    }

    async fn set_contains(&self, key: &str, member: &str) -> Lookup<bool> {
        let contains = |entry: Option<Vec<u8>>, complete: Option<Vec<u8>>| match (entry, complete) {
            (Some(e), _) => Lookup::Hit(e.last() == Some(&b'+')),
            (None, Some(_)) => Lookup::Hit(false),
            (None, None) => Lookup::Miss,
        };
        let k = self.key(key);
        let near = self
            .near
            .as_deref()
            .filter(|_| self.healthy.load(Ordering::SeqCst));
        if let Some(mut known) =
            near.and_then(|n| n.fields(&k, &[member.as_bytes(), COMPLETE.as_bytes()]))
        {
            let complete = known.pop().flatten();
            return contains(known.pop().flatten(), complete);
        }
        let ticket = near.and_then(near::Near::ticket);
        let conn = self.conn();
        self.read(async move {
            let mut conn = conn?;
            let (entry, complete): (Option<Vec<u8>>, Option<Vec<u8>>) = redis::cmd("HMGET")
                .arg(&k)
                .arg(member)
                .arg(COMPLETE)
                .query_async(&mut conn)
                .await?;
            if let Some(n) = near {
                n.store_fields(
                    ticket,
                    &k,
                    [
                        (member.as_bytes().to_vec(), entry.clone()),
                        (COMPLETE.as_bytes().to_vec(), complete.clone()),
                    ],
                );
            }
            Ok(contains(entry, complete))
        })
        .await
    }

    async fn set_members(&self, key: &str) -> Lookup<Vec<String>> {
        let members = |all: &[(Vec<u8>, Vec<u8>)]| {
            if !all.iter().any(|(f, _)| f == COMPLETE.as_bytes()) {
                return Lookup::Miss;
            }
            let mut out: Vec<String> = all
                .iter()
                .filter(|(f, v)| f.first() != Some(&0) && v.last() == Some(&b'+'))
                .filter_map(|(f, _)| String::from_utf8(f.clone()).ok())
                .collect();
            out.sort();
            Lookup::Hit(out)
        };
        let k = self.key(key);
        let near = self
            .near
            .as_deref()
            .filter(|_| self.healthy.load(Ordering::SeqCst));
        if let Some(all) = near.and_then(|n| n.whole(&k)) {
            return members(&all);
        }
        let ticket = near.and_then(near::Near::ticket);
        let conn = self.conn();
        self.read(async move {
            let mut conn = conn?;
            let all: Vec<(Vec<u8>, Vec<u8>)> =
                redis::cmd("HGETALL").arg(&k).query_async(&mut conn).await?;
            if let Some(n) = near {
                n.store_whole(ticket, &k, &all);
            }
            Ok(members(&all))
        })
        .await
    }

    /// Probes Redis; once it answers, deletes (fenced) every key whose write
    /// failed, and only then lets reads hit again.
    async fn repair(&self) {
        let Ok(mut conn) = self.conn() else {
            if let Ok(fresh) = self.client.connect().await {
                *self.conn.write().unwrap_or_else(PoisonError::into_inner) = Some(fresh);
            }
            return;
        };
        // On a cluster PING goes to every primary: all must answer.
        match tokio::time::timeout(
            OP_TIMEOUT,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                // A connection that stopped answering is not dropped by the
                // manager: start over with a fresh one.
                if let Ok(fresh) = self.client.connect().await {
                    *self.conn.write().unwrap_or_else(PoisonError::into_inner) = Some(fresh);
                }
                return;
            }
        }
        let (pending, overflow, generation) = {
            let r = self.repairs();
            (
                r.pending.clone().into_iter().collect::<Vec<_>>(),
                r.overflow,
                r.overflow_generation,
            )
        };
        for chunk in pending.chunks(PIPELINE_CHUNK) {
            let calls: Vec<Call> = chunk
                .iter()
                .map(|(k, v)| (k.clone(), vec![pad(*v).into_bytes()]))
                .collect();
            let sent = tokio::time::timeout(OP_TIMEOUT, eval_pipeline(&mut conn, &DELETE, &calls));
            if !matches!(sent.await, Ok(Ok(_))) {
                return;
            }
        }
        if overflow && !self.invalidate_prefix(&mut conn).await {
            return;
        }
        let mut r = self.repairs();
        for (k, v) in &pending {
            if r.pending.get(k) == Some(v) {
                r.pending.remove(k);
            }
        }
        if overflow && r.overflow_generation == generation {
            r.overflow = false;
        }
        if r.pending.is_empty() && !r.overflow && !self.healthy.swap(true, Ordering::SeqCst) {
            tracing::info!(prefix = %self.prefix, "redis cache available");
        }
    }

    /// Deletes (fenced) every key under the prefix: a SCAN of the node, or
    /// of every primary of a cluster in turn.
    async fn invalidate_prefix(&self, conn: &mut Conn) -> bool {
        let nodes = match conn {
            Conn::Node(_) => vec![None],
            Conn::Cluster(c) => {
                let mut cmd = redis::cmd("CLUSTER");
                cmd.arg("SLOTS");
                let slots = cmd.query_async::<Vec<redis::Value>>(c);
                let Ok(Ok(slots)) = tokio::time::timeout(OP_TIMEOUT, slots).await else {
                    return false;
                };
                primaries(&slots).into_iter().map(Some).collect()
            }
        };
        for node in nodes {
            if !self.invalidate_node(conn, node).await {
                return false;
            }
        }
        true
    }

    /// [`Self::invalidate_prefix`] on one node (`None`: the only one).
    async fn invalidate_node(&self, conn: &mut Conn, node: Option<(String, u16)>) -> bool {
        let pattern = format!("{}*", glob_escape(&self.prefix));
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(PIPELINE_CHUNK);
            let step = async {
                match (&mut *conn, &node) {
                    (Conn::Cluster(c), Some((host, port))) => {
                        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        });
                        let v = c.route_command(scan, route).await?;
                        redis::from_redis_value::<(u64, Vec<String>)>(v)
                            .map_err(redis::RedisError::from)
                    }
                    (c, _) => scan.query_async::<(u64, Vec<String>)>(c).await,
                }
            };
            let Ok(Ok((next, keys))) = tokio::time::timeout(OP_TIMEOUT, step).await else {
                return false;
            };
            let calls: Vec<Call> = keys
                .into_iter()
                .map(|k| (k, vec![pad(0).into_bytes()]))
                .collect();
            if !calls.is_empty() {
                let sent = tokio::time::timeout(OP_TIMEOUT, eval_pipeline(conn, &DELETE, &calls));
                if !matches!(sent.await, Ok(Ok(_))) {
                    return false;
                }
            }
            if next == 0 {
                return true;
            }
            cursor = next;
        }
    }
}

/// The (host, port) of each primary in a `CLUSTER SLOTS` reply.
fn primaries(slots: &[redis::Value]) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = slots
        .iter()
        .filter_map(|range| match range {
            redis::Value::Array(parts) => match parts.get(2) {
                Some(redis::Value::Array(node)) => {
                    let host = match node.first()? {
                        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
                        redis::Value::SimpleString(s) => s.clone(),
                        _ => return None,
                    };
                    let port = match node.get(1)? {
                        redis::Value::Int(p) => u16::try_from(*p).ok()?,
                        _ => return None,
                    };
                    Some((host, port))
                }
                _ => None,
            },
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Probes and repairs an unhealthy Redis until the cache is dropped.
async fn repair_loop(cache: Weak<RedisCache>) {
    let mut tick = tokio::time::interval(REPAIR_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(cache) = cache.upgrade() else {
            return;
        };
        if !cache.healthy.load(Ordering::SeqCst) {
            cache.repair().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-process cache, plus Redis when `CLM_TEST_REDIS_URL` is set.
    async fn caches() -> Vec<Cache> {
        let mut v = vec![Cache::memory()];
        if let Some(url) = std::env::var("CLM_TEST_REDIS_URL")
            .ok()
            .filter(|s| !s.is_empty())
        {
            let prefix = format!("clm-test:{}:", uuid::Uuid::new_v4().simple());
            let c = Cache::connect(Some(&url), &prefix).await.expect("url");
            assert!(c.is_available(), "CLM_TEST_REDIS_URL reachable");
            v.push(c);
        }
        v
    }

    #[tokio::test]
    async fn values_hit_miss_and_older_writes_lose() {
        for c in caches().await {
            assert_eq!(c.get("k").await, Lookup::Miss, "{c:?}");
            assert!(c.put("k", 2, b"two").await.expect("put"));
            assert!(!c.put("k", 1, b"one").await.expect("put"), "{c:?}");
            assert!(!c.put("k", 2, b"again").await.expect("put"), "{c:?}");
            assert_eq!(
                c.get("k").await,
                Lookup::Hit(Versioned {
                    version: 2,
                    bytes: b"two".to_vec()
                })
            );
            assert!(c.put("k", 3, b"three").await.expect("put"));
            // Delete keeps the fence: a late older write cannot resurrect it.
            c.delete("k", 4).await.expect("delete");
            assert_eq!(c.get("k").await, Lookup::Miss, "{c:?}");
            assert!(!c.put("k", 3, b"late").await.expect("put"), "{c:?}");
            assert!(!c.put("k", 4, b"late").await.expect("put"), "{c:?}");
            assert_eq!(c.get("k").await, Lookup::Miss, "{c:?}");
            assert!(c.put("k", 5, b"five").await.expect("put"));
            // Delete at a lower version still fences everything the key saw.
            c.delete("k", 1).await.expect("delete");
            assert!(!c.put("k", 5, b"late").await.expect("put"), "{c:?}");
            assert!(matches!(
                c.put("k", 0, b"x").await,
                Err(CacheError::Invalid(_))
            ));
        }
    }

    #[tokio::test]
    async fn a_cold_set_never_says_not_a_member() {
        for c in caches().await {
            assert_eq!(c.set_contains("seg:{1}", "a").await, Lookup::Miss, "{c:?}");
            assert_eq!(c.set_members("seg:{1}").await, Lookup::Miss);
            // An incremental add is known; other members are still unknown.
            assert_eq!(c.set_add("seg:{1}", 5, &["a"]).await.expect("add"), 1);
            assert_eq!(c.set_contains("seg:{1}", "a").await, Lookup::Hit(true));
            assert_eq!(c.set_contains("seg:{1}", "b").await, Lookup::Miss, "{c:?}");
            assert_eq!(c.set_members("seg:{1}").await, Lookup::Miss, "not complete");
            // A tombstone is a known "no".
            assert_eq!(c.set_remove("seg:{1}", 6, &["a"]).await.expect("rm"), 1);
            assert_eq!(c.set_contains("seg:{1}", "a").await, Lookup::Hit(false));
        }
    }

    #[tokio::test]
    async fn a_loaded_set_is_complete_even_when_empty() {
        for c in caches().await {
            assert!(
                c.set_replace::<&str>("seg:{2}", 10, &[])
                    .await
                    .expect("load")
            );
            assert_eq!(
                c.set_contains("seg:{2}", "a").await,
                Lookup::Hit(false),
                "{c:?}"
            );
            assert_eq!(c.set_members("seg:{2}").await, Lookup::Hit(vec![]));
            assert!(
                c.set_replace("seg:{2}", 11, &["b", "a"])
                    .await
                    .expect("load")
            );
            assert_eq!(
                c.set_members("seg:{2}").await,
                Lookup::Hit(vec!["a".to_owned(), "b".to_owned()])
            );
            assert_eq!(c.set_add("seg:{2}", 12, &["c"]).await.expect("add"), 1);
            assert_eq!(c.set_remove("seg:{2}", 12, &["a"]).await.expect("rm"), 1);
            assert_eq!(
                c.set_members("seg:{2}").await,
                Lookup::Hit(vec!["b".to_owned(), "c".to_owned()])
            );
        }
    }

    #[tokio::test]
    async fn late_older_set_writes_lose() {
        for c in caches().await {
            let k = "cust:{7}";
            assert!(c.set_replace(k, 10, &["s1", "s2"]).await.expect("load"));
            // Writes from before the load, landing late, are refused.
            assert_eq!(c.set_remove(k, 9, &["s1"]).await.expect("rm"), 0, "{c:?}");
            assert_eq!(c.set_add(k, 10, &["s9"]).await.expect("add"), 0, "{c:?}");
            assert_eq!(c.set_contains(k, "s1").await, Lookup::Hit(true));
            assert_eq!(c.set_contains(k, "s9").await, Lookup::Hit(false));
            // Per member: a newer removal, then an older add arriving late.
            assert_eq!(c.set_remove(k, 15, &["s2"]).await.expect("rm"), 1);
            assert_eq!(c.set_add(k, 13, &["s2"]).await.expect("add"), 0, "{c:?}");
            assert_eq!(c.set_contains(k, "s2").await, Lookup::Hit(false));
            // A load older than a change keeps the change.
            assert_eq!(c.set_add(k, 20, &["s3"]).await.expect("add"), 1);
            assert!(c.set_replace(k, 18, &["s1", "s2"]).await.expect("load"));
            assert_eq!(
                c.set_members(k).await,
                Lookup::Hit(vec!["s1".into(), "s2".into(), "s3".into()]),
                "{c:?}"
            );
            // Batched writes follow the same rule per member.
            let w = |member: &str, version, present| SetWrite {
                key: k.into(),
                member: member.into(),
                version,
                present,
            };
            let applied = c
                .set_apply(&[w("s1", 17, false), w("s4", 21, true), w("s3", 19, false)])
                .await
                .expect("apply");
            assert_eq!(applied, 1, "{c:?}");
            assert_eq!(
                c.set_members(k).await,
                Lookup::Hit(vec!["s1".into(), "s2".into(), "s3".into(), "s4".into()])
            );
        }
    }

    #[tokio::test]
    async fn delete_keeps_the_fence_of_a_set() {
        for c in caches().await {
            let k = "seg:{3}";
            assert!(c.set_replace(k, 5, &["a"]).await.expect("load"));
            assert_eq!(c.set_add(k, 8, &["b"]).await.expect("add"), 1);
            c.delete(k, 6).await.expect("delete");
            assert_eq!(c.set_contains(k, "a").await, Lookup::Miss, "{c:?}");
            assert_eq!(c.set_members(k).await, Lookup::Miss);
            // 8 was the highest version seen: nothing at or below it lands.
            assert_eq!(c.set_add(k, 7, &["a"]).await.expect("add"), 0, "{c:?}");
            assert_eq!(c.set_add(k, 8, &["a"]).await.expect("add"), 0, "{c:?}");
            assert!(!c.set_replace(k, 7, &["a"]).await.expect("load"), "{c:?}");
            assert_eq!(c.set_contains(k, "a").await, Lookup::Miss);
            assert!(c.set_replace(k, 9, &["c"]).await.expect("load"));
            assert_eq!(c.set_members(k).await, Lookup::Hit(vec!["c".into()]));
        }
    }

    /// How many fields `key` holds (members, tombstones and bookkeeping).
    async fn field_count(c: &Cache, key: &str) -> usize {
        match &c.0 {
            Backend::Memory(m) => match m.read(key, |s| Lookup::Hit(s.members.len())).await {
                Lookup::Hit(n) => n,
                _ => 0,
            },
            Backend::Redis(r) => {
                let mut conn = r.conn().expect("conn");
                redis::cmd("HLEN")
                    .arg(r.key(key))
                    .query_async(&mut conn)
                    .await
                    .expect("HLEN")
            }
        }
    }

    #[tokio::test]
    async fn a_set_that_churns_stays_bounded_and_keeps_its_fence() {
        for c in caches().await {
            let k = "seg:{churn}";
            let mut version = 0;
            for i in 0..2_000 {
                let m = format!("c{i}");
                version += 1;
                c.set_add(k, version, &[&m]).await.expect("add");
                version += 1;
                c.set_remove(k, version, &[&m]).await.expect("rm");
                // Tombstones are pruned as they come: never more than the
                // slack plus the live members (none here), with bookkeeping.
                let fields = field_count(&c, k).await;
                assert!(fields <= 2 * TOMBSTONE_SLACK + 8, "{fields} fields, {c:?}");
            }
            // A pruned member's late, older add never reads as present.
            assert_eq!(c.set_add(k, 3, &["c1"]).await.expect("add"), 0, "{c:?}");
            assert_ne!(c.set_contains(k, "c1").await, Lookup::Hit(true), "{c:?}");
            // A complete set that churns is forgotten (fenced) and reloads.
            let cust = "cust:{churn}";
            assert!(c.set_replace(cust, version, &["keep"]).await.expect("load"));
            for i in 0..200 {
                version += 1;
                c.set_remove(cust, version, &[&format!("s{i}")])
                    .await
                    .expect("rm");
            }
            assert!(field_count(&c, cust).await <= 2 * TOMBSTONE_SLACK + 8);
            assert_ne!(c.set_contains(cust, "keep").await, Lookup::Hit(false));
            assert!(c.set_replace(cust, version, &["keep"]).await.expect("load"));
            assert_eq!(c.set_members(cust).await, Lookup::Hit(vec!["keep".into()]));
        }
    }

    #[tokio::test]
    async fn deleting_a_large_set_fences_at_its_newest_member() {
        for c in caches().await {
            let k = "seg:{large}";
            let members: Vec<String> = (0..5_000).map(|i| format!("c{i}")).collect();
            for chunk in members.chunks(500) {
                c.set_add(k, 5, chunk).await.expect("add");
            }
            c.set_add(k, 9, &["newest"]).await.expect("add");
            c.delete(k, 6).await.expect("delete");
            assert!(field_count(&c, k).await <= 2, "{c:?}");
            assert_eq!(c.set_add(k, 9, &["late"]).await.expect("add"), 0, "{c:?}");
            assert_eq!(c.set_add(k, 10, &["next"]).await.expect("add"), 1, "{c:?}");
        }
    }

    #[tokio::test]
    async fn bad_members_are_refused() {
        for c in caches().await {
            assert!(matches!(
                c.set_add("s", 1, &[""]).await,
                Err(CacheError::Invalid(_))
            ));
            assert!(matches!(
                c.set_add("s", 1, &["\u{0}f"]).await,
                Err(CacheError::Invalid(_))
            ));
        }
    }

    #[tokio::test]
    async fn eviction_does_not_lift_the_fence_in_process() {
        let c = Cache::memory_with_capacity(4);
        let Backend::Memory(m) = &c.0 else {
            panic!("memory cache")
        };
        assert!(
            c.set_replace("big", 50, &["a", "b", "c", "d", "e", "f"])
                .await
                .expect("load")
        );
        m.entries.run_pending_tasks().await;
        assert_eq!(c.set_contains("big", "a").await, Lookup::Miss, "evicted");
        // A late write older than what the evicted entry had seen is refused.
        assert_eq!(c.set_remove("big", 40, &["a"]).await.expect("rm"), 0);
        assert_eq!(c.set_contains("big", "a").await, Lookup::Miss);
        assert_eq!(c.set_add("small", 51, &["x"]).await.expect("add"), 1);
        assert_eq!(c.set_contains("small", "x").await, Lookup::Hit(true));
    }
}
