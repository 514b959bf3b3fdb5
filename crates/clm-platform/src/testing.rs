//! Test harness: a fresh database (and Redis key space) per test.
//!
//! Without environment, tests use a temporary SQLite file and the
//! in-process cache. With `CLM_TEST_DATABASE_URL` (a PostgreSQL URL whose
//! user may create databases) and `CLM_TEST_REDIS_URL`, each test gets its
//! own new PostgreSQL database, dropped afterwards, and its own Redis key
//! prefix. `scripts/test.sh` runs the suite both ways.

use crate::config::Config;
use sea_orm::{ConnectionTrait, Database};

/// A per-test storage backend. Dropping it removes the database.
#[derive(Debug)]
pub struct TestBackend {
    /// Database URL for the service under test.
    pub database_url: String,
    /// Redis URL, when testing against Redis.
    pub redis_url: Option<String>,
    /// Key prefix unique to this test.
    pub key_prefix: String,
    pg: Option<(String, String)>,
    dir: tempfile::TempDir,
}

impl TestBackend {
    /// A fresh backend, PostgreSQL + Redis if configured, SQLite + memory otherwise.
    pub async fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("warn")
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("temp dir");
        let key_prefix = format!("clm-test:{}:", uuid::Uuid::new_v4().simple());
        let redis_url = std::env::var("CLM_TEST_REDIS_URL")
            .ok()
            .filter(|s| !s.is_empty());
        match std::env::var("CLM_TEST_DATABASE_URL")
            .ok()
            .filter(|s| !s.is_empty())
        {
            Some(admin) => {
                let name = format!("clm_t_{}", uuid::Uuid::new_v4().simple());
                let conn = Database::connect(&admin)
                    .await
                    .expect("CLM_TEST_DATABASE_URL reachable");
                conn.execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create test database");
                let _ = conn.close().await;
                let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
                let database_url = format!("{base}/{name}");
                Self {
                    database_url,
                    redis_url,
                    key_prefix,
                    pg: Some((admin, name)),
                    dir,
                }
            }
            None => {
                let database_url = format!("sqlite://{}", dir.path().join("test.db").display());
                Self {
                    database_url,
                    redis_url: None,
                    key_prefix,
                    pg: None,
                    dir,
                }
            }
        }
    }

    /// Whether this backend is PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.pg.is_some()
    }

    /// A config for `service` on this backend, listening on 127.0.0.1:0.
    pub fn config(&self, service: &str) -> Config {
        let mut c = Config::defaults(service, self.dir.path());
        c.listen = "127.0.0.1:0".parse().expect("addr");
        c.database.url = self.database_url.clone();
        c.database.max_connections = 8;
        c.cache.redis_url = self.redis_url.clone();
        c.cache.key_prefix = self.key_prefix.clone();
        c.drain_timeout_secs = 2;
        c
    }

    /// A scratch directory that lives as long as the backend.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.pg.take() {
            // Drop runs outside async context; use a short-lived runtime on its own thread.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    if let Ok(conn) = Database::connect(&admin).await {
                        let _ = conn
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .await;
                        let _ = conn.close().await;
                    }
                });
            })
            .join();
        }
    }
}

/// A service running inside the test process.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// Cancel to stop it.
    pub shutdown: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A channel to the service.
    pub fn channel(&self) -> tonic::transport::Channel {
        crate::client::channel(&self.url()).expect("valid url")
    }

    /// Stops the service gracefully and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.handle.await;
    }
}

/// Starts a service with `run` on `config` (its `listen` port may be 0) and
/// waits until its health check says SERVING.
pub async fn spawn<F, Fut>(config: Config, run: F) -> Running
where
    F: FnOnce(Config, tokio::net::TcpListener, tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .expect("bind test listener");
    let addr = listener.local_addr().expect("local addr");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(run(config, listener, shutdown.clone()));
    let running = Running {
        addr,
        shutdown,
        handle,
    };
    wait_serving(&running.url()).await;
    running
}

/// Starts `service` on `config` (port 0 is fine) and waits until it serves.
pub async fn start(service: &'static crate::service::ServiceDescriptor, config: Config) -> Running {
    spawn(config, move |c, l, s| crate::service::run(service, c, l, s)).await
}

/// [`start`] with a chosen clock.
pub async fn start_with_clock(
    service: &'static crate::service::ServiceDescriptor,
    config: Config,
    clock: std::sync::Arc<dyn clm_domain::Clock>,
) -> Running {
    spawn(config, move |c, l, s| {
        crate::service::run_with_clock(service, c, l, s, clock)
    })
    .await
}

/// Polls `grpc.health.v1.Health/Check` at `url` until SERVING (30 s at most).
pub async fn wait_serving(url: &str) {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(channel) = crate::client::channel(url) {
            let mut client = HealthClient::new(channel);
            if let Ok(r) = client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                && r.into_inner().status == ServingStatus::Serving as i32
            {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{url} did not become SERVING within 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Polls `check` until it returns true, failing the test after `timeout`.
pub async fn eventually<F, Fut>(timeout: std::time::Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
