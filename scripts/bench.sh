#!/usr/bin/env bash
# The one benchmark command: every hot-path figure of CLM beside a reference
# measured in the same run on the same machine, the ratio and its goal.
# docs/benchmarks.md explains the method and how to read the table.
#
#   scripts/bench.sh                          # everything (~10 min)
#   scripts/bench.sh --quick                  # shorter runs, no backfill/loyalty/import
#   scripts/bench.sh --only api,ingest        # parts: api segmentation journey ingest scoring backfill loyalty import
#   scripts/bench.sh --json after.json --compare before.json
#   scripts/bench.sh --skip-build             # reuse $CARGO_TARGET_DIR/release
#
# Method: release build; the server under test (and the bare tonic
# reference) pinned to core 0 (`taskset -c 0`), every load generator on core
# 1: h2load with 64 connections x 1 stream after a warm-up, pgbench
# `-M prepared -c 64 -j 1` as PostgreSQL's references. Before any load each
# request body is sent once and must answer grpc-status 0, so a rate is
# never a rate of errors. Needs PostgreSQL (BENCH_DATABASE_URL, default the
# local test server; scratch databases are created and dropped), Redis
# (redis-server, started on a free port), h2load and pgbench (installed with
# apt-get if missing), curl and python3 (the import part's Python reference
# installs grpcio-tools into tests/clients/python/.venv). Every process it
# starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=10
EVENTS=200000
SEG_EVENTS=20000
SAMPLES=200
CUSTOMERS=1000000
TOUCHES=10
IMPORT_ROWS=200000
JOURNEYS=100
PARTS="api,segmentation,journey,ingest,scoring,backfill,loyalty,import"
JSON_OUT=""
COMPARE=""
SKIP_BUILD="${SKIP_BUILD:-}"
usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) DURATION=4; EVENTS=50000; SEG_EVENTS=10000; SAMPLES=100; JOURNEYS=20; PARTS="api,segmentation,journey,ingest" ;;
    --only) PARTS="$2"; shift ;;
    --duration) DURATION="$2"; shift ;;
    --events) EVENTS="$2"; shift ;;
    --import-rows) IMPORT_ROWS="$2"; shift ;;
    --json) JSON_OUT="$2"; shift ;;
    --compare) COMPARE="$2"; shift ;;
    --skip-build) SKIP_BUILD=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option $1" >&2; usage >&2; exit 64 ;;
  esac
  shift
done
part() { case ",$PARTS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
[ -z "$COMPARE" ] || [ -r "$COMPARE" ] || { echo "cannot read $COMPARE" >&2; exit 64; }

ADMIN_URL="${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
base="${ADMIN_URL%/*}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET_DIR/release"
SERVER_CPU=(taskset -c 0)
LOAD_CPU=(taskset -c 1)
[ "$(nproc)" -ge 2 ] || { SERVER_CPU=(); LOAD_CPU=(); echo "warning: one core: nothing pinned" >&2; }

need() {
  local tool="$1" package="$2"
  command -v "$tool" >/dev/null && return 0
  echo "installing $package (for $tool)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
}
need h2load nghttp2-client
need pgbench postgresql-client
need psql postgresql-client
need redis-server redis-server
need curl curl
need python3 python3

if [ -z "$SKIP_BUILD" ]; then
  cargo build --release -q -p clm -p clm-tests -p clm-segmentation \
    --features clm-tests/bench,clm-segmentation/bench \
    --bin clm --bin bench_api --bin bench_ingest --bin bench_follow --bin bench_segmentation --bin bench_journey
fi

work="$(mktemp -d)"
rows="$work/rows.tsv"
: >"$rows"
pids=()
dbs=()
cleanup() {
  # SIGTERM: background jobs of a non-interactive shell may ignore SIGINT.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for db in "${dbs[@]}"; do
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# scratch_db NAME: creates a scratch database, dropped on exit; prints its URL.
scratch_db() {
  local db="clm_bench_${1}_$$"
  PGOPTIONS="-c client_min_messages=warning" psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
  echo "$db"
}

# start NAME CMD...: runs CMD in the background and waits for its
# "<service> listening on ADDR" lines (servers listen on port 0); sets
# $started to "service addr" lines. Not called in $(...): the pid must
# reach the cleanup trap.
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
  grep -q "listening on" "$work/$name.out" || { echo "$name printed no address" >&2; exit 1; }
  sleep 0.5
  started="$(sed -nE 's/^([a-z]+) +listening on ([0-9.]+:[0-9]+).*/\1 \2/p' "$work/$name.out")"
}
addr_of() { echo "$started" | awk -v s="$1" '$1 == s { print $2; exit }'; }

# stop_all: stops every server started so far (between parts, so the next
# part has the cores to itself).
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}

