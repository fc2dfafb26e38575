"""A real `kedro run` of the ppo stage killed with SIGKILL mid-training, then resumed with
``ppo.resume_from=latest``: it continues the killed run from its last checkpoint, says so, leaves no
staging debris, and ends exactly where an uninterrupted run of the same configuration ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calibrated_rlhf.core.ppo import list_checkpoints
from calibrated_rlhf.core.ppo.checkpoint import COMPLETE_FILE
from calibrated_rlhf.core.staging import MARK, host_name

pytestmark = pytest.mark.slow

UPDATES = 4
PARAMS = f"ppo.trainer.num_updates={UPDATES},ppo.checkpoint_every=1"
ROOT = Path("data") / "06_models" / "ppo_checkpoints"


def _env(project: Path) -> dict[str, str]:
    # as tests.project.kedro: the three runs must see the same environment to compute the same numbers;
    # wide enough a console that rich writes each log message on one line
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
            "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "COLUMNS": "400"}


def _kedro(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kedro", "run", *args], cwd=project, env=_env(project),
                          capture_output=True, text=True, timeout=600)


def _kill_after_first_checkpoint(project: Path, known: set[str], timeout_s: float = 300) -> Path:
    """Start `kedro run --pipelines ppo`; SIGKILL it once its run folder holds a checkpoint."""
    log = open(project / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "kedro", "run", "--env", "tiny", "--pipelines", "ppo",
                             "--params", PARAMS], cwd=project, env=_env(project), stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, (project / "killed.log").read_text()[-3000:]
            new = [d for d in (project / ROOT).iterdir() if d.is_dir() and d.name not in known]
            if new and list_checkpoints(new[0]):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return new[0]
            time.sleep(0.02)
        pytest.fail("no checkpoint in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_a_killed_ppo_run_resumes_to_the_uninterrupted_result(tiny_run_project):
    import torch
    from mlflow import MlflowClient

    # upstream of ppo: the shared finished tiny run (a copy); every run below is the ppo stage alone
    project = tiny_run_project
    root = project / ROOT
    before = {d.name for d in root.iterdir()}
    policies_before = {p.name for p in (project / "data" / "06_models" / "policy").iterdir()}
    # the uninterrupted reference: the same configuration, never killed
    full = _kedro(project, "--env", "tiny", "--pipelines", "ppo", "--params", PARAMS)
    assert full.returncode == 0, full.stderr[-3000:]
    (reference_dir,) = [d for d in root.iterdir() if d.name not in before]
    assert (reference_dir / COMPLETE_FILE).is_file()

    killed_dir = _kill_after_first_checkpoint(project, before | {reference_dir.name})
    killed_at = int(list_checkpoints(killed_dir)[-1].name.split("_")[1])
    assert not (killed_dir / COMPLETE_FILE).exists() and killed_at < UPDATES
    # what a process killed mid-save leaves: a staging folder named after a writer that is gone
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    debris = killed_dir / f".update_{killed_at + 1:06d}{MARK}{host_name()}-{gone.pid}-x1"
    debris.mkdir()

    resumed = _kedro(project, "--env", "tiny", "--pipelines", "ppo", "--params", PARAMS + ",ppo.resume_from=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    text = resumed.stdout + resumed.stderr
    assert f"PPO resumes run {killed_dir.name} from update {killed_at}" in text
    assert not debris.exists() and not [p for p in root.rglob(f"*{MARK}*")]
    (resumed_dir,) = [d for d in root.iterdir() if d.name not in before | {reference_dir.name, killed_dir.name}]
    assert (resumed_dir / COMPLETE_FILE).is_file() and not (killed_dir / COMPLETE_FILE).exists()
    assert list_checkpoints(resumed_dir)[-1].name == f"update_{UPDATES:06d}"  # its own folder

    # MLflow: the folder is the run's id; the resume is recorded on the resumed run
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    ref_run, res_run = client.get_run(reference_dir.name), client.get_run(resumed_dir.name)
    assert res_run.data.params["ppo.checkpoint_dir"].endswith(resumed_dir.name)
    assert res_run.data.params["ppo.resumed_from_run"] == res_run.data.tags["ppo/resumed_from_run"] == killed_dir.name
    assert res_run.data.params["ppo.resumed_from_update"] == str(killed_at)

    # same result as the uninterrupted run: every logged training and evaluation figure, and the policy
    def figures(run) -> dict[str, float]:
        return {k: v for k, v in run.data.metrics.items() if k.startswith("ppo/") and "/perf/" not in k
                and k != "ppo/eval/episodes_per_s"}

    assert figures(res_run) == figures(ref_run) and "ppo/eval/gold_policy" in figures(ref_run)
    for key in ("ppo/objective/kl", "ppo/objective/beta", "ppo/rewards/gold"):
        steps = [(m.step, m.value) for m in client.get_metric_history(ref_run.info.run_id, key)]
        assert sorted(steps) == sorted((m.step, m.value) for m in client.get_metric_history(res_run.info.run_id, key))
        assert len(steps) == UPDATES
    policies = sorted(p for p in (project / "data" / "06_models" / "policy").iterdir() if p.name not in policies_before)
    assert len(policies) == 2  # the killed run saved none
    a, b = (_weights(p / "policy") if (p / "policy").is_dir() else _weights(p) for p in policies)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
