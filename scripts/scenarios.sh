#!/usr/bin/env bash
# Runs the scenarios (conf/scenario_*) one after the other, then the comparison report.
# The baseline runs the whole DAG first; the PPO-only scenarios then reuse its reward model, policy
# and transform (the latest versions); the scenarios that change data or the reward model come last,
# so they never become the "latest" that a PPO-only scenario loads.
# Usage: bash scripts/scenarios.sh [scenario ...]   (default: all, in that order)
set -euo pipefail
cd "$(dirname "$0")/.."
export KEDRO_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
ppo_only=(scale_1 scale_0.25 scale_4 scale_1_raw scale_0.25_raw scale_4_raw norm_minmax kl_fixed)
full=(no_centering no_calibration norm_none margin no_margin ensemble_mean ensemble_min ensemble_mean_minus_std
      lowdata lowdata_ensemble_mean lowdata_ensemble_min lowdata_ensemble_mean_minus_std)
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(baseline "${ppo_only[@]}" "${full[@]}")
for s in "${scenarios[@]}"; do
  [ -d "conf/scenario_$s" ] || { echo "no scenario '$s' (conf/scenario_$s)" >&2; exit 2; }
  pipelines=data_prep,reward_model,calibration,policy_init,normalization,ppo
  [[ " ${ppo_only[*]} " == *" $s "* ]] && pipelines=ppo
  echo "== scenario $s: kedro run --env scenario_$s --pipelines $pipelines"
  kedro run --env "scenario_$s" --pipelines "$pipelines"
done
kedro run --pipelines reporting --params "reporting.filter_string=tags.scenario != ''"
