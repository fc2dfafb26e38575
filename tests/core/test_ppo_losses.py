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


# ---- loss values against the formulas, computed by hand in plain Python (not only their gradients) ----

def _hand_policy_loss(ratios, advs, mask, eps):
    terms = [max(-a * r, -a * min(max(r, 1 - eps), 1 + eps)) for r, a, m in zip(ratios, advs, mask) if m]
    return sum(terms) / len(terms)


def _hand_value_loss(values, olds, rets, mask, eps):
    terms = []
    for v, o, R, m in zip(values, olds, rets, mask):
        if m:
            clipped = o + min(max(v - o, -eps), eps)
            terms.append(max((v - R) ** 2, (clipped - R) ** 2))
    return 0.5 * sum(terms) / len(terms)


def test_policy_loss_value_matches_the_formula() -> None:
    # every case at once: inside the range, clipped on either side, unclipped outside, a masked token
    ratios = [1.0, 1.5, 0.5, 1.1, 0.7, 1.3, 2.0]
    advs = [0.8, 2.0, -1.5, -0.4, 1.2, -0.9, 5.0]
    mask = [1, 1, 1, 1, 1, 1, 0]
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.2, -0.7, -2.2]], dtype=torch.float64)
    new = old + torch.log(torch.tensor([ratios], dtype=torch.float64))
    out = clipped_policy_loss(new, old, torch.tensor([advs], dtype=torch.float64),
                              torch.tensor([mask], dtype=torch.float64), EPS)
    assert float(out.loss) == pytest.approx(_hand_policy_loss(ratios, advs, mask, EPS), rel=1e-12)
    valid = [(r, a) for r, a, m in zip(ratios, advs, mask) if m]
    assert float(out.ratio_mean) == pytest.approx(sum(r for r, _ in valid) / len(valid), rel=1e-12)
    # (r - 1) - log r, averaged over valid tokens
    hand_kl = sum((r - 1) - torch.log(torch.tensor(r, dtype=torch.float64)).item() for r, _ in valid) / len(valid)
    assert float(out.approx_kl) == pytest.approx(hand_kl, rel=1e-12)
    # clipped side wins at r=1.5,A=2 (-2*1.2 > -3) and r=0.5,A=-1.5 (1.5*0.8 > 0.75)
    assert float(out.clipfrac) == pytest.approx(2 / 6)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage() -> None:
    adv = torch.tensor([[0.3, -1.0, 2.5, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    lp = torch.full((1, 4), -1.3)
    out = clipped_policy_loss(lp, lp, adv, mask, EPS)
    assert float(out.loss) == pytest.approx(-(0.3 - 1.0 + 2.5) / 3, rel=1e-6)


def test_value_loss_value_matches_the_formula() -> None:
    # the 0.5 factor, the clip around the old value, and the max of the two squared errors
    values = [2.0, 0.5, 0.1, -0.6, 0.9, 3.0]
    olds = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    rets = [1.0, 1.0, -1.0, 0.3, -2.0, 9.0]
    mask = [1, 1, 1, 1, 1, 0]
    t = lambda xs: torch.tensor([xs], dtype=torch.float64)  # noqa: E731
    out = clipped_value_loss(t(values), t(olds), t(rets), t(mask), 0.2)
    assert float(out.loss) == pytest.approx(_hand_value_loss(values, olds, rets, mask, 0.2), rel=1e-12)


def test_value_loss_is_half_the_mean_squared_error_inside_the_clip_range() -> None:
    # no clipping at all (|v - v_old| < eps): exactly 0.5 * MSE
    v = torch.tensor([[0.1, -0.05, 0.15]])
    ret = torch.tensor([[1.0, -2.0, 0.5]])
    out = clipped_value_loss(v, torch.zeros(1, 3), ret, torch.ones(1, 3), 0.2)
    mse = ((0.1 - 1.0) ** 2 + (-0.05 + 2.0) ** 2 + (0.15 - 0.5) ** 2) / 3
    assert float(out.loss) == pytest.approx(0.5 * mse, rel=1e-6)
    assert float(out.clipfrac) == 0.0