# check ADDR PATH BODY: one call with the body; it must answer grpc-status 0.
check() {
  local addr="$1" path="$2" body="$3" out
  out="$(curl -s --http2-prior-knowledge -D - -o /dev/null --max-time 10 \
    -H 'content-type: application/grpc' -H 'te: trailers' --data-binary "@$body" \
    "http://$addr$path" | tr -d '\r')"
  if ! grep -qi '^grpc-status: 0$' <<<"$out"; then
    echo "$path on $addr did not answer OK:" >&2
    echo "$out" >&2
    exit 1
  fi
}

# rate LABEL ADDR PATH BODY MIN_BYTES: calls/s of one rpc under h2load (64
# connections x 1 stream, warm-up first), after checking the body once;
# every call must succeed and answer at least MIN_BYTES of message.
rate() {
  local label="$1" addr="$2" path="$3" body="$4" min_bytes="$5"
  local out="$work/h2load-$label.txt"
  check "$addr" "$path" "$body"
  "${LOAD_CPU[@]}" h2load -D "$DURATION" --warm-up-time 2 -c 64 -m 1 -t 1 \
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
    sys.exit(f"{label}: {done} calls, {ok} succeeded, {data / max(ok, 1):.0f} bytes per answer (expected >= {min_bytes}): calls failed")
with open(sys.argv[1] + ".ok", "w") as f:
    f.write(str(ok))
print(f"{rps:.0f}")
PY
}

# pgbench_tps DB ARGS...: transactions/s of pgbench, prepared, 64 clients, on core 1.
pgbench_tps() {
  local db="$1"; shift
  "${LOAD_CPU[@]}" pgbench -n -M prepared -c 64 -j 1 -T "$DURATION" "$@" "$base/$db" 2>&1 \
    | sed -nE 's/^tps = ([0-9.]+) .*/\1/p' | head -n1 | cut -d. -f1
}

# row KEY FIGURE VALUE UNIT REFERENCE REF_VALUE GOAL: one line of the table.
# GOAL: "ratio>=0.8", "value<50" (e.g. a latency in ms), both joined by
# "&" ("ratio>=0.5&value>=20000"), or "-" (reported, no goal).
row() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$rows"; }

echo "bench: ${DURATION}s per rate, 64 connections x 1 stream, $(nproc) cores, parts $PARTS, $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"

# The RPC reference: a bare tonic server answering Health/Check from memory,
# measured at the start of each part that compares with it (not once per
# run): a shared 2-core host drifts, and one run saw the reference move
# 56,276 -> 81,394/s between two runs 80 minutes apart.
reference_rpc() {
  start bare "${SERVER_CPU[@]}" "$BIN/bench_api" bare-server --listen 127.0.0.1:0
  python3 -c 'import sys; sys.stdout.buffer.write(b"\0\0\0\0\0")' >"$work/health.bin"
  bare_rate="$(rate bare "$(addr_of bare)" /grpc.health.v1.Health/Check "$work/health.bin" 2)"
  stop_all
  echo "  reference: bare tonic Health/Check $bare_rate/s"
}

