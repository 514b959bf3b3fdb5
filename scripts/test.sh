#!/usr/bin/env bash
# The one test command (README, .ci/run): formatting, lints, proto lint and
# breaking-change check, one build of every test (cargo nextest, one feature
# set), every test on SQLite + in-process cache, the backend-dependent tests
# again on PostgreSQL + Redis, the doc tests, and the client tests (the
# README's tour as typed, Python, Node, Go, Java, clm import/export) against
# the `clm` binary that build made. Prints each stage's time and the
# total.
#
# One build: clippy checks with --all-features (the benchmarks too); the
# tests, the doc tests and the client tests share one build with the
# features below (`bench` left out: benchmark binaries are not built here).
#
# Which tests run on PostgreSQL + Redis: every test binary (an integration
# test file, or a crate's unit tests) whose source uses
# clm_platform::testing::TestBackend or reads CLM_TEST_DATABASE_URL /
# CLM_TEST_REDIS_URL (scripts/backend-tests.py prints them as a nextest
# filterset, from cargo metadata). Everything else touches no database or
# cache and runs once. Each PostgreSQL test clones a pre-migrated template
# database; templates are keyed by CLM_TEST_TEMPLATE_KEY (a hash of the
# migration sources, set here) and, under CI, stale ones are dropped first.
#
# buf breaking compares proto/ against proto/released.binpb, the image of
# the last released API (see proto/README.md to update it on a release).
# scripts/check-deploy.sh checks deploy/ (manifests, Dockerfile, compose)
# without building anything.
#
# PostgreSQL: CLM_TEST_DATABASE_URL if set; otherwise a throwaway server
# started here from the machine's PostgreSQL binaries (initdb, pg_ctl) in a
# temporary directory on a free port, without fsync, stopped and deleted at
# the end; without those binaries, the local default server. Redis:
# CLM_TEST_REDIS_URL or the local default. Under CI=true it starts (and if
# needed installs) them and fails if it cannot; it never skips them.
# Locally, if they are down, that run is skipped with a loud warning.
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION=1.75.0
PG_URL_DEFAULT="postgres://postgres@127.0.0.1:5432/test"
REDIS_URL_DEFAULT="redis://127.0.0.1:6379"
CI="${CI:-}"
# A clean clone builds everything once: incremental state would only cost
# time and disk.
[ -z "$CI" ] || export CARGO_INCREMENTAL=0

started_at=$SECONDS
stage_name=""
stage_at=$SECONDS
timings=()
# step NAME: ends the previous stage (printing its time) and starts NAME.
step() {
  end_stage
  stage_name="$*"
  stage_at=$SECONDS
  printf '\n==> %s\n' "$*"
}
end_stage() {
  if [ -n "$stage_name" ]; then
    local t=$((SECONDS - stage_at))
    timings+=("$(printf '%5ds  %s' "$t" "$stage_name")")
    printf '    (%ds)\n' "$t"
    stage_name=""
  fi
}
summary() {
  end_stage
  printf '\nstage times:\n'
  for t in "${timings[@]}"; do printf '  %s\n' "$t"; done
  printf '  %5ds  total\n' "$((SECONDS - started_at))"
}
# A throwaway PostgreSQL in a temporary directory, on a free port, run as
# the postgres user when we are root (initdb refuses root). Durability off:
# the data is thrown away. Sets CLM_TEST_DATABASE_URL; fails (returns 1)
# without the binaries.
start_scratch_pg() {
  local bin port as=()
  bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
  [ -n "$bin" ] && [ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ] || return 1
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  scratch_pg="$(mktemp -d "${TMPDIR:-/tmp}/clm-test-pg.XXXXXX")"
  if [ "$(id -u)" = 0 ]; then
    chown postgres: "$scratch_pg" || return 1
    as=(runuser -u postgres --)
  fi
  "${as[@]}" "$bin/initdb" -D "$scratch_pg/data" -U postgres --auth=trust --no-sync \
    --encoding=UTF8 --no-locale >"$scratch_pg/initdb.log" 2>&1 \
    || { cat "$scratch_pg/initdb.log" >&2; return 1; }
  "${as[@]}" "$bin/pg_ctl" -D "$scratch_pg/data" -l "$scratch_pg/server.log" -w -t 60 start -o \
    "-p $port -k $scratch_pg -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    >/dev/null || { cat "$scratch_pg/server.log" >&2; return 1; }
  "${as[@]}" "$bin/psql" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "CREATE DATABASE test" || return 1
  export CLM_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/test"
}
stop_scratch_pg() {
  [ -n "$scratch_pg" ] || return 0
  local bin as=()
  bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
  [ "$(id -u)" != 0 ] || as=(runuser -u postgres --)
  [ ! -f "$scratch_pg/data/postmaster.pid" ] || "${as[@]}" "$bin/pg_ctl" -D "$scratch_pg/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$scratch_pg"
  scratch_pg=""
}

