#!/usr/bin/env bash
# Sets up the test dependencies (in the virtual environment of setup.sh) and runs the whole test suite.
# Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,viz
export KEDRO_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# as `source .venv/bin/activate` would: commands that start others by name (mlflow models serve's uvicorn) find them
bin=$(dirname "$(bash scripts/python.sh)")
export PATH="$bin:$PATH" VIRTUAL_ENV="$(dirname "$bin")"
python -m pytest "$@"
