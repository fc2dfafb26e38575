"""The project's Kedro hooks: thin adapters over ``provenance``, ``tracking_check``, ``pipeline_registry``
and ``launch``. (The pipeline registry needs no hook: the project's config loader hands itself to it.)

Ordered against kedro-mlflow's hook with pluggy's ``tryfirst``/``trylast`` rather than by registration
order (kedro-mlflow registers through an entry point, after ``settings.HOOKS``, and pluggy calls later
registrations first):

- ``TrackingServerCheck`` runs before kedro-mlflow touches the tracking server, so an unreachable
  server fails ``kedro run`` in seconds with the URI named, instead of after minutes of HTTP retries.
- ``LaunchedRanks`` keeps a launched secondary rank's outputs in memory, and has the main rank log how
  many processes trained (``calibrated_rlhf.runtime.launch``).
- ``ProvenanceHooks`` runs after kedro-mlflow has started the run, and writes to that run by id
  through ``MlflowClient`` (not the fluent API), so it also works from a ``ThreadRunner``'s workers.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from kedro.framework.hooks import hook_impl

from calibrated_rlhf.runtime import launch
from calibrated_rlhf.runtime.provenance import (
    MAX_PATCH_BYTES,
    REPLAY_OF_ENV,
    RUN_CONFIG_DIR,
    flatten,
    git_states,
    jsonable,
    load_version,
    provenance_tags,
    run_config,
    saved_path,
)
from calibrated_rlhf.runtime.tracking_check import check_tracking_server, configured_tracking_uri


class TrackingServerCheck:
    """Fail fast, before kedro-mlflow connects, when the tracking server is unreachable."""

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        import mlflow

        if mlflow.active_run() is not None:  # an orchestrator started the run: the server answered it
            return
        check_tracking_server(configured_tracking_uri(context))


class LaunchedRanks:
    """Under ``calibrated_rlhf.runtime.launch``: only the main process saves outputs and tracks the run.

    A secondary rank runs every node (the trainers need every rank), with the pipeline's outputs in
    memory: nothing it makes reaches ``data/`` or gets a completion marker, and downstream nodes of the
    same run still get their inputs. kedro-mlflow is off there already (``settings``). The main rank
    logs the number of processes of the stages whose results depend on it. A plain ``kedro run`` is
    not touched.
    """

    @hook_impl(tryfirst=True)  # before run_integrity pins the outputs' versions
    def before_pipeline_run(self, pipeline: Any, catalog: Any) -> None:
        if not launch.is_secondary_rank():
            return
        from kedro.io import MemoryDataset

        for name in pipeline.all_outputs():
            # assign: the rank's own object, as a node returned it (a model is not copied on every load)
            catalog[name] = MemoryDataset(copy_mode="assign")

    @hook_impl(tryfirst=True)  # while kedro-mlflow's run is still open
    def after_pipeline_run(self, run_params: dict[str, Any]) -> None:
        import mlflow

        metrics = launch.stage_metrics(run_params.get("pipeline_names"))
        if metrics and mlflow.active_run() is not None:
            mlflow.log_metrics(metrics)


def _stage_set_fields() -> frozenset[str]:
    """Typed-parameter fields a stage fills in itself and logs under a name of its own.

    ``ppo.trainer.checkpoint_dir`` must be null in the parameters (the PPO stage puts each run in its own
    folder, logged as ``ppo.checkpoint_dir``): logged from the parameters it would read ``None``.
    """
    from calibrated_rlhf.pipelines.ppo.nodes import STAGE_CHECKPOINT_FIELDS

    return frozenset(f"ppo.trainer.{field}" for field in STAGE_CHECKPOINT_FIELDS)


class ProvenanceHooks:
    """Tags and artifacts on the run kedro-mlflow opened: provenance, run configuration, loaded versions."""

    def __init__(self) -> None:
        self._catalog: Any = None
        self._context: Any = None
        self._run_id: str | None = None
        self._client: Any = None
        self._tagged_loads: dict[str, str] = {}  # one tag write per dataset, not per load

    def _active(self) -> bool:
        return self._run_id is not None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._context = context

    @hook_impl
    def after_catalog_created(self, catalog: Any) -> None:
        self._catalog = catalog

    @hook_impl(trylast=True)  # after kedro-mlflow's before_pipeline_run has started the run
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        import mlflow

        run = mlflow.active_run()
        if run is None:  # tracking disabled for this pipeline, or a secondary rank of a launch
            self._run_id = None
            return
        self._run_id = run.info.run_id
        self._client = mlflow.MlflowClient()
        self._tagged_loads = {}
        self._catalog = catalog

        config = run_config(run_params, pipeline, catalog)
        states = git_states(run_params.get("project_path"))
        parameters = self._raw_parameters(catalog)
        mlflow.set_tags(self._tags(run_params, config, states, parameters))
        # It shapes the DAG and reaches no node, so kedro-mlflow (which logs node inputs) would miss it.
        from calibrated_rlhf.pipeline_registry import ensemble_size

        mlflow.log_param("reward_model.ensemble_size", ensemble_size())

        mlflow.log_dict(parameters, f"{RUN_CONFIG_DIR}/parameters.json")
        mlflow.log_dict(config, f"{RUN_CONFIG_DIR}/run_params.json")
        self._log_git_changes(states)

    @staticmethod
    def _tags(run_params: dict[str, Any], config: dict[str, Any], states: dict[str, dict[str, str]],
              parameters: dict[str, Any]) -> dict[str, str]:
        tags = provenance_tags(run_params.get("project_path"), states)
        tags["provenance/env"] = str(config["env"])
        tags["provenance/pipelines"] = ",".join(config["pipeline_names"] or ["__default__"])
        for name, version in (run_params.get("load_versions") or {}).items():
            tags[f"provenance/load_version/{name}"] = version
        for name, digest in config["upstream_sha256"].items():
            tags[f"provenance/input_sha256/{name}"] = digest
        tags.update(launch.launch_tags())
        replay_of = os.environ.get(REPLAY_OF_ENV)
        if replay_of:
            tags["replay_of"] = replay_of
        if parameters.get("scenario"):
            # conf/scenario_*/ names its runs, so reports can group them
            tags["scenario"] = str(parameters["scenario"])
        return tags

    def _raw_parameters(self, catalog: Any) -> dict[str, Any]:
        """The resolved parameters (``--params`` merged in) as YAML gave them, before Kedro builds typed
        parameters: what a parameters file must hold to redo the run through the same validation."""
        if self._context is not None:
            try:
                return jsonable(dict(self._context.config_loader["parameters"]))
            except Exception:  # noqa: BLE001 - fall back to the catalog's (typed) copy
                pass
        try:
            return jsonable(catalog.load("parameters"))
        except Exception:  # noqa: BLE001
            return {}

    def _log_git_changes(self, states: dict[str, dict[str, str]]) -> None:
        """A dirty worktree's status and diff against HEAD, so the exact code can be rebuilt.

        Untracked files are listed in the status, not included in the diff (that would need the index).
        """
        import mlflow

        for prefix, state in states.items():
            if state["dirty"] != "True":
                continue
            mlflow.log_text(state["status"], f"{RUN_CONFIG_DIR}/{prefix}status.txt")
            diff = state.get("diff", "")
            mlflow.set_tag(f"provenance/{prefix}diff_sha256", hashlib.sha256(diff.encode()).hexdigest())
            if len(diff.encode()) <= MAX_PATCH_BYTES:
                mlflow.log_text(diff, f"{RUN_CONFIG_DIR}/{prefix}diff.patch")

    @hook_impl(trylast=True)
    def before_node_run(self, node: Any, inputs: dict[str, Any]) -> None:
        """Log typed (pydantic) parameters flattened, one MLflow param per field.

        Kedro builds the model before hooks see it, so kedro-mlflow can only log its repr. A field the
        stage sets itself is left out while it is null (see ``_stage_set_fields``).
        """
        from mlflow.entities import Param
        from pydantic import BaseModel

        if not self._active():
            return
        flat: dict[str, Any] = {}
        for name, value in inputs.items():
            if name.startswith("params:") and isinstance(value, BaseModel):
                flat.update(flatten(value.model_dump(mode="json"), prefix=name[len("params:"):]))
        skipped = _stage_set_fields()
        flat = {k: v for k, v in flat.items() if not (v is None and k in skipped)}
        if flat:
            self._client.log_batch(self._run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any, node: Any) -> None:
        """Tag the Kedro version each versioned dataset was loaded at (a pinned one when pinned)."""
        if not self._active() or self._catalog is None:
            return
        try:
            version = load_version(self._catalog.get(dataset_name))
        except Exception:  # noqa: BLE001
            return
        if version and self._tagged_loads.get(dataset_name) != version:
            self._client.set_tag(self._run_id, f"provenance/loaded/{dataset_name}", version)
            self._tagged_loads[dataset_name] = version

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        """Log a saved file or folder to MLflow when its catalog entry asks for it.

        One mechanism for every artifact (plots, transforms, model folders), and it works with
        versioned datasets, which kedro-mlflow's artifact wrapper does not.
        """
        if not self._active() or self._catalog is None:
            return
        ds = self._catalog.get(dataset_name)
        artifact_path = (getattr(ds, "metadata", None) or {}).get("mlflow_artifact_path")
        if not artifact_path:
            return
        path = saved_path(ds)
        if path is None or not os.path.exists(path):
            return
        if os.path.isdir(path):
            self._client.log_artifacts(self._run_id, path, artifact_path=artifact_path)
        else:
            self._client.log_artifact(self._run_id, path, artifact_path=artifact_path)

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._run_id = None

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._run_id = None
