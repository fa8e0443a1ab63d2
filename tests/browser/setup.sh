#!/usr/bin/env bash
# What the real-browser test needs on a clean Debian machine: Debian's Chromium and the playwright
# Python package (its own browser download is never used: the test drives /usr/bin/chromium).
# Usage: tests/browser/setup.sh [PYTHON]   (default: .venv/bin/python); idempotent.
set -euo pipefail
PY="${1:-.venv/bin/python}"
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo -n"; fi
    if [ -n "$SUDO" ] && ! sudo -n true 2>/dev/null; then
        echo "warning: cannot install Debian's chromium (not root, no password-less sudo);" \
             "tests/browser will be skipped with that reason" >&2
    else
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
    fi
fi
"$PY" -m pip install -q "playwright>=1.45"
"$PY" - <<'PYEOF'
import shutil, importlib.metadata as md
print("chromium:", shutil.which("chromium"), "| playwright", md.version("playwright"))
PYEOF
