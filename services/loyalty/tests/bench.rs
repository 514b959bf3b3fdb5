//! Loyalty benchmark: RedeemReward per second on PostgreSQL at 64
//! concurrent streams over many members, beside a same-run `pgbench -M
//! prepared` script making the same row changes in one transaction, and
//! the ratio. The reward's stock is spread over its 16 slots: both take a
//! unit from a random free slot (`FOR UPDATE SKIP LOCKED`); the service
//! then waits for a held slot when none is free, while pgbench's UPDATE
//! then changes no row (it does not retry), so the reference is a little
//! kinder than the service. Ignored by default; `scripts/bench.sh --only loyalty` runs it:
//!
//! ```sh
//! CLM_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo test --release -p clm-loyalty --features bench --test bench -- --ignored --nocapture
//! ```
//!
//! `BENCH_MEMBERS` (default 20,000), `BENCH_SECONDS` (default 10) and
//! `BENCH_STREAMS` (default 64) set the size.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::testing::{TestBackend, start};
use clm_proto::loyalty as pb;
use clm_proto::loyalty::loyalty_service_client::LoyaltyServiceClient;
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The allocator of the `clm` binary (mimalloc), so the in-process server
/// is measured as it runs there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

const PGBENCH: &str = r"\set i random(1, :members)
\set r random(1, 1000000000000)
BEGIN;
INSERT INTO idempotency_keys (scope, request_id, request_hash, create_us) VALUES ('pgbench', :client_id || '-' || :r, 'h', 0) ON CONFLICT DO NOTHING;
SELECT customer FROM loyalty_members WHERE program = 'bench' AND customer = (SELECT customer FROM bench_members WHERE i = :i) FOR UPDATE;
SELECT id, remaining, spendable_us, expire_us FROM loyalty_lots WHERE program = 'bench' AND customer = (SELECT customer FROM bench_members WHERE i = :i) AND remaining > 0 AND expire_us > 0 ORDER BY expire_us, id;
UPDATE loyalty_lots SET remaining = remaining - 1 WHERE id = (SELECT min(id) FROM loyalty_lots WHERE program = 'bench' AND customer = (SELECT customer FROM bench_members WHERE i = :i));
INSERT INTO loyalty_transactions (program, customer, kind, points, rule, reason, actor, request_id, source, at_us, lot) VALUES ('bench', 'pgbench', 2, -1, '', 'redemption', 'local', 'r', gen_random_uuid()::text, 0, 0) RETURNING id;
INSERT INTO loyalty_draws (txn, lot, amount) VALUES (currval(pg_get_serial_sequence('loyalty_transactions', 'id')), 1, 1);
INSERT INTO loyalty_redemptions (id, program, customer, reward, campaign, cost, value_minor, spend_txn, state, code, code_kind, coupon_state, coupon_expire_us, use_us, create_us, cancel_us) VALUES (gen_random_uuid()::text, 'bench', 'pgbench', 'coffee', '', 1, 0, 0, 1, gen_random_uuid()::text, 1, 1, 0, NULL, 0, NULL);
INSERT INTO timer_queue (kind, key, subject, due_us, version, payload) VALUES ('pgbench', gen_random_uuid()::text, 'pgbench', 9223372036854775807, 1, NULL);
INSERT INTO audit_entries (time_us, actor, roles, rpc, resource, customer, field_mask, before_json, after_json, request_id, trace_id) VALUES (0, 'local', 'admin', 'pgbench', 'pgbench', 'pgbench', '', '', '{}', 'r', '');
INSERT INTO outbox (event_id, event_type, subject, payload, occurred_us) VALUES (gen_random_uuid()::text, 'pgbench', 'pgbench', '\x00', 0), (gen_random_uuid()::text, 'pgbench', 'pgbench', '\x00', 0);
UPDATE loyalty_reward_slots SET stock = stock - 1 WHERE program = 'bench' AND reward = 'coffee' AND slot = (SELECT slot FROM loyalty_reward_slots WHERE program = 'bench' AND reward = 'coffee' AND stock >= 1 ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED) AND stock >= 1;
UPDATE idempotency_keys SET response = '\x00' WHERE scope = 'pgbench' AND request_id = :client_id || '-' || :r;
COMMIT;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored on PostgreSQL"]
async fn bench_redemptions_per_second_at_64_streams() {
    if std::env::var("CLM_TEST_DATABASE_URL").is_err() {
        eprintln!(
            "CLM_TEST_DATABASE_URL is not set: the loyalty benchmark runs on PostgreSQL only"
        );
        return;
    }
    let members = env_or("BENCH_MEMBERS", 20_000);
    let seconds = env_or("BENCH_SECONDS", 10);
    let streams = env_or("BENCH_STREAMS", 64);
    let cb = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let lb = TestBackend::migrated::<clm_loyalty::store::Migrator>().await;
    let customer = start(&clm_customer::DESCRIPTOR, cb.config("customer")).await;
    let mut lc = lb.config("loyalty");
    lc.database.max_connections = 32;
    lc.peers.insert("customer".into(), customer.url());
    let loyalty = start(&clm_loyalty::DESCRIPTOR, lc).await;
    let mut api = LoyaltyServiceClient::new(loyalty.channel());
    api.create_program(pb::CreateProgramRequest {
        program: Some(pb::Program {
            display_name: "bench".into(),
            ..Default::default()
        }),
        program_id: "bench".into(),
        request_id: String::new(),
    })
    .await
    .unwrap();
    api.create_reward(pb::CreateRewardRequest {
        parent: "programs/bench".into(),
        reward: Some(pb::Reward {
            display_name: "Coffee".into(),
            cost: 1,
            stock: Some(1_000_000_000_000),
            ..Default::default()
        }),
        reward_id: "coffee".into(),
        request_id: String::new(),
    })
    .await
    .unwrap();
    // Members with two lots each (one expiring, one not), set-based.
    let names: Vec<String> = (0..members)
        .map(|_| format!("customers/{}", uuid::Uuid::new_v4()))
        .collect();
    let db = Database::connect(&lb.database_url).await.unwrap();
    let json = serde_json::Value::from(names.clone()).to_string();
    for sql in [
        "INSERT INTO loyalty_members (program, customer, tier, tier_us, below_us, enroll_us) \
         SELECT 'bench', x, '', 0, NULL, 0 FROM json_array_elements_text($1::json) x",
        "INSERT INTO loyalty_lots (program, customer, amount, remaining, earn_us, spendable_us, expire_us, txn) \
         SELECT 'bench', x, 1000000, 1000000, 0, 0, e, 0 FROM json_array_elements_text($1::json) x, \
         (VALUES (4102444800000000), (9223372036854775807)) AS v(e)",
        "CREATE TABLE bench_members AS SELECT (row_number() OVER ())::int AS i, x AS customer \
         FROM json_array_elements_text($1::json) x",
    ] {
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            [json.clone().into()],
        ))
        .await
        .unwrap();
    }
    db.execute_unprepared("CREATE UNIQUE INDEX ON bench_members (i); ANALYZE")
        .await
        .unwrap();

    // RedeemReward at `streams` concurrent calls over 8 connections.
    let channels: Vec<_> = (0..8).map(|_| loyalty.channel()).collect();
    let names = Arc::new(names);
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let run = |for_secs: u64, count: bool| {
        let mut tasks = Vec::new();
        let until = Instant::now() + Duration::from_secs(for_secs);
        for s in 0..streams {
            let mut api = LoyaltyServiceClient::new(channels[(s % 8) as usize].clone());
            let names = names.clone();
            let ok = ok.clone();
            let failed = failed.clone();
            tasks.push(tokio::spawn(async move {
                let mut k = 0u64;
                while Instant::now() < until {
                    k += 1;
                    let i = ((s * 7919 + k * 104_729) % names.len() as u64) as usize;
                    let r = api
                        .redeem_reward(pb::RedeemRewardRequest {
                            member: format!(
                                "programs/bench/members/{}",
                                &names[i]["customers/".len()..]
                            ),
                            reward: "programs/bench/rewards/coffee".into(),
                            request_id: format!("{}-{s}-{k}", uuid::Uuid::now_v7().simple()),
                        })
                        .await;
                    if count {
                        match r {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }
            }));
        }
        tasks
    };
    for t in run(2, false) {
        t.await.unwrap();
    }
    let started = Instant::now();
    for t in run(seconds, true) {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rps = ok.load(Ordering::Relaxed) as f64 / elapsed;
    let failures = failed.load(Ordering::Relaxed);
    loyalty.stop().await;
    // Their connections back before pgbench opens one per stream.
    customer.stop().await;
    eprintln!("RedeemReward: {rps:.0}/s ({failures} failed calls); now pgbench");

    // The reference: the same row changes in one transaction, by pgbench.
    let script = lb.dir().join("redeem.sql");
    std::fs::write(&script, PGBENCH).unwrap();
    let out = std::process::Command::new("pgbench")
        .args([
            "-n",
            "-M",
            "prepared",
            "-c",
            &streams.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
        ])
        .args(["-D", &format!("members={members}"), "-f"])
        .arg(&script)
        .arg(&lb.database_url)
        .output()
        .expect("pgbench (postgresql-client) on PATH");
    let text = String::from_utf8_lossy(&out.stdout);
    let tps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "pgbench failed: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let ratio = rps / tps;
    println!();
    println!(
        "loyalty: RedeemReward on PostgreSQL, {streams} streams, {members} members, {seconds} s"
    );
    println!(
        "  {:<58} {:>10.0} /s",
        "RedeemReward (gRPC, idempotent, audited, with events)", rps
    );
    println!(
        "  {:<58} {:>10.0} /s",
        "pgbench -M prepared: same row changes, one transaction", tps
    );
    println!("  {:<58} {:>10.2}", "ratio", ratio);
    println!("  failed calls: {failures}");
    println!(
        "{}",
        serde_json::json!({
            "bench": "loyalty.redeem",
            "streams": streams,
            "members": members,
            "redemptions_per_s": rps.round(),
            "pgbench_tps": tps.round(),
            "ratio": (ratio * 100.0).round() / 100.0,
        })
    );
    assert_eq!(
        failures, 0,
        "no redemption may fail: every member has points and the stock is large"
    );
}
