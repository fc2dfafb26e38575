#!/usr/bin/env bash
# Over-optimization on the task that shows it (conf/overoptimization): for each reward-model data size, the DAG
# (three bootstrap reward models, calibrated, normalized), best-of-n up to n = 2048, then PPO and RLOO at each KL
# target and seed, every run tagged with its size's scenario, and PPO at a fixed beta on the raw and on the
# transform's reward with the raw outputs times 0.25, 1 and 4 (the scale runs); then the report (fits, figures,
# verdicts, warning rules) under docs/results/overoptimization/. Run in a project folder of its own: every run
# goes to its mlflow.db.
# Usage: bash scripts/overoptimization.sh
#   SIZES ("9600 2400 600": preference pairs), TARGETS ("1 2 4 8 16 32 64"), METHODS ("ppo rloo"), SEEDS ("0 1"),
#   OUT (docs/results/overoptimization), SCALE=0 skips the scale runs, REPORT_ONLY=1: the report from the runs
#   already in the store; RM: --params for the reward models (e.g. "reward_model.size.num_hidden_layers=4") with
#   LABEL, the suffix that tells their runs apart (scenario overoptimization_rm<size>_<LABEL>).
set -euo pipefail
cd "$(dirname "$0")/.."
export KEDRO_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
read -r -a sizes <<< "${SIZES:-9600 2400 600}"
read -r -a targets <<< "${TARGETS:-1 2 4 8 16 32 64}"
read -r -a methods <<< "${METHODS:-ppo rloo}"
read -r -a seeds <<< "${SEEDS:-0 1}"
out=${OUT:-docs/results/overoptimization}
python=${PYTHON:-python}
kedro() { "$python" -m kedro run --env overoptimization "$@"; }

if [ "${REPORT_ONLY:-0}" != 1 ]; then
  for size in "${sizes[@]}"; do
    tag="scenario=overoptimization_rm$size${LABEL:+_$LABEL}"
    # the DAG first: every later run of this size loads its reward models, transform and reference (the latest)
    kedro --pipelines data_prep,reward_model,calibration,policy_init,normalization \
      --params "data_prep.source.synthetic.n_pairs=$size,$tag${RM:+,$RM}"
    kedro --pipelines best_of_n --params "$tag"
    if [ "${SCALE:-1}" = 1 ]; then  # at a fixed beta: the settled beta * target of PPO's controller, 0.2, at target 4
      scale="${tag}_scale,ppo.trainer.kl_control=fixed,ppo.trainer.beta=0.05"
      for a in 0.25 1 4; do
        kedro --pipelines ppo --params "normalization.method=raw,ppo.raw_reward_multiplier=$a,${scale}"
      done
      for a in 0.25 4; do
        kedro --pipelines ppo --params "ppo.raw_reward_multiplier=$a,${scale}"
      done
    fi
    for seed in "${seeds[@]}"; do
      for kl in "${targets[@]}"; do
        for method in "${methods[@]}"; do
          if [ "$method" = ppo ]; then
            kedro --pipelines ppo --params "ppo.trainer.kl_target=$kl,ppo.trainer.seed=$seed,$tag"
          else
            kedro --pipelines rl --params "rl.algorithm=$method,rl.kl_target=$kl,rl.seed=$seed,$tag"
          fi
        done
      done
    done
  done
fi
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
labels=("${sizes[@]/%/${LABEL:+_$LABEL}}")
"$python" -m calibrated_rlhf.reporting.overoptimization --sizes "$(IFS=,; echo "${labels[*]}")" --out "$out"
