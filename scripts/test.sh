#!/usr/bin/env bash
# The one test command (README, .ci/run): formatting, lints, proto lint and
# breaking-change check, every test on SQLite + in-process cache and on
# PostgreSQL + Redis, and the generated-client tests.
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

step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "buf lint"
buf() { npx --yes "@bufbuild/buf@${BUF_VERSION}" "$@"; }
buf lint
if git rev-parse -q --verify HEAD~1 >/dev/null && git cat-file -e HEAD~1:proto 2>/dev/null; then
  step "buf breaking (against the previous commit on main)"
  buf breaking --against ".git#ref=$(git rev-parse HEAD~1)"
fi

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
if pg_up && redis_up || { [ -n "$CI" ] && start_services; }; then
  step "tests: PostgreSQL + Redis ($CLM_TEST_DATABASE_URL, $CLM_TEST_REDIS_URL)"
  cargo test --workspace --all-features
elif [ -n "$CI" ]; then
  fail "PostgreSQL or Redis is not reachable and could not be started (CI never skips them)"
else
  printf '\n!!! WARNING: PostgreSQL or Redis is down: the PostgreSQL + Redis run was SKIPPED !!!\n' >&2
fi
unset CLM_TEST_DATABASE_URL CLM_TEST_REDIS_URL

step "generated-client tests: Python (grpcio-tools) and Node (@grpc/grpc-js) against clm up"
cargo build -p clm
tests/clients/run.sh target/debug/clm

step "all checks passed"
