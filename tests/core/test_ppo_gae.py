"""GAE against a direct double-loop reference; masked whitening."""

from __future__ import annotations

import pytest
import torch

from calibrated_rlhf.core.ppo import compute_gae, masked_whiten


def reference_gae(rewards, values, lengths, gamma, lam):
    """A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l}, with V = 0 past the last valid token."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = lengths[b]
        for t in range(n):
            total = 0.0
            for l in range(n - t):
                k = t + l
                v_next = float(values[b, k + 1]) if k + 1 < n else 0.0
                delta = float(rewards[b, k]) + gamma * v_next - float(values[b, k])
                total += (gamma * lam) ** l * delta
            adv[b, t] = total
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_double_loop(gamma: float, lam: float) -> None:
    g = torch.Generator().manual_seed(0)
    B, T = 7, 11
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [T, 1, 5, 3, T - 1, 8, 2]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).double()
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    ref = reference_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, (ref + values) * mask, rtol=1e-10, atol=1e-10)
    # padding never leaks into advantages, returns or the valid positions
    assert bool((adv[mask == 0] == 0).all()) and bool((ret[mask == 0] == 0).all())


def test_gae_ignores_garbage_after_the_end() -> None:
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(4, 6, generator=g)
    values = torch.randn(4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 4).float()
    a1, _ = compute_gae(rewards, values, mask, 1.0, 0.95)
    rewards2, values2 = rewards.clone(), values.clone()
    rewards2[:, 3:] = 1e3
    values2[:, 3:] = -1e3
    a2, _ = compute_gae(rewards2, values2, mask, 1.0, 0.95)
    torch.testing.assert_close(a1, a2)


def test_masked_whiten_uses_valid_tokens_only() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 9, generator=g) * 3 + 2
    mask = (torch.rand(5, 9, generator=g) > 0.3).float()
    mask[:, 0] = 1
    w = masked_whiten(x, mask)
    valid = w[mask.bool()]
    assert abs(float(valid.mean())) < 1e-5
    assert float(valid.std()) == pytest.approx(1.0, abs=1e-4)
    assert bool((w[mask == 0] == 0).all())
    # the padding values do not matter
    x2 = x.clone()
    x2[mask == 0] = 1e6
    torch.testing.assert_close(masked_whiten(x2, mask), w)


def test_masked_whiten_with_reducer_equals_whole_batch() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 5, generator=g)
    mask = (torch.rand(8, 5, generator=g) > 0.2).float()
    whole = masked_whiten(x, mask)
    # emulate two processes: each reducer adds the other shard's statistics
    halves = [(x[:4], mask[:4]), (x[4:], mask[4:])]

    def stats(xx, mm):
        xx, mm = xx.double(), mm.double()
        return torch.stack([(xx * mm).sum(), (xx * xx * mm).sum(), mm.sum()])

    total = stats(*halves[0]) + stats(*halves[1])
    parts = [masked_whiten(xx, mm, reduce=lambda s: total) for xx, mm in halves]
    torch.testing.assert_close(torch.cat(parts), whole)
