#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need
# (redis-server, redis-cli) if missing, builds, and runs every test.
# Usage: bash tests/run.sh [extra args for the test runner]
set -euo pipefail
cd "$(dirname "$0")/.."

need_redis() { ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; }
if need_redis; then
    echo "tests/run.sh: installing redis-server (Debian package)" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
redis-server --version

# Multi-process tests start the real binary.
cargo build --bins --quiet

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast --failure-output final "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi
