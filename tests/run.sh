#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need
# (redis-server, redis-cli; systemd-analyze for the unit checks) if missing,
# builds, and runs every test.
# Usage: bash tests/run.sh [extra args for the test runner]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages providing missing tools; only those are installed.
missing=()
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    missing+=(redis-server)
fi
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "tests/run.sh: installing ${missing[*]} (Debian packages)" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
redis-server --version
systemd-analyze --version | sed -n 1p

# Multi-process tests start the real binary.
cargo build --bins --quiet

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast --failure-output final "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi
