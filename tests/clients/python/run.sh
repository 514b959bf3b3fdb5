#!/usr/bin/env bash
# Generated-client test: generates Python stubs from proto/ with grpcio-tools,
# starts `clm up` on free ports with a fresh data dir, and runs pytest.
# Usage: tests/clients/python/run.sh path/to/clm
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
clm="${1:?usage: run.sh path/to/clm}"

venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"

gen="$here/gen"
rm -rf "$gen" && mkdir -p "$gen"
# shellcheck disable=SC2046
"$venv/bin/python" -m grpc_tools.protoc -I "$root/proto" --python_out="$gen" --pyi_out="$gen" --grpc_python_out="$gen" \
  $(cd "$root/proto" && find . -name '*.proto' | sed 's|^\./||')

port="$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
data="$(mktemp -d)"
log="$data/clm.log"
RUST_LOG=warn "$clm" up --base-port "$port" --data-dir "$data" >"$log" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT

export CLM_CUSTOMER_ADDR="127.0.0.1:$port"
export PYTHONPATH="$gen"
status=0
"$venv/bin/python" -m pytest -q "$here" || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- clm up log ---"; cat "$log"
fi
exit "$status"
