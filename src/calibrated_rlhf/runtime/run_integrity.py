"""Run integrity: a run reads only its own artifacts and those of runs that completed, and they must fit.

Kedro resolves an unpinned versioned dataset to the newest version on disk, at every load. With two
runs in one project folder, or after a failed or killed run, "newest" can be another run's half-work.
This module keeps Kedro's own mechanisms (the session's save version, load versions, the catalog,
hooks) and adds one fact Kedro lacks: which versions come from runs that completed.

- **Completion marker.** When a run completes, every versioned dataset it saved gets a marker beside
  it, ``<filepath>/<version>/_complete.json``, holding the marker's lineage (below). A failed or killed
  run writes none, so nothing it saved is ever "latest"; a failed run also removes what it saved
  (a killed one cannot: its versions stay, unmarked and never loaded).
- **One version per run.** Kedro names a run's save version after its session id, a millisecond
  timestamp; two runs started in one millisecond (a scheduler, a sweep) would save into one version
  folder. A run's catalog claims its version in the project folder first (``claim_version``).
- **Isolation.** At the start of a run every versioned dataset of its pipeline is pinned once: what
  the run produces to the run's own save version, everything else to the newest *completed* version
  (or the user's ``--load-versions`` pin). No later load consults the disk again.
- **Lineage.** A marker records the version of every versioned dataset its artifact was made from,
  directly or through loaded artifacts (a transform inherits the tokenizer its reward model was
  trained with), and of the artifacts saved beside it by the same node (pairs and their synthetic task). Before anything runs, a node whose inputs disagree on the version of a common
  ancestor (a tokenizer of one run, a reward model trained with another's) is refused, naming both.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.framework.context import KedroContext
from kedro.framework.hooks import hook_impl
from kedro.io import DataCatalog
from kedro.io.core import VERSION_FORMAT, AbstractVersionedDataset, Version, generate_timestamp

log = logging.getLogger(__name__)

MARKER = "_complete.json"
CLAIMS = ".run_versions"


class InconsistentArtifacts(ValueError):
    """Upstream artifacts that do not belong together, or one that no completed run has produced."""


# ---- completion markers -----------------------------------------------------------------------------


def _marker_path(ds: AbstractVersionedDataset, version: str) -> str:
    return str(PurePosixPath(ds._filepath) / version / MARKER)


def _fs(ds: AbstractVersionedDataset) -> Any:
    """The dataset's fsspec filesystem; local datasets of this project (HFPretrainedDataset) have none."""
    import fsspec

    return getattr(ds, "_fs", None) or fsspec.filesystem("file")


def versions_on_disk(ds: AbstractVersionedDataset) -> list[str]:
    """Every version of ``ds`` present, newest first (Kedro's timestamps sort as text)."""
    return [PurePosixPath(p).parent.name for p in ds._get_versions()]


def read_marker(ds: AbstractVersionedDataset, version: str) -> dict[str, Any] | None:
    """The marker of a version, or None if the run that saved it did not complete."""
    fs = _fs(ds)
    path = _marker_path(ds, version)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as fh:
        return json.load(fh)


def latest_complete(ds: AbstractVersionedDataset) -> str | None:
    """The newest version of ``ds`` saved by a run that completed."""
    return next((v for v in versions_on_disk(ds) if read_marker(ds, v) is not None), None)


def write_marker(ds: AbstractVersionedDataset, version: str, record: dict[str, Any]) -> None:
    """Write a marker atomically: a reader sees no marker or a whole one."""
    fs = _fs(ds)
    path = _marker_path(ds, version)
    tmp = f"{path}.{os.getpid()}.tmp"
    with fs.open(tmp, "w") as fh:
        json.dump(record, fh, indent=1, sort_keys=True)
    fs.mv(tmp, path)


# ---- the run's version --------------------------------------------------------------------------------


