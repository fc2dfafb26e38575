"""The RL branches through the real `kedro run --env tiny` of a copy of the shared tiny run (its reward model,
transform and reference policy reused), read back from MLflow."""

from __future__ import annotations

import pytest

from tests.harness import kedro_run, latest_run, preload

pytestmark = pytest.mark.slow


def _history(client, run, key):
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def test_grpo_runs_on_the_tiny_run_with_the_adaptive_controller_and_the_evaluation_protocol(tiny_run_project):
    from mlflow import MlflowClient

    from calibrated_rlhf.core import metric_keys as keys
    from calibrated_rlhf.core.ppo.kl import AdaptiveKLController

    project = tiny_run_project
    template = latest_run(project)
    assert not any(k.startswith(("rl/", "dpo/")) for k in template.data.metrics)  # outside the default DAG
    preload()
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "rl", "--params",
                          "rl.algorithm=grpo,rl.scale_rewards=batch,rl.kl_target=0.05", name="grpo")
    assert code == 0, out[-4000:]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = latest_run(project)
    assert run.info.run_id != template.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags[keys.RL_ALGORITHM_TAG] == "grpo" and run.data.params["rl.scale_rewards"] == "batch"
    # started from the completed run's reference policy, scored through its transform
    for name in ("reference_policy", "reward_transform"):
        assert run.data.tags[f"provenance/loaded/{name}"] == template.data.tags["run_id"]
    # the controller's formula on the logged per-sequence KL gives the logged betas (tiny: 8 episodes an update)
    kl, beta = _history(client, run, keys.RL_KL), _history(client, run, keys.RL_BETA)
    assert len(kl) == len(beta) == 3
    controller = AdaptiveKLController(0.1, 0.05, 1000)
    for k, b in zip(kl, beta):
        assert b == pytest.approx(controller.value, rel=1e-9)
        controller.update(k, 8)
    assert run.data.metrics[keys.RL_EVAL_FINAL_BETA] == pytest.approx(beta[-1])
    assert kl[-1] > 0 and beta[-1] != 0.1
    # rewards per step, every form, gold included
    for name in ("raw", "calibrated", "normalized", "gold", "gold_gap"):
        assert len(_history(client, run, keys.rl_reward(name))) == 3, name
    # the one evaluation protocol, under the keys PPO's evaluation uses
    m = run.data.metrics
    assert m[keys.PPO_EVAL_GOLD_GAIN_CI_LOW] <= m[keys.PPO_EVAL_GOLD_GAIN] <= m[keys.PPO_EVAL_GOLD_GAIN_CI_HIGH]
    assert m[keys.PPO_EVAL_KL_REFERENCE_CI_LOW] <= m[keys.PPO_EVAL_KL_REFERENCE] <= m[keys.PPO_EVAL_KL_REFERENCE_CI_HIGH]
    # the policy is versioned under the run's own version, completed, and logged
    version = run.data.tags["run_id"]
    assert (project / "data/06_models/rl_policy" / version / "_complete.json").exists()
    assert (project / "data/06_models/rl_policy" / version / "rl_policy" / "model.safetensors").exists()
    assert "rl_policy" in {a.path for a in client.list_artifacts(run.info.run_id)}
