"""Where the benchmarks find the project, the baselines they compare against (bench/baselines: TRL's
RewardTrainer, TRL 1.12's PPO, the LBFGS calibration recipe, the reference workload) and the TRL 1.12
environment of the PPO baseline. Every script in bench/ imports these (its folder is on sys.path)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BASELINES = HERE / "baselines"
TRL_PY = REPO / ".venv-trl112" / "bin" / "python"
