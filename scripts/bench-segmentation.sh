#!/usr/bin/env bash
# Segmentation benchmark (issue 10), every figure beside a reference
# measured in the same run on the same machine:
#
# * IsMember and GetCustomerSegments at 64 concurrent streams (h2load), from
#   the cache, on `clm up` (SQLite + in-process cache) and on PostgreSQL +
#   Redis (`clm serve`), against a bare tonic server answering
#   Health/Check from memory (`bench_api bare-server`).
# * A touchpoint recorded in the customer service until IsMember reflects
#   it: p50 / p99, beside one IsMember and one RecordTouchpoints call.
# * Incremental evaluation with 300 segments: events/s, beside the customer
#   service's ingest rate alone.
# * Backfill of a 3-condition rule (one a 30-day window) on PostgreSQL over
#   CUSTOMERS customers x TOUCHES touchpoints each, beside a full scan.
#
#   scripts/bench-segmentation.sh
#   DURATION=10 CUSTOMERS=1000000 TOUCHES=10 scripts/bench-segmentation.sh
#   SKIP_BUILD=1 scripts/bench-segmentation.sh   # reuse target/release
#
# Needs PostgreSQL (CLM_BENCH_DATABASE_URL, default the local test server)
# and redis-server; creates scratch databases and drops them afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-5}"
STREAMS="${STREAMS:-64}"
CONNECTIONS="${CONNECTIONS:-8}"
SEGMENTS="${SEGMENTS:-300}"
EVENTS="${EVENTS:-20000}"
SAMPLES="${SAMPLES:-200}"
CUSTOMERS="${CUSTOMERS:-1000000}"
TOUCHES="${TOUCHES:-10}"
ADMIN_URL="${CLM_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET_DIR/${PROFILE:-release}"
base="${ADMIN_URL%/*}"
cust_db="clm_bench_segc_$$"
seg_db="clm_bench_segs_$$"
fill_db="clm_bench_segf_$$"
per_conn=$(( (STREAMS + CONNECTIONS - 1) / CONNECTIONS ))

for tool in h2load psql python3 redis-server; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release -q -p clm -p clm-tests -p clm-segmentation \
    --features clm-tests/bench,clm-segmentation/bench --bin clm --bin bench_api --bin bench_segmentation
fi

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for db in "$cust_db" "$seg_db" "$fill_db"; do
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: runs CMD in the background; sets $started to the
# addresses it prints ("<service> listening on ADDR"), one per line.
start() {
  local name="$1"; shift
  : >"$work/$name.out"
  RUST_LOG=warn "$@" >>"$work/$name.out" 2>"$work/$name.err" &
  pids+=("$!")
  for _ in $(seq 1 300); do
    grep -q "listening on" "$work/$name.out" && break
    kill -0 "$!" 2>/dev/null || { cat "$work/$name.err" >&2; echo "$name exited" >&2; exit 1; }
    sleep 0.1
  done
  sleep 0.5
  started="$(sed -nE 's/^([a-z]+) +listening on ([0-9.]+:[0-9]+).*/\1 \2/p' "$work/$name.out")"
}
addr_of() { echo "$started" | awk -v s="$1" '$1 == s { print $2 }'; }

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
req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded", text)
done, ok = int(req.group(3)), int(req.group(4))
data = int(re.search(r"\((\d+)\) data", text).group(1))
if ok == 0 or ok < done or data / ok < min_bytes:
    sys.stderr.write(text)
    sys.exit(f"{label}: {done} calls, {ok} succeeded, {data / max(ok, 1):.0f} bytes per answer: calls failed")
print(f"{rps:.0f}")
PY
}

echo "bench-segmentation: ${DURATION}s per rate, $STREAMS streams, $(nproc) cores, $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

start bare "$BIN/bench_api" bare-server --listen 127.0.0.1:0
bare="$(sed -nE 's/^bare listening on ([0-9.]+:[0-9]+).*/\1/p' "$work/bare.out")"
python3 -c 'import sys; sys.stdout.buffer.write(b"\0\0\0\0\0")' >"$work/health.bin"
bare_rate="$(rate bare "$bare" /grpc.health.v1.Health/Check "$work/health.bin" 2)"

