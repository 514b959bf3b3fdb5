#!/usr/bin/env bash
# API benchmark: calls/s of GetCustomer, CreateCustomer and
# grpc.health.v1.Health/Check through the real gRPC server at 64 concurrent
# streams (h2load), on SQLite (`clm up`) and on PostgreSQL (`clm serve`),
# next to references measured in the same run on the same machine:
# PostgreSQL's own `pgbench -S` and a single-row-insert pgbench script
# (64 clients each), and a bare tonic server answering Health/Check from
# memory (`bench_api bare-server`). Prints every figure and the ratios
# against the targets of issue 6. Absolute numbers on a shared 2-core
# machine mean little; the ratios are the point.
#
#   scripts/bench-api.sh                       # 5 s per measurement
#   DURATION=10 STREAMS=64 CONNECTIONS=8 scripts/bench-api.sh
#   SKIP_BUILD=1 scripts/bench-api.sh          # reuse target/release
#
# Needs PostgreSQL (CLM_BENCH_DATABASE_URL, default the local test server);
# creates scratch databases and drops them afterwards. Installs h2load
# (nghttp2-client) and pgbench (postgresql-client) with apt-get if missing.
# Traffic goes to 127.0.0.1 only; every server it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-5}"
STREAMS="${STREAMS:-64}"
CONNECTIONS="${CONNECTIONS:-8}"
ADMIN_URL="${CLM_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET_DIR/release"
base="${ADMIN_URL%/*}"
api_db="clm_bench_api_$$"
pgb_db="clm_bench_pgb_$$"
per_conn=$(( (STREAMS + CONNECTIONS - 1) / CONNECTIONS ))

need() {
  local tool="$1" package="$2"
  command -v "$tool" >/dev/null && return 0
  echo "installing $package (for $tool)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
}
need h2load nghttp2-client
need pgbench postgresql-client
need psql postgresql-client
need python3 python3

if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release -q -p clm -p clm-tests --features clm-tests/bench --bin clm --bin bench_api
fi

work="$(mktemp -d)"
pids=()
cleanup() {
  # SIGTERM: background jobs of a non-interactive shell may ignore SIGINT.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $api_db WITH (FORCE)" 2>/dev/null || true
  psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $pgb_db WITH (FORCE)" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: runs CMD in the background and sets $started to the
# address from its "<service> listening on ADDR" line (servers listen on
# port 0). Not called in $(...): the pid must reach the cleanup trap.
start() {
  local name="$1"; shift
  # Created before the job starts: the job's own redirect may come later.
  : >"$work/$name.out"
  RUST_LOG=warn "$@" >>"$work/$name.out" 2>"$work/$name.err" &
  pids+=("$!")
  local addr=""
  for _ in $(seq 1 300); do
    addr="$(sed -nE 's/^[a-z]+ +listening on ([0-9.]+:[0-9]+).*/\1/p' "$work/$name.out" | head -n1)"
    [ -n "$addr" ] && break
    kill -0 "$!" 2>/dev/null || { cat "$work/$name.err" >&2; echo "$name exited" >&2; exit 1; }
    sleep 0.1
  done
  [ -n "$addr" ] || { echo "$name printed no address" >&2; exit 1; }
  started="$addr"
}

# rate LABEL ADDR PATH BODY MIN_BYTES: calls/s of one rpc under h2load, after
# checking every call succeeded and answered at least MIN_BYTES of message
# (a gRPC error is HTTP 200 with an empty body, so bytes tell them apart).
rate() {
  local label="$1" addr="$2" path="$3" body="$4" min_bytes="$5"
  local out="$work/h2load-$label.txt"
  h2load -D "$DURATION" --warm-up-time 1 -c "$CONNECTIONS" -m "$per_conn" -t 1 \
    -H 'content-type: application/grpc' -H 'te: trailers' -d "$body" \
    "http://$addr$path" >"$out" 2>&1 || { cat "$out" >&2; exit 1; }
  python3 - "$out" "$label" "$min_bytes" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
label, min_bytes = sys.argv[2], int(sys.argv[3])
rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text).group(1))
req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", text)
done, ok = int(req.group(3)), int(req.group(4))
data = int(re.search(r"\((\d+)\) data", text).group(1))
if ok == 0 or ok < done or data / ok < min_bytes:
    sys.stderr.write(text)
    sys.exit(f"{label}: {done} calls, {ok} succeeded, {data / max(ok, 1):.0f} bytes per answer (expected >= {min_bytes}): calls failed")
with open(sys.argv[1] + ".ok", "w") as f:
    f.write(str(ok))
print(f"{rps:.0f}")
PY
}

# pgbench_tps ARGS...: transactions/s of a pgbench run on the scratch database.
pgbench_tps() {
  pgbench -n -c "$STREAMS" -j 2 -T "$DURATION" "$@" "$base/$pgb_db" 2>&1 \
    | sed -nE 's/^tps = ([0-9.]+) .*/\1/p' | head -n1 | cut -d. -f1
}

