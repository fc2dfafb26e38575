"""Run integrity in this process: the MLflow sqlite store and its experiment made once under a lock, and the
hook's pinning, marking and discarding over a real catalog of versioned JSON files (the `kedro run` tests of
tests/test_run_integrity.py cover the same path end to end, in child processes)."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import mlflow
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.io.core import generate_timestamp
from kedro.pipeline import Node, Pipeline

from calibrated_rlhf.runtime import run_integrity
from calibrated_rlhf.runtime.run_integrity import (CLAIMS, MARKER, InconsistentArtifacts, RunIsolation, claim_version,
                                           discard_outputs, init_sqlite_store, lineage, read_marker, resolve_versions,
                                           write_marker)

OLD, NEW = "2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"


def test_creates_the_store_and_the_experiment_with_its_location_and_tags(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    init_sqlite_store(uri, {"name": "calib", "create_experiment_kwargs": {
        "artifact_location": str(tmp_path / "art"), "tags": {"team": "rlhf"}}})
    assert db.exists() and (tmp_path / "mlflow.db.lock").exists()
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("calib")
    assert exp is not None and exp.tags.get("team") == "rlhf"
    assert exp.artifact_location.endswith("art")
    assert client.search_registered_models() == []  # the registry's tables exist too
    # a second run on the same store finds the experiment and creates nothing
    init_sqlite_store(uri, {"name": "calib", "create_experiment_kwargs": {"tags": {"team": "other"}}})
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "calib"]
    assert client.get_experiment_by_name("calib").experiment_id == exp.experiment_id
    assert client.get_experiment_by_name("calib").tags.get("team") == "rlhf"


def test_an_experiment_without_kwargs_gets_mlflows_defaults(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    init_sqlite_store(uri, {"name": "plain"})
    exp = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("plain")
    assert exp is not None and not {k: v for k, v in exp.tags.items() if not k.startswith("mlflow.")}


def test_without_an_experiment_only_the_store_is_made(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    init_sqlite_store(uri, None)
    init_sqlite_store(uri, {"create_experiment_kwargs": {"tags": {"a": "b"}}})  # no name: nothing to create
    names = {e.name for e in mlflow.MlflowClient(tracking_uri=uri).search_experiments()}
    assert names == {"Default"}


@pytest.mark.parametrize("uri", [None, "", "file:///tmp/mlruns", "http://localhost:5000", "postgresql://x/y"])
def test_other_stores_are_left_to_mlflow(tmp_path, monkeypatch, uri):
    monkeypatch.chdir(tmp_path)
    init_sqlite_store(uri, {"name": "calib"})
    assert list(tmp_path.iterdir()) == []


def test_the_store_is_made_under_an_exclusive_lock(tmp_path, monkeypatch):
    import fcntl

    calls = []
    real = fcntl.flock
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (calls.append((Path(fd.name).name, op)), real(fd, op)))
    init_sqlite_store(f"sqlite:///{tmp_path / 'm.db'}", {"name": "x"})
    assert calls == [("m.db.lock", fcntl.LOCK_EX)]


# ---- the hook over a catalog ---------------------------------------------------------------------------------


def _catalog(root: Path, save_version: str, load_versions=None) -> DataCatalog:
    config = {name: {"type": "json.JSONDataset", "filepath": str(root / f"{name}.json"), "versioned": True}
              for name in ("tokenizer", "model", "transform")}
    config["plain"] = {"type": "json.JSONDataset", "filepath": str(root / "plain.json")}
    return DataCatalog.from_config(config, save_version=save_version, load_versions=load_versions or {})


def _save(root: Path, name: str, version: str, data, complete: bool = True, made_from=None) -> None:
    catalog = _catalog(root, version)
    catalog.save(name, data)
    if complete:
        write_marker(catalog.get(name), version, {"dataset": name, "lineage": made_from or {}})


def _run_params(project: Path, session_id: str) -> dict:
    """What Kedro's session hands the hook: the same dict goes on to the hooks after it and to after_pipeline_run."""
    return {"project_path": project.as_posix(), "run_id": session_id, "load_versions": {}}


