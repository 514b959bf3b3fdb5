//! Benchmark driver of `scripts/bench.sh` (its segmentation and backfill parts).
//!
//! * `prepare`: a customer in a segment; writes the gRPC-framed IsMember and
//!   GetCustomerSegments requests h2load replays.
//! * `latency`: a touchpoint recorded in the customer service until IsMember
//!   reflects it, p50 / p99, beside the same-run latency of one IsMember
//!   call and one RecordTouchpoints call.
//! * `latency --ingest-rate R`: the same while `--ingest-clients` clients
//!   send RecordTouchpoints batches of `--ingest-batch` touchpoints to
//!   1,000 other customers as fast as they can up to R events/s in all;
//!   also prints the rate the ingest reached during the samples. The
//!   ingest's feature uses (feature "load") are evaluated against every
//!   segment that reads feature uses but enter none: the latency of one
//!   change amid a stream that changes little, not of a membership flood
//!   (`incremental` measures that).
//! * `incremental`: events/s the segmentation service sustains with N
//!   segments defined, beside the same-run ingest rate of the customer
//!   service alone: over the whole run (until every event shows applied,
//!   a fixed tail included) and over its second half (between a sentinel
//!   sent halfway through the ingest and the last one, so the tail counts
//!   at both ends and a backlog that grows shows as a ratio below 1).
//! * `backfill`: a 3-condition rule (one a 30-day window) compiled to SQL
//!   over a generated projection, beside a same-run full scan of the
//!   touchpoints.
#![forbid(unsafe_code)]

use chrono::Utc;
use clap::{Parser, Subcommand};
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::customer::{self as cpb};
use clm_proto::segmentation::segmentation_service_client::SegmentationServiceClient;
use clm_proto::segmentation::{self as pb};
use sea_orm::ConnectionTrait;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Creates a member and writes the request bodies.
    Prepare {
        #[arg(long)]
        customer: String,
        #[arg(long)]
        segmentation: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Touchpoint to IsMember latency, idle or beside an ingest.
    Latency {
        #[arg(long)]
        customer: String,
        #[arg(long)]
        segmentation: String,
        #[arg(long, default_value_t = 200)]
        samples: usize,
        /// Events/s an ingest beside the samples aims at (0: none, idle).
        #[arg(long, default_value_t = 0)]
        ingest_rate: u64,
        /// Clients of that ingest, each with one batch in flight.
        #[arg(long, default_value_t = 4)]
        ingest_clients: usize,
        /// Touchpoints per RecordTouchpoints call of that ingest.
        #[arg(long, default_value_t = 1000)]
        ingest_batch: usize,
    },
    /// Incremental evaluation throughput with many segments.
    Incremental {
        #[arg(long)]
        customer: String,
        #[arg(long)]
        segmentation: String,
        #[arg(long, default_value_t = 300)]
        segments: usize,
        #[arg(long, default_value_t = 20_000)]
        events: usize,
    },
    /// Backfill over a generated projection (PostgreSQL).
    Backfill {
        #[arg(long)]
        database_url: String,
        #[arg(long, default_value_t = 1_000_000)]
        customers: i64,
        #[arg(long, default_value_t = 10)]
        touchpoints_per_customer: i64,
    },
}

