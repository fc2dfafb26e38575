"""SIGTERM (what Slurm and Kubernetes send before SIGKILL) to a real forked `kedro run` of the ppo and rl stages:
the run stops within a bounded time at the next update boundary with a checkpoint of that update, exits
non-zero, ends its MLflow run KILLED, leaves no staging folder, and ``resume_from: latest`` continues from
the checkpoint to the end. The stages checkpoint every 100 updates here: the only checkpoint is the signal's."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from calibrated_rlhf.core.checkpointing import list_checkpoints
from calibrated_rlhf.core.checkpointing.checkpoints import COMPLETE_FILE
from calibrated_rlhf.core.staging import MARK
from tests.harness import kedro_run, preload, squash, start_kedro_run

UPDATES = 6


def signal_mid_training(project: Path, root: Path, progress: str, *args: str, name: str,
                        signum: int = signal.SIGTERM) -> tuple[Path, int, str, float]:
    """Start `kedro run ARGS`, send ``signum`` once its log shows the first update done (``progress``, e.g.
    "PPO 1/"); returns the run's checkpoint folder, the exit code, the log and the seconds from signal to exit."""
    known = {d.name for d in (project / root).iterdir()} if (project / root).is_dir() else set()
    proc = start_kedro_run(project, *args, name=name)
    log = project / "logs" / f"{name}.txt"
    deadline = time.monotonic() + 300
    try:
        while squash(progress) not in squash(log.read_text() if log.exists() else ""):
            assert proc.exitcode is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.02)
        os.kill(proc.pid, signum)
        sent = time.monotonic()
        proc.join(120)
        assert proc.exitcode is not None, "the run did not stop within 120 s of the signal"
        took = time.monotonic() - sent
    finally:
        if proc.exitcode is None:
            proc.kill()
            proc.join()
    (run_dir,) = [d for d in (project / root).iterdir() if d.is_dir() and d.name not in known]
    return run_dir, proc.exitcode, log.read_text(), took


def stopped_cleanly(project: Path, run_dir: Path, code: int, out: str, algorithm: str) -> int:
    """The checks common to both stages; returns the update the signal's checkpoint holds."""
    from mlflow import MlflowClient

    assert code != 0, out[-3000:]
    (last,) = list_checkpoints(run_dir)  # the signal's; none was scheduled
    stopped_at = int(last.name.split("_")[1])
    assert 1 <= stopped_at < UPDATES and not (run_dir / COMPLETE_FILE).exists()
    assert squash(f"StopRequested: stopped by SIGTERM after {algorithm} update {stopped_at}") in squash(out), \
        out[-3000:]
    assert not list((project / "data").rglob(f"*{MARK}*"))  # staging folders removed on the way out
    run = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(run_dir.name)
    assert run.info.status == "KILLED"
    return stopped_at


@pytest.mark.slow
def test_sigterm_stops_ppo_at_an_update_with_a_checkpoint_and_resume_finishes(tiny_run_project):
    project, root = tiny_run_project, Path("data") / "06_models" / "ppo_checkpoints"
    preload()
    params = f"ppo.trainer.num_updates={UPDATES},ppo.checkpoint_every=100"
    run_dir, code, out, took = signal_mid_training(project, root, "PPO 1/", "--env", "tiny", "--pipelines", "ppo",
                                                   "--params", params, name="ppo_sigterm")
    stopped_at = stopped_cleanly(project, run_dir, code, out, "PPO")
    print(f"stopped {took:.1f} s after SIGTERM, at update {stopped_at}")

    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "ppo", "--params",
                          params + ",ppo.resume_from=latest", name="ppo_after_sigterm")
    assert code == 0, out[-3000:]
    assert squash(f"PPO resumes run {run_dir.name} from update {stopped_at}") in squash(out)
    assert squash(f"PPO {UPDATES - stopped_at}/{UPDATES - stopped_at}") in squash(out)  # the updates left only


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo"])  # RLOO: the same stage and callback; its resume: test_rl_resume
def test_sigterm_stops_rl_at_an_update_with_a_checkpoint_and_resume_ends_as_an_uninterrupted_run(
        tiny_run_project, algorithm):
    """The resumed run logs the whole run, update for update what an uninterrupted run of the same configuration
    logs, and ends with the same evaluation."""
    from mlflow import MlflowClient

    from calibrated_rlhf.core import metric_keys as keys
    from tests.harness import latest_run

    project, root, name = tiny_run_project, Path("data") / "06_models" / "rl_checkpoints", algorithm.upper()
    preload()
    params = f"rl.algorithm={algorithm},rl.num_updates={UPDATES},rl.checkpoint_every=100"
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "rl", "--params", params,
                          name=f"{algorithm}_uninterrupted")
    assert code == 0, out[-3000:]
    reference = latest_run(project)
    run_dir, code, out, took = signal_mid_training(project, root, f"{name} 1/", "--env", "tiny", "--pipelines", "rl",
                                                   "--params", params, name=f"{algorithm}_sigterm")
    stopped_at = stopped_cleanly(project, run_dir, code, out, name)
    print(f"{name} stopped {took:.1f} s after SIGTERM, at update {stopped_at}")

    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "rl", "--params",
                          params + ",rl.resume_from=latest", name=f"{algorithm}_after_sigterm")
    assert code == 0, out[-3000:]
    assert squash(f"{name} resumes run {run_dir.name} from update {stopped_at}") in squash(out)
    resumed = latest_run(project)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    for key in (keys.RL_KL, keys.RL_BETA, keys.RL_SCORE, keys.RL_LOSS):
        curve = sorted((m.step, m.value) for m in client.get_metric_history(reference.info.run_id, key))
        assert len(curve) == UPDATES, (key, curve)
        assert sorted((m.step, m.value) for m in client.get_metric_history(resumed.info.run_id, key)) == curve, key
    tracking = ("eval/kl_second_half_mean", "eval/kl_tracking_error", "eval/final_beta", "eval/updates")
    evaluation = {k: v for k, v in reference.data.metrics.items() if k in tracking}
    assert evaluation and {k: resumed.data.metrics[k] for k in evaluation} == evaluation
