//! Layered configuration: defaults → TOML file → `CLM_*` environment →
//! command line. Validated once at start; a bad value is reported with a
//! clear message and the process exits with status 64 (`EX_USAGE`).
//!
//! Environment variables use `__` for nesting: `CLM_DATABASE__URL`,
//! `CLM_AUTH__HS256_SECRET`, `CLM_LOG__FORMAT=json`.

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Exit status for a configuration error (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Every CLM service, in port order: a name here is also a per-service
/// section of the config file (`[scoring]`) and of the environment
/// (`CLM_SCORING__DATABASE__URL`).
pub const SERVICES: [&str; 5] = ["customer", "scoring", "segmentation", "feedback", "loyalty"];

/// A service's ports, from DESIGN.md.
pub fn default_port(service: &str) -> u16 {
    match service {
        "customer" => 50051,
        "scoring" => 50052,
        "segmentation" => 50053,
        "feedback" => 50054,
        "loyalty" => 50055,
        _ => 50050,
    }
}

/// Everything one service needs to run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Service name (`customer`, `scoring`, ...).
    pub service: String,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Allow a non-loopback listen address without authentication.
    pub insecure: bool,
    /// Database.
    pub database: DatabaseConfig,
    /// Cache.
    pub cache: CacheConfig,
    /// Authentication.
    pub auth: AuthConfig,
    /// TLS (optional).
    pub tls: TlsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Seconds to let in-flight rpcs finish after a shutdown signal.
    pub drain_timeout_secs: u64,
    /// Days an idempotency key (`request_id`) is remembered.
    pub idempotency_retention_days: u32,
    /// Calls in flight above which new calls are shed with UNAVAILABLE.
    pub max_in_flight: usize,
    /// Milliseconds between outbox re-reads of an idle change stream (a
    /// safety net behind in-process and PostgreSQL NOTIFY wake-ups).
    pub change_poll_interval_ms: u64,
    /// Days a change event is kept in the outbox; a consumer asking to
    /// resume before the oldest kept one gets OUT_OF_RANGE.
    pub outbox_retention_days: u32,
    /// Milliseconds a replica's claim on a long-running operation holds
    /// (by the service clock) before another replica may take it over; the
    /// claim is renewed every third of it while the work runs.
    pub operation_lease_ms: u64,
    /// Days a finished long-running operation is kept.
    pub operation_retention_days: u32,
    /// Other services by name (`customer = "http://127.0.0.1:50051"`): the
    /// change streams this service follows are read from them, and the peer
    /// client ([`crate::peer`]) calls them.
    pub peers: BTreeMap<String, String>,
    /// How calls to peers are made (deadlines, retries, re-resolution).
    pub peer: PeerConfig,
    /// How this service follows other services' change streams.
    pub subscriber: SubscriberConfig,
    /// NATS JetStream for the change streams (see [`crate::jetstream`]).
    #[serde(default)]
    pub nats: NatsConfig,
    /// Traces and metrics export (OpenTelemetry).
    pub telemetry: TelemetryConfig,
    /// Settings only the customer service reads: keys of the `[customer]`
    /// section that are not common settings (see [`CustomerSettings`]).
    #[serde(default)]
    pub customer: CustomerSettings,
    /// Settings only the segmentation service reads (its `[segmentation]`
    /// section, see [`SegmentationSettings`]).
    #[serde(default)]
    pub segmentation: SegmentationSettings,
}

/// Settings of the segmentation service alone, in its `[segmentation]`
/// section (`snapshot_hour_utc = 2`) or as `CLM_SEGMENTATION__SNAPSHOT_HOUR_UTC=2`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentationSettings {
    /// The hour of the day (UTC, 0..23) at which each segment's daily
    /// snapshot (size, objective values and status, alerts) is taken.
    pub snapshot_hour_utc: u32,
    /// How long membership history (entries and exits) is kept, in days.
    pub membership_history_retention_days: u32,
    /// How far back (days) the trend that projects an objective to its
    /// deadline looks.
    pub objective_trend_days: u32,
    /// How long (seconds) a replica answers reads with an objective
    /// evaluation it made (0: evaluate on every read).
    pub objective_cache_secs: u32,
}

impl Default for SegmentationSettings {
    fn default() -> Self {
        Self {
            snapshot_hour_utc: 2,
            membership_history_retention_days: 400,
            objective_trend_days: 7,
            objective_cache_secs: 30,
        }
    }
}

/// OpenTelemetry export settings (see [`crate::telemetry`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint of a collector (`http://otel-collector:4317`).
    /// Unset: the standard `OTEL_EXPORTER_OTLP_ENDPOINT` variable; without
    /// either, nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// Export the tracing library's own span attributes too (`busy_ns`,
    /// `idle_ns`, `thread.*`, `code.*`, `target`).
    pub span_details: bool,
    /// Trace and measure `grpc.health.v1.Health` probes too (off: a
    /// probe every few seconds would drown the traces).
    pub trace_health_checks: bool,
    /// Seconds between metric exports.
    pub metric_interval_secs: u64,
}

