#!/usr/bin/env bash
# Reward-model training and PPO on a GPU at a size that matters (~150M-parameter Llama, bfloat16,
# response length 128), ours beside TRL; figures as JSON in OUTDIR (see bench/gpu_bench.py).
#
#   bash bench/gpu.sh OUTDIR
#
# GPU_BENCH_SIZE=tiny        the same code paths at a CPU smoke size (the test suite runs this)
# GPU_BENCH_SKIP_INSTALL=1   use the packages already installed
# PYTHON=...                 the interpreter to install into and run (default python3)
set -euo pipefail
out=${1:?usage: bench/gpu.sh OUTDIR}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
if [[ -z "${GPU_BENCH_SKIP_INSTALL:-}" ]]; then
  # torch pinned first: the registry's CUDA build on a GPU host, and nothing newer pulled in later
  "$py" -m pip install -q torch==2.13.0
  "$py" -m pip install -q -e "$repo"
  if [[ ! -x "$repo/.venv-trl112/bin/python" ]]; then
    # TRL's last PPO (1.12) on top of this environment's torch and transformers: no second torch download
    "$py" -m venv --system-site-packages "$repo/.venv-trl112"
    "$repo/.venv-trl112/bin/pip" install -q --no-deps trl==1.12.0
  fi
fi
mkdir -p "$out"
exec timeout "${GPU_BENCH_TIMEOUT_S:-450}" "$py" "$repo/bench/gpu_bench.py" --size "${GPU_BENCH_SIZE:-gpu}" --out "$out"