if part api; then
  reference_rpc
  pgb_db="$(scratch_db pgb)"; dbs+=("$pgb_db")
  pgbench -i -q -s 10 "$base/$pgb_db" >/dev/null 2>&1
  psql -q "$base/$pgb_db" -c "CREATE TABLE bench_insert (id bigserial PRIMARY KEY, display_name text NOT NULL, create_us bigint NOT NULL)"
  echo "INSERT INTO bench_insert (display_name, create_us) VALUES ('Bench Writer', 1);" >"$work/insert.sql"

  api_db="$(scratch_db api)"; dbs+=("$api_db")
  start pg "${SERVER_CPU[@]}" "$BIN/clm" serve customer --listen 127.0.0.1:0 --database-url "$base/$api_db" --data-dir "$work/pg"
  pg="$(addr_of customer)"
  "$BIN/bench_api" prepare --url "http://$pg" --out "$work/pg-bodies" >/dev/null
  pg_health="$(rate pg-health "$pg" /grpc.health.v1.Health/Check "$work/pg-bodies/health.bin" 2)"
  pg_get="$(rate pg-get "$pg" /clm.customer.v1.CustomerService/GetCustomer "$work/pg-bodies/get.bin" 100)"
  # Each PostgreSQL reference runs right before the figures it divides
  # (this host drifts within minutes), with CLM's server idle beside it.
  pg_select="$(pgbench_tps "$pgb_db" -S)"
  echo "  reference: pgbench -S $pg_select/s"
  # h2load sends one body: the row above reads one customer over and over.
  # The same 64 connections over 1,000 distinct customers (bench_api's own
  # tonic client on the load core), as pgbench -S reads random keys; before
  # the creates, whose report projection then runs on the server's core.
  pg_get_many="$("${LOAD_CPU[@]}" "$BIN/bench_api" get-load --url "http://$pg" --customers 1000 --seconds "$DURATION" | sed -nE 's/^get-load ([0-9]+)\/s$/\1/p')"
  [ -n "$pg_get_many" ] || { echo "get-load printed no rate" >&2; exit 1; }
  pg_insert="$(pgbench_tps "$pgb_db" -f "$work/insert.sql")"
  echo "  reference: pgbench one-row INSERT $pg_insert/s"
  pg_create="$(rate pg-create "$pg" /clm.customer.v1.CustomerService/CreateCustomer "$work/pg-bodies/create.bin" 50)"
  stop_all
  stored="$(psql -Atq "$base/$api_db" -c "SELECT count(*) FROM customers WHERE display_name = 'Bench Writer'")"
  answered="$(cat "$work/h2load-pg-create.txt.ok")"
  [ "$stored" -ge "$answered" ] || { echo "PostgreSQL: $answered creates answered but only $stored rows stored" >&2; exit 1; }

  start up "${SERVER_CPU[@]}" "$BIN/clm" up --base-port 0 --data-dir "$work/up"
  up="$(addr_of customer)"
  "$BIN/bench_api" prepare --url "http://$up" --out "$work/up-bodies" >/dev/null
  up_health="$(rate up-health "$up" /grpc.health.v1.Health/Check "$work/up-bodies/health.bin" 2)"
  up_get="$(rate up-get "$up" /clm.customer.v1.CustomerService/GetCustomer "$work/up-bodies/get.bin" 100)"
  up_create="$(rate up-create "$up" /clm.customer.v1.CustomerService/CreateCustomer "$work/up-bodies/create.bin" 50)"
  stop_all

  row health_pg "Health/Check, clm serve customer (PostgreSQL)" "$pg_health" "/s" "bare tonic Health/Check" "$bare_rate" "ratio>=0.8"
  row health_up "Health/Check, clm up (SQLite)" "$up_health" "/s" "bare tonic Health/Check" "$bare_rate" "ratio>=0.8"
  # The goal is judged on distinct customers: concurrent reads of one
  # customer share one row of a coalesced statement, which flatters h2load's.
  row get_pg "GetCustomer, one customer (h2load), PostgreSQL" "$pg_get" "/s" "pgbench -S -M prepared" "$pg_select" "-"
  row get_many_pg "GetCustomer, 1,000 distinct customers (bench_api get-load), PostgreSQL" "$pg_get_many" "/s" "pgbench -S -M prepared" "$pg_select" "ratio>=0.5"
  row create_pg "CreateCustomer, PostgreSQL" "$pg_create" "/s" "pgbench one-row INSERT, prepared" "$pg_insert" "ratio>=0.25"
  row get_up "GetCustomer, clm up (SQLite)" "$up_get" "/s" "bare tonic Health/Check" "$bare_rate" "-"
  row create_up "CreateCustomer, clm up (SQLite)" "$up_create" "/s" "bare tonic Health/Check" "$bare_rate" "-"
