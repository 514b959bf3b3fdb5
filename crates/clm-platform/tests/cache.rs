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

use clm_platform::testing::free_port;

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
    // Never Miss, never "not a member": the cache does not know. (The near
    // copy may answer what it held until it sees its connection drop.)
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match cache.set_contains("seg:{1}", "a").await {
            Lookup::Unavailable => break,
            got => assert_eq!(got, Lookup::Hit(true)),
        }
        assert!(Instant::now() < deadline, "the near copy outlived Redis");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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

/// Polls `read` until it answers `want`, within two seconds.
async fn until_answers<T: std::fmt::Debug + PartialEq>(
    want: Lookup<T>,
    mut read: impl AsyncFnMut() -> Lookup<T>,
) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let got = read().await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "still {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads `key`'s `member` until the near copy answers it (the tracking
/// connection is up and the reply was kept).
async fn until_near(cache: &Cache, key: &str, member: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = cache.near_hits().expect("one node keeps a near copy");
        cache.set_contains(key, member).await;
        if cache.near_hits().unwrap() > before {
            return;
        }
        assert!(Instant::now() < deadline, "the near copy never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A plain connection to `redis`, outside any cache.
async fn raw(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_near_copy_answers_locally_and_follows_every_change() {
    let redis = RedisServer::start(free_port()).await;
    let a = Cache::connect(Some(&redis.url()), "t:").await.unwrap();
    let b = Cache::connect(Some(&redis.url()), "t:").await.unwrap();
    assert!(a.set_replace("cust:{1}", 1, &["s1", "s2"]).await.unwrap());
    until_near(&a, "cust:{1}", "s1").await;
    let before = a.near_hits().unwrap();
    for _ in 0..100 {
        assert_eq!(a.set_contains("cust:{1}", "s1").await, Lookup::Hit(true));
    }
    assert_eq!(
        a.set_members("cust:{1}").await,
        Lookup::Hit(vec!["s1".to_owned(), "s2".to_owned()])
    );
    assert_eq!(
        a.set_members("cust:{1}").await,
        Lookup::Hit(vec!["s1".to_owned(), "s2".to_owned()])
    );
    assert!(
        a.near_hits().unwrap() >= before + 101,
        "answered without Redis"
    );

    // Another replica's write reaches the copy.
    assert_eq!(b.set_remove("cust:{1}", 2, &["s1"]).await.unwrap(), 1);
    until_answers(Lookup::Hit(false), async || {
        a.set_contains("cust:{1}", "s1").await
    })
    .await;
    until_answers(Lookup::Hit(vec!["s2".to_owned()]), async || {
        a.set_members("cust:{1}").await
    })
    .await;

    // So does a change made outside any cache, and a deletion.
    let mut conn = raw(&redis).await;
    until_near(&a, "cust:{1}", "s9").await;
    redis::cmd("HSET")
        .arg("t:cust:{1}")
        .arg("s9")
        .arg("00000000000000000003+")
        .exec_async(&mut conn)
        .await
        .unwrap();
    until_answers(Lookup::Hit(true), async || {
        a.set_contains("cust:{1}", "s9").await
    })
    .await;
    until_near(&a, "cust:{1}", "s9").await;
    redis::cmd("DEL")
        .arg("t:cust:{1}")
        .exec_async(&mut conn)
        .await
        .unwrap();
    until_answers(Lookup::Miss, async || {
        a.set_contains("cust:{1}", "s9").await
    })
    .await;

    // Its own writes are read back at once, never the copy from before.
    assert!(a.set_replace("cust:{2}", 10, &["x"]).await.unwrap());
    for v in 11..211_u64 {
        let present = v % 2 == 0;
        until_near(&a, "cust:{2}", "y").await;
        if present {
            assert_eq!(a.set_add("cust:{2}", v, &["y"]).await.unwrap(), 1);
        } else {
            assert_eq!(a.set_remove("cust:{2}", v, &["y"]).await.unwrap(), 1);
        }
        assert_eq!(
            a.set_contains("cust:{2}", "y").await,
            Lookup::Hit(present),
            "v{v}"
        );
    }
}

#[tokio::test]
async fn the_near_copy_is_dropped_with_its_tracking_connection() {
    let redis = RedisServer::start(free_port()).await;
    let a = Cache::connect(Some(&redis.url()), "t:").await.unwrap();
    assert!(a.set_replace("cust:{1}", 1, &["s1"]).await.unwrap());
    until_near(&a, "cust:{1}", "s1").await;

    // Kill the tracking connection (the only one in BCAST mode), then
    // change the key: the copy must not answer what it held.
    let mut conn = raw(&redis).await;
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    let tracking: Vec<&str> = clients
        .lines()
        .filter(|l| {
            l.split(' ')
                .any(|f| f.starts_with("flags=") && f.contains('B'))
        })
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .collect();
    assert_eq!(tracking.len(), 1, "{clients}");
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(tracking[0])
        .exec_async(&mut conn)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis::cmd("HSET")
        .arg("t:cust:{1}")
        .arg("s1")
        .arg("00000000000000000002-")
        .exec_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(a.set_contains("cust:{1}", "s1").await, Lookup::Hit(false));
    // Tracking comes back, and with it an empty copy that fills again.
    until_near(&a, "cust:{1}", "s1").await;
    assert_eq!(a.set_contains("cust:{1}", "s1").await, Lookup::Hit(false));
}
