#!/usr/bin/env bash
# Installs the project and its pinned dependencies into a virtual environment: the active one if any
# ($VIRTUAL_ENV), else the project's own .venv, made on first use and reused after. A distribution's
# python3 (Debian and Ubuntu mark it externally managed) is never installed into.
# torch goes first, pinned, so that nothing pulls a different (multi-GB CUDA) build; the rest is
# constrained by constraints.txt. Usage: bash scripts/setup.sh [EXTRAS]   (e.g. "test" or "test,notebook")
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python=$(bash scripts/python.sh --create)
"$python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${extras:+[$extras]}"
