"""The real `kedro run` on the tiny configuration, read back from MLflow with MlflowClient."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.harness import kedro_run, preload, squash

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tiny_run_project) -> Path:
    """A copy of the project in a scratch folder where `kedro run --env tiny` has run (the package is installed)."""
    return tiny_run_project


@pytest.fixture(scope="module")
def finished_run(project):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("calibrated_rlhf")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_run_logs_parameters_flattened(finished_run):
    _, run = finished_run
    p = run.data.params
    assert p["reward_model.training.center_rewards_coefficient"] == "0.01"
    assert p["backbone.hidden_size"] == "32"  # the tiny environment's override
    assert p["data_prep.source.kind"] == "synthetic"


def test_run_logs_the_issue_metrics_and_curves(finished_run):
    client, run = finished_run
    keys = set(run.data.metrics)
    for key in ("data/n_train", "data/n_validation", "data/n_calibration", "data/n_test", "data/n_dropped",
                "rm/test_accuracy", "rm/test_bayes_accuracy", "rm/test_reward_mean", "rm/test_reward_std",
                "rm/test_margin_mean"):
        assert key in keys, key
    history = client.get_metric_history(run.info.run_id, "rm/train/loss")
    assert len(history) >= 3 and len({m.step for m in history}) == len(history)
    assert run.data.metrics["data/n_train"] + run.data.metrics["data/n_test"] > 100
    assert 0 < run.data.metrics["rm/train/packed_batch_fraction"] <= 1  # padding-free batches in a real run
    assert run.data.metrics["rm/train/trimmed_batch_fraction"] == 1  # the last layer at the read positions


def test_run_records_provenance_and_data_hashes(finished_run):
    _, run = finished_run
    tags = run.data.tags
    assert len(tags["data/content_hash/train"]) == 64
    assert tags["provenance/version/trl"]
    # the machine decides the last bits of every float kernel, so a rerun elsewhere is not bit for bit the same
    assert re.fullmatch(r".+ \((DEFAULT|AVX2|AVX512|ZVECTOR|VSX|SVE\d*)\).*", tags["provenance/machine"])
    assert "provenance/loaded/train_pairs" in tags  # the Kedro version of a loaded versioned dataset


def test_run_logs_a_loadable_model(finished_run, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    client, run = finished_run
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"reward_model", "tokenizer"} <= artifacts
    model_dir = client.download_artifacts(run.info.run_id, "reward_model", str(tmp_path))
    tok_dir = client.download_artifacts(run.info.run_id, "tokenizer", str(tmp_path))
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    reward = model(**tok(["Describe the food in Paris. calm bright<eos>"], return_tensors="pt")).logits
    assert reward.shape == (1, 1) and torch.isfinite(reward).all()


def test_bad_parameter_fails_before_training_and_writes_nothing(project, finished_run):
    preload()
    before = sorted(p.relative_to(project) for p in (project / "data").rglob("*"))
    code, out = kedro_run(project, "--env", "tiny", "--params", "reward_model.training.learning_rate=-1",
                          name="bad_parameter")
    assert code != 0
    assert "learning_rate" in out
    assert sorted(p.relative_to(project) for p in (project / "data").rglob("*")) == before


def test_bad_data_fails_naming_the_row(project, finished_run, tmp_path):
    primary = sorted((project / "data" / "03_primary").rglob("*"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q?", "chosen": " a", "rejected": " b"}\n'
                   '{"prompt": "R?", "chosen": " same", "rejected": " same"}\n')
    preload()
    code, out = kedro_run(project, "--env", "tiny", "--params",
                          f"data_prep.source.kind=file,data_prep.source.path={bad}", name="bad_data")
    assert code != 0
    assert squash("chosen identical to rejected in field 'chosen/rejected': rows 1") in squash(out)
    assert sorted((project / "data" / "03_primary").rglob("*")) == primary  # nothing validated, nothing written
