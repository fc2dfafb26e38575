"""``python -m calibrated_rlhf.runtime.real_evidence``: the README's real-text evidence, read from a project's newest
finished run (here the shared tiny run): responses side by side, the reference's NLL of each policy's samples,
and the gold-against-KL points of the store."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_the_evidence_is_read_from_the_newest_run_and_written_once(tiny_run_project):
    out = tiny_run_project / "data" / "08_reporting" / "evidence.md"
    cmd = [sys.executable, "-m", "calibrated_rlhf.runtime.real_evidence", "--out", str(out), "--n-show", "3",
           "--n-prompts", "6", "--max-new-tokens", "8"]
    proc = subprocess.run(cmd, cwd=tiny_run_project, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    side_by_side = text.split("## Responses side by side")[1].split("##")[0]
    assert side_by_side.count("\n| ") == 2 + 3  # header, rule, three prompts
    assert "| prompt | reference | PPO |" in side_by_side
    nll = text.split("## The reference's per-token NLL")[1].split("##")[0]
    assert "| reference |" in nll and "| PPO |" in nll
    # the store's one evaluated run (the tiny DAG's PPO) is a gold-against-KL point with its interval
    points = text.split("## Gold against KL")[1]
    assert points.count("| ppo |") == 1 and "gold_gain_ci_low" in points
    assert not list(out.parent.glob(".*partial"))


def test_a_project_without_a_trained_policy_is_refused_writing_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "calibrated_rlhf.runtime.real_evidence"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no completed run saved a reference policy" in proc.stdout
    assert not any(tmp_path.iterdir())
