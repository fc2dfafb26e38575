"""Real `kedro run`s of a two-member reward ensemble on the tiny configuration, through PPO: the recipe of docs/ensembles.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.harness import kedro_run, preload, start_kedro_run
from tests.project import make_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The recipe of docs/ensembles.md for an ensemble: data and reference policy first, the members in parallel
    processes (one per GPU in the docs; CPU here), then the rest against them. Every test below reads
    this one project; the one-shot run's wiring (all members in one session) is run in memory by
    tests/pipelines/test_reward_ensemble.py."""
    from mlflow import MlflowClient

    preload()
    project = make_project(tmp_path_factory.mktemp("project"), store=True)
    size = ("--params", "reward_model.ensemble_size=2,reward_model.ensemble.aggregation=mean_minus_std")
    code, out = kedro_run(project, "--env", "tiny", *size, "--pipelines", "data_prep,policy_init", name="first")
    assert code == 0, out[-3000:]
    members = [start_kedro_run(project, "--env", "tiny", *size, "--namespaces", f"member_{i}", name=f"member_{i}")
               for i in (0, 1)]
    for i, proc in enumerate(members):
        proc.join(600)
        assert proc.exitcode == 0, (project / "logs" / f"member_{i}.txt").read_text()[-3000:]
    code, out = kedro_run(project, "--env", "tiny", *size, "--from-nodes", "assemble_reward_ensemble,reference_responses",
                          name="rest")
    assert code == 0, out[-3000:]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("calibrated_rlhf").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert len(runs) == 4  # data and policy, two members, the rest
    return project, client, runs


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


def test_runs_log_members_ensemble_and_over_optimization_curves(finished):
    _, client, runs = finished
    *_, rest = runs
    assert all(run.data.params["reward_model.ensemble_size"] == "2" for run in runs)  # shapes the DAG: logged anyway
    keys = set().union(*(run.data.metrics for run in runs))
    for i in (0, 1):
        assert {f"rm/member_{i}/test_accuracy", f"calibration/member_{i}/test_nll_after",
                f"rm/member_{i}/train/loss"} <= keys
    assert {"rm/test_accuracy", "calibration/test_nll_after", "ensemble/test_nll_after",
            "ensemble/best_member_test_nll_after", "normalization/ensemble_std",
            "eval/final_gold_gap", "eval/final_ensemble_std"} <= set(rest.data.metrics)
    updates = int(rest.data.metrics["eval/updates"])
    for key in ("ppo/rewards/ensemble_std", "ppo/rewards/gold_gap"):
        history = client.get_metric_history(rest.info.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, updates + 1)), key
        assert all(np.isfinite(m.value) for m in history)
    artifacts = {a.path for run in runs for a in client.list_artifacts(run.info.run_id, "reward_model")}
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


def test_the_rest_reads_the_members_and_trains_one_policy(finished):
    project, _, _ = finished
    models = project / "data" / "06_models"
    transform = json.loads((latest(models / "reward_transform.json") / "reward_transform.json").read_text())
    assert len(set(transform["ensemble"]["member_versions"])) == 2
    assert all(len(list((models / f"member_{i}" / "reward_model").iterdir())) == 1 for i in (0, 1))
    assert len(list((models / "policy").iterdir())) == 1


@pytest.mark.parametrize("rule, says", [("ensemble_std", "reward ensemble std"),
                                        ("repetition_surprisal", "repetition surprisal")])
@pytest.mark.parametrize("stage", ["rl", "ppo"])
def test_a_stop_rule_ends_the_run_where_it_fires_and_keeps_that_update(finished, stage, rule, says):
    """``<stage>.<rule>_stop_multiple`` far below what any batch shows (the members' disagreement; the repetition
    surprisal, never 0): the run stops at its first batch, says so, and its checkpoint folder holds the policy it
    fired on; far above it, the run trains to the end. PPO checks a rollout before optimizing on it, so it keeps the
    policy that sampled the batch (update 0); TRL scores and steps in one call, so RLOO keeps the policy one update
    past it (update 1)."""
    from calibrated_rlhf.core.checkpointing import list_checkpoints

    project, client, _ = finished
    size = "reward_model.ensemble_size=2,reward_model.ensemble.aggregation=mean_minus_std"
    updates = 3  # conf/tiny: both stages
    common = f"{size},{stage}.checkpoint_every=100"
    ended = {}
    for multiple in (1e-3, 1e3):
        code, out = kedro_run(project, "--env", "tiny", "--pipelines", stage, "--params",
                              f"{common},{stage}.{rule}_stop_multiple={multiple}", name=f"{stage}_{rule}_{multiple}")
        assert code == 0, out[-3000:]
        run = client.search_runs([client.get_experiment_by_name("calibrated_rlhf").experiment_id],
                                 order_by=["attributes.start_time DESC"], max_results=1)[0]
        ended[multiple] = (run.data.metrics["eval/stopped_early"], run.data.metrics["eval/updates"], out)
        folder = project / "data" / "06_models" / f"{stage}_checkpoints" / run.info.run_id
        ended[multiple] += ([int(p.name.split("_")[1]) for p in list_checkpoints(folder)],
                            len(client.get_metric_history(run.info.run_id, f"{stage}/rewards/{rule}")))
    stopped, updates_run, out, saved, _ = ended[1e-3]
    fired = {"ppo": 0, "rl": 1}[stage]
    assert (stopped, updates_run, saved) == (1.0, float(fired), [fired])
    assert says in out and f"exceeds {rule}_stop" in out
    stopped, updates_run, _, saved, logged = ended[1e3]
    assert (stopped, updates_run, saved) == (0.0, float(updates), [updates])
    assert logged == updates  # the signal reaches the run's MLflow history, one point per update


