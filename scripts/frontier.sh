#!/usr/bin/env bash
# The gold-reward-against-KL frontier: PPO, RLOO and GRPO at several KL targets, DPO at several betas, each
# from the latest completed run's reward model, transform and reference policy; then the frontier report.
# Usage: bash scripts/frontier.sh   (after `kedro run`; KL_TARGETS and DPO_BETAS override the budgets)
set -euo pipefail
cd "$(dirname "$0")/.."
export KEDRO_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
read -r -a kl_targets <<< "${KL_TARGETS:-1 2 4 8}"
read -r -a dpo_betas <<< "${DPO_BETAS:-0.03 0.1 0.3 1.0}"
# GRPO moves the policy faster per step (group-scaled advantages, the KL in its loss): the step that holds its target
grpo_lr=${GRPO_LEARNING_RATE:-2.0e-4}
for kl in "${kl_targets[@]}"; do
  kedro run --env scenario_frontier --pipelines ppo --params "ppo.trainer.kl_target=$kl"
  kedro run --env scenario_frontier --pipelines rl --params "rl.algorithm=rloo,rl.kl_target=$kl"
  kedro run --env scenario_frontier --pipelines rl --params "rl.algorithm=grpo,rl.kl_target=$kl,rl.learning_rate=$grpo_lr"
done
for beta in "${dpo_betas[@]}"; do
  kedro run --env scenario_frontier --pipelines dpo --params "dpo.trainer.beta=$beta"
done
python -m calibrated_rlhf.reporting.frontier --scenario frontier --kl "$(IFS=,; echo "${kl_targets[*]}")" \
  --out reports/frontier
