"""bench/gpu.sh end to end at its CPU smoke size: every side trains and the figures land as JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_script_runs_on_cpu_at_tiny_size(tmp_path):
    env = {**os.environ, "GPU_BENCH_SIZE": "tiny", "GPU_BENCH_SKIP_INSTALL": "1", "PYTHON": sys.executable,
           "TRL112_PYTHON": str(tmp_path / "no-trl112" / "python"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    assert out["size"] == "tiny" and out["config"]["dtype"] == "bfloat16" and out["device"]["cuda"] is False
    rm = out["reward_model"]
    assert {r["n_params"] for r in rm.values()} == {rm["ours"]["n_params"]}  # one model size on every side
    for side in ("trl_default", "trl_best", "ours"):
        assert rm[side]["n_pairs"] == out["config"]["rm_pairs"] and rm[side]["pairs_per_s"] > 0
        assert math.isfinite(rm[side]["train_loss"]) and rm[side]["peak_memory_mib"] > 0
    assert out["ratios"]["rm_ours_over_trl_default"] > 0
    assert out["ppo"]["ours"]["episodes_per_s"] > 0 and out["ppo"]["ours"]["n_params_policy"] > 0
    assert "no TRL 1.12 environment" in out["ppo"]["trl"]["skipped"]  # named, not silently dropped
    assert out["ratios"]["ppo_ours_over_trl"] is None
