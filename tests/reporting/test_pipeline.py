"""The reporting pipeline, the CLI and the notebook against runs logged to a scratch MLflow store."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from calibrated_rlhf.runtime import report_cli
from calibrated_rlhf.pipelines.reporting import create_pipeline
from calibrated_rlhf.pipelines.reporting.nodes import ReportingParams, compare_runs
from calibrated_rlhf.reporting import verdicts
from calibrated_rlhf.reporting.runs import load_runs
from tests.pipelines.helpers import run

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "calibrated_rlhf"
OUTPUTS = {"comparison_report_md", "comparison_report_html", "comparison_table", "comparison_curves"}
CONF = yaml.safe_load((ROOT / "conf/base/parameters_reporting.yml").read_text())["reporting"]


def params(**overrides: object) -> ReportingParams:
    """The project's reporting parameters (its scenario roles included), with ``overrides``."""
    return ReportingParams(**{**CONF, **overrides})


def log_run(client: MlflowClient, experiment_id: str, name: str, scenario: str | None = None,
            metrics: dict[str, float] | None = None, params: dict[str, object] | None = None,
            kl: float | None = None) -> str:
    """One finished run; with ``kl``, PPO curves of 8 updates whose KL settles at ``kl`` (target 1)."""
    tags = [RunTag("mlflow.runName", name)] + ([RunTag("scenario", scenario)] if scenario else [])
    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    now = int(time.time() * 1000)
    points = [Metric(k, v, now, 0) for k, v in (metrics or {}).items()]
    if kl is not None:
        for step in range(8):
            points += [Metric("ppo/objective/kl", kl * (1 + 0.5 ** step), now, step),
                       Metric("ppo/objective/kl_target", 1.0, now, step),
                       Metric("ppo/objective/beta", 0.1 / kl + 0.01 * step, now, step),
                       Metric("ppo/rewards/gold", 0.05 * step, now, step),
                       Metric("ppo/perf/episodes_per_s", 40.0 + step, now, step)]
    client.log_batch(run_id, metrics=points, params=[Param(k, str(v)) for k, v in (params or {}).items()], tags=tags)
    client.set_terminated(run_id)
    return run_id


def ppo(reward: str, a: float) -> dict[str, object]:
    return {"normalization.method": reward, "ppo.raw_reward_multiplier": a, "ppo.trainer.kl_control": "adaptive"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Scenario runs, an untagged run and an earlier report's run, in a scratch sqlite store."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/m.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=str(tmp / "artifacts"))
    calibrated = {"calibration/test_ece_before": 0.12, "calibration/test_ece_after": 0.015,
                  "calibration/test_oracle_ece": 0.012, "calibration/test_nll_before": 0.71,
                  "calibration/test_nll_after": 0.64, "calibration/temperature": 3.2}
    ids = {
        "baseline": log_run(client, exp, "__default__", "baseline", kl=1.01, params=ppo("zscore", 1) | {
            "calibration.enabled": True, "reward_model.training.center_rewards_coefficient": 0.01},
            metrics=calibrated | {"rm/test_reward_mean": 0.02, "normalization/mean": 0.3, "normalization/std": 1.7,
                                  "eval/gold_policy": 0.40, "eval/gold_gain": 0.1}),
        "no_centering": log_run(client, exp, "__default__", "no_centering", metrics={"rm/test_reward_mean": 2.5}),
        "untagged": log_run(client, exp, "__default__", metrics={"rm/test_accuracy": 0.8}),
        "reporting": log_run(client, exp, "reporting"),
    }
    for scenario, reward, a, kl, gold in [("scale_0.25", "zscore", 0.25, 0.99, 0.41),
                                          ("scale_4", "zscore", 4, 1.03, 0.39),
                                          ("scale_0.25_raw", "raw", 0.25, 0.15, 0.20),
                                          ("scale_1_raw", "raw", 1, 1.0, 0.40),
                                          ("scale_4_raw", "raw", 4, 6.0, 0.10)]:
        # The scale runs log PPO's evaluation; the baseline's KL summary comes from its curve.
        ids[scenario] = log_run(client, exp, "ppo", scenario, kl=kl, params=ppo(reward, a),
                                metrics={"eval/gold_policy": gold, "eval/kl_second_half_mean": kl})
    # An RLOO run of the baseline scenario (`--pipelines rl`), newer than PPO's: its own row, label and verdicts.
    ids["baseline_rloo"] = log_run(client, exp, "rl", "baseline", params={
        "normalization.method": "zscore", "rl.raw_reward_multiplier": 1.0, "rl.kl_target": 4.0,
        "rl.kl_control": "adaptive", "rl.scale_rewards": None},
        metrics={"eval/kl_second_half_mean": 4.4, "eval/kl_tracking_error": 0.1, "eval/final_beta": 0.07,
                 "eval/kl_reference": 4.6, "eval/gold_gain": 0.2, "eval/gold_policy": 0.5})
    client.set_tag(ids["baseline_rloo"], "rl/algorithm", "rloo")
    yield uri, ids
    mlflow.set_tracking_uri(previous)


def test_pipeline_reads_only_parameters():
    pipeline = create_pipeline()
    assert pipeline.inputs() == {"params:reporting"} and pipeline.outputs() == OUTPUTS


def test_pipeline_lays_the_runs_side_by_side_with_computed_verdicts(store):
    _, ids = store
    out = run(create_pipeline(), {"params:reporting": params(last=None)})
    md, page, table = out["comparison_report_md"], out["comparison_report_html"], out["comparison_table"]
    assert len(table) == 9 and ids["reporting"] not in set(table["run_id"])
    for label in ("baseline", "baseline [rloo]", "no_centering", "scale_0.25", "scale_4_raw",
                  f"__default__ ({ids['untagged'][:8]})"):
        assert f"| {label} |" in md, label
    baseline_kl = 1.01 * np.mean([1 + 0.5 ** step for step in range(4, 8)])
    assert "**Reward scale (PPO): supported.**" in md and f"KL moves 4.9% (0.99 to {baseline_kl:.3g})" in md
    assert verdicts.scale_verdict(table, params().scenario_roles.roles()).evidence in md
    assert "Without it (raw reward), across a in {0.25, 1, 4}, KL moves" in md
    assert "**Centering: supported.**" in md and "0.02 with centering (baseline) and 2.5 without it" in md
    assert "**Calibration: supported.**" in md and "Missing: norm_minmax" not in md
    assert "missing: norm_none, norm_minmax" in md and "missing: kl_fixed" in md
    assert "reporting" in md.split("## Verdicts")[0]  # the earlier report's run is named as left out
    rloo = table.set_index("run_id").loc[ids["baseline_rloo"]]
    assert (rloo["method"], rloo["kl_target"], rloo["kl_second_half_mean"], rloo["kl_reference"]) == ("rloo", 4, 4.4, 4.6)
    assert "**Reward scale (RLOO): undecided.**" in md and "**Normalization (RLOO): undecided.**" in md
    baseline = table.set_index("run_id").loc[ids["baseline"]]  # PPO's baseline, not shadowed by the newer RLOO run
    assert baseline["method"] == "ppo"
    assert baseline["final_beta"] == pytest.approx(0.1 / 1.01 + 0.07)
    assert baseline["episodes_per_s"] == pytest.approx(43.5)
    assert "data:image/png;base64," in page and "<table" in page
    assert len(out["comparison_curves"].axes) == 4


def test_parameters_narrow_the_runs(store):
    _, ids = store
    runs, _ = load_runs(params(scenarios=["baseline", "no_centering"]).selection())
    assert set(runs["tags.scenario"]) == {"baseline", "no_centering"}
    runs, _ = load_runs(params(last=2).selection())
    assert len(runs) == 2
    runs, notes = load_runs(params(run_ids=[ids["scale_4"], "0" * 32]).selection())
    assert list(runs["run_id"]) == [ids["scale_4"]] and notes == [f"Runs not found: {'0' * 32}."]
    out = run(create_pipeline(), {"params:reporting": params(run_ids=[ids["scale_4"]])})
    assert list(out["comparison_table"]["run_id"]) == [ids["scale_4"]]
    assert "missing: scale_0.25" in out["comparison_report_md"]


def test_the_active_run_is_left_out(store):
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="__default__") as active:
        mlflow.log_metric("rm/test_accuracy", 0.5)
        md, _, table, _ = compare_runs(params(last=None))
    assert active.info.run_id not in set(table["run_id"]) and "the run this report is logged to" in md


