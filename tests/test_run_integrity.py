"""Version pinning, completion markers and lineage (calibrated_rlhf.runtime.run_integrity) over a real catalog of
versioned JSON files; staging debris (calibrated_rlhf.core.staging); killed MLflow runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from kedro.io import DataCatalog
from kedro.io.core import generate_timestamp
from kedro.pipeline import Node, Pipeline

from calibrated_rlhf.core import staging
from calibrated_rlhf.runtime.run_integrity import (
    InconsistentArtifacts,
    latest_complete,
    lineage,
    read_marker,
    resolve_versions,
    write_marker,
)


def _catalog(root: Path, save_version: str, load_versions: dict[str, str] | None = None) -> DataCatalog:
    config = {name: {"type": "json.JSONDataset", "filepath": str(root / f"{name}.json"), "versioned": True}
              for name in ("tokenizer", "model", "transform")}
    return DataCatalog.from_config(config, save_version=save_version, load_versions=load_versions or {})


def _save(root: Path, name: str, version: str, data, complete: bool = True, made_from: dict | None = None) -> None:
    """A version on disk as a run would leave it: with a marker if that run completed."""
    catalog = _catalog(root, version)
    catalog.save(name, data)
    if complete:
        write_marker(catalog.get(name), version, {"dataset": name, "lineage": made_from or {}})


def _identity(x):
    return x


TRAIN = Pipeline([Node(_identity, "tokenizer", "model", name="train")])
TRAIN_AND_USE = Pipeline([Node(_identity, "tokenizer", "model", name="train"),
                          Node(lambda t, m: m, ["tokenizer", "model"], "transform", name="use")])
USE = Pipeline([Node(lambda t, m: m, ["tokenizer", "model"], "transform", name="use")])


def test_outputs_load_this_runs_version_even_when_a_newer_one_appears(tmp_path):
    """Two runs in one folder: the other run saves a newer version between our save and our load."""
    _save(tmp_path, "tokenizer", "2026-01-01T00.00.00.000Z", "tok")
    ours = "2026-01-02T00.00.00.000Z"
    catalog = _catalog(tmp_path, ours)
    resolve_versions(TRAIN_AND_USE, catalog)
    catalog.save("model", "ours")
    _save(tmp_path, "model", "2026-01-03T00.00.00.000Z", "theirs")  # the concurrent run, newer
    assert catalog.load("model") == "ours"


def test_inputs_resolve_to_the_newest_completed_run(tmp_path):
    _save(tmp_path, "tokenizer", "2026-01-01T00.00.00.000Z", "done")
    _save(tmp_path, "tokenizer", "2026-01-02T00.00.00.000Z", "killed", complete=False)
    catalog = _catalog(tmp_path, generate_timestamp())
    resolved = resolve_versions(TRAIN, catalog)
    assert resolved["tokenizer"] == "2026-01-01T00.00.00.000Z"
    assert catalog.load("tokenizer") == "done"
    assert latest_complete(catalog.get("tokenizer")) == "2026-01-01T00.00.00.000Z"


def test_an_input_no_completed_run_produced_is_refused_before_the_run(tmp_path):
    _save(tmp_path, "tokenizer", "2026-01-02T00.00.00.000Z", "failed", complete=False)
    with pytest.raises(InconsistentArtifacts, match=r"'tokenizer' .*no completed run has produced it "
                                                    r"\(1 version\(s\) of runs that failed or were killed"):
        resolve_versions(TRAIN, _catalog(tmp_path, generate_timestamp()))


def test_a_pinned_version_wins_even_if_its_run_did_not_complete(tmp_path):
    _save(tmp_path, "tokenizer", "2026-01-01T00.00.00.000Z", "done")
    _save(tmp_path, "tokenizer", "2026-01-02T00.00.00.000Z", "partial", complete=False)
    pin = {"tokenizer": "2026-01-02T00.00.00.000Z"}
    catalog = _catalog(tmp_path, generate_timestamp(), pin)
    assert resolve_versions(TRAIN, catalog, pin)["tokenizer"] == pin["tokenizer"]
    assert catalog.load("tokenizer") == "partial"


def test_inputs_made_from_another_version_of_a_common_ancestor_are_refused_naming_both(tmp_path):
    old, new = "2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"
    _save(tmp_path, "tokenizer", old, "tok-1")
    _save(tmp_path, "model", old, "model-1", made_from={"tokenizer": old})
    _save(tmp_path, "tokenizer", new, "tok-2")  # a later data_prep-only run
    catalog = _catalog(tmp_path, generate_timestamp())
    resolved = resolve_versions(USE, catalog)
    with pytest.raises(InconsistentArtifacts) as err:
        lineage(USE, catalog, resolved)
    message = str(err.value)
    assert "node 'use'" in message
    assert f"this run loads 'tokenizer' version {new}" in message
    assert f"'model' (version {old}) was made from 'tokenizer' version {old}" in message


def test_lineage_passes_through_loaded_artifacts_and_this_runs_outputs(tmp_path):
    old = "2026-01-01T00.00.00.000Z"
    _save(tmp_path, "tokenizer", old, "tok-1")
    ours = generate_timestamp()
    catalog = _catalog(tmp_path, ours)
    resolved = resolve_versions(TRAIN_AND_USE, catalog)
    origins = lineage(TRAIN_AND_USE, catalog, resolved)
    assert origins["model"] == {"tokenizer": old}
    assert origins["transform"] == {"tokenizer": old, "model": ours}


def test_outputs_of_one_node_name_each_other(tmp_path):
    """Pairs and their synthetic task come from one node: a run mixing two runs' of them is refused."""
    old, new = "2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"
    both = Pipeline([Node(lambda: ("t", "m"), None, ["tokenizer", "model"], name="make")])
    for version in (old, new):
        catalog = _catalog(tmp_path, version)
        resolved = resolve_versions(both, catalog)
        origins = lineage(both, catalog, resolved)
        catalog.save("tokenizer", "t")
        catalog.save("model", "m")
        for name in ("tokenizer", "model"):
            write_marker(catalog.get(name), version, {"lineage": origins[name]})
    assert origins["model"] == {"tokenizer": new}
    pin = {"tokenizer": old}  # the newest model with an older tokenizer
    catalog = _catalog(tmp_path, generate_timestamp(), pin)
    with pytest.raises(InconsistentArtifacts, match=f"'model' \\(version {new}\\) was made from 'tokenizer'"):
        lineage(USE, catalog, resolve_versions(USE, catalog, pin))


