#!/usr/bin/env bash
# Soak test (outside the default test run): N concurrent sessions for T seconds through
# rtts-gateway to the local engine, checking every session's audio digest, errors, file
# descriptors and memory, then throws 20000 fresh hostile-input examples at a gateway.
# Arguments go to tests/soak.py (--sessions 500 --seconds 60); RTTS_HOSTILE_EXAMPLES sets
# the number of hostile examples.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
"$VENV/bin/python" -m tests.soak "$@"
RTTS_HOSTILE_EXAMPLES="${RTTS_HOSTILE_EXAMPLES:-20000}" HYPOTHESIS_PROFILE=explore \
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_hostile.py
