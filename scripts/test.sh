#!/usr/bin/env bash
# The one test command (README, .ci/run): formatting, lints, proto lint and
# breaking-change check, every test on SQLite + in-process cache, the
# backend-dependent tests again on PostgreSQL + Redis, and the
# generated-client tests. Prints each stage's time and the total.
#
# Which tests run on PostgreSQL + Redis: every test target (an integration
# test file, or a crate's unit tests) whose source uses
# clm_platform::testing::TestBackend or reads CLM_TEST_DATABASE_URL /
# CLM_TEST_REDIS_URL (scripts/backend-tests.py lists them, from cargo
# metadata). Everything else touches no database or cache and runs once.
# Each PostgreSQL test clones a pre-migrated template database; templates
# are keyed by CLM_TEST_TEMPLATE_KEY (a hash of the migration sources, set
# here) and, under CI, stale ones are dropped first.
#
# buf breaking compares proto/ against proto/released.binpb, the image of
# the last released API (see proto/README.md to update it on a release).
#
# PostgreSQL + Redis: uses CLM_TEST_DATABASE_URL / CLM_TEST_REDIS_URL, or the
# local defaults. Under CI=true it starts (and if needed installs) them and
# fails if it cannot; it never skips them. Locally, if they are down, that
# run is skipped with a loud warning.
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION=1.75.0
PG_URL_DEFAULT="postgres://postgres@127.0.0.1:5432/test"
REDIS_URL_DEFAULT="redis://127.0.0.1:6379"
CI="${CI:-}"

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
trap summary EXIT
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "buf lint"
buf() { npx --yes "@bufbuild/buf@${BUF_VERSION}" "$@"; }
buf lint
step "buf breaking (against the released API, proto/released.binpb)"
buf breaking --against proto/released.binpb

step "tests: SQLite + in-process cache"
env -u CLM_TEST_DATABASE_URL -u CLM_TEST_REDIS_URL cargo test --workspace --all-features

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
start_services() {
  if ! command -v pg_ctlcluster >/dev/null || ! command -v redis-server >/dev/null; then
    step "installing PostgreSQL and Redis"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server) || true
  fi
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

export CLM_TEST_DATABASE_URL="${CLM_TEST_DATABASE_URL:-$PG_URL_DEFAULT}"
export CLM_TEST_REDIS_URL="${CLM_TEST_REDIS_URL:-$REDIS_URL_DEFAULT}"
CLM_TEST_TEMPLATE_KEY="$(find crates services -path '*/migration*' -name '*.rs' -print0 | sort -z | xargs -0 cat | sha256sum | cut -c1-16)"
export CLM_TEST_TEMPLATE_KEY
if pg_up && redis_up || { [ -n "$CI" ] && start_services; }; then
  step "tests: PostgreSQL + Redis, backend-dependent targets only ($CLM_TEST_DATABASE_URL, $CLM_TEST_REDIS_URL)"
  # Templates of other migration sources (older checkouts) are stale. Only
  # under CI: locally another checkout's run may be cloning its own.
  [ -z "$CI" ] || for db in $(psql -Atq "$CLM_TEST_DATABASE_URL" -c "SELECT datname FROM pg_database WHERE datname LIKE 'clm\_tpl\_%' AND datname NOT LIKE 'clm\_tpl\_${CLM_TEST_TEMPLATE_KEY:0:8}\_%'" 2>/dev/null || true); do
    psql -q "$CLM_TEST_DATABASE_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  done
  mapfile -t targets < <(python3 scripts/backend-tests.py)
  [ "${#targets[@]}" -gt 0 ] || fail "no backend-dependent test target found"
  for t in "${targets[@]}"; do
    printf '\n--- cargo test %s\n' "$t"
    # shellcheck disable=SC2086
    cargo test --all-features $t
  done
elif [ -n "$CI" ]; then
  fail "PostgreSQL or Redis is not reachable and could not be started (CI never skips them)"
else
  printf '\n!!! WARNING: PostgreSQL or Redis is down: the PostgreSQL + Redis run was SKIPPED !!!\n' >&2
fi
unset CLM_TEST_DATABASE_URL CLM_TEST_REDIS_URL

step "generated-client tests: Python (grpcio-tools) and Node (@grpc/grpc-js) against clm up"
cargo build -p clm
tests/clients/run.sh "${CARGO_TARGET_DIR:-target}/debug/clm"

step "all checks passed"
end_stage
