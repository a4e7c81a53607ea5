#!/usr/bin/env bash
# Quick start, main job: install everything, start the embedded local engine, speak a
# sentence to out/speech.wav and print the timings. Extra arguments go to examples/speak.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
if [ "$#" -eq 0 ]; then
    set -- "Hello! This is Huawei real-time TTS, speaking through the local engine." --out out/speech.wav
fi
exec "$VENV/bin/python" examples/speak.py "$@"
