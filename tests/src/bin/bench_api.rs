//! Helpers of `scripts/bench.sh` (its api and segmentation parts):
//!
//! * `bench_api bare-server --listen 127.0.0.1:0`: the reference "bare
//!   tonic rpc answering from memory": `grpc.health.v1.Health` on a plain
//!   tonic server with no layers, so the script can compare the real
//!   server's Health/Check against it. Prints `bare listening on ADDR`.
//! * `bench_api prepare --url URL --out DIR`: creates one customer (with
//!   demographics and three attributes) on a running customer service,
//!   checks that GetCustomer answers it, and writes the gRPC request bodies
//!   h2load sends (5-byte length prefix + encoded message): `get.bin`,
//!   `create.bin` (only a display name and no request id, so every call
//!   creates a new customer) and `health.bin`.
//! * `bench_api get-load --url URL`: GetCustomer over many distinct
//!   customers (made first, each with three attributes), from 64
//!   connections of one stream each: prints `get-load RATE/s`. h2load sends
//!   one body, so its GetCustomer rate reads one customer over and over;
//!   this is the same load spread over distinct rows, as pgbench -S reads
//!   random keys.

use clap::{Parser, Subcommand};
use clm_proto::customer as pb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use prost::Message;
use std::path::{Path, PathBuf};
use tokio_stream::StreamExt;

/// The allocator of the `clm` binary, so that the bare reference differs
/// from CLM's server only by CLM's layers, not by its allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve grpc.health.v1.Health from memory on a tonic server without layers.
    BareServer {
        /// Address to listen on (port 0 picks a free one; the bound address is printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
    /// Create a customer and write the request bodies for h2load.
    Prepare {
        /// Customer service URL.
        #[arg(long)]
        url: String,
        /// Directory for get.bin, create.bin and health.bin.
        #[arg(long)]
        out: PathBuf,
    },
    /// GetCustomer over distinct customers from many connections; prints the rate.
    GetLoad {
        /// Customer service URL.
        #[arg(long)]
        url: String,
        /// Distinct customers to create and read.
        #[arg(long, default_value_t = 1000)]
        customers: usize,
        /// Connections, one call in flight on each.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Seconds measured, after a 2 s warm-up.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

/// `message` framed as one gRPC message: uncompressed flag, big-endian length, bytes.
fn grpc_frame(message: &impl Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn write(dir: &Path, name: &str, message: &impl Message) -> anyhow::Result<()> {
    std::fs::write(dir.join(name), grpc_frame(message))?;
    Ok(())
}

async fn bare_server(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("bare listening on {}", listener.local_addr()?);
    // Same socket option as the real server, nothing else.
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

async fn prepare(url: &str, out: &Path) -> anyhow::Result<()> {
    let channel = clm_platform::client::channel(url)?;
    let mut client = CustomerServiceClient::new(channel);
    let attributes = three_attributes();
    let created = client
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(pb::Customer {
                display_name: "Bench Reader".into(),
                email: format!("bench-{}@example.com", uuid::Uuid::new_v4().simple()),
                demographics: Some(pb::Demographics {
                    occupation: "engineer".into(),
                    gender: pb::Gender::Female as i32,
                    ..Default::default()
                }),
                attributes,
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    let get = pb::GetCustomerRequest {
        name: created.name.clone(),
    };
    let got = client.get_customer(get.clone()).await?.into_inner();
    anyhow::ensure!(
        got.attributes.len() == 3,
        "GetCustomer answered {} attributes, expected 3",
        got.attributes.len()
    );
    std::fs::create_dir_all(out)?;
    write(out, "get.bin", &get)?;
    write(
        out,
        "create.bin",
        &pb::CreateCustomerRequest {
            customer: Some(pb::Customer {
                display_name: "Bench Writer".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        },
    )?;
    write(
        out,
        "health.bin",
        &tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        },
    )?;
    println!("prepared {}", created.name);
    Ok(())
}

/// Three attributes, as the customer `prepare` makes.
fn three_attributes() -> std::collections::BTreeMap<String, pb::AttributeValue> {
    use pb::attribute_value::Value;
    [
        ("plan", Value::StringValue("pro".into())),
        ("seats", Value::NumberValue(12.0)),
        ("trial", Value::BoolValue(false)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), pb::AttributeValue { value: Some(v) }))
    .collect()
}

async fn get_load(
    url: &str,
    customers: usize,
    connections: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};
    let mut client = CustomerServiceClient::new(clm_platform::client::channel(url)?);
    let mut names = Vec::with_capacity(customers);
    let run = uuid::Uuid::new_v4().simple().to_string();
    while names.len() < customers {
        let requests = (names.len()..customers.min(names.len() + 500))
            .map(|i| pb::CreateCustomerRequest {
                customer: Some(pb::Customer {
                    display_name: format!("Bench Reader {i}"),
                    email: format!("reader-{run}-{i}@example.com"),
                    attributes: three_attributes(),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .collect();
        let made = client
            .batch_create_customers(pb::BatchCreateCustomersRequest {
                requests,
                request_id: String::new(),
            })
            .await?
            .into_inner();
        names.extend(made.customers.into_iter().map(|c| c.name));
    }
    let names = Arc::new(names);
    let start = Instant::now();
    let (warm, end) = (
        start + Duration::from_secs(2),
        start + Duration::from_secs(2 + seconds),
    );
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..connections {
        let mut client = CustomerServiceClient::new(clm_platform::client::channel(url)?);
        let (names, done) = (names.clone(), done.clone());
        tasks.spawn(async move {
            // Each connection walks the customers from its own place, by a
            // stride prime to their number: every customer is read, in an
            // order no two connections share.
            let mut i = task * 7919;
            while Instant::now() < end {
                let name = names[i % names.len()].clone();
                i += 104_729;
                let got = client
                    .get_customer(pb::GetCustomerRequest { name: name.clone() })
                    .await?
                    .into_inner();
                anyhow::ensure!(
                    got.name == name && got.attributes.len() == 3,
                    "GetCustomer({name}) answered {} with {} attributes",
                    got.name,
                    got.attributes.len()
                );
                let now = Instant::now();
                if now >= warm && now < end {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(t) = tasks.join_next().await {
        t??;
    }
    #[allow(clippy::cast_precision_loss)]
    let rate = done.load(Ordering::Relaxed) as f64 / seconds as f64;
    println!("get-load {rate:.0}/s");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::BareServer { listen } => bare_server(listen).await,
        Command::Prepare { url, out } => prepare(&url, &out).await,
        Command::GetLoad {
            url,
            customers,
            connections,
            seconds,
        } => get_load(&url, customers, connections, seconds).await,
    }
}
