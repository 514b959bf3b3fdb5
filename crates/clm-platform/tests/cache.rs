//! The Redis cache against its own `redis-server` (never the shared one):
//! started after the cache, killed and restarted, and cut off by a proxy
//! that stops forwarding while Redis keeps its data. Reads say Unavailable
//! (never Miss or "not a member") while Redis cannot answer, writes fail
//! within the operation timeout, and the cache repairs itself afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::cache::{Cache, CacheError, Lookup, OP_TIMEOUT};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` of this test, without persistence, killed on drop.
struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    async fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        let server = Self {
            port,
            child: Some(child),
        };
        let client = redis::Client::open(server.url()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return server;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// The raw hash of `key`, read directly (not through the cache).
    async fn hash(&self, key: &str) -> Vec<(String, String)> {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `read` until it is not Unavailable; every earlier answer must be
/// Unavailable. Fails after `within`.
async fn until_available<T: std::fmt::Debug>(
    within: Duration,
    mut read: impl AsyncFnMut() -> Lookup<T>,
) -> Lookup<T> {
    let deadline = Instant::now() + within;
    loop {
        match read().await {
            Lookup::Unavailable => {
                assert!(Instant::now() < deadline, "the cache did not come back");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// Asserts that `op` fails with Unavailable within the operation timeout
/// (plus scheduling slack): a write never hangs on a dead Redis.
async fn fails_fast<T: std::fmt::Debug>(op: impl Future<Output = Result<T, CacheError>>) {
    let start = Instant::now();
    let r = op.await;
    assert!(matches!(r, Err(CacheError::Unavailable(_))), "{r:?}");
    assert!(
        start.elapsed() < OP_TIMEOUT + Duration::from_millis(500),
        "took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn starts_without_redis_and_connects_when_it_appears() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let start = Instant::now();
    let cache = Cache::connect(Some(&url), "t:").await.expect("connects");
    assert!(start.elapsed() < Duration::from_secs(2), "connect waited");
    assert!(!cache.is_available());
    assert_eq!(
        cache.set_contains("seg:{1}", "a").await,
        Lookup::Unavailable
    );
    fails_fast(cache.set_add("seg:{1}", 1, &["a"])).await;

    let _redis = RedisServer::start(port).await;
    let got = until_available(Duration::from_secs(10), async || {
        cache.set_contains("seg:{1}", "a").await
    })
    .await;
    assert_eq!(got, Lookup::Miss, "the failed write was repaired to cold");
    assert!(cache.set_replace("seg:{1}", 2, &["a"]).await.unwrap());
    assert_eq!(cache.set_contains("seg:{1}", "a").await, Lookup::Hit(true));
}

#[tokio::test]
async fn redis_killed_then_restarted() {
    let port = free_port();
    let mut redis = RedisServer::start(port).await;
    let cache = Cache::connect(Some(&redis.url()), "t:").await.unwrap();
    assert!(cache.is_available());
    assert!(cache.set_replace("seg:{1}", 1, &["a"]).await.unwrap());
    assert!(cache.put("v", 1, b"one").await.unwrap());
    assert_eq!(cache.set_contains("seg:{1}", "a").await, Lookup::Hit(true));

    redis.kill();
    // Never Miss, never "not a member": the cache does not know.
    for _ in 0..3 {
        assert_eq!(
            cache.set_contains("seg:{1}", "a").await,
            Lookup::Unavailable
        );
        assert_eq!(
            cache.set_contains("seg:{1}", "zz").await,
            Lookup::Unavailable
        );
        assert_eq!(cache.set_members("seg:{1}").await, Lookup::Unavailable);
        assert_eq!(cache.get("v").await, Lookup::Unavailable);
    }
    fails_fast(cache.set_add("seg:{1}", 2, &["b"])).await;
    fails_fast(cache.put("v", 2, b"two")).await;
    assert!(!cache.is_available());

    let redis = RedisServer::start(port).await;
    let got = until_available(Duration::from_secs(10), async || {
        cache.set_contains("seg:{1}", "a").await
    })
    .await;
    assert_eq!(got, Lookup::Miss, "an empty Redis is cold");
    assert!(cache.set_replace("seg:{1}", 3, &["a", "b"]).await.unwrap());
    assert_eq!(cache.set_contains("seg:{1}", "b").await, Lookup::Hit(true));
    assert_eq!(cache.set_contains("seg:{1}", "c").await, Lookup::Hit(false));
    // The repaired keys kept the fence of the writes that failed.
    assert!(!cache.put("v", 2, b"late").await.unwrap());
    assert!(cache.put("v", 3, b"three").await.unwrap());
    drop(redis);
}

/// Forwards TCP to Redis until told to stop: then it holds every connection
/// open without passing a byte (a network partition), and on restore drops
/// the held connections and forwards new ones again.
struct Proxy {
    port: u16,
    forwarding: watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (forwarding, _) = watch::channel(true);
        let tx = forwarding.clone();
        tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let mut rx = tx.subscribe();
                tokio::spawn(async move {
                    if *rx.borrow_and_update() {
                        let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => return,
                            _ = rx.wait_for(|f| !*f) => {}
                        }
                    }
                    // Partitioned: hold the sockets, pass nothing, until restored.
                    let _ = rx.wait_for(|f| *f).await;
                });
            }
        });
        Self { port, forwarding }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.forwarding.send_replace(false);
    }

    fn restore(&self) {
        self.forwarding.send_replace(true);
    }
}

#[tokio::test]
async fn writes_lost_in_a_partition_are_repaired_not_served_stale() {
    let redis = RedisServer::start(free_port()).await;
    let proxy = Arc::new(Proxy::start(redis.port).await);
    let cache = Cache::connect(Some(&proxy.url()), "t:").await.unwrap();
    assert!(cache.is_available());
    assert!(cache.set_replace("seg:{9}", 1, &["a", "b"]).await.unwrap());
    assert!(cache.put("v", 1, b"one").await.unwrap());

    proxy.cut();
    // The database removed `a` at version 2 and rewrote `v`; Redis never hears of it.
    fails_fast(cache.set_remove("seg:{9}", 2, &["a"])).await;
    fails_fast(cache.put("v", 2, b"two")).await;
    assert_eq!(
        cache.set_contains("seg:{9}", "a").await,
        Lookup::Unavailable
    );
    assert_eq!(
        cache.set_contains("seg:{9}", "b").await,
        Lookup::Unavailable
    );
    assert_eq!(cache.get("v").await, Lookup::Unavailable);
    let raw = redis.hash("t:seg:{9}").await;
    assert!(
        raw.iter()
            .any(|(f, v)| f == "a" && v == "00000000000000000001+"),
        "Redis still holds the stale member: {raw:?}"
    );

    proxy.restore();
    let got = until_available(Duration::from_secs(10), async || {
        cache.set_contains("seg:{9}", "a").await
    })
    .await;
    assert_eq!(
        got,
        Lookup::Miss,
        "the stale set was invalidated, not served"
    );
    assert_eq!(cache.get("v").await, Lookup::Miss);
    // A late copy of an old write cannot land on the repaired keys.
    assert_eq!(cache.set_add("seg:{9}", 2, &["a"]).await.unwrap(), 0);
    assert!(!cache.put("v", 2, b"late").await.unwrap());
    // Reloading from the database works.
    assert!(cache.set_replace("seg:{9}", 3, &["b"]).await.unwrap());
    assert_eq!(cache.set_contains("seg:{9}", "a").await, Lookup::Hit(false));
    assert_eq!(cache.set_contains("seg:{9}", "b").await, Lookup::Hit(true));
}
