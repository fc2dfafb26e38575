#!/usr/bin/env bash
# KL control sweep: PPO, RLOO and GRPO at several KL targets and seeds under a controller, each from the latest
# completed run's reward model, transform and reference policy (run `kedro run` first); then the tables, the
# achieved-against-target figure and the frontier of these runs under docs/results/kl_control/.
# Usage: bash scripts/kl_sweep.sh
#   TARGETS ("0.5 1 2 4 8 16"), METHODS ("ppo rloo grpo"), SEEDS ("0 1": pi's), ADAPTIVE_SEEDS ("0": Ziegler's);
#   ADAPTIVE_HORIZON (1000) and ADAPTIVE_BETA (0.1): Ziegler's controller as the project ran it before pi; GRPO_LRS ("1e-4 3e-4"):
#   GRPO's extra learning rates at target 4 (pi, every seed; 1e-3 is the default and in the grid); OUT: the report
#   folder; ADAPTIVE_TARGETS (TARGETS): Ziegler's targets; PI=0 skips pi's runs, REPORT_ONLY=1 every run; INCLUDE:
#   earlier sweeps' runs.csv files whose runs join the report. Every setting not named here is the default.
set -euo pipefail
cd "$(dirname "$0")/.."
export KEDRO_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
read -r -a targets <<< "${TARGETS:-0.5 1 2 4 8 16}"
read -r -a seeds <<< "${SEEDS:-0 1}"
read -r -a methods <<< "${METHODS:-ppo rloo grpo}"
read -r -a adaptive_seeds <<< "${ADAPTIVE_SEEDS-0}"
read -r -a adaptive_targets <<< "${ADAPTIVE_TARGETS:-${targets[*]}}"
read -r -a grpo_lrs <<< "${GRPO_LRS-1e-4 3e-4}"
adaptive_horizon=${ADAPTIVE_HORIZON:-1000}
adaptive_beta=${ADAPTIVE_BETA:-0.1}
out=${OUT:-docs/results/kl_control}
python=${PYTHON:-python}

run() {  # method controller target seed [extra params]
  local method=$1 ctl=$2 kl=$3 seed=$4 extra=${5:-} horizon=""
  if [ "$method" = ppo ]; then
    [ "$ctl" = adaptive ] && horizon=",ppo.trainer.kl_horizon=$adaptive_horizon,ppo.trainer.beta=$adaptive_beta"
    "$python" -m kedro run --env scenario_kl_control --pipelines ppo \
      --params "ppo.trainer.kl_control=$ctl,ppo.trainer.kl_target=$kl,ppo.trainer.seed=$seed$horizon$extra"
  else
    [ "$ctl" = adaptive ] && horizon=",rl.kl_horizon=$adaptive_horizon,rl.beta=$adaptive_beta"
    "$python" -m kedro run --env scenario_kl_control --pipelines rl \
      --params "rl.algorithm=$method,rl.kl_control=$ctl,rl.kl_target=$kl,rl.seed=$seed$horizon$extra"
  fi
}

grid() {  # controller seed...
  local ctl=$1 seed kl method
  local -a kls=("${targets[@]}")
  [ "$ctl" = adaptive ] && kls=("${adaptive_targets[@]}")
  shift
  for seed in "$@"; do
    for kl in "${kls[@]}"; do
      for method in "${methods[@]}"; do
        run "$method" "$ctl" "$kl" "$seed"
      done
    done
  done
}

if [ "${REPORT_ONLY:-0}" != 1 ]; then
  # in order of what the conclusions need most: pi on every target, GRPO's step sizes, Ziegler's for comparison
  if [ "${PI:-1}" = 1 ]; then
    for seed in "${seeds[@]}"; do
      grid pi "$seed"
      for lr in "${grpo_lrs[@]}"; do
        run grpo pi 4 "$seed" ",rl.learning_rate=$lr"
      done
    done
  fi
  grid adaptive "${adaptive_seeds[@]}"
fi
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}  # where kedro-mlflow logged (conf/base/mlflow.yml)
include=()
for f in ${INCLUDE:-}; do include+=(--include "$f"); done
"$python" -m calibrated_rlhf.reporting.kl_sweep --scenario kl_control --out "$out" "${include[@]}"
"$python" -m calibrated_rlhf.reporting.frontier --scenario kl_control --kl "$(IFS=,; echo "${targets[*]}")" \
  --out "$out/frontier"
