"""Hooks that record, in the run's MLflow run, what is needed to redo it.

Two hook classes, ordered against kedro-mlflow's hook with pluggy's ``tryfirst``/``trylast`` rather
than by registration order (kedro-mlflow registers through an entry point, after ``settings.HOOKS``,
and pluggy calls later registrations first):

- ``TrackingServerCheck`` runs before kedro-mlflow touches the tracking server, so an unreachable
  server fails ``kedro run`` in seconds with the URI named, instead of after minutes of HTTP retries.
- ``ProvenanceHooks`` runs after kedro-mlflow has started the run, and writes to that run by id
  through ``MlflowClient`` (not the fluent API), so it also works from a ``ThreadRunner``'s workers.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import re
import shlex
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kedro.framework.hooks import hook_impl

PACKAGES = ("calibrated_rlhf", "kedro", "kedro-datasets", "kedro-mlflow", "mlflow", "torch", "transformers",
            "trl", "accelerate", "datasets", "tokenizers", "numpy", "pandas", "pyarrow", "pydantic", "matplotlib")

# Set by `python -m calibrated_rlhf.replay` for the `kedro run` it starts; becomes the `replay_of` tag.
REPLAY_OF_ENV = "CALIBRATED_RLHF_REPLAY_OF"
RUN_CONFIG_DIR = "run_config"
MAX_PATCH_BYTES = 10 * 2**20  # a larger working-tree diff is recorded by hash only


# ---- git and package state --------------------------------------------------------------------------


def _git(cwd: str | os.PathLike[str], *args: str) -> str | None:
    # --no-optional-locks: `git status` would otherwise take index.lock to refresh the index, racing
    # anyone committing in the same worktree while a run starts.
    try:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(cwd), *args], capture_output=True,
                              text=True, check=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """Commit, worktree root, dirty flag, status and diff of the git worktree holding ``path``.

    Untracked files that git does not ignore count as dirty: a new, uncommitted pipeline module
    changes what a run does as much as an edited one.
    """
    root = _git(path, "rev-parse", "--show-toplevel")
    commit = _git(path, "rev-parse", "HEAD")
    if not root or not commit:
        return None
    status = _git(path, "status", "--porcelain") or ""
    state = {"root": root.strip(), "commit": commit.strip(), "dirty": str(bool(status.strip())), "status": status}
    if status.strip():
        state["diff"] = _git(path, "diff", "HEAD", "--binary") or ""
    return state


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would retype it: ``kedro run ...`` rather than ``.../kedro/__main__.py run ...``."""
    argv = list(sys.argv if argv is None else argv)
    prog = argv[0] if argv else ""
    # kedro's __main__ rewrites argv[0] to "python -m kedro"; both spellings run the same CLI.
    if prog == "python -m kedro" or Path(prog).name == "kedro" or prog.endswith(("kedro/__main__.py",)):
        argv = ["kedro", *argv[1:]]
    return shlex.join(argv)


def git_states(project_path: str | os.PathLike[str] | None = None) -> dict[str, dict[str, str]]:
    """Git state keyed by tag prefix: ``git_`` for the project folder's worktree, ``package_git_`` for the
    installed package's source when it lives elsewhere (the project folder is a copy of the
    configuration, say, or the package is installed from another checkout)."""
    states: dict[str, dict[str, str]] = {}
    project = git_state(project_path or os.getcwd())
    package = git_state(_package_dir())
    if project:
        states["git_"] = project
    if package and (project is None or package["root"] != project["root"]):
        states["package_git_"] = package
    return states