echo "bench-api: ${DURATION}s per figure, $STREAMS concurrent streams ($CONNECTIONS connections x $per_conn), $(nproc) cores, $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# References.
start bare "$BIN/bench_api" bare-server --listen 127.0.0.1:0
bare="$started"
python3 -c 'import sys; sys.stdout.buffer.write(b"\0\0\0\0\0")' >"$work/health.bin"
bare_health="$(rate bare-health "$bare" /grpc.health.v1.Health/Check "$work/health.bin" 2)"

psql -q "$ADMIN_URL" -c "CREATE DATABASE $pgb_db"
pgbench -i -q -s 1 "$base/$pgb_db" >/dev/null 2>&1
psql -q "$base/$pgb_db" -c "CREATE TABLE bench_insert (id bigserial PRIMARY KEY, display_name text NOT NULL, create_us bigint NOT NULL)"
echo "INSERT INTO bench_insert (display_name, create_us) VALUES ('Bench Writer', 1);" >"$work/insert.sql"
pg_select="$(pgbench_tps -S)"
pg_insert="$(pgbench_tps -f "$work/insert.sql")"

# SQLite: the embedded mode.
start sqlite "$BIN/clm" up --base-port 0 --data-dir "$work/sqlite"
sqlite_addr="$started"
"$BIN/bench_api" prepare --url "http://$sqlite_addr" --out "$work/sqlite-bodies" >/dev/null
sq_health="$(rate sqlite-health "$sqlite_addr" /grpc.health.v1.Health/Check "$work/sqlite-bodies/health.bin" 2)"
sq_get="$(rate sqlite-get "$sqlite_addr" /clm.customer.v1.CustomerService/GetCustomer "$work/sqlite-bodies/get.bin" 100)"
sq_create="$(rate sqlite-create "$sqlite_addr" /clm.customer.v1.CustomerService/CreateCustomer "$work/sqlite-bodies/create.bin" 50)"
sq_rows="$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("SELECT count(*) FROM customers WHERE display_name = ?", ("Bench Writer",)).fetchone()[0])' "$work/sqlite/customer.db")"

# PostgreSQL.
psql -q "$ADMIN_URL" -c "CREATE DATABASE $api_db"
start pg "$BIN/clm" serve customer --listen 127.0.0.1:0 --database-url "$base/$api_db" --data-dir "$work/pg"
pg_addr="$started"
"$BIN/bench_api" prepare --url "http://$pg_addr" --out "$work/pg-bodies" >/dev/null
pg_health="$(rate pg-health "$pg_addr" /grpc.health.v1.Health/Check "$work/pg-bodies/health.bin" 2)"
pg_get="$(rate pg-get "$pg_addr" /clm.customer.v1.CustomerService/GetCustomer "$work/pg-bodies/get.bin" 100)"
pg_create="$(rate pg-create "$pg_addr" /clm.customer.v1.CustomerService/CreateCustomer "$work/pg-bodies/create.bin" 50)"
pg_rows="$(psql -Atq "$base/$api_db" -c "SELECT count(*) FROM customers WHERE display_name = 'Bench Writer'")"

# Every successful CreateCustomer (warm-up included) must have stored a row.
for pair in "sqlite:$sq_rows" "pg:$pg_rows"; do
  rows="${pair#*:}"
  ok="$(cat "$work/h2load-${pair%%:*}-create.txt.ok")"
  [ "$rows" -ge "$ok" ] || { echo "${pair%%:*}: $ok creates answered but only $rows rows stored" >&2; exit 1; }
done

python3 - "$bare_health" "$pg_select" "$pg_insert" "$sq_health" "$sq_get" "$sq_create" "$pg_health" "$pg_get" "$pg_create" <<'PY'
import sys
bare, pg_select, pg_insert, sq_health, sq_get, sq_create, pg_health, pg_get, pg_create = map(float, sys.argv[1:])
rows = [
    ("bare tonic Health/Check (from memory)", bare),
    ("pgbench -S (select by key)", pg_select),
    ("pgbench single-row INSERT", pg_insert),
    ("SQLite  Health/Check", sq_health),
    ("SQLite  GetCustomer", sq_get),
    ("SQLite  CreateCustomer", sq_create),
    ("PostgreSQL Health/Check", pg_health),
    ("PostgreSQL GetCustomer", pg_get),
    ("PostgreSQL CreateCustomer", pg_create),
]
print()
for name, v in rows:
    print(f"  {name:<40} {v:>10,.0f} /s")
print()
ratios = [
    ("GetCustomer PG / pgbench -S", pg_get, pg_select, 0.5),
    ("CreateCustomer PG / pgbench insert", pg_create, pg_insert, 0.25),
    ("GetCustomer SQLite / its Health/Check", sq_get, sq_health, 0.3),
    ("Health/Check (SQLite server) / bare tonic", sq_health, bare, 0.7),
    ("Health/Check (PG server) / bare tonic", pg_health, bare, 0.7),
]
for name, a, b, target in ratios:
    r = a / b if b else 0.0
    verdict = "met" if r >= target else "MISSED"
    print(f"  {name:<44} {r:5.2f}  (target >= {target:.2f}: {verdict})")
PY
