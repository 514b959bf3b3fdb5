#!/usr/bin/env bash
# `clm import customers` on ROWS customers (default 1,000,000) beside the
# reference: the same file sent as the same batches (BATCH rows,
# CONCURRENCY in flight) by the Python client (grpcio). Each side gets a
# fresh `clm serve customer` on SQLite (or, with DATABASE_URL set, on a
# fresh PostgreSQL database each), so both start from an empty table.
# Prints both rates and the ratio clm / Python.
# Usage: scripts/bench-import.sh [path/to/clm]   (default: release build)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
clm="${1:-${CARGO_TARGET_DIR:-$root/target}/release/clm}"
ROWS="${ROWS:-1000000}"
BATCH="${BATCH:-1000}"
CONCURRENCY="${CONCURRENCY:-4}"
[ -x "$clm" ] || { echo "no clm binary at $clm (cargo build --release -p clm)"; exit 1; }

py="$root/tests/clients/python"
[ -x "$py/.venv/bin/python" ] || python3 -m venv "$py/.venv"
"$py/.venv/bin/pip" install --quiet --disable-pip-version-check -r "$py/requirements.txt"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/gen"
# shellcheck disable=SC2046
"$py/.venv/bin/python" -m grpc_tools.protoc -I "$root/proto" --python_out="$work/gen" \
  --grpc_python_out="$work/gen" $(find "$root/proto" -name '*.proto')

echo "writing $ROWS customers"
"$py/.venv/bin/python" - "$work/customers.csv" "$ROWS" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    f.write("email,display_name,birth_date,attributes.plan\n")
    for i in range(1, int(sys.argv[2]) + 1):
        f.write(f"bench-{i}@example.com,Customer {i},19{50 + i % 50}-{i % 12 + 1:02d}-{i % 28 + 1:02d},{'pro' if i % 3 else 'free'}\n")
PY

# serve NAME: a fresh customer service; sets addr to its address.
serve() {
  local dir="$work/$1" url
  addr=""
  mkdir -p "$dir"
  url="sqlite://$dir/customer.db"
  if [ -n "${DATABASE_URL:-}" ]; then
    psql -q "$DATABASE_URL" -c "DROP DATABASE IF EXISTS bench_import_$1" -c "CREATE DATABASE bench_import_$1" >/dev/null
    url="${DATABASE_URL%/*}/bench_import_$1"
  fi
  RUST_LOG=warn "$clm" serve customer --listen 127.0.0.1:0 --data-dir "$dir" --database-url "$url" >"$dir/log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do
    addr="$(sed -nE 's/^customer listening on ([0-9.:]+).*/\1/p' "$dir/log")"
    [ -n "$addr" ] && return
    sleep 0.1
  done
  cat "$dir/log"; exit 1
}

serve python
PYTHONPATH="$work/gen" "$py/.venv/bin/python" "$root/scripts/bench_import_python.py" \
  "$work/customers.csv" "$addr" "$BATCH" "$CONCURRENCY" | tee "$work/python.txt"
serve clm
"$clm" import customers "$work/customers.csv" --customer-url "http://$addr" \
  --batch-size "$BATCH" --concurrency "$CONCURRENCY" 2>/dev/null | tee "$work/clm.txt"

python_rate="$(sed -nE 's/.*: ([0-9]+) rows\/s$/\1/p' "$work/python.txt")"
clm_rate="$(sed -nE 's/.*\(([0-9]+) rows\/s\)$/\1/p' "$work/clm.txt")"
echo
printf '  clm import customers (%s rows, batches of %s, %s in flight)  %8s rows/s\n' "$ROWS" "$BATCH" "$CONCURRENCY" "$clm_rate"
printf '  reference: the same batches from the Python client          %8s rows/s\n' "$python_rate"
printf '  ratio clm import / Python client                            %8.2f\n' "$(echo "$clm_rate / $python_rate" | bc -l)"
