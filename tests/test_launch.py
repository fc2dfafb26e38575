"""The launcher's parts that need no second process: ranks, outputs of a secondary rank, the CLI, provenance."""

from __future__ import annotations

import importlib

import pytest

from calibrated_rlhf.runtime import launch
from calibrated_rlhf.runtime.launch import LAUNCH_ENV


class State:
    """The part of accelerate's PartialState the launcher reads: a single process."""

    is_main_process = True
    num_processes = 1


def test_ranks_come_from_the_launchers_variable(monkeypatch):
    monkeypatch.delenv(LAUNCH_ENV, raising=False)
    assert launch.current_rank() is None and not launch.is_secondary_rank()
    assert launch.launch_tags() == {} and launch.stage_metrics(["ppo"]) == {}
    monkeypatch.setenv(LAUNCH_ENV, "0/4")
    assert launch.current_rank() == launch.Rank(0, 4) and not launch.is_secondary_rank()
    assert launch.launch_tags() == {"provenance/launcher": "accelerate, 4 processes", "provenance/num_processes": "4"}
    assert launch.stage_metrics(["reward_model", "ppo"]) == {"ppo/perf/num_processes": 4.0}
    monkeypatch.setenv(LAUNCH_ENV, "3/4")
    assert launch.is_secondary_rank()


def test_a_secondary_rank_keeps_the_pipelines_outputs_in_memory(monkeypatch, tmp_path):
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.pipeline import Node, Pipeline
    from kedro_datasets.json import JSONDataset

    from calibrated_rlhf.runtime.hooks import LaunchedRanks

    def catalog() -> DataCatalog:
        return DataCatalog({name: JSONDataset(filepath=str(tmp_path / f"{name}.json"), version=None)
                            for name in ("given", "made")})

    pipe = Pipeline([Node(lambda x: x, "given", "made", name="copy")])
    for value, in_memory in ((None, False), ("0/2", False), ("1/2", True)):
        if value is None:
            monkeypatch.delenv(LAUNCH_ENV, raising=False)
        else:
            monkeypatch.setenv(LAUNCH_ENV, value)
        cat = catalog()
        LaunchedRanks().before_pipeline_run(pipeline=pipe, catalog=cat)
        assert isinstance(cat.get("made"), MemoryDataset) is in_memory, value
        assert isinstance(cat.get("given"), JSONDataset), value  # inputs load from disk on every rank


def test_a_secondary_rank_runs_without_kedro_mlflow(monkeypatch):
    from kedro.framework.hooks.manager import _create_hook_manager, _register_hooks_entry_points

    import calibrated_rlhf.settings as settings

    def plugin_names(disabled) -> set[str]:
        manager = _create_hook_manager()
        _register_hooks_entry_points(manager, disabled)
        registered = manager.get_plugins()  # the distribution info lists unregistered plugins too
        return {dist.project_name.replace("-", "_") for plugin, dist in manager.list_plugin_distinfo()
                if plugin in registered}

    try:
        monkeypatch.setenv(LAUNCH_ENV, "1/2")
        assert "kedro_mlflow" not in plugin_names(importlib.reload(settings).DISABLE_HOOKS_FOR_PLUGINS)
        monkeypatch.setenv(LAUNCH_ENV, "0/2")
        assert "kedro_mlflow" in plugin_names(importlib.reload(settings).DISABLE_HOOKS_FOR_PLUGINS)
    finally:
        monkeypatch.delenv(LAUNCH_ENV)
        importlib.reload(settings)


def test_the_main_process_result_or_its_error(monkeypatch):
    assert launch._from_main(lambda: {"reward_model": "v1"}, State()) == {"reward_model": "v1"}

    def fails():
        raise ValueError("no completed run has produced it")

    with pytest.raises(ValueError, match="no completed run"):
        launch._from_main(fails, State())


def test_ppo_launch_is_the_launcher_with_the_ppo_pipeline(monkeypatch):
    from calibrated_rlhf.runtime import ppo_launch

    calls = []
    monkeypatch.setattr(launch, "launch", lambda *args, **kwargs: calls.append((args, kwargs)))
    with pytest.raises(SystemExit) as done:
        ppo_launch.main(["--env", "tiny", "--params", "ppo.evaluation.seed=7,scenario=x",
                         "--load-versions", "reward_model:2026-01-01T00.00.00.000Z"])
    assert done.value.code == 0
    assert calls == [((["ppo"],), {"env": "tiny", "runtime_params": {"ppo": {"evaluation": {"seed": 7}}, "scenario": "x"},
                                   "load_versions": {"reward_model": "2026-01-01T00.00.00.000Z"},
                                   "project_path": "."})]


def test_the_command_is_recorded_as_typed():
    from calibrated_rlhf.runtime.provenance import _package_dir, command_line

    launched = str(_package_dir() / "runtime" / "launch.py")
    assert command_line([launched, "--pipelines", "ppo"]) == "python -m calibrated_rlhf.runtime.launch --pipelines ppo"
    assert command_line(["/usr/bin/kedro", "run", "--env", "tiny"]) == "kedro run --env tiny"
    assert command_line(["/elsewhere/script.py", "x"]) == "/elsewhere/script.py x"


def test_one_flatten_for_parameters_and_replayed_params():
    from calibrated_rlhf.runtime import replay
    from calibrated_rlhf.runtime.provenance import flatten

    assert flatten({"a": {"b": 1, "c": {}}}, "ppo") == {"ppo.a.b": 1, "ppo.a.c": {}}
    assert flatten({"a": {"b": 1}}) == {"a.b": 1}
    assert replay.flatten is flatten


def test_fields_the_stage_sets_are_not_logged_as_null():
    from calibrated_rlhf.runtime.hooks import ProvenanceHooks
    from calibrated_rlhf.pipelines.ppo.nodes import PPOParams

    class Client:
        params: list = []

        def log_batch(self, run_id, params):
            self.params.extend(params)

    hooks = ProvenanceHooks()
    hooks._run_id, hooks._client = "run", Client()
    hooks.before_node_run(node=None, inputs={"params:ppo": PPOParams()})
    logged = {p.key: p.value for p in hooks._client.params}
    assert "ppo.trainer.seed" in logged and "ppo.checkpoint_root" in logged
    assert not any(k.startswith(("ppo.trainer.checkpoint_dir", "ppo.trainer.keep_checkpoints",
                                 "ppo.trainer.checkpoint_every")) for k in logged)
