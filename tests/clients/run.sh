#!/usr/bin/env bash
# Generated-client tests: starts one `clm up` (free ports, fresh data dir) and
# calls it from Python (stubs generated from proto/ by grpcio-tools, pytest)
# and from Node (@grpc/grpc-js with @grpc/proto-loader, node --test).
# Usage: tests/clients/run.sh path/to/clm
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
clm="${1:?usage: run.sh path/to/clm}"

# Python: a virtualenv with pinned grpcio, and stubs generated from proto/.
py="$here/python"
if [ ! -x "$py/.venv/bin/python" ]; then
  python3 -m venv "$py/.venv"
fi
"$py/.venv/bin/pip" install --quiet --disable-pip-version-check -r "$py/requirements.txt"
rm -rf "$py/gen" && mkdir -p "$py/gen"
# shellcheck disable=SC2046
"$py/.venv/bin/python" -m grpc_tools.protoc -I "$root/proto" \
  --python_out="$py/gen" --pyi_out="$py/gen" --grpc_python_out="$py/gen" \
  $(find "$root/proto" -name '*.proto')

# Node: the locked @grpc/grpc-js and @grpc/proto-loader.
(cd "$here/node" && npm ci --no-audit --no-fund --loglevel=error)

# Every service on a port the system picks (--base-port 0: a free base
# port's neighbours may be taken); the addresses are read from its
# "<service> listening on ADDR" lines.
data="$(mktemp -d)"
log="$data/clm.log"
RUST_LOG=warn "$clm" up --base-port 0 --data-dir "$data" >"$log" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT
addr_of() { sed -nE "s/^$1 +listening on ([0-9.]+:[0-9]+).*/\\1/p" "$log" | head -n1; }
for _ in $(seq 1 600); do
  grep -q "^CLM is up" "$log" && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
grep -q "^CLM is up" "$log" || { echo "clm up did not come up:"; cat "$log"; exit 1; }
CLM_CUSTOMER_ADDR="$(addr_of customer)"
CLM_SCORING_ADDR="$(addr_of scoring)"
CLM_SEGMENTATION_ADDR="$(addr_of segmentation)"
CLM_FEEDBACK_ADDR="$(addr_of feedback)"
CLM_LOYALTY_ADDR="$(addr_of loyalty)"
export CLM_CUSTOMER_ADDR CLM_SCORING_ADDR CLM_SEGMENTATION_ADDR CLM_FEEDBACK_ADDR CLM_LOYALTY_ADDR

status=0
echo "--- Python (grpcio) ---"
PYTHONPATH="$py/gen" "$py/.venv/bin/python" -m pytest -q "$py" || status=$?
echo "--- Node (@grpc/grpc-js) ---"
(cd "$here/node" && node --test) || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- clm up log ---"; cat "$log"
fi
exit "$status"