/// Settings of the customer service alone. They sit in the `[customer]`
/// section of the config file next to the common settings it overrides
/// (`erased_identifier_policy = "flag"`), or in the environment as
/// `CLM_CUSTOMER__ERASED_IDENTIFIER_POLICY=flag`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CustomerSettings {
    /// What creating a customer, or giving one an identifier, does when the
    /// identifier (e-mail, phone, external id) matches the salted hash kept
    /// of an erased customer's identifier.
    pub erased_identifier_policy: ErasedIdentifierPolicy,
    /// Milliseconds GetCustomerView waits for the peers' parts (all asked
    /// at once); a part not in by then is marked unavailable.
    pub view_timeout_ms: u64,
    /// Seconds after which an erasure request still missing receipts is
    /// OVERDUE (`clm.customer.erasures.overdue` counts them).
    pub erasure_overdue_secs: u64,
}

impl Default for CustomerSettings {
    fn default() -> Self {
        Self {
            erased_identifier_policy: ErasedIdentifierPolicy::default(),
            view_timeout_ms: 1000,
            erasure_overdue_secs: 24 * 3600,
        }
    }
}

/// What the customer service does with an identifier that belonged to an
/// erased customer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ErasedIdentifierPolicy {
    /// Refuse the write with FAILED_PRECONDITION (`IDENTIFIER_ERASED`).
    #[default]
    Refuse,
    /// Accept it and mark the customer `reimported_after_erasure`, for a
    /// data steward to review.
    Flag,
}

/// The keys of `service`'s own settings (the fields of its typed section),
/// which its `[<service>]` section and `CLM_<SERVICE>__*` environment carry
/// beside the common settings.
fn own_setting_keys(service: &str) -> Vec<String> {
    let defaults = match service {
        "customer" => serde_json::to_value(CustomerSettings::default()),
        "segmentation" => serde_json::to_value(SegmentationSettings::default()),
        _ => return Vec::new(),
    };
    match defaults {
        Ok(serde_json::Value::Object(fields)) => fields.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// Moves the keys of `service`'s own settings in its section under
/// `<service>`, where [`Config`] keeps its typed section.
fn nest_own_settings(service: &str, section: figment::value::Value) -> figment::value::Value {
    use figment::value::{Dict, Value};
    let Value::Dict(tag, mut dict) = section else {
        return section;
    };
    let mut own = Dict::new();
    for key in own_setting_keys(service) {
        if let Some(v) = dict.remove(&key) {
            own.insert(key, v);
        }
    }
    if !own.is_empty() {
        dict.insert(service.to_owned(), Value::from(own));
    }
    Value::Dict(tag, dict)
}

/// NATS JetStream settings: a relay publishing this service's change
/// stream, and the source the subscribers read others' from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// `nats://host:port` (comma-separated for several servers); required
    /// by `relay` and by `subscriber.source = "jetstream"`.
    pub url: Option<String>,
    /// Publish this service's outbox events, in position order, to the
    /// JetStream stream `<stream_prefix>-<service>` (subject
    /// `<stream_prefix>.<service>.events`).
    pub relay: bool,
    /// Prefix of stream names and subjects (tests use their own).
    pub stream_prefix: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: None,
            relay: false,
            stream_prefix: "clm".into(),
        }
    }
}

/// Where subscribers read the change streams they follow from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StreamSource {
    /// The source service's `WatchChanges` rpc (`peers.<source>`).
    #[default]
    Grpc,
    /// The source's JetStream stream (the source must run with `nats.relay`).
    Jetstream,
}

/// Settings of the change-stream subscribers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SubscriberConfig {
    /// Most events applied in one transaction (with the cursor). A batch
    /// takes only what has already arrived, so a subscriber that keeps up
    /// applies small ones; a large bound lets one that is behind amortise
    /// each transaction's fixed costs (per customer, not per event) over
    /// more events: scoring catching up a full stream went from about
    /// 9,000 to 14,000 touchpoints/s between 1,000 and 2,000, and (on a
    /// loaded machine, after its cap lookups became one statement) from
    /// 4,500 to 6,800/s between 2,000 and 5,000; 10,000 gained nothing
    /// more. A larger batch holds SQLite's one writer longer.
    pub batch_size: usize,
    /// Transactions a batch of partition-safe events (handlers registered
    /// with `Handlers::on_batch_partitioned`) is split into on PostgreSQL,
    /// by subject, applied side by side; 1 applies every batch in one.
    pub partitions: usize,
    /// Attempts at one failing event before it is parked as a dead letter.
    pub max_attempts: u32,
    /// First retry delay in milliseconds; doubles up to `max_backoff_ms`.
    pub min_backoff_ms: u64,
    /// Longest retry delay in milliseconds.
    pub max_backoff_ms: u64,
    /// Lifetime of the service token minted for peers (with `auth.hs256_secret`).
    pub token_ttl_secs: u64,
    /// Where the followed streams are read from: `grpc` (default) or
    /// `jetstream` (needs `nats.url`).
    #[serde(default)]
    pub source: StreamSource,
}

