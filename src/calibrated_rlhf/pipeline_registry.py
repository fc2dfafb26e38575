"""Project pipelines.

``reward_model.ensemble_size`` shapes the DAG (K namespaced members instead of one reward model), so the
registry reads it from the run's configuration, which a hook hands over when the context is created
(before Kedro first asks for the pipelines).
"""
from __future__ import annotations

import logging
from typing import Any

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline, pipeline

from calibrated_rlhf.pipelines import reward_ensemble

log = logging.getLogger(__name__)

_config_loader: Any = None
_built_for: int | None = None  # the ensemble size the registered pipelines were built for


def use_config(config_loader: Any) -> None:
    """Read ``ensemble_size`` from this configuration; rebuild the pipelines if it changed the shape."""
    global _config_loader
    _config_loader = config_loader
    if _built_for is not None and _built_for != ensemble_size():
        from kedro.framework.project import PACKAGE_NAME, pipelines

        pipelines.configure(f"{PACKAGE_NAME}.pipeline_registry")


def ensemble_size() -> int:
    """``reward_model.ensemble_size`` of the run's parameters (``--params`` included); 1 without a context."""
    if _config_loader is None:
        return 1
    value = ((_config_loader["parameters"] or {}).get("reward_model") or {}).get("ensemble_size", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"parameters: reward_model.ensemble_size must be an integer >= 1, got {value!r}")
    return value


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines.

    Returns:
        A mapping from pipeline names to ``Pipeline`` objects.
    """
    global _built_for
    pipelines = find_pipelines(raise_errors=True)
    pipelines.pop("reward_ensemble", None)  # wired below, into reward_model and calibration
    size = _built_for = ensemble_size()
    if size > 1:
        log.info("reward_model.ensemble_size = %d: members %s", size,
                 ", ".join(reward_ensemble.namespace(i) for i in range(size)))
        for stage in ("reward_model", "calibration"):
            if stage in pipelines:
                pipelines[stage] = sum((reward_ensemble.member_pipeline(i, stage) for i in range(size)), Pipeline([]))
        if "calibration" in pipelines:
            pipelines["calibration"] += reward_ensemble.create_pipeline(ensemble_size=size)
        for stage in ("normalization", "ppo"):
            if stage in pipelines:
                pipelines[stage] = reward_ensemble.assembly_pipeline(size) + pipeline(
                    pipelines[stage], inputs={"reward_model": "reward_ensemble"})
    pipelines["__default__"] = sum(pipelines.values())
    return pipelines
