"""Where the benchmarks find the project, the shared anchors (TRL baselines, the reference workload) and the
TRL 1.12 environment of the PPO anchor. Every script in bench/ imports these (its folder is on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# beside the checkout, or beside the folder of a git worktree of it, unless ANCHORS_DIR names them
ANCHORS = Path(os.environ.get("ANCHORS_DIR") or next(
    (p for p in (REPO.parent / "shared" / "anchors", REPO.parent.parent / "shared" / "anchors") if p.is_dir()),
    REPO.parent / "shared" / "anchors"))
TRL_PY = REPO / ".venv-trl112" / "bin" / "python"