fi

if part segmentation; then
  reference_rpc
  start up "${SERVER_CPU[@]}" "$BIN/clm" up --base-port 0 --data-dir "$work/seg-up"
  cust="http://$(addr_of customer)"; seg="$(addr_of segmentation)"
  "$BIN/bench_segmentation" prepare --customer "$cust" --segmentation "http://$seg" --out "$work/seg-up-bodies" >/dev/null
  up_member="$(rate up-member "$seg" /clm.segmentation.v1.SegmentationService/IsMember "$work/seg-up-bodies/is_member.bin" 2)"
  up_segs="$(rate up-segs "$seg" /clm.segmentation.v1.SegmentationService/GetCustomerSegments "$work/seg-up-bodies/customer_segments.bin" 20)"
  up_latency="$("${LOAD_CPU[@]}" "$BIN/bench_segmentation" latency --customer "$cust" --segmentation "http://$seg" --samples "$SAMPLES")"
  up_incr="$("${LOAD_CPU[@]}" "$BIN/bench_segmentation" incremental --customer "$cust" --segmentation "http://$seg" --segments 300 --events "$SEG_EVENTS")"
  # The same latency while an ingest aims at 20,000 events/s (4 clients x
  # batches of 1,000 over 1,000 other customers), with the 300 segments.
  up_loaded="$("${LOAD_CPU[@]}" "$BIN/bench_segmentation" latency --customer "$cust" --segmentation "http://$seg" --samples "$((SAMPLES / 2))" --ingest-rate 20000)"
  stop_all

  redis_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  redis-server --port "$redis_port" --save "" --appendonly no >/dev/null &
  pids+=("$!")
  segc_db="$(scratch_db segc)"; segs_db="$(scratch_db segs)"; dbs+=("$segc_db" "$segs_db")
  start pgc "${SERVER_CPU[@]}" "$BIN/clm" serve customer --listen 127.0.0.1:0 --database-url "$base/$segc_db" --data-dir "$work/pgc"
  pg_cust="$(addr_of customer)"
  start pgs "${SERVER_CPU[@]}" "$BIN/clm" serve segmentation --listen 127.0.0.1:0 --database-url "$base/$segs_db" \
    --data-dir "$work/pgs" --peer "customer=http://$pg_cust" --redis-url "redis://127.0.0.1:$redis_port"
  pg_seg="$(addr_of segmentation)"
  "$BIN/bench_segmentation" prepare --customer "http://$pg_cust" --segmentation "http://$pg_seg" --out "$work/seg-pg-bodies" >/dev/null
  pg_member="$(rate pg-member "$pg_seg" /clm.segmentation.v1.SegmentationService/IsMember "$work/seg-pg-bodies/is_member.bin" 2)"
  pg_segs="$(rate pg-segs "$pg_seg" /clm.segmentation.v1.SegmentationService/GetCustomerSegments "$work/seg-pg-bodies/customer_segments.bin" 20)"
  pg_latency="$("${LOAD_CPU[@]}" "$BIN/bench_segmentation" latency --customer "http://$pg_cust" --segmentation "http://$pg_seg" --samples "$SAMPLES")"
  pg_incr="$("${LOAD_CPU[@]}" "$BIN/bench_segmentation" incremental --customer "http://$pg_cust" --segmentation "http://$pg_seg" --segments 300 --events "$SEG_EVENTS")"
  pg_loaded="$("${LOAD_CPU[@]}" "$BIN/bench_segmentation" latency --customer "http://$pg_cust" --segmentation "http://$pg_seg" --samples "$((SAMPLES / 2))" --ingest-rate 20000)"
  stop_all

  row ismember_up "IsMember from the cache, clm up" "$up_member" "/s" "bare tonic Health/Check" "$bare_rate" "ratio>=0.6"
  row ismember_pg "IsMember from the cache, PostgreSQL + Redis" "$pg_member" "/s" "bare tonic Health/Check" "$bare_rate" "ratio>=0.6"
  row segments_up "GetCustomerSegments, clm up" "$up_segs" "/s" "bare tonic Health/Check" "$bare_rate" "ratio>=0.6"
  row segments_pg "GetCustomerSegments, PostgreSQL + Redis" "$pg_segs" "/s" "bare tonic Health/Check" "$bare_rate" "ratio>=0.6"
  for pair in "up:clm up" "pg:PostgreSQL + Redis"; do
    key="${pair%%:*}"; name="${pair#*:}"
    incr_var="${key}_incr"; lat_var="${key}_latency"
    read -r evaluated alone <<<"$(sed -nE 's/.*: ([0-9]+) events\/s evaluated.*customer ingest alone ([0-9]+) events\/s.*/\1 \2/p' <<<"${!incr_var}")"
    row "seg_incremental_$key" "segmentation keeping up, 300 segments, $name" "$evaluated" "events/s" "customer ingest alone" "$alone" "ratio>=1.0"
    # The same run's second half, between a sentinel sent halfway through
    # the ingest and the last: the tail is in both ends of the window, so
    # this is the rate sustained (reported beside the goal's row, not
    # instead of it).
    read -r half_eval half_ingest <<<"$(sed -nE 's/^second half: ([0-9]+) events\/s evaluated.*\| ingest ([0-9]+) events\/s.*/\1 \2/p' <<<"${!incr_var}")"
    row "seg_sustained_$key" "segmentation, second half of that ingest (sustained), $name" "$half_eval" "events/s" "the ingest over the same events" "$half_ingest" "-"
    read -r p99 rtt <<<"$(sed -nE 's/.*IsMember p50 [0-9.]+ ms p99 ([0-9.]+) ms \| RecordTouchpoints p50 ([0-9.]+) ms.*/\1 \2/p' <<<"${!lat_var}")"
    row "seg_latency_p99_$key" "touchpoint -> IsMember reflects it, p99 (idle), $name" "$p99" "ms" "RecordTouchpoints p50" "$rtt" "value<50"
    loaded_var="${key}_loaded"
    loaded_p99="$(sed -nE 's/.*IsMember p50 [0-9.]+ ms p99 ([0-9.]+) ms \| RecordTouchpoints.*/\1/p' <<<"${!loaded_var}")"
    loaded_rate="$(sed -nE 's/^under load: ingest ([0-9]+) events\/s.*/\1/p' <<<"${!loaded_var}")"
    [ -n "$loaded_p99" ] && [ -n "$loaded_rate" ] || { echo "latency under load printed no figures: ${!loaded_var}" >&2; exit 1; }
    row "seg_latency_loaded_p99_$key" "touchpoint -> IsMember reflects it, p99, during an ingest, $name" "$loaded_p99" "ms" "the same, idle" "$p99" "value<50"
    row "seg_latency_loaded_ingest_$key" "the ingest during those samples (aim: 20,000 events/s), $name" "$loaded_rate" "events/s" "its aim" "20000" "ratio>=1.0"
  done
