//! What a service's `main` does, shared by every service binary and `clm`:
//! load the layered config (exit 64 on error, `--print-config`), bind the
//! listener, and turn SIGINT/SIGTERM into a cancellation token.

use crate::config::{self, CliOverrides, Config, EXIT_CONFIG};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// Command line of a single-service binary.
#[derive(Debug, Clone, clap::Parser)]
pub struct ServiceCli {
    /// Config overrides.
    #[command(flatten)]
    pub overrides: CliOverrides,
    /// Directory of the embedded SQLite databases (when no database URL is set).
    #[arg(long, env = "CLM_DATA_DIR", default_value = "./clm-data")]
    pub data_dir: PathBuf,
}

/// Loads `service`'s config or exits: 64 with a message on a bad value, 0
/// after printing it for `--print-config`.
pub fn load_or_exit(service: &str, data_dir: &Path, overrides: &CliOverrides) -> Config {
    match config::load(service, data_dir, overrides) {
        Ok(c) => {
            if overrides.print_config {
                println!("# clm {service}\n{}", c.to_toml());
                std::process::exit(0);
            }
            c
        }
        Err(e) => {
            eprintln!("clm {service}: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    }
}

/// Binds `config.listen`.
pub async fn bind(config: &Config) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "clm {}: cannot listen on {}: {e}",
                config.service,
                config.listen
            )
        })
}

/// A token cancelled on SIGINT (Ctrl-C) or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        crate::server::shutdown_signal().await;
        tracing::info!("shutdown signal received");
        t.cancel();
    });
    token
}

/// The whole `main` of a single-service binary: parse the command line,
/// load the config (exit 64 on error), start telemetry, bind and run
/// `service` until SIGINT/SIGTERM.
pub async fn main(service: &'static crate::service::ServiceDescriptor) -> anyhow::Result<()> {
    use clap::Parser;
    let cli = ServiceCli::parse();
    let config = load_or_exit(service.name, &cli.data_dir, &cli.overrides);
    let _telemetry = crate::telemetry::init(&config, service.name);
    let listener = bind(&config).await?;
    crate::service::run(service, config, listener, shutdown_on_signal()).await
}
