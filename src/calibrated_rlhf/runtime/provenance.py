"""What is needed to redo a run: git state, package versions, the command, data content and the run's configuration.

Plain functions, no hooks: ``calibrated_rlhf.runtime.hooks.ProvenanceHooks`` records them on the run's MLflow run,
``calibrated_rlhf.runtime.replay`` reads them back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata as md
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("calibrated_rlhf", "kedro", "kedro-datasets", "kedro-mlflow", "mlflow", "torch", "transformers",
            "trl", "accelerate", "datasets", "tokenizers", "numpy", "pandas", "pyarrow", "pydantic", "matplotlib")

# Set by `python -m calibrated_rlhf.runtime.replay` for the `kedro run` it starts; becomes the `replay_of` tag.
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
    return Path(__file__).resolve().parents[1]  # runtime/ sits inside the package


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


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would retype it: ``kedro run ...`` rather than ``.../kedro/__main__.py run ...``,
    ``python -m calibrated_rlhf.runtime.launch ...`` rather than ``.../calibrated_rlhf/runtime/launch.py ...``."""
    argv = list(sys.argv if argv is None else argv)
    prog = argv[0] if argv else ""
    # kedro's __main__ rewrites argv[0] to "python -m kedro"; both spellings run the same CLI.
    if prog == "python -m kedro" or Path(prog).name == "kedro" or prog.endswith(("kedro/__main__.py",)):
        return shlex.join(["kedro", *argv[1:]])
    module = _package_module(prog)
    if module:  # `python -m calibrated_rlhf.x` (or a launcher's `-m`) leaves the file's path in argv[0]
        return shlex.join(["python", "-m", module, *argv[1:]])
    return shlex.join(argv)


def _package_module(path: str) -> str | None:
    """``calibrated_rlhf.runtime.launch`` for ``<package dir>/runtime/launch.py``; None for a file outside the
    package."""
    if not path.endswith(".py"):
        return None
    try:
        rel = Path(path).resolve().relative_to(_package_dir())
    except ValueError:
        return None
    parts = [_package_dir().name, *rel.with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__main__" else parts)


def machine() -> str:
    """The CPU and the vector instructions torch's kernels use (``AVX2``, ``AVX512``), and the GPU if any. Runs are
    bit-identical only on the same kind of machine: another vector width sums floats in another order, and an RL
    run's sampling turns a last-bit difference into another trajectory (docs/runs-and-tracking.md)."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu} ({torch.backends.cpu.get_cpu_capability()}){gpu}"


def provenance_tags(project_path: str | os.PathLike[str] | None = None,
                    states: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """Git commit and dirty flag, package versions, the interpreter and the exact command line."""
    tags = {"provenance/command": command_line(), "provenance/python": sys.version.split()[0],
            "provenance/platform": sys.platform, "provenance/machine": machine()}
    for prefix, state in (git_states(project_path) if states is None else states).items():
        tags[f"provenance/{prefix}commit"] = state["commit"]
        tags[f"provenance/{prefix}dirty"] = state["dirty"]
    for pkg in PACKAGES:
        try:
            tags[f"provenance/version/{pkg}"] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return tags


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"<prefix>.a.b": 1}`` (``{"a.b": 1}`` without a prefix).

    An empty mapping is a value of its own: flattened away, a ``--params`` override to ``{}`` would vanish.
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
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


# ---- where a file-backed dataset reads and writes ------------------------------------------------------
# Kedro has no public API for the resolved path of a versioned dataset: these three read the private
# attributes every file-backed dataset (kedro-datasets', and this project's HFPretrainedDataset) has.


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


# ---- the run's configuration ------------------------------------------------------------------------


def _runner_path(recorded: Any) -> str | None:
    """``kedro.runner.thread_runner.ThreadRunner`` from Kedro's ``str(runner)`` (``<... object at 0x..>``);
    None for no runner (``KedroSession.run`` records a missing one as the text ``None``)."""
    if recorded is None or recorded == "None":
        return None
    match = re.match(r"<([\w.]+) object at ", str(recorded))
    return match.group(1) if match else str(recorded)


def jsonable(value: Any) -> Any:
    """Plain JSON types; typed parameters (pydantic models, dataclasses) as their field values."""
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, (tuple, set, frozenset)):
        return [jsonable(v) for v in (sorted(value) if isinstance(value, (set, frozenset)) else value)]
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
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
    config = {k: jsonable(run_params.get(k)) for k in keys}
    config.update(
        pipeline_names=sorted(names) if names else None,
        runner=_runner_path(run_params.get("runner")),
        session_id=run_params.get("run_id"),
        upstream_versions=upstream_versions,
        upstream_sha256=upstream_sha256,
        produced_datasets=sorted(pipeline.all_outputs()),
    )
    return config