fi

if part journey; then
  # Journey 2's freshness: an NPS 3 answer -> feedback's event -> scoring's
  # award -> scoring's event -> segmentation's membership, until IsMember
  # answers true; on `clm up`, one customer at a time.
  start up "${SERVER_CPU[@]}" "$BIN/clm" up --base-port 0 --data-dir "$work/journey-up"
  journey="$("${LOAD_CPU[@]}" "$BIN/bench_journey" --customer "http://$(addr_of customer)" --scoring "http://$(addr_of scoring)" \
    --segmentation "http://$(addr_of segmentation)" --feedback "http://$(addr_of feedback)" --samples "$JOURNEYS")"
  stop_all
  echo "  $journey"
  read -r j_p50 j_p99 j_submit <<<"$(sed -nE 's/.*p50 ([0-9.]+) ms p99 ([0-9.]+) ms max [0-9.]+ ms \| SubmitResponse p50 ([0-9.]+) ms.*/\1 \2 \3/p' <<<"$journey")"
  [ -n "$j_p99" ] || { echo "bench_journey printed no figures" >&2; exit 1; }
  row journey_freshness_p50_up "journey 2: NPS answer -> in the at-risk segment, p50, clm up" "$j_p50" "ms" "SubmitResponse p50" "$j_submit" "-"
  row journey_freshness_p99_up "journey 2: NPS answer -> in the at-risk segment, p99, clm up" "$j_p99" "ms" "SubmitResponse p50" "$j_submit" "value<1000"
