//! One cache interface with two implementations: Redis (through a
//! reconnecting `ConnectionManager`) and an in-process moka cache when no
//! Redis URL is configured.
//!
//! The cache is never the truth. Callers write what the database holds
//! after commit; [`Cache::set_versioned`] refuses to overwrite a newer
//! value, so two racing writers cannot leave the older one last.

use moka::future::Cache as Moka;
use redis::AsyncCommands;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::RwLock;

/// Errors from the cache. Callers usually log them and fall back to the database.
#[derive(Debug, thiserror::Error)]
#[error("cache: {0}")]
pub struct CacheError(String);

impl From<redis::RedisError> for CacheError {
    fn from(e: redis::RedisError) -> Self {
        Self(e.to_string())
    }
}

#[derive(Clone)]
#[doc(hidden)]
pub enum Entry {
    Value { version: i64, bytes: Arc<Vec<u8>> },
    Set(Arc<RwLock<HashSet<String>>>),
}

/// A key-value and set cache.
#[derive(Clone)]
pub enum Cache {
    /// Redis.
    Redis {
        /// Connection.
        conn: redis::aio::ConnectionManager,
        /// Prefix put before every key.
        prefix: String,
    },
    /// In-process.
    Memory(Moka<String, Entry>),
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cache::Redis { prefix, .. } => write!(f, "Cache::Redis({prefix})"),
            Cache::Memory(_) => f.write_str("Cache::Memory"),
        }
    }
}

/// Keeps the value only if `version` is newer than the stored one.
const SET_VERSIONED: &str = r"
local cur = redis.call('HGET', KEYS[1], 'v')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'b', ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
";

impl Cache {
    /// Connects to Redis, or builds an in-process cache when `redis_url` is `None`.
    pub async fn connect(redis_url: Option<&str>, prefix: &str) -> Result<Self, CacheError> {
        match redis_url {
            Some(url) => {
                let client = redis::Client::open(url)?;
                let conn = redis::aio::ConnectionManager::new(client).await?;
                Ok(Cache::Redis {
                    conn,
                    prefix: prefix.to_owned(),
                })
            }
            None => Ok(Cache::memory()),
        }
    }

    /// An in-process cache (at most 1,000,000 entries).
    pub fn memory() -> Self {
        Cache::Memory(Moka::builder().max_capacity(1_000_000).build())
    }

    fn key(&self, k: &str) -> String {
        match self {
            Cache::Redis { prefix, .. } => format!("{prefix}{k}"),
            Cache::Memory(_) => k.to_owned(),
        }
    }

