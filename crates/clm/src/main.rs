//! `clm`: the CLM command.
//!
//! * `clm up` runs every service in one process, each on its own port
//!   (customer 50051, scoring 50052, segmentation 50053, feedback 50054,
//!   loyalty 50055), on SQLite files under `--data-dir` with
//!   the in-process cache. Nothing to install; data survive restarts.
//! * `clm serve <service>` runs one service with the full configuration
//!   (PostgreSQL and Redis URLs, auth, TLS): see `--help` and docs/configuration.md.
//! * `clm token --subject ada --role marketer` mints an HS256 bearer token
//!   with the secret in `CLM_AUTH__HS256_SECRET`, for the audience in
//!   `CLM_AUTH__AUDIENCE` (default `clm`).
//! * `clm roles --markdown` prints who may call what (every role table);
//!   `--update-doc docs/security.md` rewrites the copy in the security guide.
//! * `clm import customers|touchpoints FILE` and `clm export segment ID`
//!   move data in and out of a running CLM through its gRPC API
//!   (docs/import-export.md).
#![forbid(unsafe_code)]

mod transfer;

/// mimalloc instead of the system allocator: a `perf` profile of the
/// customer service under RecordTouchpoints put about 40% of its CPU in
/// glibc's malloc and free (decoding a batch, building its JSON rows,
/// encoding events and stream messages all allocate per item).
///
/// Built without transparent huge pages (`no_thp`): mimalloc otherwise
/// asks for them on its arenas, and each first touch of a 2 MiB region
/// had the kernel zero all of it. In segmentation keeping up with the
/// ingest, that zeroing was ~20% of the service's CPU; without it the
/// same 20,000 events applied ~8% sooner (the `MIMALLOC_ALLOW_THP=0`
/// runs in docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use clm_platform::auth::{DEFAULT_AUDIENCE, Policy, Role, mint_hs256_with, policy_markdown};
use clm_platform::bootstrap::{ServiceCli, bind, load_or_exit, shutdown_on_signal};
use clm_platform::config::{CliOverrides, Config, EXIT_CONFIG, LogFormat, default_port};
use clm_platform::service::{ServiceDescriptor, run};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "clm",
    version,
    about = "CLM customer-lifecycle-management platform"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every service in one process on embedded SQLite (the quick start).
    Up {
        /// Directory of the SQLite files, one per service.
        #[arg(long, env = "CLM_DATA_DIR", default_value = "./clm-data")]
        data_dir: PathBuf,
        /// Address to bind every service on.
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// Port of the first service (customer); the others follow in order.
        #[arg(long, default_value_t = 50051)]
        base_port: u16,
        /// Allow a non-loopback --host without authentication.
        #[arg(long)]
        insecure: bool,
        /// Log format.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
        /// TOML configuration file (auth, logging, ... shared by all services).
        #[arg(long, env = "CLM_CONFIG")]
        config: Option<PathBuf>,
        /// Print each service's configuration and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Mint an HS256 bearer token (for development and service accounts).
    Token {
        /// Subject (`sub`): the actor recorded in audit trails.
        #[arg(long)]
        subject: String,
        /// Roles: admin, marketer, segment_owner, analyst, data_steward, service.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        /// The shared secret (at least 32 bytes).
        #[arg(long, env = "CLM_AUTH__HS256_SECRET", hide_env_values = true)]
        secret: String,
        /// Audience (`aud`): the services' `auth.audience`.
        #[arg(long, env = "CLM_AUTH__AUDIENCE", default_value = DEFAULT_AUDIENCE)]
        audience: String,
        /// Issuer (`iss`), when the services require one (`auth.issuer`).
        #[arg(long, env = "CLM_AUTH__ISSUER")]
        issuer: Option<String>,
    },
    /// Print who may call what: every service's role table.
    Roles {
        /// As the Markdown tables of docs/security.md.
        #[arg(long)]
        markdown: bool,
        /// Rewrite the role tables of these Markdown files (between their
        /// `<!-- roles:begin [SERVICE] -->` and `<!-- roles:end -->`
        /// markers): `docs/security.md` and the service guides.
        #[arg(long, alias = "update-readme", value_name = "FILE", num_args = 1..)]
        update_doc: Vec<PathBuf>,
    },
    /// Import customers or touchpoints from a CSV or JSON Lines file into a
    /// running CLM, in batches: idempotent per row, resumable
    /// (FILE.checkpoint), rejected rows in FILE.rejected.csv.
    Import {
        /// What the file holds.
        #[arg(value_enum)]
        kind: transfer::import::Kind,
        /// The file: CSV with a header row, or JSON Lines (.jsonl).
        file: PathBuf,
        /// The file's format (default: from its extension).
        #[arg(long, value_enum)]
        format: Option<transfer::rows::Format>,
        /// A `column,field` CSV renaming the file's columns to CLM fields
        /// (field `-` drops a column).
        #[arg(long)]
        mapping: Option<PathBuf>,
        /// Rows per call (1..1000). A resumed run keeps the first run's.
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
        /// Batches in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[command(flatten)]
        target: Target,
    },
    /// Export data from a running CLM.
    Export {
        #[command(subcommand)]
        what: Export,
    },
    /// Apply one service's database migrations and exit (a pre-deploy
    /// Job; the Deployments then run with database.migrate=false).
    Migrate {
        /// Which service (customer, ...).
        #[arg(value_parser = find_service)]
        service: &'static ServiceDescriptor,
        #[command(flatten)]
        cli: ServiceCli,
    },
    /// Run one service with its full configuration.
    Serve {
        /// Which service (customer, ...).
        #[arg(value_parser = find_service)]
        service: &'static ServiceDescriptor,
        #[command(flatten)]
        cli: ServiceCli,
    },
}