# A Redis Cluster of three fresh nodes on free ports (no persistence).
cluster_dir=""
cluster_ports=""
start_redis_cluster() {
  cluster_dir="$(mktemp -d "${TMPDIR:-/tmp}/clm-test-redis-cluster.XXXXXX")"
  # A node listens on its port and on port + 10000 (the cluster bus), so
  # ports are taken at or below 55535, both free.
  cluster_ports="$(python3 -c 'import random, socket
def free(p):
    try:
        for q in (p, p + 10000):
            s = socket.socket(); s.bind(("127.0.0.1", q)); s.close()
        return True
    except OSError:
        return False
ports = []
while len(ports) < 3:
    p = random.randrange(20000, 55535)
    if p not in ports and free(p):
        ports.append(p)
print(" ".join(map(str, ports)))')"
  for port in $cluster_ports; do
    mkdir -p "$cluster_dir/$port"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --cluster-enabled yes \
      --cluster-config-file nodes.conf --dir "$cluster_dir/$port" --save "" --appendonly no \
      --pidfile "$cluster_dir/$port.pid" --logfile "$cluster_dir/$port.log"
  done
  for port in $cluster_ports; do
    for _ in $(seq 1 50); do redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
  done
  # shellcheck disable=SC2086
  redis-cli --cluster create $(printf '127.0.0.1:%s ' $cluster_ports) --cluster-replicas 0 --cluster-yes >/dev/null
  for _ in $(seq 1 100); do
    redis-cli -p "${cluster_ports%% *}" cluster info | grep -q cluster_state:ok && return 0
    sleep 0.1
  done
  fail "the Redis Cluster did not form"
}
stop_redis_cluster() {
  [ -n "$cluster_dir" ] || return 0
  for port in $cluster_ports; do redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; done
  rm -rf "$cluster_dir"
  cluster_dir=""
}

scratch_pg=""
on_exit() {
  stop_redis_cluster
  stop_scratch_pg
  summary
}
trap on_exit EXIT
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

# The tests' one feature set: every workspace crate, the test harness on,
# the benchmarks (feature `bench`) off.
BUILD=(--workspace --features clm-platform/testing)
NEXTEST_PROFILE=default
[ -z "$CI" ] || NEXTEST_PROFILE=ci
nextest() { cargo nextest run "${BUILD[@]}" --profile "$NEXTEST_PROFILE" "$@"; }

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "buf lint"
buf() { npx --yes "@bufbuild/buf@${BUF_VERSION}" "$@"; }
buf lint
step "buf breaking (against the released API, proto/released.binpb)"
buf breaking --against proto/released.binpb

step "deploy/: kustomize renders, kubernetes-validate, checkov, yamllint, hadolint (scripts/check-deploy.sh)"
scripts/check-deploy.sh

if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

step "build: every test and binary, once (cargo nextest, ${BUILD[*]})"
nextest --no-run

# NATS with JetStream on 127.0.0.1:4222 (the JetStream tests use streams
# of their own there; one starts its own nats-server too).
nats_up() { (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; }
if ! nats_up; then
  if ! command -v nats-server >/dev/null && [ -n "$CI" ]; then
    step "installing NATS"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server) || true
  fi
  if command -v nats-server >/dev/null; then
    step "starting NATS with JetStream"
    mkdir -p "${TMPDIR:-/tmp}/clm-nats"
    nohup nats-server -a 127.0.0.1 -p 4222 -js -sd "${TMPDIR:-/tmp}/clm-nats" >/dev/null 2>&1 &
    for _ in $(seq 1 50); do nats_up && break; sleep 0.1; done
  fi