fi

if part ingest; then
  ing_db="$(scratch_db ing)"; fol_db="$(scratch_db fol)"; dbs+=("$ing_db" "$fol_db")
  start ing "${SERVER_CPU[@]}" "$BIN/clm" serve customer --listen 127.0.0.1:0 --database-url "$base/$ing_db" --data-dir "$work/ing"
  ing="$(addr_of customer)"
  "${LOAD_CPU[@]}" "$BIN/bench_follow" --source "http://$ing" --database-url "$base/$fol_db" --events "$EVENTS" >"$work/follow.txt" 2>"$work/follow.err" &
  follow_pid=$!
  pids+=("$follow_pid")
  "${LOAD_CPU[@]}" "$BIN/bench_ingest" --url "http://$ing" --events "$EVENTS" --batch 1000 --concurrency 4 >"$work/ingest.txt"
  wait "$follow_pid" || { cat "$work/follow.err" >&2; echo "the follower failed" >&2; exit 1; }
  stop_all
  ingest_rate="$(sed -nE 's/.*: ([0-9]+) events\/s.*/\1/p' "$work/ingest.txt")"
  follow_rate="$(sed -nE 's/.*: ([0-9]+) events\/s applied.*/\1/p' "$work/follow.txt")"
  stored="$(psql -Atq "$base/$ing_db" -c "SELECT count(*) FROM touchpoints")"
  [ "$stored" -ge "$EVENTS" ] || { echo "ingest: only $stored of $EVENTS touchpoints stored" >&2; exit 1; }
  # The reference: PostgreSQL inserting the same rows into a table with the
  # same indexes in one set-based statement.
  ref_ms="$(psql -Atq "$base/$ing_db" <<'SQL' | tail -n1
CREATE TABLE touchpoints_ref (LIKE touchpoints INCLUDING ALL);
SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint \gset t0_
INSERT INTO touchpoints_ref SELECT * FROM touchpoints;
SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint - :t0_int8;
SQL
)"
  raw=$(( stored * 1000 / (ref_ms > 0 ? ref_ms : 1) ))
  row ingest_pg "RecordTouchpoints, 4 clients x batches of 1,000, PostgreSQL" "$ingest_rate" "events/s" "raw set-based INSERT of the same rows" "$raw" "ratio>=0.5&value>=20000"
  row follow_pg "a consumer following that ingest (platform subscriber)" "$follow_rate" "events/s" "the ingest" "$ingest_rate" "-"
fi

if part scoring; then
  # Scoring following the customer stream while RecordTouchpoints ingests
  # (4 clients x batches of 1,000 over 1,000 customers), then scoring
  # catching up alone on a stream that already holds every touchpoint:
  # the scoring service's benchmark tests (customer and scoring in one
  # process, 2 worker threads, each on its own PostgreSQL database).
  export CLM_TEST_DATABASE_URL="$ADMIN_URL"
  export CLM_TEST_TEMPLATE_KEY="bench$(find services/scoring services/customer crates/clm-platform -path '*/migration*' -name '*.rs' -print0 | sort -z | xargs -0 cat | sha256sum | cut -c1-8)"
  BENCH_EVENTS="$EVENTS" cargo test --release -q -p clm-scoring --features bench --test bench -- --ignored --nocapture --test-threads 1 \
    bench_follow_the_customer_stream bench_catch_up_with_the_customer_stream >"$work/scoring.txt" 2>&1 \
    || { cat "$work/scoring.txt" >&2; exit 1; }
  read -r follow_scored follow_ingest <<<"$(sed -nE 's/^follow: .* end to end ([0-9]+)\/s .*reference customer ingest beside it ([0-9]+)\/s.*/\1 \2/p' "$work/scoring.txt")"
  read -r catch_scored catch_ingest <<<"$(sed -nE 's/^catch up: .*ledger entries\) ([0-9]+)\/s .*reference customer ingest alone ([0-9]+)\/s.*/\1 \2/p' "$work/scoring.txt")"
  [ -n "$follow_scored" ] && [ -n "$catch_scored" ] || { cat "$work/scoring.txt" >&2; echo "scoring: no figures" >&2; exit 1; }
  row scoring_follow_pg "scoring RecordTouchpoints as they arrive, end to end, PostgreSQL" "$follow_scored" "events/s" "the ingest beside it" "$follow_ingest" "value>=20000"
  row scoring_catch_up_pg "scoring catching up on the customer stream, PostgreSQL" "$catch_scored" "events/s" "customer ingest alone" "$catch_ingest" "ratio>=1.0"
