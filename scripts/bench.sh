#!/usr/bin/env bash
# Benchmarks (outside the default test run): relay overhead against nginx and a direct
# connection, capacity, throughput, plugin latency, prewarm and spares, client style, the
# local engine and an upstream outage (breaker, failover, recovery), side by side in one run. Writes BENCHMARKS.md (--quick:
# out/benchmarks/BENCHMARKS-quick.md, so a smoke run never replaces the recorded results)
# and out/benchmarks/*.png.
# Arguments go to tests/benchmarks/run.py (--quick for a smoke run; --only SECTION, e.g.
# --only outage, runs one section and, like --quick, never replaces BENCHMARKS.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
    else
        echo "bench.sh: nginx is needed; install Debian's nginx-light package" >&2
        exit 1
    fi
fi
cd "$ROOT"
# A smoke run must not replace the recorded results.
REPORT=BENCHMARKS.md
for arg in "$@"; do
    if [ "$arg" = "--quick" ] || [ "$arg" = "--only" ]; then
        mkdir -p out/benchmarks
        REPORT=out/benchmarks/BENCHMARKS-quick.md
    fi
done
exec "$VENV/bin/python" -m tests.benchmarks.run --write "$REPORT" "$@"
