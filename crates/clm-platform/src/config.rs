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
use std::net::SocketAddr;
use std::path::PathBuf;

/// Exit status for a configuration error (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

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
}

/// Cache settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// `redis://host:port/db`; empty = in-process cache.
    pub redis_url: Option<String>,
    /// Prefix for every key (lets services or tests share one Redis).
    pub key_prefix: String,
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
    /// Required `aud` claim, if set.
    pub audience: Option<String>,
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
            },
            cache: CacheConfig {
                redis_url: None,
                key_prefix: format!("clm:{service}:"),
            },
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            log: LogConfig {
                format: LogFormat::Pretty,
                filter: "info".into(),
            },
            drain_timeout_secs: 10,
            idempotency_retention_days: 7,
            max_in_flight: 2048,
            change_poll_interval_ms: 1000,
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
        if self.database.max_connections == 0 {
            return Err(ConfigError::new(
                "database.max_connections",
                "must be at least 1",
            ));
        }
        if let Some(r) = &self.cache.redis_url
            && !(r.starts_with("redis://") || r.starts_with("rediss://"))
        {
            return Err(ConfigError::new(
                "cache.redis_url",
                "must start with redis:// or rediss://",
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
        if let Some(p) = &self.auth.rs256_public_key_file
            && !p.is_file()
        {
            return Err(ConfigError::new(
                "auth.rs256_public_key_file",
                format!("{} is not a readable file", p.display()),
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
            match v {
                serde_json::Value::Object(inner) => {
                    tables.push_str(&format!("\n[{k}]\n"));
                    for (ik, iv) in inner {
                        if !iv.is_null() {
                            tables.push_str(&format!("{ik} = {iv}\n"));
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
    /// Print the resulting configuration and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
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
        fig = fig.merge(Toml::file(path));
    }
    fig = fig.merge(Env::prefixed("CLM_").split("__").ignore(&[
        "config",
        "data_dir",
        "test_database_url",
        "test_redis_url",
        "test_template_key",
    ]));
    fig = fig.merge(Serialized::defaults(cli));
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
}
