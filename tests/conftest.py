"""Shared fixtures: small synthetic data, a tokenizer trained on it, and quiet, single-threaded torch."""

from __future__ import annotations

import os

import pandas as pd
import pytest

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    # Two cores: tests that train run faster without intra-op thread contention.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_pairs() -> pd.DataFrame:
    from calibrated_rlhf.core.synthetic import SyntheticSpec, make_pairs, make_task

    spec = SyntheticSpec(seed=1, n_pairs=240, n_words=12, max_words=5)
    return make_pairs(spec, make_task(spec))


@pytest.fixture(scope="session")
def tiny_tokenizer(synthetic_pairs):
    from calibrated_rlhf.core.backbone import train_tokenizer

    corpus = list(synthetic_pairs["prompt"]) + list(synthetic_pairs["chosen"]) + list(synthetic_pairs["rejected"])
    return train_tokenizer(corpus, vocab_size=128)


TINY_BACKBONE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="session")
def tiny_run_template(tmp_path_factory):
    """One finished `kedro run --env tiny` of the whole DAG (hash seed 1), shared: tests read it or work on
    copies of it (``tiny_run_project``), never run in it. Each run costs about a minute on two cores."""
    import subprocess
    import sys

    from tests.project import kedro_env, make_project

    project = make_project(tmp_path_factory.mktemp("tiny_run_template") / "project")
    proc = subprocess.run([sys.executable, "-m", "kedro", "run", "--env", "tiny"], cwd=project,
                          env={**kedro_env(project), "PYTHONHASHSEED": "1", "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return project


@pytest.fixture(scope="module")
def tiny_run_project(tiny_run_template, tmp_path_factory):
    """A module's own copy of the shared finished tiny run (data, markers, MLflow store)."""
    from tests.project import copy_project

    return copy_project(tiny_run_template, tmp_path_factory.mktemp("tiny_run") / "project")


@pytest.fixture(autouse=True)
def _mlflow_fluent_state():
    """Each test starts with MLflow's process-wide tracking URI and active experiment as they were: a test
    that points MLflow at its own store must not leave the next test creating runs in an experiment id
    that exists only there."""
    import mlflow
    import mlflow.tracking.fluent as fluent

    uri = mlflow.get_tracking_uri()
    env = {name: os.environ.get(name) for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    fluent._active_experiment_id = None
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    mlflow.set_tracking_uri(uri)


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory):
    """A folder holding a small Qwen2 causal LM and its ChatML tokenizer without a pad token
    (``tests.chat_checkpoint``), saved with ``save_pretrained`` like a downloaded model."""
    from tests.chat_checkpoint import save_chat_checkpoint

    return save_chat_checkpoint(tmp_path_factory.mktemp("chat_checkpoint") / "qwen2-tiny-chat")