TRAIN_AND_USE = Pipeline([Node(lambda t, p: t, ["tokenizer", "params:x"], "model", name="train"),
                          Node(lambda t, m: m, ["tokenizer", "model"], "transform", name="use")])
USE = Pipeline([Node(lambda t, m: m, ["tokenizer", "model"], "transform", name="use")])


def test_a_completed_run_marks_each_versioned_output_with_its_run_and_lineage(tmp_path, monkeypatch):
    _save(tmp_path, "tokenizer", OLD, "tok")
    ours = generate_timestamp()
    catalog = _catalog(tmp_path, ours)
    hook = RunIsolation()
    hook.before_pipeline_run(_run_params(tmp_path, ours), TRAIN_AND_USE, catalog)
    assert hook._resolved == {"tokenizer": OLD, "model": ours, "transform": ours}
    catalog.save("model", "m")  # 'transform' is not written: an optional output
    monkeypatch.setattr(run_integrity, "_active_mlflow_run_id", lambda: "run-123")
    hook.after_pipeline_run({"run_id": "session-1"}, TRAIN_AND_USE, catalog)
    marker = read_marker(catalog.get("model"), ours)
    assert marker == {"session_id": "session-1", "mlflow_run_id": "run-123", "dataset": "model",
                      "lineage": {"tokenizer": OLD}}
    assert read_marker(catalog.get("transform"), ours) is None
    assert not (tmp_path / "transform.json").exists()


def test_a_run_whose_session_id_another_run_claimed_saves_and_marks_the_version_it_claimed(tmp_path, monkeypatch):
    _save(tmp_path, "tokenizer", OLD, "tok")
    ours = generate_timestamp()
    assert claim_version(tmp_path, ours) == ours  # the run that started first, in the same millisecond
    later = claim_version(tmp_path, ours)
    assert later > ours and sorted(p.name for p in (tmp_path / CLAIMS).iterdir()) == [ours, later]
    hook, catalog, run_params = RunIsolation(), _catalog(tmp_path, later), _run_params(tmp_path, ours)
    hook.after_catalog_created(save_version=later)
    hook.before_pipeline_run(run_params, TRAIN_AND_USE, catalog)
    assert run_params["run_id"] == later  # what the hooks after this one and the MLflow tags name
    assert hook._resolved == {"tokenizer": OLD, "model": later, "transform": later}
    catalog.save("model", "m")
    monkeypatch.setattr(run_integrity, "_active_mlflow_run_id", lambda: None)
    hook.after_pipeline_run(run_params, TRAIN_AND_USE, catalog)
    assert read_marker(catalog.get("model"), later)["session_id"] == later


def test_a_taken_version_moves_on_even_when_the_clock_is_behind_it(tmp_path):
    future = "2999-12-31T23.59.59.999Z"
    assert claim_version(tmp_path, future) == future
    assert claim_version(tmp_path, future) == "3000-01-01T00.00.00.000Z"
    assert claim_version(tmp_path, future) == "3000-01-01T00.00.00.001Z"


def test_a_hook_that_pinned_nothing_still_marks_what_the_run_saved(tmp_path, monkeypatch):
    ours = generate_timestamp()
    catalog = _catalog(tmp_path, ours)
    catalog.save("model", "m")
    monkeypatch.setattr(run_integrity, "_active_mlflow_run_id", lambda: None)
    RunIsolation().after_pipeline_run({}, Pipeline([Node(lambda: 1, None, "model")]), catalog)
    assert read_marker(catalog.get("model"), ours) == {"session_id": None, "mlflow_run_id": None, "dataset": "model",
                                                       "lineage": {}}


