#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install the project with its test tools into it.
# Sourced by demo.sh and test.sh; safe to run again (reinstalls only when pyproject.toml changed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "bootstrap: $PYTHON not found; install Python 3.11 or newer (or set PYTHON=...)" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "bootstrap: $("$PYTHON" --version 2>&1) is too old; Python 3.11 or newer is required" >&2
    exit 1
fi
# Debian names its packages for this Python after its version (python3.11-venv, -dev).
PYTHON_VERSION="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"

if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
        # Debian splits venv/ensurepip out of python3; install it when we can.
        rm -rf "$VENV"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "bootstrap: installing python3-venv with apt-get" >&2
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python3-venv" >/dev/null \
                || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$PYTHON_VERSION-venv" >/dev/null
            "$PYTHON" -m venv "$VENV"
        else
            echo "bootstrap: '$PYTHON -m venv' failed; install your distribution's python3-venv package" >&2
            exit 1
        fi
    fi
fi

# The C source too: an editable install compiles gateway/_relay.c once, at install time.
STAMP="$VENV/.installed-$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/gateway/_relay.c" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
    # The relay's compiled fast path needs a C compiler and the Python headers; without them
    # pip skips it and the gateway relays on its pure-Python path (the tests then say so).
    HEADERS="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    if ! command -v cc >/dev/null 2>&1 || [ ! -f "$HEADERS/Python.h" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "bootstrap: installing gcc and the Python headers with apt-get" >&2
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc \
                "python$PYTHON_VERSION-dev" >/dev/null
        else
            echo "bootstrap: no C compiler or Python headers: the gateway's relay runs on its pure-Python path (install gcc and python3-dev for the compiled one)" >&2
        fi
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev]"
    rm -f "$VENV"/.installed-*
    touch "$STAMP"
fi

# Debian's prometheus package (prometheus, promtool): the tests and the monitored stack use it.
ensure_prometheus() {
    if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian's prometheus package (prometheus, promtool)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    else
        echo "prometheus and promtool are needed: install Debian's prometheus package" >&2
        return 1
    fi
}
