#!/usr/bin/env bash
# Soak test (outside the default test run): N concurrent sessions for T seconds through
# rtts-gateway to the local engine, checking every session's audio digest, errors, file
# descriptors and memory. Arguments go to tests/soak.py (--sessions 500 --seconds 60).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m tests.soak "$@"
