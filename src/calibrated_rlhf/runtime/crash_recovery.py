"""What a killed run leaves behind, cleared by the next run; and what must wait until a run has finished.

A process killed with SIGKILL runs no ``finally`` and no hook, so its debris is cleared by whoever comes
next, and only where the writer is provably gone:

- staging folders (``calibrated_rlhf.core.staging``) under the project's ``data/`` and the system's
  temporary folder whose writing process no longer exists;
- MLflow runs left RUNNING by a process of this host that no longer exists: marked KILLED. Each run is
  tagged with its host and pid for this (``run/host``, ``run/pid``).

A model version registered by a node would be "latest" in the registry even if the run then failed or
was killed, so registration waits for the end of the run: a dataset whose catalog entry carries
``metadata: {mlflow_register: true}`` holds ``model_uri`` and ``registered_model_name``, and the model is
registered after the run has completed and kedro-mlflow has ended its MLflow run.

SIGTERM and SIGINT, unlike SIGKILL, can be handled: :class:`GracefulStop` has them stop the run at the next
update boundary of a training loop with a checkpoint (``core.stop_signals``), or at once elsewhere; the run
then fails (exit code 1) with its MLflow run ended KILLED, and ``resume_from: latest`` continues it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from calibrated_rlhf.core import stop_signals
from calibrated_rlhf.core.staging import host_name, pid_alive, sweep_stale

log = logging.getLogger(__name__)

HOST_TAG, PID_TAG = "run/host", "run/pid"


def sweep_staging(project_path: str | os.PathLike[str]) -> list[Path]:
    """Remove staging folders of dead writers under ``<project>/data`` and in the temporary folder."""
    removed = sweep_stale(Path(project_path) / "data") + sweep_stale(tempfile.gettempdir(), recursive=False)
    for path in removed:
        log.warning("removed %s, left by a process that is gone", path)
    return removed


def mark_dead_runs_killed(client: Any, experiment_ids: list[str]) -> list[str]:
    """Mark KILLED the RUNNING runs whose process (on this host) is gone; returns their ids."""
    killed = []
    runs = client.search_runs(experiment_ids, filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = "
                                                            f"'{host_name()}'", max_results=1000)
    for run in runs:
        pid = run.data.tags.get(PID_TAG, "")
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        client.set_terminated(run.info.run_id, status="KILLED")
        log.warning("MLflow run %s (pid %s) was left RUNNING by a process that is gone: marked KILLED",
                    run.info.run_id, pid)
        killed.append(run.info.run_id)
    return killed


def register_models(pipeline: Any, catalog: Any, client: Any) -> list[Any]:
    """Register the models that this run's ``mlflow_register`` datasets point at; returns the versions."""
    import mlflow

    versions = []
    for name in sorted(pipeline.all_outputs()):
        ds = catalog.get(name, fallback_to_runtime_pattern=True)
        if not (getattr(ds, "metadata", None) or {}).get("mlflow_register"):
            continue
        published = catalog.load(name)
        if not published.get("model_uri") or not published.get("registered_model_name"):
            continue
        version = mlflow.register_model(published["model_uri"], published["registered_model_name"])
        client.set_tag(published["run_id"], f"registered/{published['registered_model_name']}", version.version)
        log.info("registered %s as %s version %s", published["model_uri"], version.name, version.version)
        versions.append(version)
    return versions


class CrashRecovery:
    """Clears a killed run's debris when the next run starts; registers models once a run has finished."""

    # trylast: after kedro-mlflow has pointed MLflow at the tracking store. Here rather than at the run's
    # start, so that a run refused before it starts still clears what the killed one left.
    @hook_impl(trylast=True)
    def after_context_created(self, context: Any) -> None:
        import mlflow

        sweep_staging(context.project_path)
        config = getattr(context, "mlflow", None)
        experiment = config and mlflow.get_experiment_by_name(config.tracking.experiment.name)
        if experiment:
            mark_dead_runs_killed(mlflow.MlflowClient(), [experiment.experiment_id])

    @hook_impl(trylast=True)  # after kedro-mlflow has started this run
    def before_pipeline_run(self) -> None:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.set_tags({HOST_TAG: host_name(), PID_TAG: str(os.getpid())})

    @hook_impl(trylast=True)  # after kedro-mlflow has ended the run: a killed run registers nothing
    def after_pipeline_run(self, pipeline: Any, catalog: Any) -> None:
        import mlflow

        register_models(pipeline, catalog, mlflow.MlflowClient())


class GracefulStop:
    """SIGTERM/SIGINT handlers for the duration of the pipeline run (the previous ones put back after); a run
    they stop ends its MLflow run KILLED rather than FAILED."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] | None = None

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self) -> None:
        self._previous = stop_signals.install()

    @hook_impl(trylast=True)
    def before_node_run(self) -> None:
        # a request that something swallowed (a broad ``except Exception``) still stops the run here
        stop_signals.raise_if_requested("before the next node")

    @hook_impl
    def after_pipeline_run(self) -> None:
        stop_signals.restore(self._previous)

    @hook_impl(tryfirst=True)  # before kedro-mlflow ends the run as FAILED
    def on_pipeline_error(self, error: Exception) -> None:
        import mlflow

        stop_signals.restore(self._previous)
        if stop_signals.requested() is None and not isinstance(error, stop_signals.StopRequested):
            return
        run = mlflow.active_run()
        if run is not None:
            log.warning("MLflow run %s stopped by a signal: marked KILLED", run.info.run_id)
            mlflow.end_run(status="KILLED")
