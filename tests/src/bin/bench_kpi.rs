//! KPI report benchmark: times each report rpc of the customer service
//! (best and median of several runs) over whatever data set the database
//! holds, next to a reference measured in the same run on the same
//! database: a bare `SELECT count(*) FROM touchpoints`.
//!
//! `scripts/seed-kpi.sh` seeds PostgreSQL (1,000,000 customers, 10,000,000
//! touchpoints, 200 campaigns by default), starts a customer service and
//! runs this.

use clap::Parser;
use clm_proto::customer as pb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use sea_orm::{ConnectionTrait, Database, Statement};
use std::future::Future;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
struct Args {
    /// Customer service URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    url: String,
    /// The same database, for the reference query.
    #[arg(long)]
    database_url: String,
    /// Runs per report (the best and the median are printed).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Report period start (RFC 3339).
    #[arg(long, default_value = "2025-01-01T00:00:00Z")]
    start: String,
    /// Report period end (RFC 3339).
    #[arg(long, default_value = "2026-01-01T00:00:00Z")]
    end: String,
}

fn ts(s: &str) -> anyhow::Result<prost_types::Timestamp> {
    let t = chrono::DateTime::parse_from_rfc3339(s)?;
    Ok(prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    })
}

/// Best and median of `runs` timings of `f`, and its last answer.
async fn time<T, F, Fut>(runs: usize, mut f: F) -> anyhow::Result<(Duration, Duration, T)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut all = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        last = Some(f().await?);
        all.push(t.elapsed());
    }
    all.sort();
    let last = last.ok_or_else(|| anyhow::anyhow!("no run"))?;
    Ok((all[0], all[all.len() / 2], last))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let channel = tonic::transport::Endpoint::from_shared(args.url.clone())?
        .timeout(Duration::from_secs(600))
        .connect()
        .await?;
    let client = CustomerServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let db = Database::connect(&args.database_url).await?;
    let scope = pb::ReportScope {
        start_time: Some(ts(&args.start)?),
        end_time: Some(ts(&args.end)?),
        ..Default::default()
    };
    let backend = db.get_database_backend();
    let (ref_best, ref_median, _) = time(args.runs, || async {
        db.query_one_raw(Statement::from_string(
            backend,
            "SELECT count(*) FROM touchpoints",
        ))
        .await?;
        anyhow::Ok(())
    })
    .await?;
    let rows = db
        .query_one_raw(Statement::from_string(
            backend,
            "SELECT (SELECT count(*) FROM customers) AS c, (SELECT count(*) FROM touchpoints) AS t, \
             (SELECT count(*) FROM stage_history) AS h, (SELECT count(*) FROM campaigns) AS k",
        ))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no counts"))?;
    println!(
        "data: {} customers, {} touchpoints, {} stage moves, {} campaigns; period {} .. {}",
        rows.try_get::<i64>("", "c")?,
        rows.try_get::<i64>("", "t")?,
        rows.try_get::<i64>("", "h")?,
        rows.try_get::<i64>("", "k")?,
        args.start,
        args.end
    );
    println!(
        "reference: SELECT count(*) FROM touchpoints: best {:.0} ms, median {:.0} ms",
        ms(ref_best),
        ms(ref_median)
    );
    let report = |name: &str, target_ms: f64, best: Duration, median: Duration, note: String| {
        println!(
            "{name:<22} best {:>7.0} ms  median {:>7.0} ms  ({:.2}x the reference; target < {target_ms:.0} ms: {})  {note}",
            ms(best),
            ms(median),
            ms(best) / ms(ref_best).max(0.001),
            if ms(best) < target_ms {
                "met"
            } else {
                "MISSED"
            },
        );
    };

    let (b, m, r) = time(args.runs, || {
        let (mut c, s) = (client.clone(), scope.clone());
        async move {
            Ok(c.get_funnel_report(pb::GetFunnelReportRequest {
                scope: Some(s),
                ..Default::default()
            })
            .await?
            .into_inner())
        }
    })
    .await?;
    let entered: Vec<i64> = r.stages.iter().map(|s| s.entered_count).collect();
    report(
        "funnel",
        1000.0,
        b,
        m,
        format!("entered per stage {entered:?}"),
    );

    for (name, model) in [
        ("cac (first touch)", pb::AttributionModel::FirstTouch),
        ("cac (last touch)", pb::AttributionModel::LastTouch),
        ("cac (linear)", pb::AttributionModel::Linear),
    ] {
        let (b, m, r) = time(args.runs, || {
            let (mut c, s) = (client.clone(), scope.clone());
            async move {
                Ok(c.get_acquisition_report(pb::GetAcquisitionReportRequest {
                    scope: Some(s),
                    model: model as i32,
                    ..Default::default()
                })
                .await?
                .into_inner())
            }
        })
        .await?;
        report(
            name,
            1000.0,
            b,
            m,
            format!(
                "{} acquired, {} unattributed, {} campaign lines",
                r.acquired_customers,
                r.unattributed_customers,
                r.campaigns.len()
            ),
        );
    }

    let (b, m, r) = time(args.runs, || {
        let (mut c, s) = (client.clone(), scope.clone());
        async move {
            Ok(c.get_clv_report(pb::GetClvReportRequest {
                scope: Some(s),
                gross_margin_bps: 3_000,
                top_customers: 10,
                ..Default::default()
            })
            .await?
            .into_inner())
        }
    })
    .await?;
    report(
        "clv per cohort",
        2000.0,
        b,
        m,
        format!("{} cohort lines", r.cohorts.len()),
    );

    let (b, m, r) = time(args.runs, || {
        let (mut c, s) = (client.clone(), scope.clone());
        async move {
            Ok(c.get_retention_report(pb::GetRetentionReportRequest {
                scope: Some(s),
                active_types: vec![
                    pb::TouchpointType::Purchase as i32,
                    pb::TouchpointType::FeatureUse as i32,
                ],
                months: 12,
                ..Default::default()
            })
            .await?
            .into_inner())
        }
    })
    .await?;
    report(
        "retention cohorts",
        2000.0,
        b,
        m,
        format!("{} cohorts", r.cohorts.len()),
    );

    let (b, m, r) = time(args.runs, || {
        let (mut c, s) = (client.clone(), scope.clone());
        async move {
            Ok(c.get_journey_report(pb::GetJourneyReportRequest {
                scope: Some(s),
                to_stage: pb::Stage::Conversion as i32,
                window_days: 30,
                max_path_length: 5,
                top: 10,
                ..Default::default()
            })
            .await?
            .into_inner())
        }
    })
    .await?;
    report(
        "journey + pain points",
        5000.0,
        b,
        m,
        format!(
            "{} entered CONVERSION, {} paths, {} pain points",
            r.entered_customers,
            r.paths.len(),
            r.pain_points.len()
        ),
    );
    Ok(())
}
