#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need
# (redis-server, redis-cli; systemd-analyze for the unit checks; Debian's
# Chromium, Node.js and tests/js's npm packages, and tests/py's Python clients in a
# virtualenv, for the real-client tests) if
# missing, builds, and runs every test.
# Usage: bash tests/run.sh [extra args for the test runner]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages providing missing tools; only those are installed.
missing=()
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    missing+=(redis-server)
fi
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
# tests/browser.rs drives a real browser: Debian's Chromium, never a downloaded one.
[ -x /usr/bin/chromium ] || missing+=(chromium)
# tests/browser.rs and tests/ai_sdk.rs run Node scripts (playwright-core, the AI SDK).
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
# tests/py runs the real Python clients (openai, anthropic, ollama) in a virtualenv.
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3 python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "tests/run.sh: installing ${missing[*]} (Debian packages)" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
redis-server --version
systemd-analyze --version | sed -n 1p
/usr/bin/chromium --version 2>/dev/null
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
    echo "tests/run.sh: Node.js $(node --version) is too old: tests/js needs Node.js 20 or newer" >&2
    exit 1
fi
echo "node $(node --version)"

# tests/js's npm packages, from its package-lock.json, when not installed or outdated.
if [ ! -f tests/js/node_modules/.package-lock.json ] ||
    [ tests/js/package-lock.json -nt tests/js/node_modules/.package-lock.json ]; then
    echo "tests/run.sh: installing tests/js's npm packages (npm ci)" >&2
    npm ci --prefix tests/js --no-audit --no-fund --loglevel=error
fi
# docs/integrations.md's JavaScript snippets' packages (tests/docs.rs), likewise.
if [ ! -f tests/js/docs/node_modules/.package-lock.json ] ||
    [ tests/js/docs/package-lock.json -nt tests/js/docs/node_modules/.package-lock.json ]; then
    echo "tests/run.sh: installing tests/js/docs's npm packages (npm ci)" >&2
    npm ci --prefix tests/js/docs --no-audit --no-fund --loglevel=error
fi

# tests/py's virtualenv with the pinned Python clients, when missing or outdated.
if [ ! -x tests/py/.venv/bin/python ] || [ ! -f tests/py/.venv/.installed ] ||
    [ tests/py/requirements.txt -nt tests/py/.venv/.installed ]; then
    echo "tests/run.sh: installing tests/py's Python packages (pip, into tests/py/.venv)" >&2
    python3 -m venv tests/py/.venv
    tests/py/.venv/bin/pip install --quiet --disable-pip-version-check -r tests/py/requirements.txt
    touch tests/py/.venv/.installed
fi

# Multi-process tests start the real binary.
cargo build --bins --quiet

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast --failure-output final "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi
