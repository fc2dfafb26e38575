"""PPO's update arithmetic against the formulas written out by hand: the loss halves as the trainer takes them,
GAE and masked whitening, including the edges (one token, padding, half precision, no mean shift)."""

import math

import pytest
import torch

from calibrated_rlhf.core.ppo.gae import compute_gae, masked_mean, masked_whiten
from calibrated_rlhf.core.ppo.losses import (clipped_policy_loss, clipped_value_loss, entropy_from_logits,
                                             policy_terms, value_terms)


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


def _policy_inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 5, generator=g).to(dtype)
    responses = torch.randint(0, 5, (2, 3), generator=g)
    old = torch.log_softmax(logits.float(), -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    old = old + 0.3 * torch.randn(2, 3, generator=g)  # the sampling policy differs from the current one
    adv = torch.randn(2, 3, generator=g)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logits, responses, old, adv, mask


def _by_hand(logits, responses, old, adv, mask, eps):
    logp_all = torch.log_softmax(logits.double(), -1)
    logp = logp_all.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logp - old.double())
    a = adv.double()
    per_token = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps))
    m = mask.double()
    mean = lambda x: (x * m).sum() / m.sum()  # noqa: E731
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    clipped = (-a * ratio.clamp(1 - eps, 1 + eps) > -a * ratio).double()
    return {"policy": mean(per_token), "ratio": mean(ratio), "approx_kl": mean(ratio - 1 - torch.log(ratio)),
            "clipfrac": mean(clipped), "entropy": mean(entropy)}


def test_policy_terms_log_every_statistic_by_its_formula():
    logits, responses, old, adv, mask = _policy_inputs()
    logits.requires_grad_(True)
    stats, loss = policy_terms(logits, responses, old, adv, mask, cliprange=0.2, entropy_coef=0.0, with_entropy=True)
    want = _by_hand(logits.detach(), responses, old, adv, mask, 0.2)
    assert set(stats) == {"policy", "clipfrac", "approx_kl", "ratio", "entropy"}
    for key, value in want.items():
        assert float(stats[key].detach()) == pytest.approx(float(value), rel=1e-5, abs=1e-7), key
    assert 0.0 < float(stats["clipfrac"]) < 1.0  # the example clips some tokens and not others
    assert torch.equal(loss, stats["policy"])
    assert not stats["entropy"].requires_grad  # logged, not backpropagated


def test_entropy_bonus_enters_the_loss_with_its_coefficient_and_gradient():
    logits, responses, old, adv, mask = _policy_inputs(1)
    logits = logits.requires_grad_(True)
    stats, loss = policy_terms(logits, responses, old, adv, mask, cliprange=0.2, entropy_coef=0.05,
                               with_entropy=False)
    want = _by_hand(logits.detach(), responses, old, adv, mask, 0.2)
    assert float(loss.detach()) == pytest.approx(float(want["policy"] - 0.05 * want["entropy"]), rel=1e-5)
    assert float(stats["entropy"].detach()) == pytest.approx(float(want["entropy"]), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, logits)
    x = logits.detach().double().requires_grad_(True)
    ref = _by_hand(x, responses, old, adv, mask, 0.2)
    (ref_grad,) = torch.autograd.grad(ref["policy"] - 0.05 * ref["entropy"], x)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_without_entropy_nothing_about_it_is_logged():
    logits, responses, old, adv, mask = _policy_inputs(2)
    stats, loss = policy_terms(logits, responses, old, adv, mask, cliprange=0.2, entropy_coef=0.0, with_entropy=False)
    assert set(stats) == {"policy", "clipfrac", "approx_kl", "ratio"}


def test_half_precision_logits_are_scored_in_float32():
    logits, responses, old, adv, mask = _policy_inputs(3, dtype=torch.bfloat16)
    stats, _ = policy_terms(logits, responses, old, adv, mask, cliprange=0.2, entropy_coef=0.0, with_entropy=True)
    want = _by_hand(logits.float(), responses, old, adv, mask, 0.2)
    assert stats["ratio"].dtype == torch.float32 and stats["entropy"].dtype == torch.float32
    assert float(stats["entropy"]) == pytest.approx(float(want["entropy"]), rel=1e-6)
    assert float(stats["ratio"]) == pytest.approx(float(want["ratio"]), rel=1e-6)
    assert float(stats["approx_kl"]) == pytest.approx(float(want["approx_kl"]), rel=1e-5)


