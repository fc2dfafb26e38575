"""The RL KL callback counts every episode of a log record that spans several optimizer steps (TRL logs every
``logging_steps``): the controller moves by the episodes trained on, not by one step's worth.

Written against the callback's public behaviour only (constructor, ``bind``, ``on_log``, the trainer's
``beta``), not the controller's formula, so it holds for any controller that counts episodes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from calibrated_rlhf.core.rl.kl_control import KLControlCallback

EPISODES, TARGET = 8, 2.0


def beta_after(records: list[tuple[int, float]], episodes_per_step: int = EPISODES) -> float:
    """``trainer.beta`` after the callback has seen ``records`` (global step, per-sequence KL), in order."""
    cb = KLControlCallback("adaptive", beta=0.1, kl_target=TARGET, horizon=100, episodes_per_step=episodes_per_step)
    trainer = SimpleNamespace(beta=None)
    cb.bind(trainer)
    for step, kl in records:
        # TRL's per-token mean KL and mean completion length: their product is the per-sequence KL
        logs = {"kl": kl / 10.0, "completions/mean_length": 10.0}
        cb.on_log(None, SimpleNamespace(global_step=step), None, logs=logs)
    return trainer.beta


@pytest.mark.parametrize("kl", [0.5, 3.0], ids=["below_target", "above_target"])
@pytest.mark.parametrize("span", [2, 3])
def test_a_record_spanning_k_steps_counts_k_steps_of_episodes(kl, span):
    one_step = beta_after([(1, kl)])
    spanning = beta_after([(span, kl)])
    # the same record, as one step of span times the episodes: what the record trained on
    assert spanning == pytest.approx(beta_after([(1, kl)], episodes_per_step=EPISODES * span), rel=1e-12)
    assert abs(spanning - 0.1) > abs(one_step - 0.1) > 0  # off target, the count moves beta further
