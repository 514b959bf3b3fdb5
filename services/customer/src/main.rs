//! `clm-customer`: runs the customer service alone. See `clm serve customer`.
#![forbid(unsafe_code)]

use clap::Parser;
use clm_platform::bootstrap::{ServiceCli, bind, load_or_exit, shutdown_on_signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = ServiceCli::parse();
    let config = load_or_exit(clm_customer::SERVICE, &cli.data_dir, &cli.overrides);
    let _telemetry = clm_platform::telemetry::init(&config.log, clm_customer::SERVICE);
    let listener = bind(&config).await?;
    clm_customer::run(config, listener, shutdown_on_signal()).await
}
