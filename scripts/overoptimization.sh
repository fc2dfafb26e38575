#!/usr/bin/env bash
# Over-optimization on the task that shows it (conf/overoptimization): for each reward-model data size, the DAG
# (three bootstrap reward models, calibrated, normalized), then best-of-n up to n = 2048 and PPO and RLOO at each
# KL target and seed, every run tagged with its size's scenario; at the first size also PPO at a fixed beta on the
# raw and on the transform's reward with the raw outputs times 0.25, 1 and 4 (the scale runs); then the same for
# larger reward models at one size; then the report (fits, figures, verdicts, warning rules, runs.csv.gz: every RL
# run's series) under docs/results/overoptimization/. Run in a project folder of its own: every run goes to its
# mlflow.db.
# Usage: bash scripts/overoptimization.sh
#   SIZES ("9600 2400 600": preference pairs), TARGETS ("1 2 3 4 6 8 12 16 24 32 64"), METHODS ("ppo rloo"),
#   SEEDS ("0 1"), OUT (docs/results/overoptimization), SCALE (first: the scale runs at the first size; all; 0: none),
#   LARGE_SIZE (2400: the size the larger reward models are trained on; 0: none), LARGE_RM (their --params),
#   JOBS (2: runs at once after each size's DAG, each on nproc / JOBS torch threads: one CPU run uses two cores
#   poorly), UNTOUCHED_SEEDS ("": more seeds of every RL run, tagged <scenario>_untouched: no rule is chosen on
#   them, the report scores every chosen rule on them), REPORT_ONLY=1: the report from the runs already in the store.
set -euo pipefail
cd "$(dirname "$0")/.."
export KEDRO_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
read -r -a sizes <<< "${SIZES:-9600 2400 600}"
read -r -a targets <<< "${TARGETS:-1 2 3 4 6 8 12 16 24 32 64}"
read -r -a methods <<< "${METHODS:-ppo rloo}"
read -r -a seeds <<< "${SEEDS:-0 1}"
read -r -a untouched <<< "${UNTOUCHED_SEEDS:-}"
large_size=${LARGE_SIZE:-2400}
large=reward_model.size.num_hidden_layers=4,reward_model.size.hidden_size=256
large_rm=${LARGE_RM:-$large,reward_model.size.intermediate_size=512,reward_model.size.num_attention_heads=8}
out=${OUT:-docs/results/overoptimization}
python=${PYTHON:-python}
jobs=${JOBS:-2}
scale_at=${SCALE:-first}
# refused before any run: a typo would otherwise cost an hour of runs without what was asked for
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || { echo "JOBS must be a positive integer, got '$jobs'" >&2; exit 2; }
[[ "$scale_at" =~ ^(first|all|0)$ ]] || { echo "SCALE must be first, all or 0, got '$scale_at'" >&2; exit 2; }
threads=$(( $(nproc) / jobs > 0 ? $(nproc) / jobs : 1 ))
queue=$(mktemp)
trap 'rm -f "$queue"' EXIT

kedro=("$python" -m kedro run --env overoptimization)
enqueue() { echo "--pipelines $1 --params $2" >> "$queue"; }  # no spaces inside: xargs splits on them
drain() {  # the queued runs, JOBS at once; fails once they are done if any failed
  OMP_NUM_THREADS=$threads xargs -P "$jobs" -L 1 "${kedro[@]}" < "$queue"
  : > "$queue"
}

# $1 data size, $2 label ("" or a suffix that tells the runs of other reward models apart), $3 reward-model
# --params (may be empty), $4 1: with the scale runs
size_runs() {
  local tag="scenario=overoptimization_rm$1${2:+_$2}"
  # the DAG first: every later run of this size loads its reward models, transform and reference (the latest
  # completed ones), so the queued runs may overlap each other but not it
  "${kedro[@]}" --pipelines data_prep,reward_model,calibration,policy_init,normalization \
    --params "data_prep.source.synthetic.n_pairs=$1,$tag${3:+,$3}"
  enqueue best_of_n "$tag"
  if [ "$4" = 1 ]; then  # at a fixed beta: the settled beta * target of PPO's controller, 0.2, at target 4
    local scale="${tag}_scale,ppo.trainer.kl_control=fixed,ppo.trainer.beta=0.05"
    for a in 0.25 1 4; do enqueue ppo "normalization.method=raw,ppo.raw_reward_multiplier=$a,$scale"; done
    for a in 0.25 4; do enqueue ppo "ppo.raw_reward_multiplier=$a,$scale"; done
  fi
  for seed in "${seeds[@]}"; do rl_runs "$seed" "$tag"; done
  for seed in "${untouched[@]}"; do rl_runs "$seed" "${tag}_untouched"; done
  drain
}

# $1 seed, $2 the scenario tag: PPO and RLOO (METHODS) at every KL target
rl_runs() {
  for kl in "${targets[@]}"; do
    for method in "${methods[@]}"; do
      if [ "$method" = ppo ]; then
        enqueue ppo "ppo.trainer.kl_target=$kl,ppo.trainer.seed=$1,$2"
      else
        enqueue rl "rl.algorithm=$method,rl.kl_target=$kl,rl.seed=$1,$2"
      fi
    done
  done
}

labels=("${sizes[@]}")
if [ "$large_size" != 0 ]; then labels+=("${large_size}_large"); fi
if [ "${REPORT_ONLY:-0}" != 1 ]; then
  for i in "${!sizes[@]}"; do
    scale=0
    if [ "$scale_at" = all ] || { [ "$scale_at" = first ] && [ "$i" = 0 ]; }; then scale=1; fi
    size_runs "${sizes[$i]}" "" "" "$scale"
  done
  if [ "$large_size" != 0 ]; then size_runs "$large_size" large "$large_rm" 0; fi
fi
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
checked=()
if [ "${#untouched[@]}" -gt 0 ]; then checked=(--untouched "$(IFS=,; echo "${labels[*]}")"); fi
"$python" -m calibrated_rlhf.reporting.overoptimization --sizes "$(IFS=,; echo "${labels[*]}")" "${checked[@]}" \
  --out "$out"