/// Where a running CLM is, for `clm import` and `clm export`.
#[derive(Debug, clap::Args)]
struct Target {
    /// The customer service.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    customer_url: String,
    /// The segmentation service.
    #[arg(long, default_value = "http://127.0.0.1:50053")]
    segmentation_url: String,
    /// A bearer token (`clm token ...`) when the services require one.
    #[arg(long)]
    token: Option<String>,
}

impl Target {
    fn connect(&self) -> anyhow::Result<transfer::Connection> {
        transfer::Connection::new(
            &self.customer_url,
            &self.segmentation_url,
            self.token.as_deref(),
        )
    }
}

#[derive(Debug, Subcommand)]
enum Export {
    /// A segment's members (customer, enter_time).
    Segment {
        /// The segment: `segments/{id}` or its id.
        segment: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "csv")]
        format: transfer::rows::Format,
        /// Output file (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
}

/// Every service this build contains, in port order: the one table `up`
/// and `serve` read. Adding a service is one entry here.
static SERVICES: &[&ServiceDescriptor] = &[
    &clm_customer::DESCRIPTOR,
    &clm_scoring::DESCRIPTOR,
    &clm_segmentation::DESCRIPTOR,
    &clm_feedback::DESCRIPTOR,
    &clm_loyalty::DESCRIPTOR,
];

/// Every role table, in the security guide's order: each service's own (from its
/// descriptor), then the platform's (served by every service).
fn role_tables() -> Vec<&'static Policy> {
    clm_platform::service::role_tables(SERVICES)
}

/// Opens a generated role block: `<!-- roles:begin SERVICE -->` holds that
/// service's table (`clm.customer.v1.CustomerService`), `<!-- roles:begin
/// (...) -->` every table (docs/security.md).
const ROLES_BEGIN: &str = "<!-- roles:begin";
const ROLES_END: &str = "<!-- roles:end -->";

/// `doc` with the text of every role block replaced by the tables it
/// names; `Err` when it has no block, or names a service this build lacks.
fn with_role_tables(doc: &str) -> Result<String, String> {
    let tables = role_tables();
    let mut out = String::with_capacity(doc.len());
    let mut rest = doc;
    let mut blocks = 0;
    while let Some(begin) = rest.find(ROLES_BEGIN) {
        let close = rest[begin..]
            .find("-->")
            .map(|i| begin + i + 3)
            .ok_or("an unclosed roles:begin marker")?;
        let spec = rest[begin + ROLES_BEGIN.len()..close - 3].trim();
        let end = rest[close..]
            .find(ROLES_END)
            .map(|i| close + i)
            .ok_or_else(|| format!("no {ROLES_END} after {spec:?}"))?;
        let chosen: Vec<&Policy> = if spec.is_empty() || spec.starts_with('(') {
            tables.clone()
        } else {
            let one: Vec<&Policy> = tables
                .iter()
                .copied()
                .filter(|p| p.service == spec)
                .collect();
            if one.is_empty() {
                return Err(format!("no role table for {spec:?}"));
            }
            one
        };
        out.push_str(&rest[..close]);
        out.push('\n');
        out.push_str(&policy_markdown(&chosen));
        rest = &rest[end..];
        blocks += 1;
    }
    if blocks == 0 {
        return Err(format!("no {ROLES_BEGIN} ... --> {ROLES_END} markers"));
    }
    out.push_str(rest);
    Ok(out)
}

