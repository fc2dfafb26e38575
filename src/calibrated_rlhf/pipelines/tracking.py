"""The one place nodes talk to MLflow directly; everything else they log goes through kedro-mlflow's datasets.

What is left here cannot be a node's output:

- the active run's id names a stage's checkpoint folder before training starts (``checkpoints.run_folder_name``),
  and the report leaves out the run it is being logged to (``reporting``): both read the run kedro-mlflow opened;
- what a resumed stage picked up (``<stage>.resumed_from_*``) is known only inside the node, once the
  checkpoint is found, and is logged there as params and tags (``track``), from the main process only;
- the deployable model (``log_reward_model``) is an MLflow pyfunc bundle whose artifacts are folders the node
  writes at run time, where kedro-mlflow's model dataset takes artifacts from static configuration only; it is
  logged inside the active run and registered by a hook once the run has finished (``runtime.crash_recovery``),
  so a failed run never becomes the latest version.

MLflow is imported when called: a node module imports without it (the pipelines are built in every ``kedro``
command).
"""

from __future__ import annotations

from typing import Any


def active_run_id() -> str | None:
    """The id of the MLflow run kedro-mlflow opened for this session, or None when nothing is tracked."""
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def tracking_uri() -> str:
    """Where MLflow reads and writes runs (kedro-mlflow sets it from conf/*/mlflow.yml)."""
    import mlflow

    return mlflow.get_tracking_uri()


def log_params_and_tags(params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None) -> None:
    """Log to the active run as strings; nothing when no run is tracked. The caller decides which process logs."""
    import mlflow

    if mlflow.active_run() is None:
        return
    if params:
        mlflow.log_params({k: str(v) for k, v in params.items()})
    if tags:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_reward_model(reward_model: Any, tokenizer: Any, reward_transform: dict[str, Any], name: str,
                     input_example: Any) -> Any:
    """Log the deployable bundle (``serving.log_reward_model``) to the active run, unregistered; MLflow's ModelInfo."""
    from calibrated_rlhf.serving import log_reward_model as log_bundle

    return log_bundle(reward_model, tokenizer, reward_transform, name, None, input_example)