fi

if part backfill; then
  fill_db="$(scratch_db fill)"; dbs+=("$fill_db")
  fill="$("$BIN/bench_segmentation" backfill --database-url "$base/$fill_db" --customers "$CUSTOMERS" --touchpoints-per-customer "$TOUCHES")"
  read -r rule_s scan_s <<<"$(sed -nE 's/.*rule query ([0-9.]+) s .*full scan of touchpoints ([0-9.]+) s.*/\1 \2/p' <<<"$fill")"
  # Seconds: lower is better, so the figure is the reference's time over the rule's.
  row backfill_pg "segment backfill, 3 conditions, $CUSTOMERS customers x $TOUCHES touchpoints (s)" "$rule_s" "s" "full scan of the touchpoints (s)" "$scan_s" "-"
fi

if part loyalty; then
  export CLM_TEST_DATABASE_URL="$ADMIN_URL"
  export CLM_TEST_TEMPLATE_KEY="bench$(find services/loyalty crates/clm-platform -path '*/migration*' -name '*.rs' -print0 | sort -z | xargs -0 cat | sha256sum | cut -c1-8)"
  cargo test --release -q -p clm-loyalty --features bench --test bench -- --ignored --nocapture --test-threads 1 >"$work/loyalty.txt" 2>&1 \
    || { cat "$work/loyalty.txt" >&2; exit 1; }
  line="$(grep '"bench":"loyalty.redeem"' "$work/loyalty.txt" | tail -n1)"
  read -r redeem tps <<<"$(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print(j["redemptions_per_s"], j["pgbench_tps"])' "$line")"
  row loyalty_redeem_pg "RedeemReward, 64 streams, PostgreSQL" "$redeem" "/s" "pgbench -M prepared, same row changes" "$tps" "-"
fi

if part import; then
  # `clm import customers` beside the reference: the same file sent as the
  # same batches (1,000 rows, 4 in flight, a request id per batch) by the
  # Python client (grpcio stubs generated from proto/), each into a fresh
  # `clm serve customer` on its own PostgreSQL database.
  py="tests/clients/python"
  [ -x "$py/.venv/bin/python" ] || python3 -m venv "$py/.venv"
  "$py/.venv/bin/pip" install --quiet --disable-pip-version-check -r "$py/requirements.txt"
  mkdir -p "$work/gen"
  # shellcheck disable=SC2046
  "$py/.venv/bin/python" -m grpc_tools.protoc -I proto --python_out="$work/gen" \
    --grpc_python_out="$work/gen" $(find proto -name '*.proto')
  "$py/.venv/bin/python" - "$work/customers.csv" "$IMPORT_ROWS" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    f.write("email,display_name,birth_date,attributes.plan\n")
    for i in range(1, int(sys.argv[2]) + 1):
        f.write(f"bench-{i}@example.com,Customer {i},19{50 + i % 50}-{i % 12 + 1:02d}-{i % 28 + 1:02d},{'pro' if i % 3 else 'free'}\n")
