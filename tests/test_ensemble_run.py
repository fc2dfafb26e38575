"""A real `kedro run` with a two-member reward ensemble on the tiny configuration, through PPO."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.project import kedro, make_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("project"))
    proc = kedro(project, "--env", "tiny", "--params",
                 "reward_model.ensemble_size=2,reward_model.ensemble.aggregation=mean_minus_std")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("calibrated_rlhf").experiment_id])
    assert len(runs) == 1
    return project, client, runs[0]


def latest(folder: Path) -> Path:
    return sorted(folder.iterdir())[-1]


def test_members_are_versioned_apart(finished):
    project, _, _ = finished
    models = project / "data" / "06_models"
    for i in (0, 1):
        member = latest(models / f"member_{i}" / "reward_model") / "reward_model"
        assert (member / "model.safetensors").exists()
        assert json.loads((latest(models / f"member_{i}" / "temperature_fit.json") / "temperature_fit.json")
                          .read_text())["temperature"] > 0
    assert not (models / "reward_model").exists()  # no single model was trained


def test_transform_carries_the_ensemble(finished):
    project, _, _ = finished
    path = latest(project / "data" / "06_models" / "reward_transform.json") / "reward_transform.json"
    ensemble = json.loads(path.read_text())["ensemble"]
    assert ensemble["aggregation"] == "mean_minus_std" and len(ensemble["member_temperatures"]) == 2
    assert len(set(ensemble["member_versions"])) == 2 and ensemble["reference_ensemble_std"] > 0


def test_run_logs_members_ensemble_and_over_optimization_curves(finished):
    _, client, run = finished
    assert run.data.params["reward_model.ensemble_size"] == "2"  # shapes the DAG, reaches no node: logged anyway
    keys = set(run.data.metrics)
    for i in (0, 1):
        assert {f"rm/member_{i}/test_accuracy", f"calibration/member_{i}/test_nll_after",
                f"rm/member_{i}/train/loss"} <= keys
    assert {"rm/test_accuracy", "calibration/test_nll_after", "ensemble/test_nll_after",
            "ensemble/best_member_test_nll_after", "normalization/ensemble_std",
            "ppo/eval/final_gold_gap", "ppo/eval/final_ensemble_std"} <= keys
    updates = int(run.data.metrics["ppo/eval/updates"])
    for key in ("ppo/rewards/ensemble_std", "ppo/rewards/gold_gap"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, updates + 1)), key
        assert all(np.isfinite(m.value) for m in history)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reward_model")}
    assert artifacts == {"reward_model/member_0", "reward_model/member_1"}


def test_registered_model_scores_with_the_whole_ensemble(finished):
    import mlflow
    import pandas as pd

    project, _, _ = finished
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model("models:/calibrated-rlhf-reward-model/1")
    finally:
        mlflow.set_tracking_uri(None)
    out = model.predict(pd.DataFrame({"prompt": ["Describe the food in Paris."] * 2,
                                      "response": [" calm bright", " grey cold"]}))
    assert {"raw", "calibrated", "normalized", "ensemble_std"} <= set(out.columns)
    assert (out["ensemble_std"] >= 0).all() and out["ensemble_std"].gt(0).any()


def test_the_readmes_parallel_members_recipe_runs(tmp_path):
    """Members in parallel processes (one per GPU in the README; CPU here), then the rest against them."""
    import os
    import subprocess
    import sys

    project = make_project(tmp_path)
    size = ("--params", "reward_model.ensemble_size=2")
    assert kedro(project, "--env", "tiny", *size, "--pipelines", "data_prep,policy_init").returncode == 0
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "KEDRO_DISABLE_TELEMETRY": "true"}
    members = [subprocess.Popen([sys.executable, "-m", "kedro", "run", "--env", "tiny", *size, "--namespaces",
                                 f"member_{i}"], cwd=project, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
               for i in (0, 1)]
    for proc in members:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    rest = kedro(project, "--env", "tiny", *size, "--from-nodes", "assemble_reward_ensemble,reference_responses")
    assert rest.returncode == 0, rest.stderr[-3000:]
    models = project / "data" / "06_models"
    transform = json.loads((latest(models / "reward_transform.json") / "reward_transform.json").read_text())
    assert len(transform["ensemble"]["member_versions"]) == 2
    assert len(list((models / "policy").iterdir())) == 1
