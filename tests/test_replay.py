"""`python -m calibrated_rlhf.runtime.replay RUN_ID` redoes a past run: same parameters, same upstream versions."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from calibrated_rlhf.runtime import replay

from tests.harness import kedro_run, preload
from tests.project import make_project

ROOT = Path(__file__).resolve().parents[1]
TIMING = re.compile(r"(runtime(_s)?|_per_s(econd)?)$")  # wall-clock measurements, not results
TOL = 1e-6




def _env(project: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
            "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "COLUMNS": "200"}


def _replay_cli(project: Path, args: list[str], out: Path, err: Path) -> None:
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    # pytest's capture replaced sys.stdout/stderr with its own objects: point them at the files too.
    sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in (1, 2))  # noqa: SIM115
    os.chdir(project)
    os.environ.update(_env(project))
    sys.argv = ["python -m calibrated_rlhf.runtime.replay", *args]
    sys.exit(replay.main(args))


def run_replay(project: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m calibrated_rlhf.runtime.replay ARGS` in ``project``: its ``main``, forked from the test process with
    the heavy modules imported once (tests/harness.py); the `kedro run` it starts is a fresh interpreter of its own."""
    import multiprocessing

    preload()
    out, err = project / "logs" / "replay_stdout.txt", project / "logs" / "replay_stderr.txt"
    out.parent.mkdir(exist_ok=True)
    proc = multiprocessing.get_context("fork").Process(target=_replay_cli, args=(project, list(args), out, err))
    proc.start()
    proc.join(600)
    assert proc.exitcode is not None, "replay did not finish"
    return subprocess.CompletedProcess(args, proc.exitcode, out.read_text(), err.read_text())


def latest_run(client):
    exp = client.get_experiment_by_name("calibrated_rlhf")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]


def assert_same_metrics(client, run_a: str, run_b: str) -> None:
    keys_a, keys_b = set(client.get_run(run_a).data.metrics), set(client.get_run(run_b).data.metrics)
    assert keys_a == keys_b
    for key in sorted(k for k in keys_a if not TIMING.search(k)):
        ha = sorted((m.step, m.value) for m in client.get_metric_history(run_a, key))
        hb = sorted((m.step, m.value) for m in client.get_metric_history(run_b, key))
        assert [s for s, _ in ha] == [s for s, _ in hb], key
        for (step, a), (_, b) in zip(ha, hb):
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=TOL, abs_tol=TOL), (key, step, a, b)


# ---- the command it builds (fast) -------------------------------------------------------------------


def test_kedro_args_pin_upstream_versions_and_keep_filters():
    run_params = {
        "env": "tiny", "pipeline_names": ["calibration"], "tags": ["fit"], "node_names": [], "from_nodes": [],
        "to_nodes": ["report_calibration"], "from_inputs": [], "to_outputs": [], "namespaces": [],
        "load_versions": {"reward_model": "2026-01-01T00.00.00.000Z"},
        "upstream_versions": {"reward_model": "2026-01-01T00.00.00.000Z", "tokenizer": "2026-01-02T00.00.00.000Z",
                              "temperature_fit": "2026-01-03T00.00.00.000Z"},
        "produced_datasets": ["temperature_fit"],
        "runtime_params": {"calibration": {"n_bins": 10, "note": "1e-3"}},
        "runner": "kedro.runner.thread_runner.ThreadRunner", "only_missing_outputs": False,
    }
    args = replay.kedro_args(run_params, "replay_abcdef12")
    assert args == [
        "run", "--env", "replay_abcdef12", "--pipelines", "calibration", "--tags", "fit",
        "--to-nodes", "report_calibration",
        "--load-versions", "reward_model:2026-01-01T00.00.00.000Z,tokenizer:2026-01-02T00.00.00.000Z",
        "--params", 'calibration.n_bins=10,calibration.note="1e-3"',
        "--runner", "kedro.runner.thread_runner.ThreadRunner",
    ]


