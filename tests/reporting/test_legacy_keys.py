"""Runs logged before the one ``eval/`` prefix (PPO's under ``ppo/eval/``, RLOO's KL tracking under ``rl/eval/``, the
protocol under PPO's keys for every method) read like runs logged now: same table row, frontier point and sweep row."""

from __future__ import annotations

import math
import time

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.reporting import frontier, kl_sweep
from calibrated_rlhf.reporting.runs import RunSelection, load_runs
from calibrated_rlhf.reporting.table import comparison_table, with_current_keys

EXPERIMENT = "calibrated_rlhf"
PROTOCOL = {"kl_reference": 3.9, "kl_reference_ci_low": 3.5, "kl_reference_ci_high": 4.3, "gold_reference": 0.2,
            "gold_policy": 0.5, "gold_gain": 0.3, "gold_gain_ci_low": 0.25, "gold_gain_ci_high": 0.35}
TRACKING = {"kl_second_half_mean": 4.2, "kl_tracking_error": 0.05, "final_beta": 0.08, "updates": 60.0}
PPO_ONLY = {"episodes_per_s": 41.0, "stopped_early": 0.0, "final_gold_gap": 0.4}
# (method, params, figures under the old keys as that release logged them)
METHODS = {
    "ppo": ({"ppo.trainer.kl_target": 4.0, "ppo.trainer.kl_control": "pi", "ppo.trainer.seed": 1,
             "ppo.trainer.learning_rate": 1e-5},
            {f"ppo/eval/{k}": v for k, v in (PROTOCOL | TRACKING | PPO_ONLY).items()}),
    "rloo": ({"rl.kl_target": 4.0, "rl.kl_control": "pi", "rl.seed": 1, "rl.learning_rate": 1e-5},
             {f"ppo/eval/{k}": v for k, v in PROTOCOL.items()} | {f"rl/eval/{k}": v for k, v in TRACKING.items()}
             | {"rl/eval/runtime_s": 12.0}),
    "dpo": ({"dpo.trainer.beta": 0.1}, {f"ppo/eval/{k}": v for k, v in PROTOCOL.items()}),
}


def _log(client: MlflowClient, experiment_id: str, method: str, metrics: dict[str, float], params: dict) -> str:
    run_id = client.create_run(experiment_id, run_name=method).info.run_id
    now = int(time.time() * 1000)
    points = [Metric(k, v, now, 0) for k, v in metrics.items()]
    if method == "ppo":
        points.append(Metric(keys.PPO_KL, 4.2, now, 0))  # every PPO run logs its curves
    tags = [RunTag("scenario", method)] + ([RunTag(keys.RL_ALGORITHM_TAG, method)] if method != "ppo" else [])
    client.log_batch(run_id, metrics=points, params=[Param(k, str(v)) for k, v in params.items()], tags=tags)
    client.set_terminated(run_id)
    return run_id


def _renamed(old: dict[str, float]) -> dict[str, float]:
    """The same figures under today's keys: the legacy map read backwards."""
    back = {o: new for new, olds in keys.LEGACY_KEYS.items() for o in olds}
    return {back.get(k, k): v for k, v in old.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each method logged twice to one store, with the old keys and with the current ones."""
    tmp = tmp_path_factory.mktemp("legacy")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/m.db")
    client = MlflowClient()
    exp = client.create_experiment(EXPERIMENT, artifact_location=str(tmp / "artifacts"))
    ids = {}
    for method, (params, old) in METHODS.items():
        ids[(method, "old")] = _log(client, exp, method, old, params)
        ids[(method, "new")] = _log(client, exp, method, _renamed(old), params)
    loaded, _ = load_runs(RunSelection(experiment=EXPERIMENT))
    yield loaded, ids
    mlflow.set_tracking_uri(previous)


def test_the_legacy_map_covers_every_key_the_old_runs_logged():
    for method, (_, old) in METHODS.items():
        renamed = _renamed(old)
        assert all(k.startswith("eval/") for k in renamed), (method, renamed)
        assert len(renamed) == len(old), method  # no two old keys of one run land on one new key


def test_old_runs_read_like_new_ones_in_the_table_frontier_and_sweep(runs):
    loaded, ids = runs
    stored = loaded.set_index("run_id")
    assert len(stored) == 6 and math.isnan(stored.loc[ids[("ppo", "old")], f"metrics.{keys.EVAL_GOLD_GAIN}"])
    table = comparison_table(loaded).set_index("run_id")
    points = frontier.frontier_points(loaded).set_index("run_id")
    sweep = kl_sweep.sweep_runs(loaded).set_index("run_id")
    columns = ["method", "kl_reference", "gold_reward", "gold_reference", "gold_gain", "gold_gain_ci_low",
               "gold_gain_ci_high", "kl_second_half_mean", "kl_tracking_error", "final_beta", "kl_target",
               "episodes_per_s", "final_gold_gap"]
    for method in METHODS:
        old, new = ids[(method, "old")], ids[(method, "new")]
        pd.testing.assert_series_equal(table.loc[old, columns], table.loc[new, columns], check_names=False)
        assert table.loc[old, "gold_gain"] == PROTOCOL["gold_gain"] and table.loc[old, "method"] == method
        pd.testing.assert_series_equal(points.loc[old], points.loc[new], check_names=False)
        if method != "dpo":  # DPO tracks no KL target
            assert table.loc[old, "kl_second_half_mean"] == TRACKING["kl_second_half_mean"]
            pd.testing.assert_series_equal(sweep.loc[old], sweep.loc[new], check_names=False)
    assert table.loc[ids[("ppo", "old")], "episodes_per_s"] == PPO_ONLY["episodes_per_s"]


def test_a_current_key_wins_over_an_old_one_and_the_input_is_left_alone():
    runs = pd.DataFrame([{"run_id": "a", "metrics.eval/gold_gain": 0.1, "metrics.ppo/eval/gold_gain": 0.9},
                         {"run_id": "b", "metrics.eval/gold_gain": math.nan, "metrics.ppo/eval/gold_gain": 0.9}])
    before = runs.copy()
    out = with_current_keys(runs)
    assert list(out["metrics.eval/gold_gain"]) == [0.1, 0.9]
    pd.testing.assert_frame_equal(runs, before)