def test_the_marker_is_written_whole(tmp_path):
    _save(tmp_path, "model", OLD, 1, made_from={"tokenizer": "x"})
    path = tmp_path / "model.json" / OLD / MARKER
    assert json.loads(path.read_text()) == {"dataset": "model", "lineage": {"tokenizer": "x"}}
    assert sorted(p.name for p in path.parent.iterdir()) == [MARKER, "model.json"]  # no temporary file left


def test_markers_live_on_the_datasets_own_filesystem(tmp_path, monkeypatch):
    """A dataset on another fsspec filesystem (here in memory) keeps its markers there, not on local disk."""
    monkeypatch.chdir(tmp_path)
    root = f"memory:///integrity-{uuid.uuid4().hex}"  # the memory filesystem is shared by the whole process
    catalog = DataCatalog.from_config({"model": {"type": "json.JSONDataset", "filepath": f"{root}/model.json",
                                                 "versioned": True}}, save_version=OLD)
    catalog.save("model", {"w": 1})
    ds = catalog.get("model")
    write_marker(ds, OLD, {"dataset": "model"})
    assert read_marker(ds, OLD) == {"dataset": "model"}
    assert run_integrity.latest_complete(ds) == OLD
    assert list(tmp_path.iterdir()) == []  # nothing written to the local folder its path would name


def test_a_failed_runs_output_is_discarded_on_the_datasets_own_filesystem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = f"memory:///integrity-{uuid.uuid4().hex}"
    config = {"model": {"type": "json.JSONDataset", "filepath": f"{root}/model.json", "versioned": True}}
    done = DataCatalog.from_config(config, save_version=OLD)
    done.save("model", {"w": 1})
    write_marker(done.get("model"), OLD, {"dataset": "model"})
    failed = DataCatalog.from_config(config, save_version=NEW)
    failed.save("model", {"w": 2})  # then the run fails: its version goes, the completed one stays
    assert discard_outputs(Pipeline([Node(lambda: 1, None, "model")]), failed) == [
        f"{root[len('memory://'):]}/model.json/{NEW}"]
    assert run_integrity.versions_on_disk(failed.get("model")) == [OLD]
    assert list(tmp_path.iterdir()) == []


def test_markers_of_a_local_folder_dataset_without_a_filesystem(tmp_path, tiny_tokenizer):
    from kedro.io.core import Version

    from calibrated_rlhf.datasets.hf_pretrained import HFPretrainedDataset

    ds = HFPretrainedDataset(filepath=str(tmp_path / "tokenizer"), kind="tokenizer", version=Version(None, OLD))
    assert getattr(ds, "_fs", None) is None
    ds.save(tiny_tokenizer)
    assert read_marker(ds, OLD) is None
    write_marker(ds, OLD, {"dataset": "tokenizer"})
    assert read_marker(ds, OLD) == {"dataset": "tokenizer"}
    assert (tmp_path / "tokenizer" / OLD / MARKER).exists()


def test_a_failed_run_discards_its_unmarked_outputs_through_the_hook(tmp_path, caplog):
    _save(tmp_path, "tokenizer", OLD, "tok")
    _save(tmp_path, "model", OLD, "older model")
    ours = generate_timestamp()
    catalog = _catalog(tmp_path, ours)
    hook = RunIsolation()
    hook.before_pipeline_run(_run_params(tmp_path, ours), TRAIN_AND_USE, catalog)
    catalog.save("model", "half")
    with caplog.at_level(logging.WARNING, logger="calibrated_rlhf.runtime.run_integrity"):
        hook.on_pipeline_error(TRAIN_AND_USE, catalog)
    assert f"the run failed: removed its partial output {tmp_path / 'model.json' / ours}" in caplog.text
    assert sorted(p.name for p in (tmp_path / "model.json").iterdir()) == [OLD]  # the older version stays
    assert (tmp_path / "tokenizer.json" / OLD).exists()


