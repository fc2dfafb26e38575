#!/usr/bin/env bash
# The environment of TRL's last PPO (trl 1.12; later releases removed it): .venv-trl112 at the project's
# root, beside the project's own environment, with the same pinned torch. Made once, reused after.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -x .venv-trl112/bin/python ]; then
  python=$(bash scripts/python.sh)
  "$python" -m venv .venv-trl112
  .venv-trl112/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 trl==1.12.0
fi
# peft, for the LoRA cells (trl_ppo_cell.py --lora-top): the project's pinned version
.venv-trl112/bin/python -c "import peft" 2>/dev/null || .venv-trl112/bin/python -m pip install --quiet \
  --disable-pip-version-check "$(grep -i '^peft==' constraints.txt)"
echo "$PWD/.venv-trl112/bin/python"
