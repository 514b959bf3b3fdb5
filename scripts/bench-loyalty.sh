#!/usr/bin/env bash
# Loyalty benchmark (issue 19): RedeemReward per second on PostgreSQL at 64
# concurrent streams over many members, beside a same-run `pgbench -M
# prepared` script that makes the same row changes in one transaction
# (idempotency key, member lock, lot draw, transaction, draw, redemption,
# coupon timer, audit entry, two outbox events, one unit from a free stock
# slot), and the ratio.
# Prints a table and one JSON line.
#
#   scripts/bench-loyalty.sh
#   BENCH_MEMBERS=100000 BENCH_SECONDS=20 scripts/bench-loyalty.sh
#
# Needs PostgreSQL (CLM_BENCH_DATABASE_URL, default the local test server)
# and pgbench (postgresql-client, installed with apt-get if missing);
# creates scratch databases and drops them afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v pgbench >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-client >/dev/null
}
export CLM_TEST_DATABASE_URL="${CLM_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
export CLM_TEST_TEMPLATE_KEY="${CLM_TEST_TEMPLATE_KEY:-bench$(find services/loyalty crates/clm-platform -path '*/migration*' -name '*.rs' -print0 | sort -z | xargs -0 cat | sha256sum | cut -c1-8)}"
cargo test --release -q -p clm-loyalty --features bench --test bench -- --ignored --nocapture --test-threads 1
