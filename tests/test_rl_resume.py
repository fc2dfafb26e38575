"""A real `kedro run` of the rl stage (RLOO, running_zscore) killed with SIGKILL mid-training, then resumed with
``rl.resume_from=latest``: it continues the killed run from its last checkpoint, says so, logs the whole run, and ends
as an uninterrupted run of the same configuration does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibrated_rlhf.core.checkpointing import list_checkpoints
from calibrated_rlhf.core.checkpointing.checkpoints import COMPLETE_FILE
from calibrated_rlhf.core.staging import MARK
from tests.harness import kedro_run, kill_at_first_checkpoint, preload, squash

pytestmark = pytest.mark.slow

UPDATES = 3
PARAMS = f"rl.num_updates={UPDATES},rl.checkpoint_every=1,normalization.method=running_zscore"
ROOT = Path("data") / "06_models" / "rl_checkpoints"


def test_a_killed_rl_run_resumes_from_its_checkpoint_with_the_controller_and_the_running_moments(tiny_run_project):
    """Three runs of the stage: an uninterrupted one, one killed, its resume (the weights' equality is
    ``tests/core/test_rl_kl_control.py``'s, through the same library entry point): the resumed run logs the whole
    run's betas, which follow the controller's formula across the kill, every figure as the uninterrupted run logs
    it, and ends with the running moments of every update's batch."""
    from mlflow import MlflowClient

    from calibrated_rlhf.core import metric_keys as keys
    from calibrated_rlhf.core.checkpointing.checkpoints import SCORE_STATE_FILE, read_run
    from calibrated_rlhf.core.kl_controller import PIKLController, initial_beta
    from tests.harness import latest_run

    project = tiny_run_project
    preload()
    # the uninterrupted run of the same configuration, to compare the resumed one with
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "rl", "--params", PARAMS, name="rl_uninterrupted")
    assert code == 0, out[-3000:]
    reference = latest_run(project)
    known = {d.name for d in (project / ROOT).iterdir()} if (project / ROOT).is_dir() else set()
    killed_dir = kill_at_first_checkpoint(project, ROOT, known, "--env", "tiny", "--pipelines", "rl", "--params",
                                          PARAMS, name="rl_killed")
    killed_at = int(list_checkpoints(killed_dir)[-1].name.split("_")[1])
    assert not (killed_dir / COMPLETE_FILE).exists() and killed_at < UPDATES

    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "rl", "--params", PARAMS + ",rl.resume_from=latest",
                          name="rl_resumed")
    assert code == 0, out[-3000:]
    assert squash(f"RLOO resumes run {killed_dir.name} from update {killed_at}") in squash(out)
    root = project / ROOT
    assert not list(root.rglob(f"*{MARK}*"))  # the killed run's TRL staging folder was swept
    (resumed_dir,) = [d for d in root.iterdir() if (d / COMPLETE_FILE).is_file() and d.name not in known]
    assert read_run(resumed_dir)["resumed_from"]["run"] == killed_dir.name
    last = list_checkpoints(resumed_dir)[-1]
    assert last.name == f"update_{UPDATES:06d}"
    # tiny: 8 completions an update; the moments restored at update killed_at went on from there
    assert json.loads((last / SCORE_STATE_FILE.format(rank=0)).read_text())["normalizer"]["count"] == 8 * UPDATES

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(resumed_dir.name)
    assert run.data.params["rl.checkpoint_dir"].endswith(resumed_dir.name)
    assert run.data.params["rl.resumed_from_run"] == run.data.tags["rl/resumed_from_run"] == killed_dir.name
    assert run.data.params["rl.resumed_from_update"] == str(killed_at)

    def history(key):
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    kl, beta = history(keys.RL_KL), history(keys.RL_BETA)
    assert len(kl) == len(beta) == len(history(keys.RL_SCORE)) == UPDATES
    # killed with SIGKILL and resumed, the run logs what the uninterrupted one does, update for update
    for key in (keys.RL_KL, keys.RL_BETA, keys.RL_SCORE, keys.RL_LOSS):
        assert history(key) == [m.value for m in sorted(client.get_metric_history(reference.info.run_id, key),
                                                        key=lambda m: m.step)], key
    evaluation = {k: v for k, v in reference.data.metrics.items() if k.startswith("eval/") and "runtime" not in k}
    assert evaluation and {k: run.data.metrics[k] for k in evaluation} == evaluation
    controller = PIKLController(initial_beta(4.0), 4.0, 400, gain=2.0)  # conf/base rl: pi, beta null, horizon, gain
    for k, b in zip(kl, beta):
        assert b == pytest.approx(controller.value, rel=1e-9)
        controller.update(k, 8)
    assert beta[-1] != beta[0]  # the controller moved beta (in the climb, by its proportional term)
