//! Test harness: a fresh database (and Redis key space) per test, and the
//! assertions every service's tests share ([`assert_bad_field`],
//! [`eventually`]).
//!
//! Without environment, tests use a temporary SQLite file and the
//! in-process cache. With `CLM_TEST_DATABASE_URL` (a PostgreSQL URL whose
//! user may create databases) and `CLM_TEST_REDIS_URL`, each test gets its
//! own new PostgreSQL database, dropped afterwards, and its own Redis key
//! prefix. `scripts/test.sh` runs the backend-dependent tests both ways.
//!
//! [`TestBackend::migrated`] gives a PostgreSQL test a clone of a
//! pre-migrated template database (`CREATE DATABASE .. TEMPLATE ..`)
//! instead of running every migration again: one template per migrator,
//! named `clm_tpl_<key>_<hash>`: the hash of its migration names and of
//! `CLM_TEST_TEMPLATE_KEY`, which `scripts/test.sh` sets to a hash of the
//! migration sources so an edited migration gets a new template (and the
//! script drops templates of other keys). The first test process to need
//! a template builds it under a PostgreSQL advisory lock, so concurrent
//! test processes never build it twice or clone a half-built one.

use crate::config::Config;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DbBackend, Statement};
use sea_orm_migration::MigratorTrait;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

/// A TCP port on 127.0.0.1 that nothing listens on now, for a process a
/// test starts with a fixed address (a `clm serve` whose peers must know
/// its URL, a `redis-server`).
///
/// Chosen at random *below* the kernel's ephemeral range
/// (`ip_local_port_range`): a port from `bind(":0")`, as this used to
/// take, is free only until the next `bind(":0")` or outgoing connection
/// of any test running beside this one, and one of them took it before
/// the process started often enough to fail CI (a `clm serve` exiting
/// before it printed its address). Below that range the kernel hands out
/// nothing by itself; only another test picking at random can collide,
/// and the port is checked free first.
pub fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (10_000u16, low.saturating_sub(1));
    if to > from + 1_000 {
        for _ in 0..64 {
            let span = u128::from(to - from);
            let port = from + u16::try_from(uuid::Uuid::new_v4().as_u128() % span).unwrap_or(0);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

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
    /// A fresh, empty backend, PostgreSQL + Redis if configured, SQLite +
    /// memory otherwise.
    pub async fn new() -> Self {
        Self::create(None).await
    }

    /// A backend whose database already holds `M`'s schema: on PostgreSQL
    /// a clone of `M`'s template database (built once, see the module
    /// doc); on SQLite a fresh file that the service migrates on start.
    pub async fn migrated<M: MigratorTrait>() -> Self {
        let template = match admin_url() {
            Some(admin) => Some(template::<M>(&admin).await),
            None => None,
        };
        Self::create(template).await
    }

    async fn create(template: Option<String>) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("warn")
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("temp dir");
        let key_prefix = format!("clm-test:{}:", uuid::Uuid::new_v4().simple());
        let redis_url = std::env::var("CLM_TEST_REDIS_URL")
            .ok()
            .filter(|s| !s.is_empty());
        match admin_url() {
            Some(admin) => {
                let name = format!("clm_t_{}", uuid::Uuid::new_v4().simple());
                let conn = Database::connect(&admin)
                    .await
                    .expect("CLM_TEST_DATABASE_URL reachable");
                let create = match &template {
                    Some(t) => format!("CREATE DATABASE {name} TEMPLATE {t}"),
                    None => format!("CREATE DATABASE {name}"),
                };
                conn.execute_unprepared(&create)
                    .await
                    .expect("create test database");
                let _ = conn.close().await;
                let database_url = format!("{}/{name}", base_url(&admin));
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
        // `CLM_TEST_REDIS_CLUSTER=1`: CLM_TEST_REDIS_URL names Redis Cluster nodes.
        c.cache.cluster = self.redis_url.is_some()
            && std::env::var("CLM_TEST_REDIS_CLUSTER").is_ok_and(|v| v == "1");
        c.cache.key_prefix = self.key_prefix.clone();
        c.drain_timeout_secs = 2;
        c
    }

    /// A scratch directory that lives as long as the backend.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

fn admin_url() -> Option<String> {
    std::env::var("CLM_TEST_DATABASE_URL")
        .ok()
        .filter(|s| !s.is_empty())
}

/// `postgres://user@host:port` of an admin URL (without the database).
fn base_url(admin: &str) -> &str {
    admin.rsplit_once('/').map_or(admin, |(b, _)| b)
}

/// Templates this process knows to be complete.
static READY_TEMPLATES: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Name of `M`'s template database, building it first if no process has.
async fn template<M: MigratorTrait>(admin: &str) -> String {
    let mut hash = Sha256::new();
    for m in M::migrations() {
        hash.update(m.name().as_bytes());
        hash.update([0]);
    }
    hash.update(
        std::env::var("CLM_TEST_TEMPLATE_KEY")
            .unwrap_or_default()
            .as_bytes(),
    );
    let digest = hash.finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    // The key's prefix leads the name so scripts/test.sh can drop the
    // templates of other migration sources.
    let key: String = std::env::var("CLM_TEST_TEMPLATE_KEY")
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    let name = format!("clm_tpl_{}_{hex}", if key.is_empty() { "0" } else { &key });
    let known = |name: &str| {
        READY_TEMPLATES
            .lock()
            .expect("template set")
            .get_or_insert_with(HashSet::new)
            .contains(name)
    };
    if known(&name) {
        return name;
    }
    // One connection, so the session-level advisory lock and its unlock
    // run on the same session.
    let mut opts = ConnectOptions::new(admin.to_owned());
    opts.max_connections(1)
        .min_connections(1)
        .sqlx_logging(false);
    let conn = Database::connect(opts)
        .await
        .expect("CLM_TEST_DATABASE_URL reachable");
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest[8..16]);
    let key = i64::from_be_bytes(key);
    conn.execute_unprepared(&format!("SELECT pg_advisory_lock({key})"))
        .await
        .expect("template lock");
    let exists = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT 1 FROM pg_database WHERE datname = $1",
            [name.clone().into()],
        ))
        .await
        .expect("look up template")
        .is_some();
    if !exists {
        // Built under another name and renamed when complete: a process
        // killed half-way leaves only the `_building` database, which the
        // next builder drops.
        let building = format!("{name}_building");
        for sql in [
            format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"),
            format!("CREATE DATABASE {building}"),
        ] {
            conn.execute_unprepared(&sql)
                .await
                .expect("template database");
        }
        let db = Database::connect(format!("{}/{building}", base_url(admin)))
            .await
            .expect("template reachable");
        M::up(&db, None).await.expect("migrate template");
        let _ = db.close().await;
        conn.execute_unprepared(&format!("ALTER DATABASE {building} RENAME TO {name}"))
            .await
            .expect("publish template");
    }
    let _ = conn
        .execute_unprepared(&format!("SELECT pg_advisory_unlock({key})"))
        .await;
    let _ = conn.close().await;
    READY_TEMPLATES
        .lock()
        .expect("template set")
        .get_or_insert_with(HashSet::new)
        .insert(name.clone());
    name
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
    spawn_on(listener, config, run).await
}

