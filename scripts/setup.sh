#!/usr/bin/env bash
# Create .venv with Python 3.11+ and install a requirements file into it.
# Usage: scripts/setup.sh requirements.txt|requirements-dev.txt
# Re-running is cheap: nothing is installed when the file has not changed since.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=${1:-requirements.txt}

find_python() {
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "error: Python 3.11 or newer is needed (tried python3.11, python3.12, python3.13, python3)" >&2
  return 1
}

if [[ ! -x .venv/bin/python ]]; then
  python=$(find_python)
  echo "setup: creating .venv with $($python --version)" >&2
  "$python" -m venv .venv
fi

stamp=".venv/.installed-$(basename "$requirements")"
wanted=$(cat requirements*.txt | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$wanted" ]]; then
  echo "setup: installing $requirements into .venv (first time takes a minute)" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
  echo "$wanted" > "$stamp"
fi