def test_parameters_file_round_trips_and_an_existing_env_is_never_overwritten(tmp_path):
    params = {"a": {"f": 1e-3, "s": "1e-3", "n": None, "l": [1, "x"], "lit": "${not.an.interpolation}"}}
    text = replay.parameters_yaml(params, "abc")
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "catalog.yml").write_text("x: {type: MemoryDataset}\n")
    (tmp_path / "tiny" / "credentials.yml").write_text("secret: 1\n")
    env_dir = replay.write_replay_env(tmp_path, "replay_abc", "tiny", text)
    assert (env_dir / "parameters.yml").read_text() == text
    assert (env_dir / "catalog.yml").exists() and not (env_dir / "credentials.yml").exists()

    (env_dir / "parameters.yml").write_text("a: {f: 2}\n")  # a user's edit
    replay.write_replay_env(tmp_path, "replay_abc", "tiny", text)
    assert (env_dir / "parameters.yml").read_text() == "a: {f: 2}\n"


def test_rejects_what_is_not_a_run_id(capsys):
    with pytest.raises(SystemExit):
        replay.main(["../../etc", "--dry-run"])
    assert "not an MLflow run id" in capsys.readouterr().err


# ---- real runs and replays ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: data_prep + reward_model with a --params override. B: calibration on A's outputs."""
    from mlflow import MlflowClient

    preload()
    project = make_project(tmp_path_factory.mktemp("replay"), store=True)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "data_prep,reward_model",
                          "--params", "reward_model.training.learning_rate=0.002", name="a")
    assert code == 0, out[-3000:]
    run_a = latest_run(client)
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "calibration", name="b")
    assert code == 0, out[-3000:]
    run_b = latest_run(client)
    return project, client, run_a, run_b


@pytest.mark.slow
def test_dry_run_prints_the_command_and_writes_nothing(runs):
    project, _, run_a, run_b = runs
    proc = run_replay(project, run_b.info.run_id, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    env = f"replay_{run_b.info.run_id[:8]}"
    assert f"kedro run --env {env} --pipelines calibration --load-versions " in proc.stdout
    assert f"reward_model:{run_a.data.tags['run_id']}" in proc.stdout  # A's session id is its save version
    assert f"CALIBRATED_RLHF_REPLAY_OF={run_b.info.run_id}" in proc.stdout
    assert not (project / "conf" / env).exists()


@pytest.fixture(scope="module")
def replays(runs):
    """Replay A (which writes newer versions of everything), then B, which must still read A's."""
    project, client, run_a, run_b = runs
    out = []
    for run in (run_a, run_b):
        proc = run_replay(project, run.info.run_id)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        new = latest_run(client)
        assert f"MLflow run {new.info.run_id}" in proc.stdout
        out.append(new)
    return out


@pytest.mark.slow
def test_replay_reproduces_parameters_and_metrics(runs, replays):
    project, client, run_a, _ = runs
    replay_a, _ = replays
    assert replay_a.data.tags["replay_of"] == run_a.info.run_id
    assert replay_a.data.tags["provenance/env"] == f"replay_{run_a.info.run_id[:8]}"
    assert replay_a.data.params == run_a.data.params
    assert replay_a.data.params["reward_model.training.learning_rate"] == "0.002"  # the --params override
    assert_same_metrics(client, run_a.info.run_id, replay_a.info.run_id)
    written = yaml.safe_load((project / "conf" / f"replay_{run_a.info.run_id[:8]}" / "parameters.yml").read_text())
    assert written["reward_model"]["training"]["learning_rate"] == 0.002
    assert written["backbone"]["hidden_size"] == 32


@pytest.mark.slow
def test_replay_of_a_later_stage_reads_the_recorded_upstream_versions(runs, replays):
    _, client, run_a, run_b = runs
    replay_a, replay_b = replays
    version_a = run_a.data.tags["run_id"]  # kedro session id = the versions A saved
    assert replay_a.data.tags["run_id"] != version_a  # newer versions of every dataset now exist
    assert replay_b.data.tags["replay_of"] == run_b.info.run_id
    for name in ("reward_model", "tokenizer", "calibration_pairs", "test_scores"):
        assert replay_b.data.tags[f"provenance/loaded/{name}"] == version_a, name
        digest = f"provenance/input_sha256/{name}"
        assert replay_b.data.tags[digest] == run_b.data.tags[digest]
    assert_same_metrics(client, run_b.info.run_id, replay_b.info.run_id)
