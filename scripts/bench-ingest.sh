#!/usr/bin/env bash
# Ingest benchmark: records EVENTS touchpoints (default 1,000,000) in batches
# of 1,000 through the real gRPC API into PostgreSQL, and prints events/s.
# A consumer (bench_follow: the platform subscriber, set-based batch handler,
# its own database) follows the customer change stream at the same time and
# prints the rate it applied them at: whether a consumer keeps up with ingest.
#
#   scripts/bench-ingest.sh                  # 1,000,000 events, 4 clients
#   EVENTS=200000 CONCURRENCY=8 scripts/bench-ingest.sh
#
# Needs PostgreSQL (CLM_BENCH_DATABASE_URL, default the local test server);
# creates a scratch database and drops it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS="${EVENTS:-1000000}"
CONCURRENCY="${CONCURRENCY:-4}"
ADMIN_URL="${CLM_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
db="clm_bench_$$"
base="${ADMIN_URL%/*}"

cargo build --release -q -p clm -p clm-tests --bin clm --bin bench_ingest --bin bench_follow
psql -q "$ADMIN_URL" -c "CREATE DATABASE $db"
psql -q "$ADMIN_URL" -c "CREATE DATABASE ${db}_follow"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
data="$(mktemp -d)"
RUST_LOG=warn target/release/clm serve customer --listen "127.0.0.1:$port" --database-url "$base/$db" --data-dir "$data" &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  [ -n "${follow_pid:-}" ] && kill "$follow_pid" 2>/dev/null || true
  psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS ${db}_follow WITH (FORCE)" || true
  rm -rf "$data"
}
trap cleanup EXIT
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

RUST_LOG=warn target/release/bench_follow --source "http://127.0.0.1:$port" --database-url "$base/${db}_follow" --events "$EVENTS" &
follow_pid=$!
target/release/bench_ingest --url "http://127.0.0.1:$port" --events "$EVENTS" --batch 1000 --concurrency "$CONCURRENCY"
wait "$follow_pid"
follow_pid=
psql -Atq "$base/$db" -c "SELECT 'stored touchpoints: ' || count(*) FROM touchpoints; SELECT 'outbox events: ' || count(*) FROM outbox"
