"""Project pipelines.

Static but for one thing: ``reward_model.ensemble_size`` K shapes the DAG. With K > 1, ``reward_model`` and
``calibration`` become K namespaced members (``member_0`` ... ``member_{K-1}``, each with its own datasets) plus
the ensemble's calibration, and every stage that scores (``normalization``, ``ppo``, ``rl``, ``best_of_n``) reads
the assembled ``reward_ensemble``. That part must stay dynamic: Kedro's namespaces are fixed when a pipeline is
built and a node cannot fan out at run time, so K members are K copies of the member pipeline; registering a
fixed maximum of members would run the unused ones. Everything else is static: the stages are found by
``find_pipelines``, ``__default__`` is every stage but the alternatives to PPO (:data:`ALTERNATIVE_METHODS`,
run with ``--pipelines rl``, ``dpo``, ``best_of_n``), and K = 1 registers exactly the stages' own pipelines.

K is read from the run's configuration, which Kedro does not hand to ``register_pipelines``, so it reaches
the registry two ways, the first that applies wins:

- every config loader Kedro builds for a context (``settings.CONFIG_LOADER_CLASS`` is
  :class:`ProjectConfigLoader`) hands itself over, before any hook and also where no hook runs: ``kedro viz``
  swaps the hook manager for a null one, so ``kedro viz --env scenario_ensemble_mean`` still draws the ensemble;
- with none (``kedro registry describe``, no context at all), the registry reads the configuration itself:
  the environment the CLI's ``--env`` or ``KEDRO_ENV`` names.

Kedro caches the registered pipelines, so a loader that changes K (a second session in one process, a test)
has them rebuilt (:meth:`RegistryState.use`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kedro.config import OmegaConfigLoader
from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline, pipeline

log = logging.getLogger(__name__)


class RegistryState:
    """The registry's state: the configuration that shapes the pipelines, and the shape they were built for."""

    def __init__(self) -> None:
        self.config_loader: Any = None  # handed over; None: read the configuration from the CLI's environment
        self.built_for: int | None = None  # the ensemble size the registered pipelines were built for

    def use(self, config_loader: Any) -> None:
        """Read ``ensemble_size`` from this configuration; rebuild the pipelines if it changed the shape."""
        self.config_loader = config_loader
        if self.built_for is not None and self.built_for != self.ensemble_size():
            from kedro.framework.project import PACKAGE_NAME, pipelines

            pipelines.configure(f"{PACKAGE_NAME}.pipeline_registry")

    def ensemble_size(self) -> int:
        """``reward_model.ensemble_size`` of the run's parameters (``--params`` included); 1 without a project."""
        loader = self.config_loader if self.config_loader is not None else _cli_config_loader()
        if loader is None:
            return 1
        value = ((loader["parameters"] or {}).get("reward_model") or {}).get("ensemble_size", 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"parameters: reward_model.ensemble_size must be an integer >= 1, got {value!r}")
        return value


_SHAPE = RegistryState()

# Pipelines of RL methods besides PPO: registered, but outside `__default__`.
ALTERNATIVE_METHODS = ("rl", "dpo", "best_of_n")


def use_config(config_loader: Any) -> None:
    """Shape the pipelines by this configuration (``None``: by the CLI's environment again)."""
    _SHAPE.use(config_loader)


def ensemble_size() -> int:
    """``reward_model.ensemble_size`` the pipelines are shaped by."""
    return _SHAPE.ensemble_size()


class ProjectConfigLoader(OmegaConfigLoader):
    """Kedro's ``OmegaConfigLoader`` that hands itself to the pipeline registry when Kedro builds it for a context.

    Kedro builds the context's loader from ``settings.CONFIG_LOADER_CLASS`` whether or not hooks run
    (``kedro viz`` runs none unless ``--include-hooks``), so the registry sees the environment and the
    ``--params`` the context was made for.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        use_config(self)


def _cli_config_loader() -> OmegaConfigLoader | None:
    """The project's configuration for the environment the CLI (``--env``) or ``KEDRO_ENV`` names, read as
    ``settings`` says; None outside a Kedro project."""
    from kedro.framework.project import settings
    from kedro.utils import find_kedro_project

    project = find_kedro_project(Path.cwd())
    if project is None:
        return None
    env, runtime_params = _cli_env_and_params()
    # A plain OmegaConfigLoader (not ProjectConfigLoader): reading the configuration must not hand it over.
    return OmegaConfigLoader(conf_source=str(Path(project) / settings.CONF_SOURCE),
                             env=env or os.environ.get("KEDRO_ENV"), runtime_params=runtime_params,
                             **settings.CONFIG_LOADER_ARGS)


def _cli_env_and_params() -> tuple[str | None, dict[str, Any] | None]:
    """``--env`` and ``--params`` of the running Kedro command, if a click command is running."""
    import click

    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        env, params = ctx.params.get("env"), ctx.params.get("params")
        if env or params:
            return env, params if isinstance(params, dict) else None
        ctx = ctx.parent
    return None, None


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines.

    Returns:
        A mapping from pipeline names to ``Pipeline`` objects.
    """
    # Imported here: settings imports this module (for ProjectConfigLoader) in every `kedro` command.
    from calibrated_rlhf.pipelines import reward_ensemble

    pipelines = find_pipelines(raise_errors=True)
    pipelines.pop("reward_ensemble", None)  # wired below, into reward_model and calibration
    size = _SHAPE.built_for = ensemble_size()
    if size > 1:
        log.info("reward_model.ensemble_size = %d: members %s", size,
                 ", ".join(reward_ensemble.namespace(i) for i in range(size)))
        for stage in ("reward_model", "calibration"):
            if stage in pipelines:
                pipelines[stage] = sum((reward_ensemble.member_pipeline(i, stage) for i in range(size)), Pipeline([]))
        if "calibration" in pipelines:
            pipelines["calibration"] += reward_ensemble.create_pipeline(ensemble_size=size)
        for stage in ("normalization", "ppo", "rl", "best_of_n"):
            if stage in pipelines:
                pipelines[stage] = reward_ensemble.assembly_pipeline(size) + pipeline(
                    pipelines[stage], inputs={"reward_model": "reward_ensemble"})
    # The alternatives to PPO run on request (`kedro run --pipelines rl`): the default DAG stays one method.
    pipelines["__default__"] = sum(p for name, p in pipelines.items() if name not in ALTERNATIVE_METHODS)
    return pipelines