/// Settings of the peer client ([`crate::peer`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Deadline in milliseconds of a call to a peer made outside an incoming
    /// rpc (timers, background work); inside one, the caller's remaining
    /// `grpc-timeout` is passed on instead.
    pub default_timeout_ms: u64,
    /// Milliseconds between re-resolutions of a peer's DNS name: addresses
    /// that appear get calls, addresses that go are dropped.
    pub resolve_interval_ms: u64,
    /// Most attempts at an idempotent call that fails with UNAVAILABLE or
    /// DEADLINE_EXCEEDED (within its deadline); other calls get one.
    pub max_attempts: u32,
    /// First retry delay in milliseconds; doubles (with jitter) up to `max_backoff_ms`.
    pub min_backoff_ms: u64,
    /// Longest retry delay in milliseconds.
    pub max_backoff_ms: u64,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            default_timeout_ms: 5_000,
            resolve_interval_ms: 5_000,
            max_attempts: 4,
            min_backoff_ms: 50,
            max_backoff_ms: 1_000,
        }
    }
}

/// Database settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user@host/db` or `sqlite://path/to/file.db`.
    pub url: String,
    /// Pool size (PostgreSQL; SQLite always uses one writer connection).
    pub max_connections: u32,
    /// Connections kept open.
    pub min_connections: u32,
    /// Seconds to wait for a connection from the pool.
    pub acquire_timeout_secs: u64,
    /// Run migrations at start.
    pub migrate: bool,
    /// A PostgreSQL replica the reports read from (KPI reports, survey
    /// summaries); they are then as stale as the replica's lag. Unset: the
    /// reports read the primary.
    #[serde(default)]
    pub read_url: Option<String>,
}

/// Cache settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// `redis://host:port/db`; empty = in-process cache. With `cluster`,
    /// one or more nodes of the Redis Cluster, comma-separated (seeds: the
    /// others are discovered).
    pub redis_url: Option<String>,
    /// Prefix for every key (lets services or tests share one Redis).
    pub key_prefix: String,
    /// `redis_url` names nodes of a Redis Cluster (the redis crate's
    /// cluster client: each command goes to its key's slot).
    #[serde(default)]
    pub cluster: bool,
}

/// JWT bearer-token settings. With neither key set, auth is off and the
/// service only binds loopback unless `insecure` is set.
#[derive(Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 shared secret (from env or file only).
    pub hs256_secret: Option<String>,
    /// Path of an RS256 public key in PEM.
    pub rs256_public_key_file: Option<PathBuf>,
    /// Required `iss` claim, if set.
    pub issuer: Option<String>,
    /// The `aud` claim tokens must carry (and minted tokens get); unset
    /// means [`crate::auth::DEFAULT_AUDIENCE`] (`clm`).
    pub audience: Option<String>,
    /// A file holding the bearer token this service presents to its peers
    /// (a token issued to it, e.g. a projected service-account token): for
    /// RS256, where a service cannot mint its own. Re-read at most once a
    /// second, so a rotated token is picked up without a restart. With
    /// `hs256_secret` set it takes precedence over minting.
    pub service_token_file: Option<PathBuf>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "hs256_secret",
                &self.hs256_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("rs256_public_key_file", &self.rs256_public_key_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("service_token_file", &self.service_token_file)
            .finish()
    }
}

impl AuthConfig {
    /// Whether tokens are checked.
    pub fn enabled(&self) -> bool {
        self.hs256_secret.is_some() || self.rs256_public_key_file.is_some()
    }
}

/// TLS settings (rustls). Both or neither.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: Option<PathBuf>,
    /// PEM private key.
    pub key_file: Option<PathBuf>,
}

