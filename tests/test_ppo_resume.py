"""A real `kedro run` of the ppo stage killed with SIGKILL mid-training, then resumed with
``ppo.resume_from=latest``: it continues the killed run from its last checkpoint, says so, leaves no
staging debris, and ends exactly where an uninterrupted run of the same configuration ends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from calibrated_rlhf.core.checkpointing import list_checkpoints
from calibrated_rlhf.core.checkpointing.checkpoints import COMPLETE_FILE
from calibrated_rlhf.core.staging import MARK, host_name
from tests.harness import kedro_run, kill_at_first_checkpoint, preload, squash

pytestmark = pytest.mark.slow

UPDATES = 4
PARAMS = f"ppo.trainer.num_updates={UPDATES},ppo.checkpoint_every=1"
ROOT = Path("data") / "06_models" / "ppo_checkpoints"


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
    preload()
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "ppo", "--params", PARAMS, name="reference")
    assert code == 0, out[-3000:]
    (reference_dir,) = [d for d in root.iterdir() if d.name not in before]
    assert (reference_dir / COMPLETE_FILE).is_file()

    killed_dir = kill_at_first_checkpoint(project, ROOT, before | {reference_dir.name}, "--env", "tiny", "--pipelines",
                                          "ppo", "--params", PARAMS, name="killed")
    killed_at = int(list_checkpoints(killed_dir)[-1].name.split("_")[1])
    assert not (killed_dir / COMPLETE_FILE).exists() and killed_at < UPDATES
    # what a process killed mid-save leaves: a staging folder named after a writer that is gone
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    debris = killed_dir / f".update_{killed_at + 1:06d}{MARK}{host_name()}-{gone.pid}-x1"
    debris.mkdir()

    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "ppo", "--params", PARAMS + ",ppo.resume_from=latest",
                          name="resumed")
    assert code == 0, out[-3000:]
    assert squash(f"PPO resumes run {killed_dir.name} from update {killed_at}") in squash(out)
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
        return {k: v for k, v in run.data.metrics.items() if k.startswith(("ppo/", "eval/")) and "/perf/" not in k
                and k != "eval/episodes_per_s"}

    assert figures(res_run) == figures(ref_run) and "eval/gold_policy" in figures(ref_run)
    for key in ("ppo/objective/kl", "ppo/objective/beta", "ppo/rewards/gold"):
        steps = [(m.step, m.value) for m in client.get_metric_history(ref_run.info.run_id, key)]
        assert sorted(steps) == sorted((m.step, m.value) for m in client.get_metric_history(res_run.info.run_id, key))
        assert len(steps) == UPDATES
    policies = sorted(p for p in (project / "data" / "06_models" / "policy").iterdir() if p.name not in policies_before)
    assert len(policies) == 2  # the killed run saved none
    a, b = (_weights(p / "policy") if (p / "policy").is_dir() else _weights(p) for p in policies)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
