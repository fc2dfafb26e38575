"""The report over a real run: `kedro run --env tiny` in a copy of the project, then the report (the CLI,
and the table it is built from) over that run's MLflow store. Every column the table has is filled for
the run, except the ones named below with the reason they are empty for one tiny run; a metric key the
nodes stopped logging under the name the report reads would leave its column empty and fail here."""

from __future__ import annotations

import math

import mlflow
import pytest
from mlflow import MlflowClient

from calibrated_rlhf.runtime import report_cli
from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core.kl_tracking import summarize_kl_tracking
from calibrated_rlhf.reporting.runs import RunSelection, load_histories, load_runs
from calibrated_rlhf.reporting.table import comparison_table, empty_columns
from tests.project import ROOT

pytestmark = pytest.mark.slow

# Empty for a single `--env tiny` run, and why.
EXPECTED_EMPTY = {
    "scenario": "conf/tiny sets no scenario, so the run has no scenario tag (its label is name and short id)",
    "aggregation": "one reward model: reward_model.ensemble.aggregation is not logged without an ensemble",
    "ensemble_nll_after": "ensemble/* is logged by reward_ensemble, which runs only with ensemble_size > 1",
    "best_member_nll_after": "the same: no members",
    "final_ensemble_std": "ppo/rewards/ensemble_std exists only when an ensemble scores the responses",
    "scale_rewards": "GRPO's rl.scale_rewards: a PPO run has none",
}


@pytest.fixture(scope="module")
def tiny_run(tiny_run_project):
    """(tracking URI, run id) of one finished `kedro run --env tiny`."""
    project = tiny_run_project
    uri = f"sqlite:///{project / 'mlflow.db'}"
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("calibrated_rlhf").experiment_id])
    assert len(runs) == 1
    return uri, runs[0].info.run_id


@pytest.fixture
def tracking(tiny_run):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tiny_run[0])
    yield tiny_run
    mlflow.set_tracking_uri(previous)


def test_every_column_is_filled_for_the_run_but_the_named_ones(tracking):
    _, run_id = tracking
    runs, notes = load_runs(RunSelection())
    table = comparison_table(runs, load_histories(runs["run_id"]))
    assert list(table["run_id"]) == [run_id] and notes == []
    assert sorted(empty_columns(table)) == sorted(EXPECTED_EMPTY)


def test_the_table_reads_what_the_ppo_stage_logged_and_its_curves_agree(tracking):
    _, run_id = tracking
    run = MlflowClient().get_run(run_id)
    runs, _ = load_runs(RunSelection(run_ids=(run_id,)))
    histories = load_histories([run_id])
    row = comparison_table(runs, histories).iloc[0]
    logged = run.data.metrics
    # the method is the run's tag, as for every RL method, not guessed from its curves
    assert run.data.tags[keys.RL_ALGORITHM_TAG] == "ppo" and row["method"] == "ppo"
    assert row["final_beta"] == logged[keys.EVAL_FINAL_BETA]
    assert row["episodes_per_s"] == logged[keys.EVAL_EPISODES_PER_S]
    assert row["kl_tracking_error"] == logged[keys.EVAL_KL_TRACKING_ERROR]
    # Recomputed from the logged curves with the stage's own summary, the figures are the ones it logged.
    curve = {k: list(histories.loc[histories["key"] == k].sort_values("step")["value"])
             for k in (keys.PPO_KL, keys.PPO_BETA, keys.PPO_EPISODES_PER_S)}
    again = summarize_kl_tracking(curve[keys.PPO_KL], row["kl_target"], curve[keys.PPO_BETA],
                                  curve[keys.PPO_EPISODES_PER_S])
    assert math.isclose(again.kl_second_half_mean, logged[keys.EVAL_KL_SECOND_HALF_MEAN], rel_tol=1e-9)
    assert again.final_beta == logged[keys.EVAL_FINAL_BETA]
    assert again.updates == logged[keys.EVAL_UPDATES]


def test_the_cli_report_shows_no_empty_cell(tiny_run, tmp_path):
    uri, run_id = tiny_run
    previous = mlflow.get_tracking_uri()
    try:
        rc = report_cli.main(["--tracking-uri", uri, "--out", str(tmp_path),
                              "--parameters", str(ROOT / "conf/base/parameters_reporting.yml")])
    finally:
        mlflow.set_tracking_uri(previous)
    assert rc == 0
    md = (tmp_path / "comparison_report.md").read_text()
    cells = [c.strip() for line in md.splitlines() if line.startswith("| ") for c in line.strip("|").split("|")]
    assert run_id[:8] in cells and "n/a" not in cells
    for column in EXPECTED_EMPTY:
        assert column not in cells, column  # left out of the rendered sections, not shown as n/a