/// Log settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` or `json`.
    pub format: LogFormat,
    /// `tracing` env-filter directive, e.g. `info,clm_customer=debug`.
    pub filter: String,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    Pretty,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// Defaults for `service`: loopback on its port, SQLite under `data_dir`.
    pub fn defaults(service: &str, data_dir: &std::path::Path) -> Self {
        Self {
            service: service.to_owned(),
            listen: SocketAddr::from(([127, 0, 0, 1], default_port(service))),
            insecure: false,
            database: DatabaseConfig {
                url: format!(
                    "sqlite://{}",
                    data_dir.join(format!("{service}.db")).display()
                ),
                max_connections: 16,
                min_connections: 1,
                acquire_timeout_secs: 10,
                migrate: true,
                read_url: None,
            },
            cache: CacheConfig {
                redis_url: None,
                key_prefix: format!("clm:{service}:"),
                cluster: false,
            },
            auth: AuthConfig {
                audience: Some(crate::auth::DEFAULT_AUDIENCE.into()),
                ..AuthConfig::default()
            },
            tls: TlsConfig::default(),
            log: LogConfig {
                format: LogFormat::Pretty,
                filter: "info".into(),
            },
            drain_timeout_secs: 10,
            idempotency_retention_days: 7,
            max_in_flight: 2048,
            change_poll_interval_ms: 1000,
            outbox_retention_days: 30,
            operation_lease_ms: 30_000,
            operation_retention_days: 30,
            peers: BTreeMap::new(),
            peer: PeerConfig::default(),
            subscriber: SubscriberConfig {
                batch_size: 5_000,
                partitions: 2,
                max_attempts: 10,
                min_backoff_ms: 100,
                max_backoff_ms: 10_000,
                token_ttl_secs: 600,
                source: StreamSource::Grpc,
            },
            nats: NatsConfig::default(),
            telemetry: TelemetryConfig {
                otlp_endpoint: None,
                span_details: false,
                trace_health_checks: false,
                metric_interval_secs: 30,
            },
            customer: CustomerSettings::default(),
            segmentation: SegmentationSettings::default(),
        }
    }

    /// Checks the values that must hold before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = &self.database.url;
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::new(
                "database.url",
                "must start with sqlite:, postgres:// or postgresql://",
            ));
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::new("max_in_flight", "must be at least 1"));
        }
        if self.segmentation.snapshot_hour_utc > 23 {
            return Err(ConfigError::new(
                "segmentation.snapshot_hour_utc",
                "must be an hour of the day, 0..23",
            ));
        }
        if self.segmentation.membership_history_retention_days == 0 {
            return Err(ConfigError::new(
                "segmentation.membership_history_retention_days",
                "must be at least 1",
            ));
        }
        if self.segmentation.objective_cache_secs > 3600 {
            return Err(ConfigError::new(
                "segmentation.objective_cache_secs",
                "must be 0..3600",
            ));
        }
        if !(1..=90).contains(&self.segmentation.objective_trend_days) {
            return Err(ConfigError::new(
                "segmentation.objective_trend_days",
                "must be 1..90",
            ));
        }
        if self.database.max_connections == 0 {
            return Err(ConfigError::new(
                "database.max_connections",
                "must be at least 1",
            ));
        }
        if let Some(r) = &self.cache.redis_url {
            let mut urls = vec![r.as_str()];
            if self.cache.cluster {
                urls = r.split(',').map(str::trim).collect();
            }
            if urls
                .iter()
                .any(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
            {
                return Err(ConfigError::new(
                    "cache.redis_url",
                    "must start with redis:// or rediss:// (with cache.cluster, each comma-separated node)",
                ));
            }
        }
        let needs_nats = self.nats.relay || self.subscriber.source == StreamSource::Jetstream;
        if needs_nats && self.nats.url.is_none() {
            return Err(ConfigError::new(
                "nats.url",
                "is required by nats.relay and by subscriber.source = \"jetstream\"",
            ));
        }
        if let Some(u) = &self.nats.url
            && u.split(',')
                .any(|u| !(u.trim().starts_with("nats://") || u.trim().starts_with("tls://")))
        {
            return Err(ConfigError::new(
                "nats.url",
                "must start with nats:// or tls://",
            ));
        }
        if self.nats.stream_prefix.is_empty()
            || !self
                .nats
                .stream_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(ConfigError::new(
                "nats.stream_prefix",
                "must be letters, digits or _ (it names streams and subjects)",
            ));
        }
        if let Some(r) = &self.database.read_url
            && !(r.starts_with("postgres://") || r.starts_with("postgresql://"))
        {
            return Err(ConfigError::new(
                "database.read_url",
                "must be a postgres:// URL (a read replica of database.url)",
            ));
        }
        if self.cache.cluster && self.cache.redis_url.is_none() {
            return Err(ConfigError::new(
                "cache.cluster",
                "needs cache.redis_url naming at least one node of the cluster",
            ));
        }
        if self.cache.key_prefix.contains(['{', '}']) {
            return Err(ConfigError::new(
                "cache.key_prefix",
                "must not contain { or }: callers put Redis Cluster hash tags in their keys",
            ));
        }
        if self.auth.hs256_secret.is_some() && self.auth.rs256_public_key_file.is_some() {
            return Err(ConfigError::new(
                "auth",
                "set either auth.hs256_secret or auth.rs256_public_key_file, not both",
            ));
        }
        if self.auth.audience.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::new(
                "auth.audience",
                "must not be empty (tokens are checked against it)",
            ));
        }
        if self
            .auth
            .hs256_secret
            .as_ref()
            .is_some_and(|s| s.len() < 32)
        {
            return Err(ConfigError::new(
                "auth.hs256_secret",
                "must be at least 32 bytes",
            ));
        }
        if let Some(p) = &self.auth.rs256_public_key_file {
            crate::auth::read_rs256_key(p)
                .map_err(|e| ConfigError::new("auth.rs256_public_key_file", e))?;
        }
        if self.auth.issuer.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::new(
                "auth.issuer",
                "must not be empty (leave it unset to accept any issuer)",
            ));
        }
        if let Some(e) = &self.telemetry.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(ConfigError::new(
                "telemetry.otlp_endpoint",
                "must be an http:// or https:// URL (OTLP/gRPC, e.g. http://127.0.0.1:4317)",
            ));
        }
        if self.telemetry.metric_interval_secs == 0 {
            return Err(ConfigError::new(
                "telemetry.metric_interval_secs",
                "must be at least 1",
            ));
        }
        for (name, url) in &self.peers {
            if !SERVICES.contains(&name.as_str()) {
                return Err(ConfigError::new(
                    format!("peers.{name}"),
                    format!("is not a CLM service (one of {})", SERVICES.join(", ")),
                ));
            }
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::new(
                    format!("peers.{name}"),
                    "must be an http:// or https:// URL",
                ));
            }
        }
        if self.peer.default_timeout_ms == 0 {
            return Err(ConfigError::new(
                "peer.default_timeout_ms",
                "must be at least 1",
            ));
        }
        if self.peer.resolve_interval_ms < 10 {
            return Err(ConfigError::new(
                "peer.resolve_interval_ms",
                "must be at least 10",
            ));
        }
        if self.peer.max_attempts == 0 {
            return Err(ConfigError::new(
                "peer.max_attempts",
                "must be at least 1 (1: no retries)",
            ));
        }
        if self.peer.min_backoff_ms > self.peer.max_backoff_ms {
            return Err(ConfigError::new(
                "peer.min_backoff_ms",
                "must not exceed peer.max_backoff_ms",
            ));
        }
        if let Some(p) = &self.auth.service_token_file {
            match std::fs::read_to_string(p) {
                Ok(t) if !t.trim().is_empty() => {}
                Ok(_) => {
                    return Err(ConfigError::new(
                        "auth.service_token_file",
                        format!("{} is empty", p.display()),
                    ));
                }
                Err(e) => {
                    return Err(ConfigError::new(
                        "auth.service_token_file",
                        format!("cannot read {}: {e}", p.display()),
                    ));
                }
            }
        }
        if self.subscriber.batch_size == 0 || self.subscriber.batch_size > 10_000 {
            return Err(ConfigError::new(
                "subscriber.batch_size",
                "must be between 1 and 10000",
            ));
        }
        if self.subscriber.partitions == 0 || self.subscriber.partitions > 16 {
            return Err(ConfigError::new(
                "subscriber.partitions",
                "must be between 1 and 16",
            ));
        }
        if self.subscriber.token_ttl_secs < 10 {
            return Err(ConfigError::new(
                "subscriber.token_ttl_secs",
                "must be at least 10",
            ));
        }
        if self.operation_lease_ms < 100 {
            return Err(ConfigError::new(
                "operation_lease_ms",
                "must be at least 100",
            ));
        }
        if self.operation_retention_days == 0 {
            return Err(ConfigError::new(
                "operation_retention_days",
                "must be at least 1",
            ));
        }
        if self.outbox_retention_days == 0 {
            return Err(ConfigError::new(
                "outbox_retention_days",
                "must be at least 1",
            ));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(ConfigError::new(
                "tls",
                "cert_file and key_file must be set together",
            ));
        }
        if !self.auth.enabled() && !self.listen.ip().is_loopback() && !self.insecure {
            return Err(ConfigError::new(
                "listen",
                format!(
                    "{} is not a loopback address and no authentication is configured; set auth.hs256_secret or auth.rs256_public_key_file, or pass --insecure",
                    self.listen
                ),
            ));
        }
        Ok(())
    }

    /// TOML rendering for `--print-config` (secrets redacted).
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.auth.hs256_secret.is_some() {
            shown.auth.hs256_secret = Some("<redacted>".into());
        }
        toml_string(&shown)
    }
}

