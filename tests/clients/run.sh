#!/usr/bin/env bash
# Generated-client tests: starts one `clm up` (free ports, fresh data dir),
# runs the README's tour against it (readme_tour.py) and calls it from
# Python (stubs generated from proto/ by grpcio-tools, pytest), Node
# (@grpc/grpc-js with @grpc/proto-loader, node --test), Go and Java (stubs
# generated with Debian's protoc, protoc-gen-go(-grpc) and grpc_java_plugin).
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

# Node: the locked @grpc/grpc-js, @grpc/proto-loader and protobufjs.
(cd "$here/node" && npm ci --no-audit --no-fund --loglevel=error)

# Go and Java: Debian's packaged toolchains only (no module proxy, no Maven),
# installed with apt-get when missing. Stubs are generated from proto/ and
# compiled before `clm up` starts.
apt_packages=()
need() { if ! "$@" >/dev/null 2>&1; then apt_packages+=("${pkgs[@]}"); fi; }
pkgs=(protobuf-compiler); need command -v protoc
# golang-github-golang-protobuf-1-5-dev replaces the 1.3 package grpc-dev
# pulls in: grpc-go's codec marshals through github.com/golang/protobuf, and
# only 1.4+ marshals the APIv2 messages protoc-gen-go generates.
pkgs=(golang-go protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev golang-google-protobuf-dev golang-google-genproto-dev golang-github-golang-protobuf-1-5-dev)
need test -d /usr/share/gocode/src/google.golang.org/genproto/googleapis/rpc/errdetails -a -x /usr/bin/protoc-gen-go-grpc -a -x /usr/bin/protoc-gen-go -a -x /usr/bin/go -a -f /usr/share/gocode/src/github.com/golang/protobuf/proto/registry.go
pkgs=(default-jdk-headless libgrpc-java protobuf-compiler-grpc-java-plugin libprotobuf-java libguava-java libperfmark-java libnetty-java libgeronimo-annotation-1.3-spec-java)
need test -x /usr/bin/grpc_java_plugin -a -f /usr/share/java/grpc-netty.jar -a -f /usr/share/java/netty-codec-http2.jar -a -f /usr/share/java/perfmark-api.jar -a -f /usr/share/java/geronimo-annotation-1.3-spec.jar -a -x /usr/bin/javac
if [ "${#apt_packages[@]}" -gt 0 ]; then
  echo "installing ${apt_packages[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi
gen="$(mktemp -d)"
trap 'rm -rf "$gen"' EXIT
start=$SECONDS
# Go, GOPATH mode over /usr/share/gocode: one Go package per proto file
# (clm/<svc>/v1/<file> as package <file>pb), because proto packages import
# each other both ways (customer's customer_view.proto reads feedback's
# survey.proto, which reads customer.proto) and Go packages cannot;
# google/rpc/status and google/longrunning are genproto's.
go_map="Mgoogle/rpc/status.proto=google.golang.org/genproto/googleapis/rpc/status;status"
go_map="$go_map,Mgoogle/longrunning/operations.proto=google.golang.org/genproto/googleapis/longrunning;longrunning"
clm_protos=$(cd "$root/proto" && find clm -name '*.proto' | sort)
for f in $clm_protos; do
  base="$(basename "$f" .proto)"
  go_map="$go_map,M$f=clm.dev/gen/${f%.proto};${base//_/}pb"
done
mkdir -p "$gen/go/src/clmclient"
# shellcheck disable=SC2086
protoc -I "$root/proto" --go_out="$gen/go/src" --go_opt="$go_map" \
  --go-grpc_out="$gen/go/src" --go-grpc_opt="$go_map" $clm_protos
cp "$here/go/client_test.go" "$gen/go/src/clmclient/"
go_env=(env GO111MODULE=off GOPATH="$gen/go:/usr/share/gocode" GOFLAGS=)
(cd "$gen/go/src/clmclient" && "${go_env[@]}" go test -c -o "$gen/go/clmclient.test" .)
echo "Go stubs generated and compiled in $((SECONDS - start)) s"
# Java: protoc + grpc_java_plugin, javac against the jars under /usr/share/java
# (google.rpc.Status and BadRequest generated from the vendored proto/google/rpc).
start=$SECONDS
mkdir -p "$gen/java/src" "$gen/java/classes"
# shellcheck disable=SC2046
protoc -I "$root/proto" --java_out="$gen/java/src" --grpc-java_out="$gen/java/src" \
  --plugin=protoc-gen-grpc-java=/usr/bin/grpc_java_plugin $(cd "$root/proto" && find clm google -name '*.proto')
jars=/usr/share/java
java_cp="$(printf '%s:' "$jars"/grpc-{api,core,stub,protobuf,protobuf-lite,netty,context}.jar \
  "$jars"/{protobuf,guava,perfmark-api,jsr305,error_prone_annotations,geronimo-annotation-1.3-spec}.jar \
  "$jars"/netty-{buffer,codec,codec-http,codec-http2,codec-socks,common,handler,handler-proxy,resolver,transport}.jar)"
javac -nowarn -d "$gen/java/classes" -cp "$java_cp" -sourcepath "$gen/java/src" "$here/java/ClmClientTest.java"
echo "Java stubs generated and compiled in $((SECONDS - start)) s"

# Every service on a port the system picks (--base-port 0: a free base
# port's neighbours may be taken); the addresses are read from its
# "<service> listening on ADDR" lines.
data="$(mktemp -d)"
log="$data/clm.log"
RUST_LOG=warn "$clm" up --base-port 0 --data-dir "$data" >"$log" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$data" "$gen"; }
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
echo "--- README tour (grpcurl and Python, as typed) ---"
tour_start=$SECONDS
"$py/.venv/bin/python" "$here/readme_tour.py" "$root" "$py/.venv/bin" || status=$?
echo "README tour: $((SECONDS - tour_start)) s"
echo "--- Python (grpcio) ---"
CLIENTS_CLM_BINARY="$(cd "$(dirname "$clm")" && pwd)/$(basename "$clm")" PYTHONPATH="$py/gen" \
  "$py/.venv/bin/python" -m pytest -q "$py" || status=$?
echo "--- Node (@grpc/grpc-js) ---"
(cd "$here/node" && node --test) || status=$?
echo "--- Go (Debian golang-go, grpc-go) ---"
start=$SECONDS
(cd "$here/go" && "$gen/go/clmclient.test" -test.v -test.timeout 120s) || status=$?
echo "Go client test: $((SECONDS - start)) s"
echo "--- Java (Debian grpc-java, javac) ---"
start=$SECONDS
java -cp "$gen/java/classes:$java_cp" ClmClientTest || status=$?
echo "Java client test: $((SECONDS - start)) s"
if [ "$status" -ne 0 ]; then
  echo "--- clm up log ---"; cat "$log"
fi
exit "$status"