PY
  imp_py_db="$(scratch_db imppy)"; imp_clm_db="$(scratch_db impclm)"; dbs+=("$imp_py_db" "$imp_clm_db")
  start imppy "${SERVER_CPU[@]}" "$BIN/clm" serve customer --listen 127.0.0.1:0 --database-url "$base/$imp_py_db" --data-dir "$work/imppy"
  PYTHONPATH="$work/gen" "${LOAD_CPU[@]}" "$py/.venv/bin/python" scripts/bench_import_python.py \
    "$work/customers.csv" "$(addr_of customer)" 1000 4 >"$work/import-python.txt"
  stop_all
  start impclm "${SERVER_CPU[@]}" "$BIN/clm" serve customer --listen 127.0.0.1:0 --database-url "$base/$imp_clm_db" --data-dir "$work/impclm"
  "${LOAD_CPU[@]}" "$BIN/clm" import customers "$work/customers.csv" --customer-url "http://$(addr_of customer)" \
    --batch-size 1000 --concurrency 4 >"$work/import-clm.txt" 2>/dev/null
  stop_all
  python_rate="$(sed -nE 's/.*: ([0-9]+) rows\/s$/\1/p' "$work/import-python.txt")"
  clm_rate="$(sed -nE 's/.*\(([0-9]+) rows\/s\)$/\1/p' "$work/import-clm.txt")"
  for db in "$imp_py_db" "$imp_clm_db"; do
    stored="$(psql -Atq "$base/$db" -c "SELECT count(*) FROM customers")"
    [ "$stored" -eq "$IMPORT_ROWS" ] || { echo "import: $stored of $IMPORT_ROWS customers stored in $db" >&2; exit 1; }
  done
  row import_pg "clm import customers, $IMPORT_ROWS rows, batches of 1,000, PostgreSQL (rows/s)" "$clm_rate" "rows/s" "the same batches from the Python client" "$python_rate" "-"
fi

load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$rows" "$JSON_OUT" "$COMPARE" "$DURATION" "$PARTS" "$load_before" "$load_after" "$(git rev-parse HEAD 2>/dev/null || echo unknown)" <<'PY'
import datetime, json, os, platform, re, sys
rows_file, json_out, compare, duration, parts, load_before, load_after, commit = sys.argv[1:]

def met(value, ratio, goal):
    if goal == "-":
        return None
    ok = True
    for g in goal.split("&"):
        m = re.fullmatch(r"(ratio|value)(>=|<=|<|>)([0-9.]+)", g)
        subject, op, want = {"ratio": ratio, "value": value}[m.group(1)], m.group(2), float(m.group(3))
        ok &= {">=": subject >= want, "<=": subject <= want, "<": subject < want, ">": subject > want}[op]
    return ok

rows = []
for line in open(rows_file):
    key, figure, value, unit, ref, ref_value, goal = line.rstrip("\n").split("\t")
    value, ref_value = float(value or 0), float(ref_value or 0)
    ratio = value / ref_value if ref_value else 0.0
    rows.append(dict(key=key, figure=figure, value=value, unit=unit, reference=ref,
                     reference_value=ref_value, ratio=round(ratio, 3), goal=goal,
                     met=met(value, ratio, goal)))

def num(v):
    return f"{v:,.2f}" if v < 100 else f"{v:,.0f}"

print()
print(f"{'figure':<66} {'value':>15} {'reference':>12} {'ratio':>6}  {'goal':<24} met")
for r in rows:
    verdict = {None: "", True: "yes", False: "NO"}[r["met"]]
    print(f"{r['figure']:<66} {num(r['value']):>9} {r['unit']:<8} {num(r['reference_value']):>9} {r['ratio']:>6.2f}  {r['goal']:<24} {verdict}")
    print(f"{'  reference: ' + r['reference']:<66}")
print(f"\nload average before {load_before}, after {load_after}")

run = dict(commit=commit, time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           machine=dict(cores=os.cpu_count(), cpu=next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor()),
                        kernel=platform.release()),
           duration_s=int(duration), parts=parts.split(","), load_before=load_before, load_after=load_after, rows=rows)
if json_out:
    with open(json_out, "w") as f:
        json.dump(run, f, indent=2)
    print(f"wrote {json_out}")
if compare:
    before = {r["key"]: r for r in json.load(open(compare))["rows"]}
    print(f"\nchange against {compare}:")
    print(f"{'figure':<66} {'before':>10} {'after':>10} {'change':>8}   {'ratio before -> after'}")
    for r in rows:
        b = before.get(r["key"])
        if not b:
            print(f"{r['figure']:<66} {'-':>10} {num(r['value']):>10}")
            continue
        change = (r["value"] / b["value"] - 1) * 100 if b["value"] else 0.0
        print(f"{r['figure']:<66} {num(b['value']):>10} {num(r['value']):>10} {change:>+7.0f}%   {b['ratio']:.2f} -> {r['ratio']:.2f}")
PY
