"""PPO's loss halves as the trainer takes them, against the formulas written out by hand."""

import torch

from calibrated_rlhf.core.ppo.losses import clipped_value_loss, policy_terms, value_terms


def test_value_terms_scale_the_clipped_value_loss_by_vf_coef():
    values = torch.tensor([[1.0, 3.0]])
    old = torch.tensor([[0.0, 2.9]])
    returns = torch.tensor([[0.0, 0.0]])
    mask = torch.ones(1, 2)
    stats, loss = value_terms(values, old, returns, mask, cliprange_value=0.2, vf_coef=0.5)
    # position 0: clipped value 0.2 -> max(1, 0.04) = 1; position 1: clipped 3.0 -> 9
    expected = 0.5 * (1.0 + 9.0) / 2
    assert torch.isclose(stats["value"], torch.tensor(expected))
    assert torch.isclose(loss, torch.tensor(0.5 * expected))