def test_value_clipfrac_counts_tokens_where_the_clipped_value_is_worse():
    values = torch.tensor([[1.0, 0.05, 3.0, 9.0]])
    old = torch.tensor([[0.0, 0.0, 2.9, 0.0]])
    returns = torch.zeros(1, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = clipped_value_loss(values, old, returns, mask, cliprange_value=0.2)
    # token 0: clipped 0.2 is closer to R than 1.0 (not worse); token 1 inside the range; token 2 clipped to 3.0
    # equals the value (not worse); token 3 is padding
    assert float(out.clipfrac) == 0.0
    out = clipped_value_loss(values, old, torch.full((1, 4), 2.0), mask, cliprange_value=0.2)
    # R = 2: token 0's clipped value 0.2 is worse than 1.0; token 1's is the value itself; token 2 equal
    assert float(out.clipfrac) == pytest.approx(1 / 3)
    assert float(out.loss) == pytest.approx(0.5 * ((2 - 0.2) ** 2 + (2 - 0.05) ** 2 + 1.0) / 3, rel=1e-6)
    # a value far below the old one is clipped from below: clip(-1, 0 - 0.2, 0 + 0.2) = -0.2
    out = clipped_value_loss(torch.tensor([[-1.0]]), torch.zeros(1, 1), torch.tensor([[-2.0]]), torch.ones(1, 1), 0.2)
    assert float(out.clipfrac) == 1.0 and float(out.loss) == pytest.approx(0.5 * 1.8**2)


def test_value_terms_compute_in_float32_from_half_precision_values():
    values = torch.tensor([[1.0, 3.0]], dtype=torch.bfloat16)
    stats, loss = value_terms(values, torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 10.0, vf_coef=2.0)
    assert stats["value"].dtype == torch.float32 and set(stats) == {"value", "vclipfrac"}
    assert float(loss) == pytest.approx(2.0 * 0.5 * (1 + 9) / 2)
    assert float(stats["vclipfrac"]) == 0.0


def test_entropy_from_logits_equals_the_entropy_of_the_softmax():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]]])
    ent = entropy_from_logits(logits)
    assert float(ent[0, 0]) == pytest.approx(math.log(4.0), rel=1e-6)
    p = torch.softmax(logits[0, 1].double(), -1)
    assert float(ent[0, 1]) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-4)
    torch.testing.assert_close(entropy_from_logits(logits, torch.log_softmax(logits, -1)), ent)


def test_policy_loss_statistics_ignore_padding():
    lp = torch.tensor([[0.0, 5.0]])
    out = clipped_policy_loss(lp, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]), 0.2)
    assert float(out.loss) == -1.0 and float(out.ratio_mean) == 1.0
    assert float(out.approx_kl) == 0.0 and float(out.clipfrac) == 0.0


# ---- advantages ---------------------------------------------------------------------------------------------


def test_gae_of_a_two_token_episode_written_out():
    rewards = torch.tensor([[0.5, 2.0, 7.0]])
    values = torch.tensor([[1.0, 3.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.8
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    d1 = 2.0 - 3.0  # the last valid token: nothing bootstraps from the padding after it
    d0 = 0.5 + gamma * 3.0 - 1.0
    torch.testing.assert_close(adv, torch.tensor([[d0 + gamma * lam * d1, d1, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[d0 + gamma * lam * d1 + 1.0, d1 + 3.0, 0.0]]))


def test_gae_of_one_token_responses_is_reward_minus_value():
    adv, ret = compute_gae(torch.tensor([[1.0], [2.0]]), torch.tensor([[0.25], [3.0]]), torch.ones(2, 1), 0.9, 0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.75], [-1.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0], [2.0]]))


def test_gae_at_the_last_column_does_not_bootstrap():
    rewards = torch.tensor([[1.0, 1.0]])
    values = torch.tensor([[0.5, 0.25]])
    adv, ret = compute_gae(rewards, values, torch.ones(1, 2), gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0 + 0.25 - 0.5 + 0.75, 0.75]]))
    torch.testing.assert_close(ret, torch.tensor([[2.0, 1.0]]))


def test_masked_whiten_is_the_z_score_with_bessels_correction_and_zero_padding():
    x = torch.tensor([[1.0, 2.0, 6.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    valid = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    mean, var = valid.mean(), valid.var(unbiased=True)
    want = ((valid - mean) / torch.sqrt(var + 1e-8)).float()
    out = masked_whiten(x, mask)
    torch.testing.assert_close(out[0, :3], want)
    assert out[0, 3] == 0.0 and out.dtype == torch.float32
    kept = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept[0, :3], want + mean.float())
    assert kept[0, 3] == 0.0


def test_masked_whiten_of_a_small_spread_and_of_two_tokens():
    for values in ([0.0, 0.001, 0.003], [2.0, 5.0]):
        x = torch.tensor([values], dtype=torch.float64)
        v = x[0]
        want = (v - v.mean()) / torch.sqrt(v.var(unbiased=True) + 1e-8)
        torch.testing.assert_close(masked_whiten(x, torch.ones_like(x))[0], want)


def test_masked_whiten_of_one_valid_token_or_a_constant_is_zero():
    out = masked_whiten(torch.tensor([[5.0, 3.0]]), torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(out, torch.zeros(1, 2))
    torch.testing.assert_close(masked_whiten(torch.full((2, 2), 4.0), torch.ones(2, 2)), torch.zeros(2, 2))
    torch.testing.assert_close(masked_whiten(torch.ones(1, 2), torch.zeros(1, 2)), torch.zeros(1, 2))


def test_masked_whiten_with_a_reducer_uses_the_global_sums():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[4.0, 8.0]])
    ma = torch.ones(1, 2)
    other = torch.stack([b.double().sum(), (b.double() ** 2).sum(), torch.tensor(2.0, dtype=torch.float64)])
    out = masked_whiten(a, ma, reduce=lambda s: s + other)
    both = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    want = ((torch.tensor([1.0, 2.0], dtype=torch.float64) - both.mean()) / torch.sqrt(both.var() + 1e-8)).float()
    torch.testing.assert_close(out[0], want)


def test_masked_mean_of_nothing_is_zero():
    assert float(masked_mean(torch.tensor([3.0]), torch.tensor([0.0]))) == 0.0
    assert float(masked_mean(torch.tensor([3.0, 5.0]), torch.tensor([1.0, 0.0]))) == pytest.approx(3.0)