fn frame(msg: &impl prost::Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn ts(t: chrono::DateTime<Utc>) -> prost_types::Timestamp {
    clm_platform::convert::timestamp(t)
}

async fn clients(
    customer: &str,
    segmentation: &str,
) -> anyhow::Result<(
    CustomerServiceClient<tonic::transport::Channel>,
    SegmentationServiceClient<tonic::transport::Channel>,
)> {
    Ok((
        CustomerServiceClient::new(clm_platform::client::channel(customer)?),
        SegmentationServiceClient::new(clm_platform::client::channel(segmentation)?),
    ))
}

async fn new_customers(
    c: &mut CustomerServiceClient<tonic::transport::Channel>,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let requests = chunk
            .iter()
            .map(|_| cpb::CreateCustomerRequest {
                customer: Some(cpb::Customer {
                    display_name: "Bench".into(),
                    email: format!("b-{}@example.com", uuid::Uuid::new_v4().simple()),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .collect();
        let created = c
            .batch_create_customers(cpb::BatchCreateCustomersRequest {
                requests,
                request_id: uuid::Uuid::new_v4().to_string(),
            })
            .await?
            .into_inner();
        names.extend(created.customers.into_iter().map(|c| c.name));
    }
    Ok(names)
}

async fn segment(
    s: &mut SegmentationServiceClient<tonic::transport::Channel>,
    text: &str,
) -> anyhow::Result<String> {
    let seg = s
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(pb::Segment {
                display_name: "bench".into(),
                owner: "bench".into(),
                rule_text: text.into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    loop {
        let got = s
            .get_segment(pb::GetSegmentRequest {
                name: seg.name.clone(),
            })
            .await?
            .into_inner();
        if got.state == pb::SegmentState::Ready as i32 {
            return Ok(seg.name);
        }
        anyhow::ensure!(
            got.state != pb::SegmentState::Failed as i32,
            "segment failed: {}",
            got.failure_reason
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn member(
    s: &mut SegmentationServiceClient<tonic::transport::Channel>,
    segment: &str,
    customer: &str,
) -> anyhow::Result<bool> {
    Ok(s.is_member(pb::IsMemberRequest {
        segment: segment.into(),
        customer: customer.into(),
    })
    .await?
    .into_inner()
    .member)
}

fn touch(customer: &str, feature: &str) -> cpb::Touchpoint {
    cpb::Touchpoint {
        customer: customer.into(),
        event_id: uuid::Uuid::new_v4().to_string(),
        r#type: cpb::TouchpointType::FeatureUse as i32,
        occurred_time: Some(ts(Utc::now())),
        feature: feature.into(),
        ..Default::default()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn prepare(customer: &str, segmentation: &str, out: &Path) -> anyhow::Result<()> {
    let (mut c, mut s) = clients(customer, segmentation).await?;
    let who = new_customers(&mut c, 1).await?.remove(0);
    let seg = segment(&mut s, "stage = APPROACH").await?;
    while !member(&mut s, &seg, &who).await? {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join("is_member.bin"),
        frame(&pb::IsMemberRequest {
            segment: seg.clone(),
            customer: who.clone(),
        }),
    )?;
    std::fs::write(
        out.join("customer_segments.bin"),
        frame(&pb::GetCustomerSegmentsRequest {
            customer: who.clone(),
        }),
    )?;
    std::fs::write(
        out.join("health.bin"),
        frame(&tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        }),
    )?;
    println!("prepared {who} in {seg}");
    Ok(())
}

/// How long a sample beside an ingest is waited for.
const LOADED_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// An ingest beside the latency samples.
struct Ingest {
    /// Events/s aimed at, in all.
    rate: u64,
    clients: usize,
    batch: usize,
}

/// Starts `ingest`'s clients: each sends batches of feature uses to
/// `people`, paced to its share of the rate, until `stop`; `sent` counts
/// the touchpoints recorded.
fn start_ingest(
    c: &CustomerServiceClient<tonic::transport::Channel>,
    ingest: &Ingest,
    people: Arc<Vec<String>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    sent: Arc<std::sync::atomic::AtomicU64>,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
    use std::sync::atomic::Ordering;
    let per_client = ingest.rate as f64 / ingest.clients as f64;
    (0..ingest.clients)
        .map(|k| {
            let (mut c, people, stop, sent) =
                (c.clone(), people.clone(), stop.clone(), sent.clone());
            let batch = ingest.batch;
            tokio::spawn(async move {
                let started = Instant::now();
                let mut mine = 0u64;
                let mut n = k;
                while !stop.load(Ordering::Relaxed) {
                    let touchpoints = (0..batch)
                        .map(|_| {
                            n += 1;
                            touch(&people[n % people.len()], "load")
                        })
                        .collect();
                    c.record_touchpoints(cpb::RecordTouchpointsRequest { touchpoints })
                        .await?;
                    mine += batch as u64;
                    sent.fetch_add(batch as u64, Ordering::Relaxed);
                    // Ahead of this client's share of the rate: wait.
                    let due = std::time::Duration::from_secs_f64(mine as f64 / per_client);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                Ok(())
            })
        })
        .collect()
}

async fn latency(
    customer: &str,
    segmentation: &str,
    samples: usize,
    ingest: Option<Ingest>,
) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let (mut c, mut s) = clients(customer, segmentation).await?;
    let seg = segment(
        &mut s,
        r#"count(feature_use where feature = "latency", 1d) >= 1"#,
    )
    .await?;
    let people = new_customers(&mut c, samples).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut loaders = Vec::new();
    if let Some(ingest) = &ingest {
        let others = Arc::new(new_customers(&mut c, 1000).await?);
        loaders = start_ingest(&c, ingest, others, stop.clone(), sent.clone());
        // Warm-up: the ingest and the service's batches reach their pace.
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    let (sent_before, measuring) = (sent.load(Ordering::Relaxed), Instant::now());
    let (mut end_to_end, mut is_member_rtt, mut record_rtt) = (Vec::new(), Vec::new(), Vec::new());
    for who in &people {
        let t = Instant::now();
        member(&mut s, &seg, who).await?;
        is_member_rtt.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        c.record_touchpoints(cpb::RecordTouchpointsRequest {
            touchpoints: vec![touch(who, "latency")],
        })
        .await?;
        record_rtt.push(t.elapsed().as_secs_f64() * 1e3);
        // Idle, a sample must show within 30 s. Beside an ingest the
        // service may fall behind for good: a sample still not shown after
        // LOADED_WAIT counts as LOADED_WAIT (the figure is then a lower
        // bound) and ends the sampling, since every later one would wait
        // behind the same backlog.
        let mut censored = false;
        while !member(&mut s, &seg, who).await? {
            if ingest.is_some() && t.elapsed() >= LOADED_WAIT {
                censored = true;
                break;
            }
            anyhow::ensure!(t.elapsed().as_secs() < 30, "never became a member");
        }
        end_to_end.push(t.elapsed().as_secs_f64() * 1e3);
        if censored {
            println!(
                "under load: sample {} of {samples} still not a member after {LOADED_WAIT:?}: counted as {LOADED_WAIT:?}, sampling stopped",
                end_to_end.len()
            );
            break;
        }
    }
    let ingested = sent.load(Ordering::Relaxed) - sent_before;
    let measured = measuring.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.await??;
    }
    for v in [&mut end_to_end, &mut is_member_rtt, &mut record_rtt] {
        v.sort_by(f64::total_cmp);
    }
    if let Some(ingest) = &ingest {
        println!(
            "under load: ingest {:.0} events/s during the samples (aimed at {}, {} clients x batches of {})",
            ingested as f64 / measured,
            ingest.rate,
            ingest.clients,
            ingest.batch
        );
    }
    println!(
        "latency touchpoint->IsMember p50 {:.2} ms p99 {:.2} ms | RecordTouchpoints p50 {:.2} ms p99 {:.2} ms | IsMember p50 {:.2} ms p99 {:.2} ms ({} of {samples} samples)",
        percentile(&end_to_end, 0.5),
        percentile(&end_to_end, 0.99),
        percentile(&record_rtt, 0.5),
        percentile(&record_rtt, 0.99),
        percentile(&is_member_rtt, 0.5),
        percentile(&is_member_rtt, 0.99),
        end_to_end.len(),
    );
    Ok(())
}

async fn incremental(
    customer: &str,
    segmentation: &str,
    segments: usize,
    events: usize,
) -> anyhow::Result<()> {
    let (mut c, mut s) = clients(customer, segmentation).await?;
    // A mix: a third read feature_use (with different filters and windows),
    // the rest read other facts and cannot be affected by these events.
    for i in 0..segments {
        let rule = match i % 3 {
            0 => format!(
                r#"count(feature_use where feature = "f{}", {}d) >= 2"#,
                i % 17,
                1 + i % 9
            ),
            1 => format!("stage = RETENTION and time_in_stage >= {}d", 1 + i % 30),
            _ => format!(r#"attributes.plan = "p{i}" or age > {}"#, 20 + i % 50),
        };
        segment(&mut s, &rule).await?;
    }
    let sentinel = segment(
        &mut s,
        r#"count(feature_use where feature = "sentinel") >= 1"#,
    )
    .await?;
    let people = new_customers(&mut c, 200).await?;
    let batches: Vec<Vec<cpb::Touchpoint>> = (0..events)
        .map(|i| touch(&people[i % people.len()], &format!("f{}", i % 17)))
        .collect::<Vec<_>>()
        .chunks(500)
        .map(<[cpb::Touchpoint]>::to_vec)
        .collect();
    let half = batches.len() / 2;
    let second_half: usize = batches[half..].iter().map(Vec::len).sum();
    let mut midway = None;
    let t = Instant::now();
    for (i, b) in batches.into_iter().enumerate() {
        if i == half {
            // Halfway: a sentinel sent beside the ingest, and the time its
            // membership shows. Its batch's other partitions may still be
            // writing then: the mark is early if anything, which lengthens
            // the second half's window (a pessimistic figure).
            let (mut c, mut s) = (c.clone(), s.clone());
            let (who, sentinel) = (people[2].clone(), sentinel.clone());
            let sent = t.elapsed().as_secs_f64();
            midway = Some(tokio::spawn(async move {
                c.record_touchpoints(cpb::RecordTouchpointsRequest {
                    touchpoints: vec![touch(&who, "sentinel")],
                })
                .await?;
                while !member(&mut s, &sentinel, &who).await? {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                anyhow::Ok((sent, t.elapsed().as_secs_f64()))
            }));
        }
        c.record_touchpoints(cpb::RecordTouchpointsRequest { touchpoints: b })
            .await?;
    }
    let ingest = t.elapsed().as_secs_f64();
    // The partitions of one batch commit one by one, so the first
    // sentinel's customer can be a member while another partition of its
    // batch is still writing. A second sentinel, sent once the first is
    // seen, is in a later batch, which starts only after every partition
    // of the first committed: once it is seen, every event is applied (the
    // figure then includes one more small batch: pessimistic, never
    // flattering).
    for who in &people[..2] {
        c.record_touchpoints(cpb::RecordTouchpointsRequest {
            touchpoints: vec![touch(who, "sentinel")],
        })
        .await?;
        while !member(&mut s, &sentinel, who).await? {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    let applied = t.elapsed().as_secs_f64();
    let (mid_sent, mid_applied) = match midway {
        Some(task) => task.await??,
        None => anyhow::bail!("--events too few for a halfway sentinel"),
    };
    println!(
        "incremental {segments} segments: {:.0} events/s evaluated (all {events} applied in {applied:.2} s) | customer ingest alone {:.0} events/s | ratio {:.2}",
        events as f64 / applied,
        events as f64 / ingest,
        ingest / applied
    );
    println!(
        "second half: {:.0} events/s evaluated ({second_half} events, halfway sentinel applied at {mid_applied:.2} s) | ingest {:.0} events/s (halfway sentinel sent at {mid_sent:.2} s) | ratio {:.2}",
        second_half as f64 / (applied - mid_applied),
        second_half as f64 / (ingest - mid_sent),
        (ingest - mid_sent) / (applied - mid_applied)
    );
    Ok(())
}

async fn backfill(url: &str, customers: i64, per: i64) -> anyhow::Result<()> {
    use clm_domain::rules;
    use clm_segmentation::sql::Compiler;
    let db = sea_orm::Database::connect(url).await?;
    <clm_segmentation::store::Migrator as sea_orm_migration::MigratorTrait>::up(&db, None).await?;
    let now = Utc::now();
    let now_us = now.timestamp_micros();
    let t = Instant::now();
    db.execute_unprepared("TRUNCATE fact_customers, fact_touchpoints, fact_attributes")
        .await?;
    db.execute_unprepared(&format!(
        "INSERT INTO fact_customers (customer_id, birth_date, gender, stage, stage_us) \
         SELECT 'c' || g, to_char(DATE '1950-01-01' + (g % 20000), 'YYYY-MM-DD'), 1 + g % 2, 1 + g % 6, {now_us} \
         FROM generate_series(1, {customers}) g"
    ))
    .await?;
    db.execute_unprepared(&format!(
        "INSERT INTO fact_touchpoints (event_id, customer_id, kind, occurred_us, feature) \
         SELECT 'e' || g, 'c' || (1 + (g - 1) / {per}), 3, {now_us} - ((g * 37) % 90) * 86400000000, \
                CASE WHEN g % 3 = 0 THEN 'export' ELSE 'import' END \
         FROM generate_series(1, {}) g",
        customers * per
    ))
    .await?;
    db.execute_unprepared("ANALYZE fact_customers; ANALYZE fact_touchpoints")
        .await?;
    let generated = t.elapsed().as_secs_f64();
    let rule = rules::compile(
        r#"age >= 30 and stage = RETENTION and count(feature_use where feature = "export", 30d) >= 2"#,
        &clm_segmentation::catalog::catalog(Default::default()),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let select = Compiler {
        at: now,
        postgres: true,
    }
    .select(&rule);
    let count = sea_orm::sea_query::Query::select()
        .expr_as(
            sea_orm::sea_query::Func::count(sea_orm::sea_query::Expr::val(1)),
            sea_orm::sea_query::Alias::new("n"),
        )
        .from_subquery(select, sea_orm::sea_query::Alias::new("r"))
        .to_owned();
    let t = Instant::now();
    let n: i64 = db
        .query_one(&count)
        .await?
        .map(|r| r.try_get("", "n"))
        .transpose()?
        .unwrap_or(0);
    let rule_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    db.execute_unprepared("SELECT count(*) FROM fact_touchpoints WHERE feature = 'export'")
        .await?;
    let scan_s = t.elapsed().as_secs_f64();
    println!(
        "backfill {customers} customers / {} touchpoints (generated in {generated:.1} s): rule query {rule_s:.2} s ({n} members) | full scan of touchpoints {scan_s:.2} s | ratio {:.2}",
        customers * per,
        rule_s / scan_s.max(1e-9)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Prepare {
            customer,
            segmentation,
            out,
        } => prepare(&customer, &segmentation, &out).await,
        Command::Latency {
            customer,
            segmentation,
            samples,
            ingest_rate,
            ingest_clients,
            ingest_batch,
        } => {
            let ingest = (ingest_rate > 0).then_some(Ingest {
                rate: ingest_rate,
                clients: ingest_clients.max(1),
                batch: ingest_batch.max(1),
            });
            latency(&customer, &segmentation, samples, ingest).await
        }
        Command::Incremental {
            customer,
            segmentation,
            segments,
            events,
        } => incremental(&customer, &segmentation, segments, events).await,
        Command::Backfill {
            database_url,
            customers,
            touchpoints_per_customer,
        } => backfill(&database_url, customers, touchpoints_per_customer).await,
    }
}
