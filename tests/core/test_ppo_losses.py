"""Clipped PPO losses: where gradients vanish and where they do not."""

from __future__ import annotations

import pytest
import torch

from calibrated_rlhf.core.ppo import clipped_policy_loss, clipped_value_loss
from calibrated_rlhf.core.ppo.losses import entropy_from_logits, logprobs_from_logits

EPS = 0.2


def _policy_grad(log_ratio: float, advantage: float) -> float:
    old = torch.zeros(1, 1)
    new = torch.full((1, 1), log_ratio, requires_grad=True)
    out = clipped_policy_loss(new, old, torch.full((1, 1), advantage), torch.ones(1, 1), EPS)
    out.loss.backward()
    return float(new.grad)


@pytest.mark.parametrize("ratio,adv", [(1.5, 1.0), (1.21, 2.0), (0.5, -1.0), (0.79, -0.3)])
def test_policy_gradient_zero_outside_clip_on_clipped_side(ratio: float, adv: float) -> None:
    # A > 0 and r > 1 + eps, or A < 0 and r < 1 - eps: the clipped term wins, no gradient
    assert _policy_grad(torch.log(torch.tensor(ratio)).item(), adv) == 0.0


@pytest.mark.parametrize("ratio,adv", [(1.0, 1.0), (1.1, 1.0), (0.9, -1.0), (1.19, -2.0), (0.85, 0.5),
                                       # outside the range but on the side that reduces the objective:
                                       # the unclipped term wins and the gradient pulls back
                                       (0.5, 1.0), (1.5, -1.0)])
def test_policy_gradient_nonzero_inside_or_on_unclipped_side(ratio: float, adv: float) -> None:
    g = _policy_grad(torch.log(torch.tensor(ratio)).item(), adv)
    assert g != 0.0
    # d/dlogp of -A * r is -A * r
    assert g == pytest.approx(-adv * ratio, rel=1e-5)


def test_policy_loss_masks_and_reports_clipfrac() -> None:
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.0, 1.5, 0.5, 3.0]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = clipped_policy_loss(new, old, adv, mask, EPS)
    out.loss.backward()
    assert new.grad[0, 3] == 0.0  # masked
    assert new.grad[0, 1] == 0.0  # clipped
    assert new.grad[0, 0] != 0.0 and new.grad[0, 2] != 0.0
    assert float(out.clipfrac) == pytest.approx(1 / 3)
    assert float(out.approx_kl) > 0


def test_value_gradient_zero_when_clipped_value_is_worse() -> None:
    old = torch.zeros(1, 3)
    ret = torch.tensor([[1.0, 1.0, -1.0]])
    # 0: moved beyond +0.2 and overshoots to 2.0 -> unclipped (2-1)^2 = 1 vs clipped (0.2-1)^2 = .64:
    #    unclipped wins, gradient flows; 1: moved to 0.5 toward target 1 -> clipped (0.2) is worse, no grad;
    # 2: inside the range, gradient flows
    v = torch.tensor([[2.0, 0.5, 0.1]], requires_grad=True)
    out = clipped_value_loss(v, old, ret, torch.ones(1, 3), 0.2)
    out.loss.backward()
    assert v.grad[0, 0] != 0.0
    assert v.grad[0, 1] == 0.0
    assert v.grad[0, 2] != 0.0
    assert float(out.clipfrac) == pytest.approx(1 / 3)


def test_logprobs_and_entropy_from_logits() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    toks = torch.randint(0, 7, (2, 3), generator=g)
    ref = torch.log_softmax(logits, -1).gather(-1, toks[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, toks), ref)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