fn find_service(name: &str) -> Result<&'static ServiceDescriptor, String> {
    SERVICES
        .iter()
        .copied()
        .find(|s| s.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = SERVICES.iter().map(|s| s.name).collect();
            format!(
                "unknown service {name:?}; this build has: {}",
                names.join(", ")
            )
        })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Roles {
            markdown,
            update_doc,
        } => {
            if !update_doc.is_empty() {
                for path in update_doc {
                    let text = std::fs::read_to_string(&path)?;
                    if !text.contains(ROLES_BEGIN) {
                        continue; // `docs/*.md`: the guides without a role block
                    }
                    let updated = match with_role_tables(&text) {
                        Ok(updated) => updated,
                        Err(e) => {
                            eprintln!("clm roles: {}: {e}", path.display());
                            std::process::exit(EXIT_CONFIG);
                        }
                    };
                    std::fs::write(&path, updated)?;
                    println!("updated the role tables of {}", path.display());
                }
            } else if markdown {
                print!("{}", policy_markdown(&role_tables()));
            } else {
                for p in role_tables() {
                    for (rpc, roles) in p.rules {
                        let names: Vec<&str> = std::iter::once("admin")
                            .chain(roles.iter().map(|r| r.as_str()))
                            .collect();
                        println!("{}/{rpc}: {}", p.service, names.join(", "));
                    }
                }
            }
            Ok(())
        }
        Command::Token {
            subject,
            roles,
            ttl_secs,
            secret,
            audience,
            issuer,
        } => {
            let mut parsed = Vec::new();
            for r in &roles {
                let Some(role) = Role::parse(r) else {
                    eprintln!("clm token: unknown role {r:?}");
                    std::process::exit(EXIT_CONFIG);
                };
                parsed.push(role);
            }
            if secret.len() < 32 {
                eprintln!("clm token: the secret must be at least 32 bytes");
                std::process::exit(EXIT_CONFIG);
            }
            if audience.is_empty() {
                eprintln!("clm token: the audience must not be empty");
                std::process::exit(EXIT_CONFIG);
            }
            println!(
                "{}",
                mint_hs256_with(
                    &secret,
                    &audience,
                    issuer.as_deref(),
                    &subject,
                    &parsed,
                    std::time::Duration::from_secs(ttl_secs)
                )?
            );
            Ok(())
        }
        Command::Import {
            kind,
            file,
            format,
            mapping,
            batch_size,
            concurrency,
            target,
        } => {
            let options = transfer::import::Options {
                kind,
                file,
                format,
                mapping,
                batch_size,
                concurrency,
            };
            transfer::import::run(&target.connect()?, &options).await?;
            Ok(())
        }
        Command::Export {
            what:
                Export::Segment {
                    segment,
                    format,
                    output,
                    target,
                },
        } => {
            transfer::export::segment(&target.connect()?, &segment, format, output.as_deref())
                .await?;
            Ok(())
        }
        Command::Migrate { service, cli } => {
            let config = load_or_exit(service.name, &cli.data_dir, &cli.overrides);
            let _telemetry = clm_platform::telemetry::init(&config, service.name);
            let db = clm_platform::db::connect(&config.database).await?;
            (service.migrate)(&db).await?;
            println!("{}: migrations applied", service.name);
            Ok(())
        }
        Command::Serve { service, cli } => {
            let config = load_or_exit(service.name, &cli.data_dir, &cli.overrides);
            let _telemetry = clm_platform::telemetry::init(&config, service.name);
            let listener = bind(&config).await?;
            // Tests and scripts start `clm serve --listen 127.0.0.1:0` and read the port here.
            println!("{} listening on {}", service.name, listener.local_addr()?);
            run(service, config, listener, shutdown_on_signal()).await
        }
        Command::Up {
            data_dir,
            host,
            base_port,
            insecure,
            log_format,
            config,
            print_config,
        } => {
            // Port 0: every service on its own ephemeral port (peers are
            // filled in from the bound addresses below).
            let port_of = |name: &str| {
                if base_port == 0 {
                    0
                } else {
                    base_port.saturating_add(default_port(name) - default_port("customer"))
                }
            };
            let mut configs = Vec::new();
            for &service in SERVICES {
                let overrides = CliOverrides {
                    config: config.clone(),
                    listen: Some(SocketAddr::new(host, port_of(service.name))),
                    insecure,
                    log_format,
                    ..Default::default()
                };
                let mut c = load_or_exit(service.name, &data_dir, &overrides);
                // `up` is the embedded mode: one SQLite file per service,
                // in-process cache, and every peer on this host.
                let defaults = Config::defaults(service.name, &data_dir);
                c.database = defaults.database;
                c.cache.redis_url = None;
                for &peer in SERVICES {
                    c.peers.insert(
                        peer.name.to_owned(),
                        format!("http://{}", SocketAddr::new(host, port_of(peer.name))),
                    );
                }
                configs.push((service, c));
            }
            if print_config {
                for (service, c) in &configs {
                    println!("# clm {}\n{}", service.name, c.to_toml());
                }
                return Ok(());
            }
            let _telemetry = clm_platform::telemetry::init(&configs[0].1, "up");
            let shutdown = shutdown_on_signal();
            let mut tasks = tokio::task::JoinSet::new();
            let mut bound = Vec::with_capacity(configs.len());
            for (service, c) in configs {
                let listener = bind(&c).await?;
                bound.push((service, c, listener));
            }
            let addrs: Vec<(&str, SocketAddr)> = bound
                .iter()
                .map(|(s, _, l)| Ok((s.name, l.local_addr()?)))
                .collect::<std::io::Result<_>>()?;
            for (service, mut c, listener) in bound {
                for (peer, addr) in &addrs {
                    c.peers.insert((*peer).to_owned(), format!("http://{addr}"));
                }
                println!(
                    "{:<13} listening on {}  (data: {})",
                    service.name,
                    listener.local_addr()?,
                    c.database.url
                );
                let token = shutdown.clone();
                tasks.spawn(async move { (service, run(service, c, listener, token).await) });
            }
            println!("CLM is up. Ctrl-C stops it.");
            let mut result = Ok(());
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok((_, Ok(()))) => {}
                    Ok((service, Err(e))) => {
                        eprintln!("{} failed: {e:#}", service.name);
                        shutdown.cancel();
                        result = Err(e);
                    }
                    Err(e) => {
                        shutdown.cancel();
                        result = Err(e.into());
                    }
                }
            }
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_table_covers_its_service_exactly() {
        for p in role_tables() {
            if let Err(e) = clm_platform::auth::check_policy(p) {
                panic!("{e}");
            }
        }
    }

    #[test]
    fn the_docs_role_tables_are_the_code_s() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
        let mut checked = Vec::new();
        for entry in std::fs::read_dir(&docs).expect("docs/") {
            let path = entry.expect("entry").path();
            let doc = std::fs::read_to_string(&path).expect("a doc");
            if !doc.contains(ROLES_BEGIN) {
                continue;
            }
            let expected = with_role_tables(&doc).expect("well-formed role markers");
            assert!(
                doc == expected,
                "{}'s role tables differ from the code's; run \
                 `cargo run -p clm -- roles --update-doc docs/*.md`",
                path.display()
            );
            checked.push(
                path.file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        checked.sort();
        assert_eq!(
            checked,
            [
                "customer.md",
                "feedback.md",
                "loyalty.md",
                "scoring.md",
                "security.md",
                "segmentation.md"
            ],
            "security.md has every table, each service guide its own"
        );
    }

    #[test]
    fn a_role_block_names_one_service_or_all() {
        let one = with_role_tables(
            "a\n<!-- roles:begin clm.scoring.v1.ScoringService -->\nold\n<!-- roles:end -->\nb",
        )
        .expect("one");
        assert!(one.contains("`clm.scoring.v1.ScoringService`"));
        assert!(!one.contains("CustomerService") && !one.contains("old"));
        assert!(one.ends_with("<!-- roles:end -->\nb"));
        let all = with_role_tables("<!-- roles:begin (all) -->\n<!-- roles:end -->").expect("all");
        assert!(all.contains("CustomerService") && all.contains("LoyaltyService"));
        assert!(
            with_role_tables("<!-- roles:begin clm.nope.v1.X -->\n<!-- roles:end -->").is_err()
        );
        assert!(with_role_tables("no markers").is_err());
    }
}
