//! Ingest benchmark: records N touchpoints through the real gRPC API in
//! batches, with several concurrent clients, and prints events per second.
//!
//! `scripts/bench.sh` (its ingest part) starts a customer service on PostgreSQL and runs this.

use clap::Parser;
use clm_proto::customer as pb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use std::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// Customer service URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    url: String,
    /// Touchpoints to record.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Touchpoints per RecordTouchpoints call (at most 1,000).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Distinct customers the events are spread over.
    #[arg(long, default_value_t = 1000)]
    customers: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let channel = tonic::transport::Endpoint::from_shared(args.url.clone())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client = CustomerServiceClient::new(channel.clone());
    let run = uuid::Uuid::new_v4().simple().to_string();

    let mut customers = Vec::with_capacity(args.customers);
    for chunk in (0..args.customers).collect::<Vec<_>>().chunks(1000) {
        let requests = chunk
            .iter()
            .map(|i| pb::CreateCustomerRequest {
                customer: Some(pb::Customer {
                    external_id: format!("bench-{run}-{i}"),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .collect();
        let created = client
            .batch_create_customers(pb::BatchCreateCustomersRequest {
                requests,
                request_id: String::new(),
            })
            .await?;
        customers.extend(created.into_inner().customers.into_iter().map(|c| c.name));
    }

    let batches = args.events.div_ceil(args.batch);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (next, customers, run) = (next.clone(), customers.clone(), run.clone());
        let mut client = CustomerServiceClient::new(channel.clone());
        let (events, batch_size) = (args.events, args.batch);
        workers.push(tokio::spawn(async move {
            let mut recorded = 0usize;
            loop {
                let b = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if b >= batches {
                    return Ok::<usize, anyhow::Error>(recorded);
                }
                let from = b * batch_size;
                let to = (from + batch_size).min(events);
                let touchpoints = (from..to)
                    .map(|i| pb::Touchpoint {
                        customer: customers[i % customers.len()].clone(),
                        event_id: format!("{run}-{i}"),
                        r#type: pb::TouchpointType::FeatureUse as i32,
                        feature: "dashboard".into(),
                        channel: "web".into(),
                        occurred_time: Some(prost_types::Timestamp {
                            seconds: 1_760_000_000 + i as i64,
                            nanos: 0,
                        }),
                        ..Default::default()
                    })
                    .collect();
                let r = client
                    .record_touchpoints(pb::RecordTouchpointsRequest { touchpoints })
                    .await?;
                recorded += r.into_inner().recorded_count as usize;
            }
        }));
    }
    let mut recorded = 0;
    for w in workers {
        recorded += w.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "ingested {recorded} touchpoints in {secs:.1} s with {} clients, batches of {}: {:.0} events/s",
        args.concurrency,
        args.batch,
        recorded as f64 / secs
    );
    Ok(())
}
