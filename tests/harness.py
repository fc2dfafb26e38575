"""The catalog-backed harness: a pipeline slice through the real `kedro run` of a project copy.

The run goes through everything a user's does: the CLI, the project's settings and hooks (run
integrity, provenance, kedro-mlflow), the catalog with its Parquet and versioned datasets, and the
parameter models. Use it wherever a behaviour depends on storage; the in-memory helper
(`tests.pipelines.helpers.run`) stays for what storage cannot change.

To stay fast on two cores, each run is forked with the heavy modules (torch, transformers, mlflow, the
pipelines) imported once; the child runs kedro's own command line, exactly what `python -m kedro run` calls.
The runs fork from a fork server (a fresh process that imported those modules and never ran anything), not
from the test process: by then the test process has run torch on several threads, and a child forked from it
inherits thread pools whose threads it does not have (one such run crashed in its first parallel op, inside
the embedding, in a full run of the suite).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pkgutil
import sys
from pathlib import Path
from typing import Any

import pandas as pd

ENV = {"KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "COLUMNS": "200"}
PRELOADED = ("calibrated_rlhf.pipeline_registry", "kedro.framework.cli", "kedro_mlflow.framework.hooks",
             "kedro_datasets.pandas", "kedro_datasets.json", "kedro_datasets.text", "kedro_datasets.matplotlib",
             "mlflow.store.tracking.sqlalchemy_store", "mlflow.transformers", "git", "datasets",
             "transformers.trainer", "trl.trainer.reward_trainer", "trl.trainer.sft_trainer",
             "trl.trainer.dpo_trainer", "trl.trainer.grpo_trainer", "trl.trainer.rloo_trainer")


def _stage_pipelines() -> list[str]:
    import calibrated_rlhf.pipelines as stages

    return [f"{stages.__name__}.{stage.name}.pipeline" for stage in pkgutil.iter_modules(stages.__path__) if stage.ispkg]


def preload() -> None:
    """Start the runs' fork server now, so that what it imports once for every run is not timed in a test's run.

    The project's pipelines count most: ``register_pipelines`` imports every stage's nodes, and with them
    torch, transformers and TRL, in each run that has not got them yet (about 10 s on two cores). The test
    process itself imports none of it for the runs' sake."""
    _run_context()


def _run_context() -> multiprocessing.context.BaseContext:
    """The fork server the runs start from: started once, with the preloaded modules and the harness's
    environment (rich sizes its console, and so the width of every logged line, when it is imported)."""
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([*PRELOADED, *_stage_pipelines(), __name__])
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    try:
        forkserver.ensure_running()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ctx


def _cli(project: str, args: list[str], log: str, env: dict[str, str], session_id: str | None) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # pytest's capture replaced sys.stdout/stderr with its own objects: point them at the log too.
    sys.stdout = sys.stderr = open(fd, "w", buffering=1)  # noqa: SIM115 - the process ends with the run
    os.chdir(project)
    os.environ.update({**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{Path(project) / 'mlflow.db'}", **env})
    sys.argv = ["kedro", "run", *args]
    from kedro.framework.cli import main

    if session_id:  # the session's timestamp, as if the clock read it: runs started in one millisecond
        import kedro.framework.session.session as kedro_session

        kedro_session.generate_timestamp = lambda: session_id

    main()


def start_kedro_run(project: Path, *args: str, name: str, env: dict[str, str] | None = None,
                    session_id: str | None = None) -> multiprocessing.Process:
    """`kedro run ARGS` in ``project``, forked from the fork server and not waited for (a run to kill); it prints
    to logs/<name>.txt.
    ``env`` is set in the run's environment over the harness's own (e.g. another MLFLOW_TRACKING_URI);
    ``session_id`` replaces the timestamp Kedro would name the session (and its save version) after."""
    log = project / "logs" / f"{name}.txt"
    log.parent.mkdir(exist_ok=True)
    proc = _run_context().Process(target=_cli, args=(str(project), list(args), str(log), dict(env or {}), session_id))
    proc.start()
    return proc


def kedro_run(project: Path, *args: str, name: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`kedro run ARGS` in ``project``, forked: the exit code and everything the run printed."""
    proc = start_kedro_run(project, *args, name=name, env=env)
    proc.join(300)
    assert proc.exitcode is not None, f"kedro run {name} did not finish"
    return proc.exitcode, (project / "logs" / f"{name}.txt").read_text()


def listing(project: Path) -> set[str]:
    """Every path under the project's data/, to show that a failed run wrote nothing."""
    data = project / "data"
    return {str(p.relative_to(data)) for p in data.rglob("*")} if data.exists() else set()


def squash(text: str) -> str:
    """Without whitespace: the CLI's rich output wraps long lines."""
    return "".join(text.split())


def latest_run(project: Path) -> Any:
    """The project's newest MLflow run."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("calibrated_rlhf")
    (run,) = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return run


def saved(project: Path, filepath: str) -> Any:
    """What the newest completed run saved at a catalog ``filepath`` (a Parquet, CSV or JSON dataset), read back
    from disk the way the next stage reads it: the newest version with a completion marker."""
    root = project / filepath
    versions = sorted((p for p in root.iterdir() if (p / "_complete.json").exists()), reverse=True)
    assert versions, f"no completed version under {root}"
    path = versions[0] / root.name
    if path.suffix in (".parquet", ".csv"):
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    return json.loads(path.read_text())


def kill_at_first_checkpoint(project: Path, root: Path, known: set[str], *args: str, name: str,
                             timeout_s: float = 300) -> Path:
    """Start `kedro run ARGS` (forked, :func:`start_kedro_run`) and SIGKILL it once a run folder under ``root``
    that is not in ``known`` holds a checkpoint; returns that folder."""
    import signal
    import time

    import pytest

    from calibrated_rlhf.core.checkpointing import list_checkpoints

    proc = start_kedro_run(project, *args, name=name)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            assert proc.exitcode is None, (project / "logs" / f"{name}.txt").read_text()[-3000:]
            new = [d for d in (project / root).iterdir() if d.is_dir() and d.name not in known] \
                if (project / root).is_dir() else []
            if new and list_checkpoints(new[0]):
                os.kill(proc.pid, signal.SIGKILL)
                proc.join()
                return new[0]
            time.sleep(0.02)
        pytest.fail("no checkpoint in time")
    finally:
        if proc.exitcode is None:
            proc.kill()
            proc.join()