def test_a_failed_run_removes_what_it_saved_and_nothing_else(tmp_path):
    from calibrated_rlhf.runtime.run_integrity import discard_outputs

    _save(tmp_path, "tokenizer", "2026-01-01T00.00.00.000Z", "tok")
    ours = generate_timestamp()
    catalog = _catalog(tmp_path, ours)
    resolve_versions(TRAIN_AND_USE, catalog)
    catalog.save("model", "half")  # then the run fails before 'transform'
    before_tokenizer = sorted((tmp_path / "tokenizer.json").rglob("*"))
    assert discard_outputs(TRAIN_AND_USE, catalog) == [str(tmp_path / "model.json" / ours)]
    assert not (tmp_path / "model.json").exists()
    assert sorted((tmp_path / "tokenizer.json").rglob("*")) == before_tokenizer


def test_marker_round_trip(tmp_path):
    _save(tmp_path, "model", "2026-01-01T00.00.00.000Z", 1, made_from={"tokenizer": "x"})
    ds = _catalog(tmp_path, generate_timestamp()).get("model")
    assert read_marker(ds, "2026-01-01T00.00.00.000Z")["lineage"] == {"tokenizer": "x"}
    assert read_marker(ds, "2026-01-09T00.00.00.000Z") is None


# ---- staging debris ---------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_staging_of_dead_writers_only(tmp_path):
    host = staging.host_name()
    dead = tmp_path / "models" / f".reward_model.staging-{host}-{_dead_pid()}-abc123"
    live = tmp_path / "models" / f".reward_model.staging-{host}-{os.getpid()}-def456"
    other_host = tmp_path / "models" / f".reward_model.staging-elsewhere-{_dead_pid()}-ghi789"
    for d in (dead, live, other_host):
        (d / "inner").mkdir(parents=True)
    kept_file = tmp_path / "models" / "model.safetensors"
    kept_file.write_text("x")
    assert staging.sweep_stale(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and other_host.exists() and kept_file.exists()


def test_staging_dir_is_removed_on_exit_and_names_its_writer(tmp_path):
    with staging.staging_dir(tmp_path, "rm-train") as path:
        assert path.name.startswith(f".rm-train.staging-{staging.host_name()}-{os.getpid()}-")
        assert not staging.is_stale(path)
    assert not path.exists()


def test_a_zombie_counts_as_gone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
        assert not staging.pid_alive(proc.pid)
    finally:
        proc.wait()


def test_dead_runs_are_marked_killed_live_ones_kept(tmp_path):
    import mlflow

    from calibrated_rlhf.runtime.crash_recovery import HOST_TAG, PID_TAG, mark_dead_runs_killed

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e")
    tags = {HOST_TAG: staging.host_name()}
    dead = client.create_run(exp, tags={**tags, PID_TAG: str(_dead_pid())}).info.run_id
    live = client.create_run(exp, tags={**tags, PID_TAG: str(os.getpid())}).info.run_id
    elsewhere = client.create_run(exp, tags={HOST_TAG: "elsewhere", PID_TAG: str(_dead_pid())}).info.run_id
    assert mark_dead_runs_killed(client, [exp]) == [dead]
    status = {r: client.get_run(r).info.status for r in (dead, live, elsewhere)}
    assert status == {dead: "KILLED", live: "RUNNING", elsewhere: "RUNNING"}


def _start_tracking(uri: str, experiment: dict, barrier) -> None:
    """What each `kedro run` does at start: this project's hook, then kedro-mlflow's get-or-create."""
    import mlflow

    from calibrated_rlhf.runtime.run_integrity import init_sqlite_store

    barrier.wait(30)
    init_sqlite_store(uri, experiment)
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(experiment["name"]) is None:  # kedro_mlflow_config._set_experiment
        client.create_experiment(experiment["name"])


def test_runs_starting_together_on_a_new_store_all_find_one_experiment(tmp_path):
    # Four at once: with two, CI's `kedro run`s failed now and then on `UNIQUE constraint failed`.
    import multiprocessing

    import mlflow
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 - imported once, before the forks

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = {"name": "calibrated_rlhf", "create_experiment_kwargs": {"tags": {"team": "rlhf"}}}
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_start_tracking, args=(uri, experiment, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    found = mlflow.MlflowClient(uri).search_experiments(filter_string="name = 'calibrated_rlhf'")
    assert len(found) == 1 and found[0].tags == {"team": "rlhf"}


# ---- real `kedro run`s: two at once in one folder, a killed one ---------------------------------------


def _runs(project: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("calibrated_rlhf")
    return client, client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.slow
def test_two_runs_at_once_in_one_folder_read_only_their_own_artifacts(tmp_path):
    import json

    import numpy as np
    import pandas as pd

    from tests.project import make_project

    from tests.harness import preload, start_kedro_run

    preload()  # both runs are forked (tests/harness.py) and go on at the same time
    project = make_project(tmp_path / "project")
    stages = "data_prep,reward_model,calibration"
    # Started in one millisecond (as CI's two runs once were): Kedro names both sessions, and their save
    # versions, after the same timestamp.
    started = generate_timestamp()
    procs = [start_kedro_run(project, "--env", "tiny", "--pipelines", stages, "--params",
                             f"data_prep.source.synthetic.seed={seed}", name=f"seed_{seed}", session_id=started)
             for seed in (1, 2)]
    for p in procs:
        p.join(600)
    outputs = [(project / "logs" / f"seed_{seed}.txt").read_text() for seed in (1, 2)]
    assert [p.exitcode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    client, runs = _runs(project)
    assert len(runs) == 2
    accuracies, sessions = set(), set()
    for run in runs:
        run_id = run.info.run_id
        session = json.loads(Path(client.download_artifacts(run_id, "run_config/run_params.json",
                                                            str(tmp_path / run_id))).read_text())["session_id"]
        sessions.add(session)
        loaded = {k: v for k, v in run.data.tags.items() if k.startswith("provenance/loaded/")}
        assert {"provenance/loaded/train_pairs", "provenance/loaded/reward_model", "provenance/loaded/test_scores",
                "provenance/loaded/tokenizer"} <= set(loaded)
        assert set(loaded.values()) == {session}, loaded  # every load was this run's own version
        markers = [m for m in (project / "data").rglob("_complete.json") if m.parent.name == session]
        assert markers and all(json.loads(m.read_text())["mlflow_run_id"] == run_id for m in markers)
        # What it logged was computed from its own files.
        train = pd.read_parquet(project / "data/03_primary/train_pairs.parquet" / session / "train_pairs.parquet")
        from calibrated_rlhf.core.preferences import content_hash

        assert run.data.tags["data/content_hash/train"] == content_hash(train)
        scores = pd.read_parquet(project / "data/07_model_output/test_scores.parquet" / session / "test_scores.parquet")
        own = float(np.mean(scores["reward_chosen"] > scores["reward_rejected"]))
        assert run.data.metrics["rm/test_accuracy"] == pytest.approx(own)
        accuracies.add(run.data.tags["data/content_hash/train"])
    assert len(accuracies) == 2  # two seeds, two data sets: the runs did not share one
    assert started in sessions and len(sessions) == 2  # one saved the session's version, the other a later one


@pytest.mark.slow
def test_a_killed_run_leaves_nothing_a_later_run_loads(tmp_path):
    import glob
    import signal
    import tempfile
    import time

    from tests.harness import kedro_run, preload, squash, start_kedro_run
    from tests.project import make_project

    preload()  # the run to kill and the next one are forked (tests/harness.py)
    project = make_project(tmp_path / "project", store=True)
    proc = start_kedro_run(project, "--env", "tiny", name="killed")
    # SIGKILL while the reward model trains: TRL's output folder is a staging folder of this process.
    pattern = os.path.join(tempfile.gettempdir(), f".rm-train.staging-{staging.host_name()}-{proc.pid}-*")
    deadline = time.monotonic() + 300
    while not glob.glob(pattern):
        assert proc.exitcode is None, (project / "logs" / "killed.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "reward-model training never started"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    debris = glob.glob(pattern)
    assert debris  # SIGKILL runs no cleanup
    client, runs = _runs(project)
    assert [r.info.status for r in runs] == ["RUNNING"]
    assert list((project / "data" / "03_primary").rglob("*.parquet"))  # data_prep had written its outputs
    assert not list((project / "data").rglob("_complete.json"))

    # The next run: PPO alone needs a reward model and pairs, and none comes from a completed run.
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "ppo", name="ppo_after_kill")
    assert code != 0
    assert squash("no completed run has produced it") in squash(out)
    assert not any(os.path.exists(d) for d in debris)
    assert client.get_run(runs[0].info.run_id).info.status == "KILLED"
    assert client.search_model_versions() == []  # nothing registered from the killed run