fi
nats_up || fail "NATS is not reachable on 127.0.0.1:4222 and could not be started (the JetStream tests need it)"

step "tests: SQLite + in-process cache"
(unset CLM_TEST_DATABASE_URL CLM_TEST_REDIS_URL && nextest)

step "doc tests"
env -u CLM_TEST_DATABASE_URL -u CLM_TEST_REDIS_URL cargo test "${BUILD[@]}" --doc

pg_up() { pg_isready -q -d "$CLM_TEST_DATABASE_URL" 2>/dev/null; }
redis_up() { redis-cli -u "$CLM_TEST_REDIS_URL" ping 2>/dev/null | grep -q PONG; }
install_services() {
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v redis-server >/dev/null; then
    step "installing PostgreSQL and Redis"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server) || true
  fi
}
start_services() {
  if ! pg_up && command -v pg_ctlcluster >/dev/null; then
    step "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  if ! redis_up && command -v redis-server >/dev/null; then
    step "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  fi
  for _ in $(seq 1 30); do pg_up && redis_up && return 0; sleep 1; done
  return 1
}

export CLM_TEST_REDIS_URL="${CLM_TEST_REDIS_URL:-$REDIS_URL_DEFAULT}"
pg_note="given"
if [ -z "${CLM_TEST_DATABASE_URL:-}" ]; then
  [ -z "$CI" ] || install_services
  step "starting a throwaway PostgreSQL"
  if start_scratch_pg; then
    pg_note="throwaway"
  else
    stop_scratch_pg
    printf 'no PostgreSQL binaries to start one with: using the local server\n'
    export CLM_TEST_DATABASE_URL="$PG_URL_DEFAULT"
    pg_note="local"
  fi
fi
CLM_TEST_TEMPLATE_KEY="$(find crates services -path '*/migration*' -name '*.rs' -print0 | sort -z | xargs -0 cat | sha256sum | cut -c1-16)"
export CLM_TEST_TEMPLATE_KEY
if pg_up && redis_up || { [ -n "$CI" ] && start_services; }; then
  step "tests: PostgreSQL + Redis, backend-dependent binaries only ($CLM_TEST_DATABASE_URL $pg_note, $CLM_TEST_REDIS_URL)"
  # Templates of other migration sources (older checkouts) are stale. Only
  # under CI: locally another checkout's run may be cloning its own.
  [ -z "$CI" ] || [ -n "$scratch_pg" ] || for db in $(psql -Atq "$CLM_TEST_DATABASE_URL" -c "SELECT datname FROM pg_database WHERE datname LIKE 'clm\_tpl\_%' AND datname NOT LIKE 'clm\_tpl\_${CLM_TEST_TEMPLATE_KEY:0:8}\_%'" 2>/dev/null || true); do
    psql -q "$CLM_TEST_DATABASE_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  done
  filter="$(python3 scripts/backend-tests.py)"
  [ -n "$filter" ] || fail "no backend-dependent test binary found"
  nextest -E "$filter"
  step "tests: segmentation's cache on a 3-node Redis Cluster (redis-server --cluster-enabled)"
  start_redis_cluster
  CLM_TEST_REDIS_URL="redis://127.0.0.1:${cluster_ports%% *}" CLM_TEST_REDIS_CLUSTER=1 \
    nextest -E "($filter) & package(clm-segmentation)"
  stop_redis_cluster
elif [ -n "$CI" ]; then
  fail "PostgreSQL or Redis is not reachable and could not be started (CI never skips them)"
else
  printf '\n!!! WARNING: PostgreSQL or Redis is down: the PostgreSQL + Redis run was SKIPPED !!!\n' >&2
fi
stop_scratch_pg
unset CLM_TEST_DATABASE_URL CLM_TEST_REDIS_URL

step "client tests against clm up: the README tour, Python (grpcio-tools), Node (@grpc/grpc-js), Go and Java (Debian toolchains), clm import/export"
# The `clm` binary of the build above (the clm crate's tests run it), not
# a second build with other features.
clm="${CARGO_TARGET_DIR:-target}/debug/clm"
[ -x "$clm" ] || fail "$clm was not built by the test build"
tests/clients/run.sh "$clm"

step "all checks passed"
end_stage
