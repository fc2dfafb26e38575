#!/usr/bin/env bash
# Sets up (a virtual environment, see setup.sh) and runs the whole pipeline on the embedded default
# (synthetic task, tiny model, sqlite MLflow). Arguments go to `kedro run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export KEDRO_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
"$(dirname "$(bash scripts/python.sh)")/kedro" run "$@"