fn toml_string(c: &Config) -> String {
    // figment's TOML provider is read-only; serde_json → hand-rendered TOML
    // keeps the dependency set small and the output stable.
    let value = serde_json::to_value(c).unwrap_or_default();
    let mut top = String::new();
    let mut tables = String::new();
    if let serde_json::Value::Object(map) = value {
        for (k, v) in map {
            // Another service's own settings are not this one's.
            if SERVICES.contains(&k.as_str()) && k != c.service {
                continue;
            }
            match v {
                serde_json::Value::Object(inner) => {
                    tables.push_str(&format!("\n[{k}]\n"));
                    for (ik, iv) in inner {
                        if !iv.is_null() {
                            tables.push_str(&format!("{} = {iv}\n", toml_key(&ik)));
                        }
                    }
                }
                serde_json::Value::Null => {}
                other => top.push_str(&format!("{k} = {other}\n")),
            }
        }
    }
    top + &tables
}

fn toml_key(k: &str) -> String {
    if k.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_owned()
    } else {
        serde_json::Value::String(k.to_owned()).to_string()
    }
}

/// A configuration value that is wrong, and why.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}: {message}")]
pub struct ConfigError {
    /// Dotted key.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Command-line options shared by every service command.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct CliOverrides {
    /// TOML configuration file.
    #[arg(long, env = "CLM_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:50051.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Database URL (postgres://... or sqlite://...).
    #[arg(long)]
    #[serde(skip)]
    pub database_url: Option<String>,
    /// Redis URL for the cache.
    #[arg(long)]
    #[serde(skip)]
    pub redis_url: Option<String>,
    /// Allow binding a non-loopback address without authentication.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// Log format.
    #[arg(long, value_enum)]
    #[serde(skip)]
    pub log_format: Option<LogFormat>,
    /// A peer service's URL, `NAME=URL` (repeatable), e.g.
    /// `--peer customer=http://customer:50051`.
    #[arg(long = "peer", value_parser = parse_peer)]
    #[serde(skip)]
    pub peers: Vec<(String, String)>,
    /// Print the resulting configuration and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
}