def provenance_tags(project_path: str | os.PathLike[str] | None = None,
                    states: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """Git commit and dirty flag, package versions, the interpreter and the exact command line."""
    tags = {"provenance/command": command_line(), "provenance/python": sys.version.split()[0],
            "provenance/platform": sys.platform}
    for prefix, state in (git_states(project_path) if states is None else states).items():
        tags[f"provenance/{prefix}commit"] = state["commit"]
        tags[f"provenance/{prefix}dirty"] = state["dirty"]
    for pkg in PACKAGES:
        try:
            tags[f"provenance/version/{pkg}"] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return tags


def flatten(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"<prefix>.a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# ---- data content -----------------------------------------------------------------------------------


def content_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, or of a folder's files (relative paths and contents, in sorted order)."""
    p = Path(path)
    if p.is_file():
        return _file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f.relative_to(p).as_posix().encode() + b"\0" + bytes.fromhex(_file_sha256(f)))
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def saved_path(ds: Any) -> str | None:
    """Where a file-backed dataset just wrote (its save version's path when versioned)."""
    filepath = getattr(ds, "_filepath", None)
    if filepath is None:
        return None
    version = ds.resolve_save_version() if getattr(ds, "_version", None) else None
    return str(ds._get_versioned_path(version)) if version else str(filepath)


def load_version(ds: Any) -> str | None:
    """The Kedro version a versioned dataset loads (the pinned one, else the latest); None if unversioned."""
    resolve = getattr(ds, "resolve_load_version", None)
    if resolve is None or not getattr(ds, "_version", None):
        return None
    try:
        return resolve()
    except Exception:  # noqa: BLE001 - no version on disk yet: the load itself will say so
        return None


def local_load_path(ds: Any) -> str | None:
    """The local file or folder a file-backed dataset loads from, if it exists."""
    filepath = getattr(ds, "_filepath", None)
    if filepath is None or getattr(ds, "_protocol", "file") not in ("file", None):
        return None
    try:
        path = str(ds._get_load_path()) if getattr(ds, "_version", None) else str(filepath)
    except Exception:  # noqa: BLE001
        return None
    return path if os.path.exists(path) else None


# ---- tracking server --------------------------------------------------------------------------------


class TrackingServerUnreachable(RuntimeError):
    """The configured MLflow tracking server does not answer."""


def _redact(uri: str) -> str:
    """The URI without user:password, for messages."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _ssl_context() -> ssl.SSLContext | None:
    # The same switches MLflow's own HTTP client honours.
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()  # noqa: S323 - the user asked for it, as in MLflow
    cafile = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    return ssl.create_default_context(cafile=cafile) if cafile else None


def _http_get(url: str, timeout: float) -> tuple[int, str, bytes]:
    """Status, content type and (up to 64 KiB of) body; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=_ssl_context()) as resp:  # noqa: S310
            return resp.status, resp.headers.get("Content-Type", ""), resp.read(65536)
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", "") if err.headers else "", b""


def _is_json(content_type: str, body: bytes) -> bool:
    import json

    if "json" not in content_type.lower():
        return False
    try:
        json.loads(body or b"null")
    except ValueError:
        return False
    return True


