"""Hooks that record, in the run's MLflow run, what is needed to redo it."""

from __future__ import annotations

import importlib.metadata as md
import os
import shlex
import subprocess
import sys
from typing import Any

from kedro.framework.hooks import hook_impl

PACKAGES = ("calibrated_rlhf", "kedro", "kedro-datasets", "kedro-mlflow", "mlflow", "torch", "transformers",
            "trl", "accelerate", "datasets", "tokenizers", "numpy", "pandas", "pydantic")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def provenance_tags() -> dict[str, str]:
    """Git commit and dirty flag, package versions and the exact command line."""
    tags = {"provenance/command": " ".join(shlex.quote(a) for a in sys.argv)}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["provenance/git_commit"] = commit
        tags["provenance/git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    for pkg in PACKAGES:
        try:
            tags[f"provenance/version/{pkg}"] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return tags


def flatten(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


class ProvenanceHooks:
    """Tags the active MLflow run (opened by kedro-mlflow) with provenance and loaded dataset versions."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        import mlflow

        if mlflow.active_run() is None:
            return
        mlflow.set_tags(provenance_tags())
        load_versions = run_params.get("load_versions") or {}
        for name, version in load_versions.items():
            mlflow.set_tag(f"provenance/load_version/{name}", version)

    @hook_impl
    def before_node_run(self, node: Any, inputs: dict[str, Any]) -> None:
        """Log typed (pydantic) parameters flattened, one MLflow param per field.

        Kedro builds the model before hooks see it, so kedro-mlflow can only log its repr.
        """
        import mlflow
        from pydantic import BaseModel

        if mlflow.active_run() is None:
            return
        flat: dict[str, Any] = {}
        for name, value in inputs.items():
            if name.startswith("params:") and isinstance(value, BaseModel):
                flat.update(flatten(value.model_dump(mode="json"), prefix=name[len("params:"):]))
        if flat:
            mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any, node: Any) -> None:
        import mlflow

        if mlflow.active_run() is None:
            return
        version = _loaded_version(dataset_name)
        if version:
            mlflow.set_tag(f"provenance/loaded/{dataset_name}", version)

    @hook_impl
    def after_catalog_created(self, catalog: Any) -> None:
        global _CATALOG
        _CATALOG = catalog

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        """Log a saved file or folder to MLflow when its catalog entry asks for it.

        One mechanism for every artifact (plots, transforms, model folders), and it works with
        versioned datasets, which kedro-mlflow's artifact wrapper does not.
        """
        import mlflow

        if mlflow.active_run() is None or _CATALOG is None:
            return
        ds = _CATALOG.get(dataset_name)
        artifact_path = (getattr(ds, "metadata", None) or {}).get("mlflow_artifact_path")
        if not artifact_path:
            return
        path = saved_path(ds)
        if path is None or not os.path.exists(path):
            return
        if os.path.isdir(path):
            mlflow.log_artifacts(path, artifact_path=artifact_path)
        else:
            mlflow.log_artifact(path, artifact_path=artifact_path)


_CATALOG: Any = None


def saved_path(ds: Any) -> str | None:
    """Where a file-backed dataset just wrote (its save version's path when versioned)."""
    filepath = getattr(ds, "_filepath", None)
    if filepath is None:
        return None
    version = ds.resolve_save_version() if getattr(ds, "_version", None) else None
    return str(ds._get_versioned_path(version)) if version else str(filepath)


def _loaded_version(name: str) -> str | None:
    """The Kedro version a versioned dataset was loaded at, if it is versioned."""
    if _CATALOG is None:
        return None
    try:
        ds = _CATALOG.get(name)
    except Exception:  # noqa: BLE001 - a dataset the catalog cannot describe has no version to record
        return None
    resolve = getattr(ds, "resolve_load_version", None)
    if resolve is None or not getattr(ds, "_version", None):
        return None
    try:
        return resolve()
    except Exception:  # noqa: BLE001
        return None
