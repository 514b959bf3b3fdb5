//! The cache on a Redis Cluster of this test's own: three `redis-server`
//! nodes (`--cluster-enabled yes`) on free ports joined by `redis-cli
//! --cluster create`. Every operation, a multi-key `set_apply` across slots
//! included, works through a seed node; with one node stopped, reads say
//! Unavailable (never Miss or "not a member") and writes fail fast; after
//! the node restarts, the cache repairs itself: keys whose writes failed
//! are deleted (fenced), not served stale.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::cache::{Cache, Lookup, SetWrite};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free port for a cluster node: it also listens on port + 10000 (the
/// cluster bus), so the port is at most 55535 and both are free.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = 20_000 + (std::process::id() % 30_000) as u16;
    loop {
        let port = start + NEXT.fetch_add(7, Ordering::SeqCst) % 5_000;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if port <= 55_535 && free(port) && free(port + 10_000) {
            return port;
        }
    }
}

/// One cluster node, its state (`nodes.conf`) in its own directory so a
/// restart rejoins with the same id and slots; killed on drop.
struct Node {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn start(port: u16, dir: PathBuf) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        Self {
            port,
            dir,
            child: Some(child),
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await?;
        cmd.query_async(&mut c).await
    }

    /// Whether this node holds `key` (read directly, not through the cache).
    /// (A key of another node's slot is MOVED: not held here.)
    async fn holds(&self, key: &str) -> bool {
        match self.query::<i64>(redis::cmd("EXISTS").arg(key)).await {
            Ok(n) => n == 1,
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::Moved) => false,
            Err(e) => panic!("{e}"),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until every node says `cluster_state:ok`.
async fn cluster_ok(nodes: &[Node]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut ok = true;
        for n in nodes {
            let info = n
                .query::<String>(redis::cmd("CLUSTER").arg("INFO"))
                .await
                .unwrap_or_default();
            ok &= info.contains("cluster_state:ok");
        }
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "the cluster did not form");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn until_available<T: std::fmt::Debug>(
    within: Duration,
    mut read: impl AsyncFnMut() -> Lookup<T>,
) -> Lookup<T> {
    let deadline = Instant::now() + within;
    loop {
        match read().await {
            Lookup::Unavailable => {
                assert!(Instant::now() < deadline, "the cache did not come back");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

#[tokio::test]
async fn the_cache_on_a_redis_cluster_with_a_node_stopped_and_restarted() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| {
            let dir = root.path().join(format!("n{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            Node::start(free_port(), dir)
        })
        .collect();
    // Each node answers before the cluster is created.
    for n in &nodes {
        let deadline = Instant::now() + Duration::from_secs(10);
        while n.query::<String>(&redis::cmd("PING")).await.is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let status = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .status()
        .expect("redis-cli on PATH");
    assert!(status.success());
    cluster_ok(&nodes).await;

    // One seed is enough: the other nodes are discovered.
    let cache = Cache::connect_cluster(&nodes[0].url(), "t:").await.unwrap();
    let sets: Vec<String> = (0..24).map(|i| format!("{{seg:{i}}}:members")).collect();
    until_available(Duration::from_secs(10), async || {
        cache.set_contains(&sets[0], "a").await
    })
    .await;
    for s in &sets {
        assert!(cache.set_replace(s, 1, &["a"]).await.unwrap());
    }
    // One call writing to every set, across slots and nodes.
    let writes: Vec<SetWrite> = sets
        .iter()
        .map(|s| SetWrite {
            key: s.clone(),
            member: "b".into(),
            version: 2,
            present: true,
        })
        .collect();
    assert_eq!(cache.set_apply(&writes).await.unwrap(), sets.len());
    for s in &sets {
        assert_eq!(cache.set_contains(s, "b").await, Lookup::Hit(true));
        assert_eq!(cache.set_contains(s, "zz").await, Lookup::Hit(false));
    }
    assert!(cache.put("{cust:1}:v", 1, b"one").await.unwrap());
    assert_eq!(
        cache.get("{cust:1}:v").await.hit().map(|v| v.version),
        Some(1)
    );
    // The sets are spread over the nodes.
    let mut on = [0; 3];
    for s in &sets {
        for (i, n) in nodes.iter().enumerate() {
            on[i] += usize::from(n.holds(&format!("t:{s}")).await);
        }
    }
    assert!(on.iter().all(|n| *n > 0), "sets per node: {on:?}");

    // Node 1 stops: a write to one of its sets fails fast, and then no read
    // hits (never Miss, never "not a member").
    let mut down_set = String::new();
    for s in &sets {
        if nodes[1].holds(&format!("t:{s}")).await {
            down_set.clone_from(s);
            break;
        }
    }
    let mut live_set = String::new();
    for s in &sets {
        if nodes[0].holds(&format!("t:{s}")).await {
            live_set.clone_from(s);
            break;
        }
    }
    nodes[1].stop();
    let start = Instant::now();
    assert!(cache.set_add(&down_set, 3, &["c"]).await.is_err());
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // A write the outage refused on a live node's set is repaired, not lost.
    assert!(cache.set_add(&live_set, 4, &["d"]).await.is_err());
    assert_eq!(
        cache.set_contains(&live_set, "a").await,
        Lookup::Unavailable
    );
    assert_eq!(
        cache.set_contains(&live_set, "d").await,
        Lookup::Unavailable
    );
    assert_eq!(cache.set_members(&down_set).await, Lookup::Unavailable);

    // Node 1 restarts (empty: no persistence) and rejoins with its slots.
    let port = nodes[1].port;
    let dir = nodes[1].dir.clone();
    nodes[1] = Node::start(port, dir);
    cluster_ok(&nodes).await;
    let got = until_available(Duration::from_secs(20), async || {
        cache.set_contains(&down_set, "a").await
    })
    .await;
    assert_eq!(got, Lookup::Miss, "the restarted node is cold");
    // The set whose write failed was deleted with its fence: cold, not stale.
    assert_eq!(cache.set_contains(&live_set, "a").await, Lookup::Miss);
    // ...and its fence: a late copy of the failed write cannot land.
    assert_eq!(cache.set_add(&live_set, 4, &["d"]).await.unwrap(), 0);
    assert!(cache.set_replace(&live_set, 5, &["a", "d"]).await.unwrap());
    assert_eq!(cache.set_contains(&live_set, "d").await, Lookup::Hit(true));
    // Sets on the other nodes kept their members.
    for s in &sets {
        if nodes[2].holds(&format!("t:{s}")).await {
            assert_eq!(cache.set_contains(s, "b").await, Lookup::Hit(true));
        }
    }
}
