//! Follow benchmark: a consumer service following the customer change
//! stream through the platform subscriber while `bench_ingest` writes to it,
//! applying each run of touchpoints with one set-based INSERT. Prints the
//! events applied per second and how long after the source's last event it
//! caught up.
//!
//! `scripts/bench.sh` (its ingest part) runs it next to the ingest.

use clap::Parser;
use clm_platform::changes::{Apply, Handlers, OnBatch, Subscriber};
use clm_platform::service::{Parts, ServiceDescriptor, migrate_with};
use clm_platform::{Error, Runtime};
use clm_proto::common::ChangeEvent;
use clm_proto::customer as pb;
use sea_orm::ConnectionTrait;
use sea_orm::sea_query::{Alias, OnConflict, Query};
use sea_orm_migration::prelude::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
struct Args {
    /// Customer service URL.
    #[arg(long)]
    source: String,
    /// The follower's own database.
    #[arg(long)]
    database_url: String,
    /// Touchpoints to wait for.
    #[arg(long)]
    events: i64,
    /// Events per transaction.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut m = clm_platform::migration::platform_migrations();
        m.push(Box::new(Seen));
        m
    }
}

struct Seen;

impl MigrationName for Seen {
    fn name(&self) -> &str {
        "m0100_seen"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Seen {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Alias::new("seen"))
                .if_not_exists()
                .col(
                    ColumnDef::new(Alias::new("event_id"))
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(Alias::new("customer")).string().not_null())
                .to_owned(),
        )
        .await
    }
}

static FOLLOWER: ServiceDescriptor = ServiceDescriptor {
    name: "follower",
    about: "benchmark consumer of the customer stream",
    migrate: migrate_with::<Migrator>,
    policy: &clm_platform::auth::Policy::PLATFORM_ONLY,
    build: |_| Ok(Parts::new()),
};

/// Counts the rows its batches inserted (a hint for when to check the
/// table, never the result: a batch retried after a failure counts twice).
struct Record(Arc<std::sync::atomic::AtomicU64>);

#[async_trait::async_trait]
impl OnBatch<pb::TouchpointRecorded> for Record {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, pb::TouchpointRecorded)>,
    ) -> Result<(), Error> {
        let mut insert = Query::insert();
        insert
            .into_table(Alias::new("seen"))
            .columns([Alias::new("event_id"), Alias::new("customer")])
            .on_conflict(
                OnConflict::column(Alias::new("event_id"))
                    .do_nothing()
                    .to_owned(),
            );
        for (event, _) in &messages {
            insert.values_panic([event.event_id.clone().into(), event.subject.clone().into()]);
        }
        let n = cx.txn().execute(&insert).await?.rows_affected();
        self.0.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

async fn count(rt: &Runtime) -> anyhow::Result<i64> {
    let row = rt
        .db
        .query_one_raw(sea_orm::Statement::from_string(
            rt.db.get_database_backend(),
            "SELECT COUNT(*) FROM seen",
        ))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no count"))?;
    Ok(row.try_get_by_index(0)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = clm_platform::config::Config::defaults("follower", std::path::Path::new("."));
    config.database.url = args.database_url.clone();
    config.subscriber.batch_size = args.batch;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let rt = clm_platform::open(
        &FOLLOWER,
        &config,
        Arc::new(clm_domain::SystemClock),
        shutdown.clone(),
    )
    .await?;
    let hint = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let handlers =
        Handlers::new().on_batch::<pb::TouchpointRecorded, _>(Arc::new(Record(hint.clone())));
    let subscriber = Subscriber::new(rt.clone(), "customer", args.source.clone(), handlers)
        .with_config(&config.subscriber);
    tokio::spawn(subscriber.run(shutdown.clone()));

    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut first: Option<Instant> = None;
    loop {
        // The table is counted only once the batches say they are done
        // (a COUNT(*) every 20 ms would load the database under test).
        let hinted =
            <i64 as TryFrom<u64>>::try_from(hint.load(std::sync::atomic::Ordering::Relaxed))?;
        let n = if hinted >= args.events {
            count(&rt).await?
        } else {
            hinted
        };
        if n > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if n >= args.events {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "followed only {n} of {} events",
            args.events
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    println!(
        "followed {} touchpoints in {secs:.1} s (batches of up to {}): {:.0} events/s applied",
        args.events,
        args.batch,
        args.events as f64 / secs.max(1e-9)
    );
    shutdown.cancel();
    Ok(())
}
