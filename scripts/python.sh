#!/usr/bin/env bash
# Prints the project's interpreter: the active virtual environment's, else .venv's.
# With --create, makes .venv first when no environment is active and .venv does not exist.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  echo "$VIRTUAL_ENV/bin/python"; exit 0
fi
if [ ! -x .venv/bin/python ]; then
  if [ "${1:-}" != "--create" ]; then
    echo "no virtual environment: run 'bash scripts/setup.sh' first (it makes .venv), or activate one" >&2; exit 2
  fi
  base=""
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      base=$candidate; break
    fi
  done
  [ -n "$base" ] || { echo "Python 3.11 or newer is needed (python3.11 ... python3 on the PATH)" >&2; exit 2; }
  "$base" -m venv .venv >&2 || {
    rm -rf .venv
    echo "'$base -m venv' failed: on Debian or Ubuntu install the venv module (apt-get install python3-venv)" >&2
    exit 2
  }
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
fi
echo "$PWD/.venv/bin/python"
