#!/usr/bin/env bash
# KPI report benchmark: seeds PostgreSQL with a realistic data set
# (scripts/seed-kpi.sql, set-based: 1,000,000 customers with stage
# histories, 10,000,000 touchpoints with purchases and campaign touches,
# 200 campaigns with monthly spend), starts a customer service on it and
# times every report rpc beside a same-run reference (a bare
# `SELECT count(*) FROM touchpoints`) with the ratio (tests/src/bin/bench_kpi.rs).
#
#   scripts/seed-kpi.sh                         # 1,000,000 customers
#   CUSTOMERS=100000 scripts/seed-kpi.sh        # smaller
#   KEEP_DB=1 KPI_DB=clm_kpi scripts/seed-kpi.sh        # keep the database
#   SKIP_SEED=1 KPI_DB=clm_kpi scripts/seed-kpi.sh      # re-time a kept one (never dropped)
#
# Needs PostgreSQL (CLM_BENCH_DATABASE_URL, default the local test server).
# Builds optimised binaries (PROFILE=debug for a quicker build; the targets
# are about the release build).
set -euo pipefail
cd "$(dirname "$0")/.."
CUSTOMERS="${CUSTOMERS:-1000000}"
TOUCHPOINTS_PER_CUSTOMER="${TOUCHPOINTS_PER_CUSTOMER:-10}"
CAMPAIGNS="${CAMPAIGNS:-200}"
RUNS="${RUNS:-3}"
PROFILE="${PROFILE:-release}"
ADMIN_URL="${CLM_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
db="${KPI_DB:-clm_kpi_$$}"
base="${ADMIN_URL%/*}"
target="${CARGO_TARGET_DIR:-target}/$PROFILE"

if [ -z "${SKIP_BUILD:-}" ]; then
  flags=()
  [ "$PROFILE" = release ] && flags=(--release)
  cargo build -q "${flags[@]}" -p clm-customer -p clm-tests --features clm-tests/bench --bin clm-customer --bin bench_kpi
fi
if [ -z "${SKIP_SEED:-}" ]; then
  psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
  psql -q "$ADMIN_URL" -c "CREATE DATABASE $db"
fi
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
data="$(mktemp -d)"
# The service migrates the database when it starts.
RUST_LOG=warn "$target/clm-customer" --listen "127.0.0.1:$port" --database-url "$base/$db" --data-dir "$data" &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  # A re-timed database (SKIP_SEED) was not made here: it is never dropped.
  [ -n "${KEEP_DB:-}${SKIP_SEED:-}" ] || psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  rm -rf "$data"
}
trap cleanup EXIT
for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
# ... and has finished its migrations (the last one makes the touchpoint
# rollups; on a kept database it backfills them, which takes a while).
for _ in $(seq 1 3000); do
  [ "$(psql -Atq "$base/$db" -c "SELECT count(*) FROM seaql_migrations WHERE version = 'm0008_touchpoint_rollups'" 2>/dev/null)" = 1 ] && break
  sleep 0.2
done

if [ -z "${SKIP_SEED:-}" ]; then
  echo "[seed] $CUSTOMERS customers x $TOUCHPOINTS_PER_CUSTOMER touchpoints, $CAMPAIGNS campaigns into $db"
  start=$(date +%s)
  psql -q "$base/$db" -v customers="$CUSTOMERS" -v touchpoints_per_customer="$TOUCHPOINTS_PER_CUSTOMER" \
    -v campaigns="$CAMPAIGNS" -f scripts/seed-kpi.sql
  echo "[seed] done in $(( $(date +%s) - start )) s"
fi
"$target/bench_kpi" --url "http://127.0.0.1:$port" --database-url "$base/$db" --runs "$RUNS"
