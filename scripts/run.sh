#!/usr/bin/env bash
# Sets up (a virtual environment, see setup.sh) and runs the whole pipeline on the embedded default
# (synthetic task, tiny model, sqlite MLflow). Arguments go to `kedro run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export KEDRO_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# as `source .venv/bin/activate` would: commands that start others by name (mlflow models serve's uvicorn) find them
bin=$(dirname "$(bash scripts/python.sh)")
export PATH="$bin:$PATH" VIRTUAL_ENV="$(dirname "$bin")"
kedro run "$@"