@pytest.mark.parametrize("overrides", [{"experiment": "absent"}, {"filter_string": "tags.scenario = 'nothing'"}])
def test_no_matching_runs_still_writes_a_report(store, overrides):
    out = run(create_pipeline(), {"params:reporting": params(**overrides)})
    assert "No matching runs" in out["comparison_report_md"] and "No matching runs" in out["comparison_report_html"]
    assert out["comparison_table"].empty


def test_catalog_entries_save_the_outputs_and_parameters_validate(store, tmp_path):
    from kedro.io import DataCatalog

    out = run(create_pipeline(), {"params:reporting": ReportingParams(**CONF)})
    entries = yaml.safe_load((ROOT / "conf/base/catalog_reporting.yml").read_text())
    assert set(entries) == OUTPUTS
    for name, entry in entries.items():
        assert entry["versioned"] and entry["metadata"] == {"mlflow_artifact_path": "report"}, name
        entry["filepath"] = str(tmp_path / Path(entry["filepath"]).name)
    catalog = DataCatalog.from_config(entries)
    for name in OUTPUTS:
        catalog.save(name, out[name])
    saved = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert saved == {"comparison_report.md", "comparison_report.html", "comparison_table.csv", "comparison_curves.png"}


def test_cli_writes_the_same_report_and_logs_it_to_its_own_run(store, tmp_path, capsys):
    uri, ids = store
    rc = report_cli.main(["--tracking-uri", uri, "--experiment", EXPERIMENT, "--out", str(tmp_path),
                          "--filter", "tags.scenario LIKE 'scale_%'", "--log-to-mlflow"])
    assert rc == 0
    md = (tmp_path / "comparison_report.md").read_text()
    assert "**Reward scale (PPO): supported.**" in md and "| no_centering |" not in md and "| scale_4_raw |" in md
    assert "data:image/png;base64," in (tmp_path / "comparison_report.html").read_text()
    logged = capsys.readouterr().out.split("logged to MLflow run ")[1].split()[0]
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(logged, "report")}
    assert "report/comparison_report.html" in artifacts
    with pytest.raises(SystemExit):
        report_cli.parse_args(["--runs", ids["baseline"], "--last", "3"])


def test_notebook_runs_against_the_store(store, monkeypatch, capsys):
    uri, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    nb = json.loads((ROOT / "notebooks/compare_runs.ipynb").read_text())
    namespace: dict[str, object] = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "compare_runs.ipynb", "exec"), namespace)
    assert len(namespace["table"]) >= 9 and namespace["verdicts"][0].holds is True
    assert np.isfinite(namespace["table"]["kl_second_half_mean"]).sum() >= 6