def claim_version(project_path: str | os.PathLike[str], proposed: str) -> str:
    """The version this run saves under: ``proposed`` (Kedro's session id), or a later one if another run
    in this project folder has it.

    Without a claim the second of two runs started in one millisecond fails half-way on Kedro's "save path
    must not exist", and its failure handler would remove the first run's unfinished outputs as its own.
    Creating ``<project>/.run_versions/<version>`` with O_EXCL is atomic on a local filesystem; the loser
    tries the next millisecond, or the clock's time if that is later. Claims stay: one empty file per run.
    """
    claims = Path(project_path) / CLAIMS
    claims.mkdir(exist_ok=True)
    version = proposed
    while True:
        try:
            os.close(os.open(claims / version, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return version
        except FileExistsError:
            # Always later than the taken one, so a clock that stepped back cannot loop here.
            later = datetime.strptime(version, VERSION_FORMAT) + timedelta(milliseconds=1)
            version = max(generate_timestamp(), later.strftime(VERSION_FORMAT)[:-4] + "Z")


# ---- resolving versions at the start of a run -------------------------------------------------------


def _versioned(catalog: Any, name: str) -> AbstractVersionedDataset | None:
    if name == "parameters" or name.startswith("params:"):
        return None
    ds = catalog.get(name, fallback_to_runtime_pattern=True)
    return ds if isinstance(ds, AbstractVersionedDataset) and ds._version is not None else None


def quiet_catalog(project: Path, env: str | None, runtime_params: dict[str, Any] | None = None) -> Any:
    """The project's catalog for ``env``, from a context with no hooks registered: looking at the catalog must not
    open an MLflow run, sweep a run's outputs or mark anything. The project must be bootstrapped."""
    from kedro.framework.hooks.manager import _create_hook_manager
    from kedro.framework.project import PACKAGE_NAME, settings

    loader = settings.CONFIG_LOADER_CLASS(conf_source=str(project / settings.CONF_SOURCE), env=env,
                                          runtime_params=runtime_params, **settings.CONFIG_LOADER_ARGS)
    context = settings.CONTEXT_CLASS(package_name=PACKAGE_NAME, project_path=project, config_loader=loader,
                                     env=env, runtime_params=runtime_params, hook_manager=_create_hook_manager())
    return context.catalog


def resolve_versions(pipeline: Any, catalog: Any, load_versions: dict[str, str] | None = None) -> dict[str, str]:
    """Pin every versioned dataset of ``pipeline`` in ``catalog``; returns name -> version.

    Outputs of the pipeline load the run's own save version. Inputs load the user's pin, else the newest
    version of a completed run; an input with none is an error now, before anything is written.
    """
    load_versions = load_versions or {}
    produced = pipeline.all_outputs()
    resolved: dict[str, str] = {}
    for name in sorted(pipeline.datasets()):
        ds = _versioned(catalog, name)
        if ds is None:
            continue
        save = ds.resolve_save_version()
        if name in produced:
            load = save
        elif name in load_versions:
            load = load_versions[name]
            if read_marker(ds, load) is None:
                log.warning("%s: the pinned version %s is not from a completed run", name, load)
        else:
            load = latest_complete(ds)
            if load is None:
                found = versions_on_disk(ds)
                raise InconsistentArtifacts(
                    f"'{name}' ({ds._filepath}): no completed run has produced it"
                    + (f" ({len(found)} version(s) of runs that failed or were killed, newest {found[0]})"
                       if found else "")
                    + ". Run the pipeline that makes it, or pin a version with --load-versions.")
        catalog[name] = catalog.get(name, version=Version(load, save))
        resolved[name] = load
    return resolved


def lineage(pipeline: Any, catalog: Any, resolved: dict[str, str]) -> dict[str, dict[str, str]]:
    """For every dataset of the pipeline, the versions of the versioned datasets it was made from.

    Raises ``InconsistentArtifacts`` where one node's inputs were made from two versions of one dataset.
    """
    produced = pipeline.all_outputs()
    origins: dict[str, dict[str, str]] = {}
    for name, version in resolved.items():
        if name not in produced:
            origins[name] = dict((read_marker(catalog.get(name), version) or {}).get("lineage", {}))
    for node in pipeline.nodes:  # topologically sorted
        merged: dict[str, str] = {}
        source: dict[str, str] = {}
        conflicts = []
        for inp in node.inputs:
            direct = {inp: resolved[inp]} if inp in resolved else {}
            for ancestor, version in {**origins.get(inp, {}), **direct}.items():
                if merged.setdefault(ancestor, version) != version:
                    conflicts.append((ancestor, source[ancestor], merged[ancestor], inp, version))
                source.setdefault(ancestor, inp)
        if conflicts:
            # Name the disagreement a user can act on: an input itself (the tokenizer) before its ancestors.
            conflicts.sort(key=lambda c: c[0] not in node.inputs)
            raise InconsistentArtifacts(_conflict(node.name, *conflicts[0], resolved))
        for out in node.outputs:
            # Outputs of one node belong together (pairs and their synthetic task): each names the others.
            siblings = {o: resolved[o] for o in node.outputs if o != out and o in resolved}
            origins[out] = {**merged, **siblings}
    return origins


def _conflict(node: str, ancestor: str, first: str, first_version: str, second: str, second_version: str,
              resolved: dict[str, str]) -> str:
    def how(inp: str, version: str) -> str:
        if inp == ancestor:
            return f"this run loads '{ancestor}' version {version}"
        return f"'{inp}' (version {resolved.get(inp, 'of this run')}) was made from '{ancestor}' version {version}"

    return (f"node '{node}': its inputs do not belong together: {how(first, first_version)}, but "
            f"{how(second, second_version)}. Rerun the stages after '{ancestor}', or pin matching versions "
            "with --load-versions.")


# ---- the context and the hook --------------------------------------------------------------------------


class ProjectContext(KedroContext):
    """Kedro's context, except that a run's catalog saves under a version it claimed (``claim_version``)."""

    def _get_catalog(self, catalog_class: type = DataCatalog, save_version: str | None = None,
                     load_versions: dict[str, str] | None = None) -> Any:
        # Kedro's documented place to change how the catalog is made; the version must be set here, as every
        # dataset of a catalog, lazy ones included, takes the one save version it was built with.
        if save_version:
            save_version = claim_version(self.project_path, save_version)
        return super()._get_catalog(catalog_class, save_version, load_versions)


def init_sqlite_store(uri: str | None, experiment: dict[str, Any] | None = None) -> None:
    """Create (or migrate) an MLflow sqlite store and its experiment once, under a file lock.

    Runs started together on a new store would otherwise race twice: both run MLflow's schema
    migrations (one fails, ``duplicate column name``), then both find no experiment and create it (one
    fails, ``UNIQUE constraint failed``). ``experiment`` is mlflow.yml's ``tracking.experiment``; it is
    created here with the kwargs kedro-mlflow would pass, so kedro-mlflow finds it. Other stores are
    left to MLflow.
    """
    if not uri or not uri.startswith("sqlite:///"):
        return
    import fcntl

    import mlflow

    path = uri[len("sqlite:///"):]
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
        name = (experiment or {}).get("name")
        if name and client.get_experiment_by_name(name) is None:
            kwargs = experiment.get("create_experiment_kwargs") or {}
            client.create_experiment(name, artifact_location=kwargs.get("artifact_location"),
                                     tags=kwargs.get("tags"))


class RunIsolation:
    """Pins versions when a run starts (before any other hook reads them); marks its outputs when it completes."""

    def __init__(self) -> None:
        self._save_version: str | None = None
        self._resolved: dict[str, str] = {}
        self._lineage: dict[str, dict[str, str]] = {}

    @hook_impl(tryfirst=True)  # before kedro-mlflow opens the store
    def after_context_created(self, context: Any) -> None:
        from calibrated_rlhf.runtime.tracking_check import configured_mlflow

        conf = configured_mlflow(context)
        init_sqlite_store((conf.get("server") or {}).get("mlflow_tracking_uri"),
                          (conf.get("tracking") or {}).get("experiment"))

    @hook_impl
    def after_catalog_created(self, save_version: str | None) -> None:
        if save_version:  # the run's catalog, not one built to look at (`context.catalog`)
            self._save_version = save_version

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        if self._save_version and self._save_version != run_params["run_id"]:
            log.warning("another run in this folder started in the same millisecond: this run saves version %s, "
                        "not %s", self._save_version, run_params["run_id"])
            # Kedro hands this one dict to every hook: those after this one (kedro-mlflow's tags, the
            # provenance record) and the completion markers name the version the run saves.
            run_params["run_id"] = self._save_version
        self._resolved = resolve_versions(pipeline, catalog, run_params.get("load_versions"))
        self._lineage = lineage(pipeline, catalog, self._resolved)
        upstream = {k: v for k, v in self._resolved.items() if k not in pipeline.all_outputs()}
        if upstream:
            log.info("upstream versions (completed runs or pinned): %s",
                     ", ".join(f"{k}={v}" for k, v in upstream.items()))

    @hook_impl
    def on_pipeline_error(self, pipeline: Any, catalog: Any) -> None:
        for folder in discard_outputs(pipeline, catalog):
            log.warning("the run failed: removed its partial output %s", folder)

    # tryfirst: while kedro-mlflow's run is still active, so the marker names it.
    @hook_impl(tryfirst=True)
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        record = {"session_id": run_params.get("run_id"), "mlflow_run_id": _active_mlflow_run_id()}
        for name in sorted(pipeline.all_outputs()):
            ds = _versioned(catalog, name)
            if ds is None or not ds.exists():  # an output a node did not write (an optional plot)
                continue
            write_marker(ds, ds.resolve_save_version(), {**record, "dataset": name,
                                                         "lineage": self._lineage.get(name, {})})


def discard_outputs(pipeline: Any, catalog: Any) -> list[str]:
    """Remove what a failed run saved (its own save version of each output, never marked complete).

    Nothing would load it anyway; removing it leaves the folder as it was before the run, so a bad
    input costs no disk and misleads no one browsing ``data/``. Returns the removed folders.
    """
    removed = []
    for name in sorted(pipeline.all_outputs()):
        ds = _versioned(catalog, name)
        if ds is None:
            continue
        fs, version = _fs(ds), ds.resolve_save_version()
        folder = str(PurePosixPath(ds._filepath) / version)
        if not fs.exists(folder) or read_marker(ds, version) is not None:
            continue
        fs.rm(folder, recursive=True)
        removed.append(folder)
        if fs.exists(str(ds._filepath)) and not fs.ls(str(ds._filepath)):
            fs.rmdir(str(ds._filepath))  # the dataset's folder, if this run created it
    return removed


def _active_mlflow_run_id() -> str | None:
    try:
        import mlflow
    except ImportError:
        return None
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None
