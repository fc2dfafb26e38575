"""Best-of-n through the real `kedro run --env tiny --pipelines best_of_n` on a copy of the shared tiny run: the
curve lands as a CSV and as MLflow histories, its KL never above the usual formula, its gold against the
pool it was drawn from."""

from __future__ import annotations

import math

import pytest

from tests.harness import kedro_run, latest_run, preload, saved

pytestmark = pytest.mark.slow


def test_best_of_n_runs_on_the_tiny_run_and_logs_its_curve(tiny_run_project):
    from mlflow import MlflowClient

    from calibrated_rlhf.core import metric_keys as keys

    project = tiny_run_project
    template = latest_run(project)
    assert not any(k.startswith("best_of_n/") for k in template.data.metrics)  # outside the default DAG
    preload()
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "best_of_n", name="best_of_n")
    assert code == 0, out[-4000:]
    run = latest_run(project)
    assert run.info.run_id != template.info.run_id and run.info.status == "FINISHED"
    for name in ("reference_policy", "reward_transform", "reward_model"):
        assert run.data.tags[f"provenance/loaded/{name}"] == template.data.tags["run_id"]
    points = saved(project, "data/08_reporting/best_of_n_points.csv")
    assert list(points["n"]) == [1, 2, 4, 8, 16, 32]
    assert points["kl"].iloc[0] == pytest.approx(0.0, abs=1e-12) and points["gold_gain"].iloc[0] == pytest.approx(0.0)
    assert (points["kl"] <= points["kl_bound"] + 1e-12).all() and points["kl"].is_monotonic_increasing
    assert (points["kl"] <= math.log(64) + 1e-12).all()  # the pool's own ceiling
    # the proxy ranks its own favourite first: its gain over the pool grows with n
    assert points["proxy_gain"].is_monotonic_increasing and points["proxy_gain"].iloc[-1] > 0
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    history = client.get_metric_history(run.info.run_id, keys.best_of_n_curve("kl"))
    assert sorted((m.step, m.value) for m in history) == pytest.approx(list(zip(points["n"], points["kl"])))
    assert keys.best_of_n_fit("alpha") in run.data.metrics and keys.best_of_n_fit("d_peak_observed") in run.data.metrics
