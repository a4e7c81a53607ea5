#!/usr/bin/env bash
# Quick start, tests: install everything (Python packages into .venv, and Debian's
# prometheus package for promtool and the real Prometheus the tests start), then run the
# whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
ensure_prometheus
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
