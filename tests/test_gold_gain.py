"""End to end, PPO buys gold reward: the whole DAG through the real `kedro run`, at the smallest size
where the reward model has learned enough of the synthetic task for its optimum to be worth chasing.

The tiny environment is too small for that (its reward model barely beats chance, so PPO has nothing
to climb); this run keeps the tiny backbone and grows only the data, the reward model's epochs and
PPO's updates.
"""

from __future__ import annotations

import pytest

from tests.harness import kedro_run, latest_run, preload
from tests.project import make_project

pytestmark = pytest.mark.slow

LEARNABLE = ",".join([
    "data_prep.source.synthetic.n_pairs=1600",
    "reward_model.training.num_train_epochs=3",
    "ppo.trainer.num_updates=20",
    "ppo.trainer.learning_rate=3e-3",
    "ppo.trainer.batch_size=16",
    "ppo.trainer.num_ppo_epochs=2",
    "ppo.evaluation.n_prompts=32",
    "ppo.evaluation.samples_per_prompt=4",
])


def test_ppo_raises_the_gold_reward_of_the_reference_policy(tmp_path):
    from mlflow import MlflowClient

    preload()
    project = make_project(tmp_path / "project", store=True)
    code, out = kedro_run(project, "--env", "tiny", "--params", LEARNABLE, name="gold")
    assert code == 0, out[-3000:]
    run = latest_run(project)
    m = run.data.metrics
    # The reward model must have learned something for the test to mean anything: better than a coin.
    assert m["rm/test_expected_accuracy"] > 0.5 + 0.5 * (m["rm/test_bayes_accuracy"] - 0.5)
    # Gold reward (the synthetic task's truth, never seen by PPO) rises, with the 95% interval off zero.
    assert m["eval/gold_policy"] > m["eval/gold_reference"]
    assert m["eval/gold_gain_ci_low"] > 0
    # And it rose because PPO climbed the proxy it was given: the normalized reward's curve goes up.
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    curve = [p.value for p in sorted(client.get_metric_history(run.info.run_id, "ppo/rewards/normalized"),
                                     key=lambda p: p.step)]
    assert len(curve) == 20
    assert sum(curve[-5:]) / 5 > sum(curve[:5]) / 5