/// [`spawn`] on a listener bound already.
async fn spawn_on<F, Fut>(listener: tokio::net::TcpListener, config: Config, run: F) -> Running
where
    F: FnOnce(Config, tokio::net::TcpListener, tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
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

/// [`start`] on `listener`, bound already: a suite binds every service's
/// listener first, so each knows the others' addresses with no race for a
/// free port.
pub async fn start_on(
    service: &'static crate::service::ServiceDescriptor,
    config: Config,
    listener: std::net::TcpListener,
) -> Running {
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    spawn_on(listener, config, move |c, l, s| {
        crate::service::run(service, c, l, s)
    })
    .await
}

/// [`start_on`] with a chosen clock (a suite whose services share a
/// clock the test drives).
pub async fn start_on_with_clock(
    service: &'static crate::service::ServiceDescriptor,
    config: Config,
    listener: std::net::TcpListener,
    clock: std::sync::Arc<dyn clm_domain::Clock>,
) -> Running {
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    spawn_on(listener, config, move |c, l, s| {
        crate::service::run_with_clock(service, c, l, s, clock)
    })
    .await
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

/// Asserts that `status` is INVALID_ARGUMENT with a `BadRequest` field
/// violation naming `field` (e.g. `customer.email`, `touchpoints[1].revenue`).
pub fn assert_bad_field(status: &tonic::Status, field: &str) {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    let fields: Vec<String> = details
        .bad_request()
        .expect("BadRequest detail")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert!(
        fields.iter().any(|f| f == field),
        "expected a violation of {field}, got {fields:?}"
    );
}

/// What [`eventually`] polls: `bool` (done or not) or `Option<T>` (the
/// value once there).
pub trait Settled {
    /// What `eventually` returns.
    type Output;
    /// `Some` once the condition holds.
    fn settled(self) -> Option<Self::Output>;
}

impl Settled for bool {
    type Output = ();
    fn settled(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Settled for Option<T> {
    type Output = T;
    fn settled(self) -> Option<T> {
        self
    }
}

/// The first column of the first row `sql` answers, as an integer (a
/// count, a position): the one-number question a test asks a database.
/// Panics, naming the statement, when it fails or answers no row.
pub async fn scalar(db: &impl ConnectionTrait, sql: &str) -> i64 {
    db.query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .expect(sql)
        .expect("a row")
        .try_get_by_index::<i64>(0)
        .expect("an integer")
}

/// Polls `check` every 10 ms until it holds (returns `true` or `Some`),
/// and panics if it still does not after `deadline`. For conditions that
/// another task or process brings about (a consumer catching up, a slot
/// freed); never for waiting on time, which tests move with the `Clock`.
///
/// ```ignore
/// eventually(Duration::from_secs(30), || async { applied(&db).await >= 10 }).await;
/// ```
pub async fn eventually<S, F, Fut>(deadline: Duration, mut check: F) -> S::Output
where
    S: Settled,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    let until = std::time::Instant::now() + deadline;
    loop {
        if let Some(out) = check().await.settled() {
            return out;
        }
        assert!(
            std::time::Instant::now() < until,
            "condition still false after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Samples, every 2 ms until [`LockWaits::stop`], the statements of a
/// PostgreSQL database that wait for a lock (`pg_stat_activity`), other
/// than the relation-extension lock and the NOTIFY queue's lock at commit:
/// what a test asserts when writers must
/// not queue on each other's row locks.
/// On SQLite (one writer) it samples nothing.
#[derive(Debug)]
pub struct LockWaits {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<std::collections::BTreeSet<String>>,
}

impl LockWaits {
    /// Starts sampling the database at `url`.
    pub fn sample(url: &str) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, url) = (stop.clone(), url.to_owned());
        let task = tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            if !url.starts_with("postgres") {
                return seen;
            }
            let db = Database::connect(&url)
                .await
                .expect("connect to sample locks");
            // `extend` is the relation-extension lock: concurrent inserts
            // into one table take turns adding its pages. It is held for a
            // page write, not a transaction, and is no row lock to queue on.
            // An `object` lock at COMMIT is the NOTIFY queue's, one for the
            // whole cluster (`PreCommit_Notify`): the outbox relay's commit
            // waits there for any database's notifying commit (another
            // test's relay), not for a row.
            let sql = "SELECT wait_event || ': ' || query AS query FROM pg_stat_activity \
                       WHERE datname = current_database() \
                       AND wait_event_type = 'Lock' AND wait_event <> 'extend' \
                       AND NOT (wait_event = 'object' AND query = 'COMMIT')";
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let rows = db
                    .query_all_raw(Statement::from_string(DbBackend::Postgres, sql))
                    .await
                    .expect("pg_stat_activity");
                seen.extend(
                    rows.iter()
                        .filter_map(|r| r.try_get::<String>("", "query").ok()),
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            seen
        });
        Self { stop, task }
    }

    /// Stops sampling and returns every statement seen waiting for a lock,
    /// each after the lock it waited for (`tuple: UPDATE ...`).
    pub async fn stop(self) -> std::collections::BTreeSet<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.expect("lock sampler")
    }
}

/// Waits (30 s at most) until operation `name` of the service behind
/// `channel` is done (through `google.longrunning.Operations`), and
/// returns it.
pub async fn operation_done(
    channel: tonic::transport::Channel,
    name: &str,
) -> clm_proto::google::longrunning::Operation {
    use clm_proto::google::longrunning::GetOperationRequest;
    use clm_proto::google::longrunning::operations_client::OperationsClient;
    eventually(Duration::from_secs(30), || {
        let mut client = OperationsClient::new(channel.clone());
        let name = name.to_owned();
        async move {
            let op = client
                .get_operation(GetOperationRequest { name })
                .await
                .expect("GetOperation")
                .into_inner();
            op.done.then_some(op)
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn eventually_polls_until_the_condition_holds_and_returns_its_value() {
        let calls = AtomicUsize::new(0);
        let got = eventually(Duration::from_secs(5), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            (n >= 3).then_some(n * 10)
        })
        .await;
        assert_eq!(got, 30);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    #[should_panic(expected = "condition still false after")]
    async fn eventually_gives_up_at_the_deadline() {
        eventually(Duration::from_millis(30), || async { false }).await;
    }

    #[test]
    fn assert_bad_field_finds_the_named_violation() {
        let status: tonic::Status =
            crate::Error::invalid("customer.email", "is not an e-mail address").into();
        assert_bad_field(&status, "customer.email");
        let other = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_bad_field(&status, "customer.name");
        }));
        assert!(other.is_err(), "a different field is not accepted");
    }
}
