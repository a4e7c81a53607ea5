#!/usr/bin/env bash
# Quick start, tests: install everything (Python packages into .venv, and Debian's
# prometheus package for promtool and the real Prometheus the tests start), then run the
# whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing Debian's prometheus package (prometheus, promtool)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    else
        echo "test.sh: prometheus and promtool are needed; install Debian's prometheus package" >&2
        exit 1
    fi
fi

cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
