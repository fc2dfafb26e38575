"""The repository stands alone: a user's clone has nothing beside it, so nothing here may reach outside it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# written in two parts so that this file does not match itself
OUTSIDE = ("../" + "shared", "shared/" + "anchors")


def test_no_file_names_a_folder_outside_the_repository():
    named = []
    for top in ("tests", "bench", "conf", "scripts", "src", "docs", ".ci", "README.md", "pyproject.toml"):
        paths = [ROOT / top] if (ROOT / top).is_file() else (ROOT / top).rglob("*")
        for path in paths:
            built = any(part.endswith(".egg-info") or part == "__pycache__" for part in path.parts)
            if path.is_file() and not built and path.suffix in {"", ".py", ".sh", ".md", ".yml", ".yaml", ".toml", ".txt", ".ipynb"}:
                text = path.read_text(errors="replace")
                named += [f"{path.relative_to(ROOT)}: {o}" for o in OUTSIDE if o in text]
    assert not named, named


def test_the_reference_workload_exports_from_the_repository_alone(tmp_path):
    """What `conf/reference_workload` ingests and the benchmarks train on, made by the copy in bench/baselines."""
    out = tmp_path / "export"
    subprocess.run([sys.executable, str(ROOT / "bench" / "baselines" / "workload.py"), "--export", str(out)],
                   cwd=tmp_path, check=True, capture_output=True, timeout=120)
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    heldout = (out / "heldout.jsonl").read_text().splitlines()
    assert (len(train), len(heldout)) == (4096, 1024)
    assert set(train[0]) == {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected", "true_prob_chosen"}
    assert all(0 < row["true_prob_chosen"] < 1 for row in train)