fn parse_peer(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(n, u)| (n.trim().to_owned(), u.trim().to_owned()))
        .filter(|(n, u)| !n.is_empty() && !u.is_empty())
        .ok_or_else(|| format!("{s:?} is not NAME=URL"))
}

/// Loads the layered configuration of `service`.
pub fn load(
    service: &str,
    data_dir: &std::path::Path,
    cli: &CliOverrides,
) -> Result<Config, ConfigError> {
    let mut fig = Figment::from(Serialized::defaults(Config::defaults(service, data_dir)));
    if let Some(path) = &cli.config {
        if !path.is_file() {
            return Err(ConfigError::new(
                "--config",
                format!("{} does not exist", path.display()),
            ));
        }
        // The file's top level applies to every service; a `[<service>]`
        // table applies to that service only, on top.
        let file = Figment::from(Toml::file(path));
        let mut dict: figment::value::Dict = file
            .extract()
            .map_err(|e| ConfigError::new(path.display().to_string(), e.kind.to_string()))?;
        let mut own = None;
        for name in SERVICES {
            if let Some(section) = dict.remove(name)
                && name == service
            {
                own = Some(section);
            }
        }
        fig = fig.merge(Serialized::defaults(dict));
        if let Some(section) = own {
            fig = fig.merge(Serialized::defaults(nest_own_settings(service, section)));
        }
    }
    let is_section = |k: &figment::value::UncasedStr| {
        SERVICES.iter().any(|s| {
            k.as_str()
                .to_ascii_lowercase()
                .starts_with(&format!("{s}__"))
        })
    };
    fig = fig.merge(
        Env::prefixed("CLM_")
            .ignore(&[
                "config",
                "data_dir",
                "test_database_url",
                "test_redis_url",
                "test_redis_cluster",
                "test_template_key",
            ])
            .filter(move |k| !is_section(k))
            .split("__"),
    );
    let own_keys = own_setting_keys(service);
    let own_service = service.to_owned();
    fig = fig.merge(
        Env::prefixed(&format!("CLM_{}__", service.to_uppercase()))
            .map(move |k| {
                let first = k.as_str().split("__").next().unwrap_or_default();
                if own_keys.iter().any(|o| o.eq_ignore_ascii_case(first)) {
                    format!("{own_service}__{k}").into()
                } else {
                    k.as_str().to_owned().into()
                }
            })
            .split("__"),
    );
    fig = fig.merge(Serialized::defaults(cli));
    for (name, url) in &cli.peers {
        fig = fig.merge((format!("peers.{name}"), url));
    }
    if let Some(url) = &cli.database_url {
        fig = fig.merge(("database.url", url));
    }
    if let Some(url) = &cli.redis_url {
        fig = fig.merge(("cache.redis_url", url));
    }
    if let Some(format) = cli.log_format {
        fig = fig.merge(("log.format", format));
    }
    let mut config: Config = fig.extract().map_err(|e| {
        let key = e.path.join(".");
        ConfigError::new(
            if key.is_empty() {
                "config".to_owned()
            } else {
                key
            },
            e.kind.to_string(),
        )
    })?;
    config.service = service.to_owned();
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_loopback() {
        let c = Config::defaults("customer", std::path::Path::new("/tmp/x"));
        assert!(c.validate().is_ok());
        assert_eq!(c.listen.port(), 50051);
        assert!(c.database.url.ends_with("customer.db"));
    }

    #[test]
    fn public_bind_without_auth_is_refused_unless_insecure() {
        let mut c = Config::defaults("customer", std::path::Path::new("/tmp/x"));
        c.listen = "0.0.0.0:50051".parse().expect("addr");
        assert_eq!(c.validate().unwrap_err().key, "listen");
        c.insecure = true;
        assert!(c.validate().is_ok());
        c.insecure = false;
        c.auth.hs256_secret = Some("x".repeat(32));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn an_unusable_rs256_key_names_its_file_and_telemetry_is_checked() {
        let dir = tempfile::tempdir().expect("dir");
        let mut c = Config::defaults("customer", dir.path());
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not a key").expect("write");
        for key in [bad.clone(), dir.path().join("missing.pem")] {
            c.auth.rs256_public_key_file = Some(key.clone());
            let e = c.validate().unwrap_err();
            assert_eq!(e.key, "auth.rs256_public_key_file");
            assert!(e.message.contains(&key.display().to_string()), "{e}");
        }
        c.auth.rs256_public_key_file = None;
        c.auth.issuer = Some(String::new());
        assert_eq!(c.validate().unwrap_err().key, "auth.issuer");
        c.auth.issuer = None;
        c.telemetry.otlp_endpoint = Some("collector:4317".into());
        assert_eq!(c.validate().unwrap_err().key, "telemetry.otlp_endpoint");
        c.telemetry.otlp_endpoint = Some("http://collector:4317".into());
        assert!(c.validate().is_ok());
        c.telemetry.metric_interval_secs = 0;
        assert_eq!(
            c.validate().unwrap_err().key,
            "telemetry.metric_interval_secs"
        );
    }

    #[test]
    fn auth_is_one_key_with_an_audience() {
        let mut c = Config::defaults("customer", std::path::Path::new("/tmp/x"));
        assert_eq!(c.auth.audience.as_deref(), Some("clm"));
        c.auth.hs256_secret = Some("x".repeat(32));
        assert!(c.validate().is_ok());
        // The key file exists, so only the pair is wrong.
        c.auth.rs256_public_key_file = Some(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/rs256-test-public.pem"),
        );
        assert_eq!(c.validate().unwrap_err().key, "auth");
        c.auth.hs256_secret = None;
        assert!(c.validate().is_ok());
        c.auth.audience = Some(String::new());
        assert_eq!(c.validate().unwrap_err().key, "auth.audience");
    }

    #[test]
    fn read_url_names_a_postgres_replica() {
        let mut c = Config::defaults("customer", std::path::Path::new("/tmp"));
        c.database.read_url = Some("sqlite:///tmp/x.db".into());
        assert_eq!(c.validate().unwrap_err().key, "database.read_url");
        c.database.read_url = Some("postgres://replica/customer".into());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn key_prefix_leaves_hash_tags_to_the_keys() {
        let mut c = Config::defaults("segmentation", std::path::Path::new("/tmp/x"));
        c.cache.key_prefix = "{clm}:".into();
        assert_eq!(c.validate().unwrap_err().key, "cache.key_prefix");
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "clm.toml",
                "drain_timeout_secs = 3\n[database]\nmax_connections = 4\n",
            )?;
            jail.set_env("CLM_DATABASE__MAX_CONNECTIONS", "5");
            let cli = CliOverrides {
                config: Some("clm.toml".into()),
                listen: Some("127.0.0.1:6000".parse().expect("addr")),
                ..Default::default()
            };
            let c = load("customer", std::path::Path::new("/tmp/x"), &cli).expect("loads");
            assert_eq!(c.drain_timeout_secs, 3);
            assert_eq!(c.database.max_connections, 5);
            assert_eq!(c.listen.port(), 6000);
            jail.set_env("CLM_DATABASE__MAX_CONNECTIONS", "many");
            let e = load("customer", std::path::Path::new("/tmp/x"), &cli).unwrap_err();
            assert_eq!(e.key, "database.max_connections");
            Ok(())
        });
    }

    #[test]
    fn print_config_redacts_secrets() {
        let mut c = Config::defaults("customer", std::path::Path::new("/tmp/x"));
        c.auth.hs256_secret = Some("s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t".into());
        let shown = c.to_toml();
        assert!(shown.contains("<redacted>"));
        assert!(!shown.contains("s3cr3t"));
        assert!(shown.contains("[database]"));
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn service_sections_and_peers_apply_to_their_service_only() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "clm.toml",
                "drain_timeout_secs = 3\n\
                 [peers]\ncustomer = \"http://customer:50051\"\n\
                 [scoring]\ndrain_timeout_secs = 7\n[scoring.database]\nmax_connections = 3\n",
            )?;
            jail.set_env("CLM_SCORING__LOG__FILTER", "debug");
            jail.set_env("CLM_PEERS__SEGMENTATION", "http://seg:50053");
            let cli = CliOverrides {
                config: Some("clm.toml".into()),
                peers: vec![("feedback".into(), "http://fb:50054".into())],
                ..Default::default()
            };
            let dir = std::path::Path::new("/tmp/x");
            let scoring = load("scoring", dir, &cli).expect("scoring loads");
            assert_eq!(scoring.drain_timeout_secs, 7);
            assert_eq!(scoring.database.max_connections, 3);
            assert_eq!(scoring.log.filter, "debug");
            assert_eq!(scoring.peers["customer"], "http://customer:50051");
            assert_eq!(scoring.peers["segmentation"], "http://seg:50053");
            assert_eq!(scoring.peers["feedback"], "http://fb:50054");
            let customer = load("customer", dir, &cli).expect("customer loads");
            assert_eq!(
                customer.drain_timeout_secs, 3,
                "another service's section does not apply"
            );
            assert_eq!(customer.log.filter, "info");
            assert!(customer.to_toml().contains("[peers]"));

            jail.set_env("CLM_PEERS__BILLING", "http://billing:1");
            let e = load("customer", dir, &cli).unwrap_err();
            assert_eq!(e.key, "peers.billing");
            jail.set_env("CLM_PEERS__BILLING", "");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn the_customer_section_carries_the_customer_settings() {
        figment::Jail::expect_with(|jail| {
            let dir = std::path::Path::new("/tmp/x");
            let none = CliOverrides::default();
            let c = load("customer", dir, &none).expect("defaults load");
            assert_eq!(
                c.customer.erased_identifier_policy,
                ErasedIdentifierPolicy::Refuse
            );
            jail.create_file(
                "clm.toml",
                "[customer]\nerased_identifier_policy = \"flag\"\ndrain_timeout_secs = 4\n",
            )?;
            let cli = CliOverrides {
                config: Some("clm.toml".into()),
                ..Default::default()
            };
            let c = load("customer", dir, &cli).expect("customer loads");
            assert_eq!(
                c.customer.erased_identifier_policy,
                ErasedIdentifierPolicy::Flag
            );
            assert_eq!(c.drain_timeout_secs, 4, "common keys still apply");
            let shown = c.to_toml();
            assert!(
                shown.contains("[customer]\nerased_identifier_policy = \"flag\""),
                "{shown}"
            );
            let scoring = load("scoring", dir, &cli).expect("scoring ignores [customer]");
            assert!(!scoring.to_toml().contains("erased_identifier_policy"));

            jail.set_env("CLM_CUSTOMER__ERASED_IDENTIFIER_POLICY", "refuse");
            let c = load("customer", dir, &cli).expect("env loads");
            assert_eq!(
                c.customer.erased_identifier_policy,
                ErasedIdentifierPolicy::Refuse,
                "the environment beats the file"
            );
            jail.set_env("CLM_CUSTOMER__ERASED_IDENTIFIER_POLICY", "maybe");
            let e = load("customer", dir, &cli).unwrap_err();
            assert_eq!(e.key, "customer.erased_identifier_policy", "{e}");
            jail.set_env("CLM_CUSTOMER__ERASED_IDENTIFIER_POLICY", "flag");

            jail.create_file(
                "clm.toml",
                "[scoring]\nerased_identifier_policy = \"flag\"\n",
            )?;
            assert!(
                load("scoring", dir, &cli).is_err(),
                "a customer setting is unknown to scoring"
            );
            jail.create_file("clm.toml", "erased_identifier_policy = \"flag\"\n")?;
            assert!(
                load("customer", dir, &cli).is_err(),
                "customer settings belong in [customer]"
            );
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn unknown_keys_are_refused_in_sections_too() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("clm.toml", "[scoring]\ndrian_timeout_secs = 7\n")?;
            let cli = CliOverrides {
                config: Some("clm.toml".into()),
                ..Default::default()
            };
            let dir = std::path::Path::new("/tmp/x");
            assert!(load("scoring", dir, &cli).is_err());
            assert!(
                load("customer", dir, &cli).is_ok(),
                "scoring's section is not customer's"
            );
            jail.create_file("clm.toml", "drian_timeout_secs = 7\n")?;
            assert!(load("customer", dir, &cli).is_err());
            Ok(())
        });
    }
}