# clm up: SQLite + in-process cache.
start up "$BIN/clm" up --base-port 0 --data-dir "$work/up"
cust="http://$(addr_of customer)"; seg="http://$(addr_of segmentation)"
"$BIN/bench_segmentation" prepare --customer "$cust" --segmentation "$seg" --out "$work/up-bodies" >/dev/null
up_member="$(rate up-member "$(addr_of segmentation)" /clm.segmentation.v1.SegmentationService/IsMember "$work/up-bodies/is_member.bin" 2)"
up_segs="$(rate up-segs "$(addr_of segmentation)" /clm.segmentation.v1.SegmentationService/GetCustomerSegments "$work/up-bodies/customer_segments.bin" 20)"
up_latency="$("$BIN/bench_segmentation" latency --customer "$cust" --segmentation "$seg" --samples "$SAMPLES")"
up_incr="$("$BIN/bench_segmentation" incremental --customer "$cust" --segmentation "$seg" --segments "$SEGMENTS" --events "$EVENTS")"

# PostgreSQL + Redis.
redis_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
redis-server --port "$redis_port" --save "" --appendonly no >/dev/null &
pids+=("$!")
psql -q "$ADMIN_URL" -c "CREATE DATABASE $cust_db" -c "CREATE DATABASE $seg_db" -c "CREATE DATABASE $fill_db"
start pgc "$BIN/clm" serve customer --listen 127.0.0.1:0 --database-url "$base/$cust_db" --data-dir "$work/pgc"
pg_cust="$(addr_of customer)"
start pgs "$BIN/clm" serve segmentation --listen 127.0.0.1:0 --database-url "$base/$seg_db" \
  --data-dir "$work/pgs" --peer "customer=http://$pg_cust" --redis-url "redis://127.0.0.1:$redis_port"
pg_seg="$(addr_of segmentation)"
"$BIN/bench_segmentation" prepare --customer "http://$pg_cust" --segmentation "http://$pg_seg" --out "$work/pg-bodies" >/dev/null
pg_member="$(rate pg-member "$pg_seg" /clm.segmentation.v1.SegmentationService/IsMember "$work/pg-bodies/is_member.bin" 2)"
pg_segs="$(rate pg-segs "$pg_seg" /clm.segmentation.v1.SegmentationService/GetCustomerSegments "$work/pg-bodies/customer_segments.bin" 20)"
pg_latency="$("$BIN/bench_segmentation" latency --customer "http://$pg_cust" --segmentation "http://$pg_seg" --samples "$SAMPLES")"
pg_incr="$("$BIN/bench_segmentation" incremental --customer "http://$pg_cust" --segmentation "http://$pg_seg" --segments "$SEGMENTS" --events "$EVENTS")"
pg_fill="$("$BIN/bench_segmentation" backfill --database-url "$base/$fill_db" --customers "$CUSTOMERS" --touchpoints-per-customer "$TOUCHES")"

python3 - "$bare_rate" "$up_member" "$up_segs" "$pg_member" "$pg_segs" <<'PY'
import sys
bare, up_m, up_s, pg_m, pg_s = map(float, sys.argv[1:])
print()
print(f"  {'bare tonic Health/Check (from memory)':<44} {bare:>10,.0f} /s")
for name, v in [("clm up IsMember", up_m), ("clm up GetCustomerSegments", up_s),
                ("PostgreSQL+Redis IsMember", pg_m), ("PostgreSQL+Redis GetCustomerSegments", pg_s)]:
    print(f"  {name:<44} {v:>10,.0f} /s   ratio to bare {v / bare:5.2f} (aim >= 0.60)")
PY
echo
echo "  clm up:            $up_latency"
echo "  PostgreSQL+Redis:  $pg_latency"
echo "  clm up:            $up_incr"
echo "  PostgreSQL+Redis:  $pg_incr"
echo "  PostgreSQL:        $pg_fill"
