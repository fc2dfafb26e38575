"""A scratch copy of the project for tests that run the real `kedro run` (the package is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_project(dst: Path, store: bool = False) -> Path:
    """Copy the configuration, pyproject.toml and the telemetry opt-out; no data, no local or replay envs.

    ``store``: start with an empty MLflow store (``empty_store``) instead of none, for tests whose subject is
    not a project's first run; the first run's store creation stays covered by those that leave it False."""
    shutil.copytree(ROOT / "conf", dst / "conf", ignore=shutil.ignore_patterns("local", "replay_*"))
    (dst / "conf" / "local").mkdir()
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(ROOT / name, dst / name)
    (dst / "src").mkdir()
    if store:
        empty_store(dst / "mlflow.db")
    return dst


_EMPTY_STORE: list[Path] = []


def empty_store(dst: Path) -> Path:
    """A copy at ``dst`` of an MLflow sqlite store with its tables made and nothing logged: what MLflow writes
    when it first opens the file. Its schema migrations take seconds on two cores, so they run once per test
    process."""
    if not _EMPTY_STORE:
        import tempfile

        from mlflow import MlflowClient

        made = Path(tempfile.mkdtemp(prefix="empty_mlflow_store_")) / "mlflow.db"
        MlflowClient(f"sqlite:///{made}").search_experiments()
        _EMPTY_STORE.append(made)
    shutil.copy(_EMPTY_STORE[0], dst)
    return dst


def kedro_env(project: Path) -> dict[str, str]:
    """The environment of a `kedro run` in ``project``: its own sqlite MLflow store, offline, quiet."""
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
            "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def kedro(project: Path, *args: str) -> subprocess.CompletedProcess:
    """`kedro run ARGS` in ``project`` with its own sqlite MLflow store."""
    return subprocess.run([sys.executable, "-m", "kedro", "run", *args], cwd=project, env=kedro_env(project),
                          capture_output=True, text=True, timeout=600)


def wait_until_up(url: str, server: subprocess.Popen, describe, timeout_s: float = 120.0) -> None:
    """Poll ``url`` until it answers 200; fail with ``describe()`` (e.g. the server's log) if the server
    exits or does not come up in time."""
    import time
    import urllib.request

    import pytest

    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            pytest.fail(f"server exited {server.returncode}: {describe()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"server not up after {timeout_s:.0f} s: {describe()}")
        time.sleep(0.5)


def copy_project(src: Path, dst: Path) -> Path:
    """A copy of a project that has run: its data/ (versions and completion markers) and its MLflow store.

    The store's artifact locations still point into ``src``, which the copy only reads from; runs made
    in the copy log their artifacts there too, beside the original's.
    """
    shutil.copytree(src, dst)
    return dst