@pytest.mark.parametrize("stage", ["rl", "ppo"])
def test_a_fitted_warning_stops_the_run_after_the_update_it_fires_on_and_keeps_its_policy(finished, stage, tmp_path):
    """``ppo.trainer.fitted_warning`` / ``rl.fitted_warning``: a warning whose score is its bias alone (every weight
    0), above its threshold, with its base at update 2. The rule refuses a run that does not log a signal it reads
    under the stage's keys, and its score is NaN before the base, so the run stops after update 2 and keeps the
    policy that update made, in both stages."""
    from calibrated_rlhf.core.checkpointing import list_checkpoints
    from calibrated_rlhf.core.fitted_warning import FEATURES, FittedWarning

    project, client, _ = finished
    n = len(FEATURES)
    path = tmp_path / "fitted_warning.json"
    FittedWarning((0.0,) * n, (1.0,) * n, (0.0,) * n, bias=1.0, threshold=0.0, window=1, base=1).save(path)
    size = "reward_model.ensemble_size=2,reward_model.ensemble.aggregation=mean_minus_std"
    key = {"ppo": "ppo.trainer.fitted_warning", "rl": "rl.fitted_warning"}[stage]
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", stage, "--params",
                          f"{size},{stage}.checkpoint_every=100,{key}={path}", name=f"{stage}_fitted")
    assert code == 0, out[-3000:]
    run = client.search_runs([client.get_experiment_by_name("calibrated_rlhf").experiment_id],
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    folder = project / "data" / "06_models" / f"{stage}_checkpoints" / run.info.run_id
    assert (run.data.metrics["eval/stopped_early"], run.data.metrics["eval/updates"]) == (1.0, 2.0)
    assert [int(p.name.split("_")[1]) for p in list_checkpoints(folder)] == [2]
    assert "fitted warning score 1.000 exceeds its threshold 0.000 at update 2" in out


@pytest.mark.parametrize("stage", ["rl", "ppo"])
def test_a_broken_fitted_warning_file_stops_the_stage_by_name_before_it_writes_anything(finished, stage, tmp_path):
    """A fitted warning file that is not one (a user's typo, a truncated copy): the run fails naming the file, and no
    model, checkpoint or data version appears that a later run would load."""
    project, _, _ = finished
    broken = tmp_path / "broken_warning.json"
    broken.write_text('{"mean": [0.0')
    models = project / "data"
    before = sorted(p for p in models.rglob("*") if p.is_file())
    key = {"ppo": "ppo.trainer.fitted_warning", "rl": "rl.fitted_warning"}[stage]
    size = "reward_model.ensemble_size=2,reward_model.ensemble.aggregation=mean_minus_std"
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", stage, "--params", f"{size},{key}={broken}",
                          name=f"{stage}_broken_warning")
    assert code != 0 and "broken_warning.json" in out
    assert sorted(p for p in models.rglob("*") if p.is_file()) == before


def test_best_of_n_ranks_the_pool_by_every_member_and_aggregation(finished):
    """One pool, every ranking: the members alone and each aggregation. The transform ranks by the ensemble's own
    aggregation (mean_minus_std here), so those two curves are one; the members, who disagree, rank otherwise."""
    from tests.harness import saved

    project, _, _ = finished
    size = "reward_model.ensemble_size=2,reward_model.ensemble.aggregation=mean_minus_std"
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "best_of_n", "--params", size, name="best_of_n")
    assert code == 0, out[-3000:]
    curves = saved(project, "data/08_reporting/best_of_n_rankings.csv")
    assert list(dict.fromkeys(curves["ranking"])) == ["transform", "member_0", "member_1", "mean", "min",
                                                      "mean_minus_std"]
    by = {name: group.reset_index(drop=True) for name, group in curves.groupby("ranking")}
    assert by["transform"]["gold_gain"].to_numpy() == pytest.approx(by["mean_minus_std"]["gold_gain"].to_numpy())
    assert not np.allclose(by["member_0"]["gold_gain"], by["member_1"]["gold_gain"])
    points = saved(project, "data/08_reporting/best_of_n_points.csv")
    assert points["gold_gain"].to_numpy() == pytest.approx(by["transform"]["gold_gain"].to_numpy())
    for group in by.values():  # every ranking's KL within the bound and growing with n
        assert (group["kl"] <= group["kl_bound"] + 1e-12).all() and group["kl"].is_monotonic_increasing