def check_tracking_server(uri: str | None, timeout: float = 5.0) -> None:
    """Raise ``TrackingServerUnreachable`` unless an http(s) tracking URI answers as an MLflow server.

    The REST API decides: ``experiments/search`` must answer JSON (2xx or 4xx: MLflow's errors are JSON
    too), or 401/403 (a real server behind authentication). ``/health`` answering 2xx alone is not enough:
    any web server at the wrong port (``python -m http.server``, a proxy's HTML page) answers that, and
    MLflow would then fail much later, mid-run. Non-http URIs (sqlite, file, databricks) are not checked.
    """
    if not uri or urlsplit(uri).scheme not in ("http", "https"):
        return
    base = uri.rstrip("/")
    try:
        status, content_type, body = _http_get(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", timeout)
        if status in (401, 403) or (status < 500 and _is_json(content_type, body)):
            return
        if status < 500:
            shown = content_type.split(";")[0] or "no content type"
            raise TrackingServerUnreachable(
                f"{_redact(uri)} is not an MLflow tracking server: /api/2.0/mlflow/experiments/search answered "
                f"HTTP {status} with {shown}, not JSON. Point MLFLOW_TRACKING_URI at the MLflow server or unset it"
            )
        reason = f"HTTP {status}"
    except urllib.error.URLError as err:
        reason = str(err.reason)
    except (OSError, ValueError) as err:  # timeouts, resets, malformed hosts
        reason = f"{type(err).__name__}: {err}"
    raise TrackingServerUnreachable(
        f"MLflow tracking server at {_redact(uri)} is unreachable ({reason}): start it or unset MLFLOW_TRACKING_URI"
    )


def configured_tracking_uri(context: Any) -> str | None:
    """The tracking URI kedro-mlflow will use: ``server.mlflow_tracking_uri`` of the resolved mlflow.yml."""
    from kedro.config import MissingConfigException

    loader = context.config_loader
    if "mlflow" not in loader.config_patterns:
        # The same patterns kedro-mlflow adds (it skips adding when the key is present).
        loader.config_patterns.update({"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]})
    try:
        conf = loader["mlflow"] or {}
    except MissingConfigException:
        return None
    return (conf.get("server") or {}).get("mlflow_tracking_uri")


class PipelineShape:
    """Hands the run's configuration to the pipeline registry: ``reward_model.ensemble_size`` shapes the DAG."""

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        from calibrated_rlhf.pipeline_registry import use_config

        use_config(context.config_loader)


class TrackingServerCheck:
    """Fail fast, before kedro-mlflow connects, when the tracking server is unreachable."""

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        import mlflow

        if mlflow.active_run() is not None:  # an orchestrator started the run: the server answered it
            return
        check_tracking_server(configured_tracking_uri(context))


# ---- provenance -------------------------------------------------------------------------------------


def _runner_path(recorded: Any) -> str | None:
    """``kedro.runner.thread_runner.ThreadRunner`` from Kedro's ``str(runner)`` (``<... object at 0x..>``)."""
    if recorded is None:
        return None
    match = re.match(r"<([\w.]+) object at ", str(recorded))
    return match.group(1) if match else str(recorded)


def _jsonable(value: Any) -> Any:
    """Plain JSON types; typed parameters (pydantic models, dataclasses) as their field values."""
    import dataclasses

    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, (tuple, set, frozenset)):
        return [_jsonable(v) for v in (sorted(value) if isinstance(value, (set, frozenset)) else value)]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def run_config(run_params: dict[str, Any], pipeline: Any, catalog: Any) -> dict[str, Any]:
    """What ``kedro run`` was asked to do, plus the versions and hashes of the upstream data it reads.

    ``pipeline_names`` is sorted: the CLI passes them through a ``set``, so their order is arbitrary
    (and the combined pipeline does not depend on it).
    """
    names = run_params.get("pipeline_names") or ([run_params["pipeline_name"]] if run_params.get("pipeline_name")
                                                 else None)
    upstream_versions: dict[str, str] = {}
    upstream_sha256: dict[str, str] = {}
    for name in sorted(pipeline.inputs()):
        if name == "parameters" or name.startswith("params:"):
            continue
        try:
            ds = catalog.get(name)
        except Exception:  # noqa: BLE001 - an input the catalog cannot describe has nothing to pin
            continue
        version = load_version(ds)
        if version:
            upstream_versions[name] = version
        path = local_load_path(ds)
        if path:
            upstream_sha256[name] = content_sha256(path)
    keys = ("env", "tags", "from_nodes", "to_nodes", "node_names", "from_inputs", "to_outputs", "namespaces",
            "load_versions", "runtime_params", "only_missing_outputs", "kedro_version")
    config = {k: _jsonable(run_params.get(k)) for k in keys}
    config.update(
        pipeline_names=sorted(names) if names else None,
        runner=_runner_path(run_params.get("runner")),
        session_id=run_params.get("run_id"),
        upstream_versions=upstream_versions,
        upstream_sha256=upstream_sha256,
        produced_datasets=sorted(pipeline.all_outputs()),
    )
    return config


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
        if run is None:  # tracking disabled for this pipeline
            self._run_id = None
            return
        self._run_id = run.info.run_id
        self._client = mlflow.MlflowClient()
        self._tagged_loads = {}
        self._catalog = catalog

        config = run_config(run_params, pipeline, catalog)
        states = git_states(run_params.get("project_path"))
        tags = provenance_tags(run_params.get("project_path"), states)
        tags["provenance/env"] = str(config["env"])
        tags["provenance/pipelines"] = ",".join(config["pipeline_names"] or ["__default__"])
        for name, version in (run_params.get("load_versions") or {}).items():
            tags[f"provenance/load_version/{name}"] = version
        for name, digest in config["upstream_sha256"].items():
            tags[f"provenance/input_sha256/{name}"] = digest
        replay_of = os.environ.get(REPLAY_OF_ENV)
        if replay_of:
            tags["replay_of"] = replay_of
        parameters = self._raw_parameters(catalog)
        if parameters.get("scenario"):
            # conf/scenario_*/ names its runs, so reports can group them
            tags["scenario"] = str(parameters["scenario"])
        mlflow.set_tags(tags)
        # It shapes the DAG and reaches no node, so kedro-mlflow (which logs node inputs) would miss it.
        from calibrated_rlhf.pipeline_registry import ensemble_size

        mlflow.log_param("reward_model.ensemble_size", ensemble_size())

        mlflow.log_dict(parameters, f"{RUN_CONFIG_DIR}/parameters.json")
        mlflow.log_dict(config, f"{RUN_CONFIG_DIR}/run_params.json")
        self._log_git_changes(states)

    def _raw_parameters(self, catalog: Any) -> dict[str, Any]:
        """The resolved parameters (``--params`` merged in) as YAML gave them, before Kedro builds typed
        parameters: what a parameters file must hold to redo the run through the same validation."""
        if self._context is not None:
            try:
                return _jsonable(dict(self._context.config_loader["parameters"]))
            except Exception:  # noqa: BLE001 - fall back to the catalog's (typed) copy
                pass
        try:
            return _jsonable(catalog.load("parameters"))
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

        Kedro builds the model before hooks see it, so kedro-mlflow can only log its repr.
        """
        from mlflow.entities import Param
        from pydantic import BaseModel

        if not self._active():
            return
        flat: dict[str, Any] = {}
        for name, value in inputs.items():
            if name.startswith("params:") and isinstance(value, BaseModel):
                flat.update(flatten(value.model_dump(mode="json"), prefix=name[len("params:"):]))
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