def test_discard_keeps_a_version_that_was_marked_complete(tmp_path):
    ours = generate_timestamp()
    _save(tmp_path, "model", ours, "done")
    catalog = _catalog(tmp_path, ours)
    assert discard_outputs(Pipeline([Node(lambda: 1, None, "model")]), catalog) == []
    assert (tmp_path / "model.json" / ours / MARKER).exists()


def test_discard_removes_only_the_runs_folder_when_others_remain(tmp_path):
    _save(tmp_path, "model", OLD, "older")
    ours = generate_timestamp()
    catalog = _catalog(tmp_path, ours)
    catalog.save("model", "half")
    removed = discard_outputs(Pipeline([Node(lambda: 1, None, "model"), Node(lambda: 1, None, "plain"),
                                        Node(lambda: 1, None, "transform")]), catalog)
    assert removed == [str(tmp_path / "model.json" / ours)]
    assert (tmp_path / "model.json" / OLD).exists()


def test_discard_goes_past_outputs_it_has_nothing_to_remove_for(tmp_path):
    ours = generate_timestamp()
    catalog = _catalog(tmp_path, ours)
    catalog.save("transform", "half")  # 'model' was never saved, 'plain' is not versioned
    pipe = Pipeline([Node(lambda: 1, None, "model"), Node(lambda: 1, None, "plain"),
                     Node(lambda: 1, None, "transform")])
    assert discard_outputs(pipe, catalog) == [str(tmp_path / "transform.json" / ours)]
    assert not (tmp_path / "transform.json").exists()


def test_resolution_skips_parameters_memory_and_unversioned_datasets(tmp_path):
    _save(tmp_path, "tokenizer", OLD, "tok")
    catalog = _catalog(tmp_path, NEW)
    catalog["scratch"] = MemoryDataset()
    pipe = Pipeline([Node(lambda t, p, q, s, u: t, ["tokenizer", "params:x", "parameters", "scratch", "plain"],
                          "model", name="train")])
    (tmp_path / "plain.json").write_text("1")
    assert resolve_versions(pipe, catalog) == {"tokenizer": OLD, "model": NEW}


def test_an_input_nothing_produced_is_refused_naming_it_and_the_remedy(tmp_path):
    train = Pipeline([Node(lambda t: t, "tokenizer", "model", name="train")])
    with pytest.raises(InconsistentArtifacts, match=r"^'tokenizer' \(.*tokenizer\.json\): no completed run has "
                                                    r"produced it\. Run the pipeline that makes it, or pin a version "
                                                    r"with --load-versions\.$"):
        resolve_versions(train, _catalog(tmp_path, NEW))
    _save(tmp_path, "tokenizer", OLD, "a", complete=False)
    _save(tmp_path, "tokenizer", NEW, "b", complete=False)
    with pytest.raises(InconsistentArtifacts, match=rf"\(2 version\(s\) of runs that failed or were killed, newest "
                                                    rf"{NEW}\)\. Run the pipeline"):
        resolve_versions(train, _catalog(tmp_path, generate_timestamp()))


def test_a_pin_of_an_incomplete_version_is_loaded_with_a_warning(tmp_path, caplog):
    _save(tmp_path, "tokenizer", OLD, "done")
    _save(tmp_path, "model", OLD, "m", made_from={"tokenizer": OLD})
    _save(tmp_path, "tokenizer", NEW, "partial", complete=False)
    pin = {"tokenizer": NEW}
    catalog = _catalog(tmp_path, generate_timestamp(), pin)
    with caplog.at_level(logging.WARNING, logger="calibrated_rlhf.runtime.run_integrity"):
        resolved = resolve_versions(USE, catalog, pin)
    assert resolved == {"tokenizer": NEW, "model": OLD, "transform": resolved["transform"]}
    assert f"tokenizer: the pinned version {NEW} is not from a completed run" in caplog.text
    assert catalog.load("tokenizer") == "partial" and catalog.load("model") == "m"
    caplog.clear()
    pin = {"tokenizer": OLD}
    with caplog.at_level(logging.WARNING, logger="calibrated_rlhf.runtime.run_integrity"):
        resolve_versions(USE, _catalog(tmp_path, generate_timestamp(), pin), pin)
    assert "not from a completed run" not in caplog.text


