#!/usr/bin/env bash
# Installs the project and its pinned dependencies. torch goes first, pinned, so that nothing pulls
# a different (multi-GB CUDA) build; the rest is constrained by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python3 -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${extras:+[$extras]}"