    /// Stores `bytes` under `key` unless a value with an equal or higher
    /// `version` is already there. Returns whether it was stored.
    pub async fn set_versioned(
        &self,
        key: &str,
        version: i64,
        bytes: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, CacheError> {
        let k = self.key(key);
        match self {
            Cache::Redis { conn, .. } => {
                let ttl_ms = ttl.map_or(0, |t| t.as_millis() as u64);
                let stored: i64 = redis::Script::new(SET_VERSIONED)
                    .key(k)
                    .arg(version)
                    .arg(bytes)
                    .arg(ttl_ms)
                    .invoke_async(&mut conn.clone())
                    .await?;
                Ok(stored == 1)
            }
            Cache::Memory(m) => {
                let new = Entry::Value {
                    version,
                    bytes: Arc::new(bytes.to_vec()),
                };
                let result = m
                    .entry(k)
                    .and_compute_with(|cur| async move {
                        match cur.map(|e| e.into_value()) {
                            Some(Entry::Value { version: v, .. }) if v >= version => {
                                moka::ops::compute::Op::Nop
                            }
                            _ => moka::ops::compute::Op::Put(new),
                        }
                    })
                    .await;
                Ok(!matches!(
                    result,
                    moka::ops::compute::CompResult::Unchanged(_)
                ))
            }
        }
    }

    /// Reads a value stored with [`Cache::set_versioned`]: `(version, bytes)`.
    pub async fn get_versioned(&self, key: &str) -> Result<Option<(i64, Vec<u8>)>, CacheError> {
        let k = self.key(key);
        match self {
            Cache::Redis { conn, .. } => {
                let (v, b): (Option<i64>, Option<Vec<u8>>) = redis::cmd("HMGET")
                    .arg(&k)
                    .arg("v")
                    .arg("b")
                    .query_async(&mut conn.clone())
                    .await?;
                Ok(v.zip(b))
            }
            Cache::Memory(m) => Ok(match m.get(&k).await {
                Some(Entry::Value { version, bytes }) => Some((version, bytes.as_ref().clone())),
                _ => None,
            }),
        }
    }

    /// Deletes a key.
    pub async fn delete(&self, key: &str) -> Result<(), CacheError> {
        let k = self.key(key);
        match self {
            Cache::Redis { conn, .. } => {
                let _: i64 = conn.clone().del(k).await?;
            }
            Cache::Memory(m) => m.invalidate(&k).await,
        }
        Ok(())
    }

    /// Adds members to a set.
    pub async fn set_add(&self, key: &str, members: &[String]) -> Result<(), CacheError> {
        if members.is_empty() {
            return Ok(());
        }
        let k = self.key(key);
        match self {
            Cache::Redis { conn, .. } => {
                let _: i64 = conn.clone().sadd(k, members).await?;
            }
            Cache::Memory(m) => {
                let set = self.memory_set(m, k).await;
                set.write().await.extend(members.iter().cloned());
            }
        }
        Ok(())
    }

    /// Removes members from a set.
    pub async fn set_remove(&self, key: &str, members: &[String]) -> Result<(), CacheError> {
        if members.is_empty() {
            return Ok(());
        }
        let k = self.key(key);
        match self {
            Cache::Redis { conn, .. } => {
                let _: i64 = conn.clone().srem(k, members).await?;
            }
            Cache::Memory(m) => {
                if let Some(Entry::Set(set)) = m.get(&k).await {
                    let mut s = set.write().await;
                    for x in members {
                        s.remove(x);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `member` is in the set.
    pub async fn set_contains(&self, key: &str, member: &str) -> Result<bool, CacheError> {
        let k = self.key(key);
        match self {
            Cache::Redis { conn, .. } => Ok(conn.clone().sismember(k, member).await?),
            Cache::Memory(m) => Ok(match m.get(&k).await {
                Some(Entry::Set(set)) => set.read().await.contains(member),
                _ => false,
            }),
        }
    }

    /// All members of the set, sorted.
    pub async fn set_members(&self, key: &str) -> Result<Vec<String>, CacheError> {
        let k = self.key(key);
        let mut out: Vec<String> = match self {
            Cache::Redis { conn, .. } => conn.clone().smembers(k).await?,
            Cache::Memory(m) => match m.get(&k).await {
                Some(Entry::Set(set)) => set.read().await.iter().cloned().collect(),
                _ => Vec::new(),
            },
        };
        out.sort();
        Ok(out)
    }

    async fn memory_set(&self, m: &Moka<String, Entry>, k: String) -> Arc<RwLock<HashSet<String>>> {
        let entry = m
            .get_with(k.clone(), async { Entry::Set(Arc::default()) })
            .await;
        match entry {
            Entry::Set(s) => s,
            Entry::Value { .. } => {
                let s: Arc<RwLock<HashSet<String>>> = Arc::default();
                m.insert(k, Entry::Set(s.clone())).await;
                s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn caches() -> Vec<Cache> {
        let mut v = vec![Cache::memory()];
        if let Ok(url) = std::env::var("CLM_TEST_REDIS_URL") {
            let prefix = format!("clm-test:{}:", uuid::Uuid::new_v4());
            v.push(
                Cache::connect(Some(&url), &prefix)
                    .await
                    .expect("redis reachable"),
            );
        }
        v
    }

    #[tokio::test]
    async fn versioned_values_never_go_back() {
        for c in caches().await {
            assert!(c.set_versioned("k", 2, b"two", None).await.expect("set"));
            assert!(
                !c.set_versioned("k", 1, b"one", None).await.expect("set"),
                "{c:?}"
            );
            assert_eq!(
                c.get_versioned("k").await.expect("get"),
                Some((2, b"two".to_vec()))
            );
            assert!(c.set_versioned("k", 3, b"three", None).await.expect("set"));
            c.delete("k").await.expect("del");
            assert_eq!(c.get_versioned("k").await.expect("get"), None);
        }
    }

    #[tokio::test]
    async fn sets() {
        for c in caches().await {
            c.set_add("s", &["a".into(), "b".into()])
                .await
                .expect("add");
            assert!(c.set_contains("s", "a").await.expect("contains"));
            c.set_remove("s", &["a".into()]).await.expect("rem");
            assert!(!c.set_contains("s", "a").await.expect("contains"));
            assert_eq!(
                c.set_members("s").await.expect("members"),
                vec!["b".to_owned()]
            );
            c.delete("s").await.expect("del");
        }
    }
}
