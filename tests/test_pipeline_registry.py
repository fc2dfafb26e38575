"""The registry shapes the DAG by the configuration a context was made for, also where no hook runs (`kedro viz`)."""

from __future__ import annotations

import pytest
from kedro.framework.project import configure_project, pipelines

from calibrated_rlhf import pipeline_registry
from tests.project import ROOT

ENSEMBLE_ENV = "scenario_ensemble_mean"  # reward_model.ensemble_size: 5
MEMBERS = {f"member_{i}" for i in range(5)}


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry reading the project's configuration, and left as it found it: the default shape."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("KEDRO_ENV", raising=False)
    configure_project("calibrated_rlhf")
    yield
    monkeypatch.delenv("KEDRO_ENV", raising=False)
    pipeline_registry.use_config(None)


def member_namespaces(registered: dict) -> set[str | None]:
    return {n.namespace for n in registered["reward_model"].nodes}


def test_a_session_without_hooks_registers_the_ensemble(fresh_registry):
    """What kedro-viz's load_data does unless --include-hooks: a session whose hook manager ignores every hook."""
    from kedro.framework.hooks.manager import _NullPluginManager
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(ROOT)
    with KedroSession.create(project_path=ROOT, env=ENSEMBLE_ENV, save_on_close=False) as session:
        session._hook_manager = _NullPluginManager()
        session.load_context()
        registered = dict(pipelines)
    assert member_namespaces(registered) == MEMBERS
    assert "assemble_reward_ensemble" in {n.name for n in registered["ppo"].nodes}
    assert pipeline_registry.ensemble_size() == 5


def test_runtime_params_of_the_context_shape_it_too(fresh_registry):
    from kedro.framework.hooks.manager import _NullPluginManager
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(ROOT)
    with KedroSession.create(project_path=ROOT, env="tiny", save_on_close=False,
                             runtime_params={"reward_model": {"ensemble_size": 2}}) as session:
        session._hook_manager = _NullPluginManager()
        session.load_context()
        assert member_namespaces(dict(pipelines)) == {"member_0", "member_1"}


def test_without_a_context_the_registry_reads_the_environment_kedro_env_names(fresh_registry, monkeypatch):
    pipeline_registry.use_config(None)
    assert pipeline_registry.ensemble_size() == 1  # conf/local over conf/base
    monkeypatch.setenv("KEDRO_ENV", ENSEMBLE_ENV)
    assert member_namespaces(pipeline_registry.register_pipelines()) == MEMBERS


def test_a_changed_shape_rebuilds_the_registered_pipelines(fresh_registry):
    from kedro.config import OmegaConfigLoader

    from calibrated_rlhf.settings import CONFIG_LOADER_ARGS

    pipeline_registry.use_config(None)
    assert member_namespaces(dict(pipelines)) == {None}
    # A plain OmegaConfigLoader does not hand itself over; use_config (what ProjectConfigLoader calls) does.
    loader = OmegaConfigLoader(str(ROOT / "conf"), env=ENSEMBLE_ENV, **CONFIG_LOADER_ARGS)
    assert member_namespaces(dict(pipelines)) == {None}
    pipeline_registry.use_config(loader)
    assert member_namespaces(dict(pipelines)) == MEMBERS


def test_kedro_viz_draws_the_ensemble(fresh_registry):
    """The real thing, where the optional `viz` extra is installed."""
    pytest.importorskip("kedro_viz")
    from kedro_viz.integrations.kedro.data_loader import load_data

    registered = load_data(ROOT, env=ENSEMBLE_ENV)[1]
    assert member_namespaces(registered) == MEMBERS
