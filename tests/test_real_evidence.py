"""``python -m calibrated_rlhf.runtime.real_evidence``: the README's real-text evidence, read from a project's newest
finished run (here the shared tiny run): responses side by side, the reference's NLL of each policy's samples,
and the gold-against-KL points of the store. What it reads beside a policy is what that policy was made from."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.project import kedro_env

pytestmark = pytest.mark.slow


def test_the_evidence_is_read_from_the_newest_run_and_written_once(tiny_run_project):
    out = tiny_run_project / "data" / "08_reporting" / "evidence.md"
    cmd = [sys.executable, "-m", "calibrated_rlhf.runtime.real_evidence", "--out", str(out), "--n-show", "3",
           "--n-prompts", "6", "--max-new-tokens", "8"]
    proc = subprocess.run(cmd, cwd=tiny_run_project, env=kedro_env(tiny_run_project), capture_output=True,
                          text=True, timeout=300)
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


def test_a_folder_that_is_not_a_project_is_refused_writing_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "calibrated_rlhf.runtime.real_evidence"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "is not a Kedro project folder" in proc.stdout
    assert not any(tmp_path.iterdir())


def newer_copy(project, folder: str, lineage: dict | None = None) -> tuple[str, str]:
    """Copy the newest version of a versioned folder to a later version with a completion marker, as a later
    run would leave it; returns (old, new) versions."""
    root = project / folder
    old = sorted(p.name for p in root.iterdir())[-1]
    new = "2099-01-01T00.00.00.000Z"
    shutil.copytree(root / old, root / new)
    marker = json.loads((root / new / "_complete.json").read_text())
    (root / new / "_complete.json").write_text(json.dumps({**marker, "lineage": lineage or marker["lineage"]}))
    return old, new


def evidence(project, *args):
    out = project / "data" / "08_reporting" / "evidence.md"
    proc = subprocess.run([sys.executable, "-m", "calibrated_rlhf.runtime.real_evidence", "--out", str(out),
                           "--n-show", "1", "--n-prompts", "2", "--max-new-tokens", "4", *args], cwd=project,
                          env=kedro_env(project), capture_output=True, text=True, timeout=300)
    return proc, out


def test_the_tokenizer_and_gold_read_are_the_policys_not_a_later_runs(tiny_run_template, tmp_path):
    from tests.project import copy_project

    project = copy_project(tiny_run_template, tmp_path / "project")
    used, later = newer_copy(project, "data/06_models/tokenizer")
    used_gold, later_gold = newer_copy(project, "data/01_raw/synthetic_task.json")
    proc, out = evidence(project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = out.read_text().split("## Responses")[0]
    assert f"tokenizer `{used}`" in header and later not in header
    assert f"synthetic_task `{used_gold}`" in header and later_gold not in header
    # the gold-against-KL points come from the store named, as every MLflow reader of the project takes it
    proc, out = evidence(project, "--tracking-uri", f"sqlite:///{tmp_path / 'empty.db'}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| ppo |" not in out.read_text().split("## Gold against KL")[1]


def test_policies_made_from_different_runs_are_refused_naming_both(tiny_run_template, tmp_path):
    from tests.project import copy_project

    project = copy_project(tiny_run_template, tmp_path / "project")
    policy = sorted((project / "data/06_models/policy").iterdir())[-1]
    lineage = json.loads((policy / "_complete.json").read_text())["lineage"]
    rl = project / "data/06_models/rl_policy" / "2099-01-01T00.00.00.000Z"
    shutil.copytree(policy / "policy", rl / "rl_policy")
    (rl / "_complete.json").write_text(json.dumps(
        {"dataset": "rl_policy", "lineage": {**lineage, "tokenizer": "2098-01-01T00.00.00.000Z"}}))
    proc, out = evidence(project)
    assert proc.returncode == 1 and not out.exists()
    assert f"'policy' version {policy.name} was made from 'tokenizer' version {lineage['tokenizer']}" in proc.stdout
    assert "'rl_policy' version 2099-01-01T00.00.00.000Z from version 2098-01-01T00.00.00.000Z" in proc.stdout
    # a pin to a version no run completed is refused, not replaced by another
    proc, out = evidence(project, "--load-versions", "rl_policy:2097-01-01T00.00.00.000Z")
    assert proc.returncode == 1 and "'rl_policy' version 2097-01-01T00.00.00.000Z is not from a run" in proc.stdout
