#!/usr/bin/env bash
# Flotilla's test command; CI runs exactly this (`.ci/run`).
#
# Installs what is missing (once, from Debian's packages), starts PostgreSQL
# and Redis on loopback, builds the test images, then runs the format check,
# clippy with warnings denied and the whole test suite against the real
# Docker Engine, PostgreSQL and Redis.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# The build cache lives outside the clone so reruns and fresh clones are fast.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/flotilla/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

step() { echo; echo "==> $*"; }

step "services (PostgreSQL, Redis)"
scripts/dev-services.sh start
eval "$(scripts/dev-services.sh env)"

step "test images"
scripts/build-images.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The cluster tests bring up scripts/cluster.sh's cluster (and reuse it
# when it is up, as on a developer's machine); CI takes it down at the end.
if [ "${CI:-}" = true ]; then
  trap 'scripts/cluster.sh down >/dev/null 2>&1 || true' EXIT
fi

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  cargo test --workspace --locked --no-fail-fast "$@"
fi
echo
echo "All checks passed."
