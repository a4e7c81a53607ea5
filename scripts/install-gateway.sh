#!/bin/sh
# Install only the gateway (no pipecat) with the given pip, from this source tree or from a
# built wheel (the container image installs the one its build stage compiled):
#   sh scripts/install-gateway.sh pip [PROJECT]
# The Dockerfile runs exactly this; the tests run it in a fresh virtualenv and start the
# gateway from it, so a green CI proves the image's install steps work.
set -eu
PIP="${1:-pip}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
$PIP install --no-cache-dir --no-deps "${2:-$ROOT}"
$PIP install --no-cache-dir -r "$ROOT/requirements-gateway.txt"