def test_a_conflict_between_two_loaded_artifacts_names_both_and_their_versions(tmp_path):
    _save(tmp_path, "tokenizer", OLD, "t")
    _save(tmp_path, "model", OLD, "m1", made_from={"tokenizer": OLD, "vocab": "v1"})
    _save(tmp_path, "transform", OLD, "x", made_from={"tokenizer": OLD, "vocab": "v2"})
    both = Pipeline([Node(lambda m, t: m, ["model", "transform"], "plain", name="report")])
    catalog = _catalog(tmp_path, NEW)
    resolved = resolve_versions(both, catalog)
    with pytest.raises(InconsistentArtifacts) as err:
        lineage(both, catalog, resolved)
    assert str(err.value) == (
        f"node 'report': its inputs do not belong together: 'model' (version {OLD}) was made from 'vocab' version "
        f"v1, but 'transform' (version {OLD}) was made from 'vocab' version v2. Rerun the stages after 'vocab', "
        "or pin matching versions with --load-versions.")


def test_a_conflict_on_an_input_itself_is_named_first(tmp_path):
    _save(tmp_path, "tokenizer", NEW, "t2")
    _save(tmp_path, "model", OLD, "m", made_from={"tokenizer": OLD, "vocab": "v1"})
    _save(tmp_path, "transform", OLD, "x", made_from={"vocab": "v2", "tokenizer": OLD})
    three = Pipeline([Node(lambda a, b, c: a, ["model", "transform", "tokenizer"], "plain", name="n")])
    catalog = _catalog(tmp_path, generate_timestamp())
    with pytest.raises(InconsistentArtifacts, match=rf"^node 'n': its inputs do not belong together: 'model' "
                                                    rf"\(version {OLD}\) was made from 'tokenizer' version {OLD}, but "
                                                    rf"this run loads 'tokenizer' version {NEW}\. Rerun the stages "
                                                    r"after 'tokenizer'"):
        lineage(three, catalog, resolve_versions(three, catalog))


def test_a_marker_without_lineage_counts_as_made_from_nothing(tmp_path):
    catalog = _catalog(tmp_path, OLD)
    catalog.save("tokenizer", "t")
    write_marker(catalog.get("tokenizer"), OLD, {"dataset": "tokenizer"})
    catalog = _catalog(tmp_path, NEW)
    origins = lineage(TRAIN_AND_USE, catalog, resolve_versions(TRAIN_AND_USE, catalog))
    assert origins["tokenizer"] == {} and origins["model"] == {"tokenizer": OLD}
    assert origins["transform"] == {"tokenizer": OLD, "model": NEW}


def test_a_conflict_through_an_in_memory_intermediate_names_it_as_of_this_run(tmp_path):
    _save(tmp_path, "tokenizer", OLD, "t1")
    _save(tmp_path, "model", OLD, "m", made_from={"tokenizer": OLD})
    _save(tmp_path, "tokenizer", NEW, "t2")
    pipe = Pipeline([Node(lambda t: t, "tokenizer", "scratch", name="prep"),
                     Node(lambda m, s: m, ["model", "scratch"], "transform", name="use")])
    catalog = _catalog(tmp_path, generate_timestamp())
    with pytest.raises(InconsistentArtifacts, match=rf"but 'scratch' \(version of this run\) was made from "
                                                    rf"'tokenizer' version {NEW}\. Rerun"):
        lineage(pipe, catalog, resolve_versions(pipe, catalog))


def test_the_active_mlflow_run_is_named(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        assert run_integrity._active_mlflow_run_id() is None
        with mlflow.start_run() as run:
            assert run_integrity._active_mlflow_run_id() == run.info.run_id
    finally:
        mlflow.set_tracking_uri(None)
