#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need if
# missing (redis-server and redis-cli; Debian's Chromium and the npm packages
# of tests/js for the real-client tests), builds, and runs every test.
# Usage: bash tests/run.sh [extra args for the test runner]
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
APT_UPDATED=""
apt_install() {
    echo "tests/run.sh: installing $* (Debian packages)" >&2
    if [ -z "$APT_UPDATED" ]; then
        $SUDO apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

need_redis() { ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; }
if need_redis; then
    apt_install redis-server
fi
redis-server --version

# tests/browser.rs drives a real browser: Debian's Chromium, never a downloaded one.
if [ ! -x /usr/bin/chromium ]; then
    apt_install chromium
fi
/usr/bin/chromium --version 2>/dev/null

# tests/browser.rs and tests/ai_sdk.rs run Node scripts (playwright-core, the AI SDK).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
fi
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
    echo "tests/run.sh: Node.js $(node --version) is too old: tests/js needs Node.js 20 or newer" >&2
    exit 1
fi
echo "node $(node --version)"
js_lock=tests/js/package-lock.json
js_installed=tests/js/node_modules/.package-lock.json
if [ ! -f "$js_installed" ] || [ "$js_lock" -nt "$js_installed" ]; then
    echo "tests/run.sh: installing tests/js's npm packages (npm ci)" >&2
    npm ci --prefix tests/js --no-audit --no-fund --loglevel=error
fi

# Multi-process tests start the real binary.
cargo build --bins --quiet

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast --failure-output final "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi
