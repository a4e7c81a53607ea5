#!/bin/sh
# Install only the gateway (no pipecat) with the given pip, e.g. in the container image:
#   sh scripts/install-gateway.sh pip
# The Dockerfile runs exactly this; the tests run it in a fresh virtualenv and start the
# gateway from it, so a green CI proves the image's install steps work.
set -eu
PIP="${1:-pip}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
$PIP install --no-cache-dir --no-deps "$ROOT"
$PIP install --no-cache-dir -r "$ROOT/requirements-gateway.txt"
