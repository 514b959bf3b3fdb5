#!/usr/bin/env bash
# Ingest benchmark: records EVENTS touchpoints (default 1,000,000) in batches
# of 1,000 through the real gRPC API into PostgreSQL, and prints events/s.
# A consumer (bench_follow: the platform subscriber, set-based batch handler,
# its own database) follows the customer change stream at the same time and
# prints the rate it applied them at: whether a consumer keeps up with ingest.
#
#   scripts/bench-ingest.sh                  # 1,000,000 events, 4 clients
#   EVENTS=200000 CONCURRENCY=8 scripts/bench-ingest.sh
#   PROFILE=debug FOLLOW=0 EVENTS=100000 scripts/bench-ingest.sh   # quicker
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

PROFILE="${PROFILE:-release}"
target="${CARGO_TARGET_DIR:-target}/$PROFILE"
flags=()
[ "$PROFILE" = release ] && flags=(--release)
[ -n "${SKIP_BUILD:-}" ] || cargo build "${flags[@]}" -q -p clm -p clm-tests --features clm-tests/bench --bin clm --bin bench_ingest --bin bench_follow
psql -q "$ADMIN_URL" -c "CREATE DATABASE $db"
psql -q "$ADMIN_URL" -c "CREATE DATABASE ${db}_follow"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
data="$(mktemp -d)"
RUST_LOG=warn "$target/clm" serve customer --listen "127.0.0.1:$port" --database-url "$base/$db" --data-dir "$data" &
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

if [ "${FOLLOW:-1}" = 1 ]; then
  RUST_LOG=warn "$target/bench_follow" --source "http://127.0.0.1:$port" --database-url "$base/${db}_follow" --events "$EVENTS" &
  follow_pid=$!
fi
"$target/bench_ingest" --url "http://127.0.0.1:$port" --events "$EVENTS" --batch 1000 --concurrency "$CONCURRENCY" | tee "$data/ingest.txt"
if [ -n "${follow_pid:-}" ]; then wait "$follow_pid"; follow_pid=; fi

# Reference, same run, same machine: PostgreSQL inserting the same rows into a
# table with the same indexes in one set-based statement.
ref_ms="$(psql -Atq "$base/$db" <<'SQL' | tail -n1
CREATE TABLE touchpoints_ref (LIKE touchpoints INCLUDING ALL);
SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint \gset t0_
INSERT INTO touchpoints_ref SELECT * FROM touchpoints;
SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint - :t0_int8;
SQL
)"
python3 - "$data/ingest.txt" "$EVENTS" "$ref_ms" <<'PY'
import re, sys
rate = float(re.search(r"([\d.]+) events/s", open(sys.argv[1]).read()).group(1))
events, ref_ms = int(sys.argv[2]), max(int(sys.argv[3]), 1)
ref = events / (ref_ms / 1000)
print(f"reference: raw set-based INSERT of the same {events} rows: {ref:.0f} rows/s")
print(f"ratio ingest / raw INSERT: {rate / ref:.2f}")
PY
psql -Atq "$base/$db" -c "SELECT 'stored touchpoints: ' || count(*) FROM touchpoints; SELECT 'outbox events: ' || count(*) FROM outbox"
