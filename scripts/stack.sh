#!/usr/bin/env bash
# The monitored stack on loopback: rtts-gateway on the local engine, a real Prometheus with
# our alert rules, and generated traffic. Installs what it needs; Ctrl-C stops everything.
# Extra arguments go to examples/monitored_stack.py (e.g. --duration 60).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
ensure_prometheus
cd "$ROOT"
exec "$VENV/bin/python" examples/monitored_stack.py "$@"
