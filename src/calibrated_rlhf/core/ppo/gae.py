"""Generalised advantage estimation over response tokens, and masked statistics."""

from __future__ import annotations

from typing import Callable

import torch

# Sums a tensor over processes (identity on one process); lets whitening use global statistics.
Reducer = Callable[[torch.Tensor], torch.Tensor]


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, both [batch, T], zero where ``mask`` is 0.

    ``mask`` marks valid response tokens (a prefix of each row: tokens up to and including EOS).
    The episode ends at the last valid token, so nothing bootstraps from padding after it.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        if t + 1 < T:
            next_mask = mask[:, t + 1]
            next_value = values[:, t + 1]
        else:
            next_mask = torch.zeros_like(last)
            next_value = next_mask
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # next_mask cuts the recursion at the end of the episode
        last = (delta + gamma * lam * next_mask * last) * mask[:, t]
        advantages[:, t] = last
    returns = (advantages + values) * mask
    return advantages, returns


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (local, differentiable)."""
    return (x * mask).sum() / mask.sum().clamp_min(1)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce: Reducer | None = None
) -> torch.Tensor:
    """Zero-mean unit-variance over valid positions; padding stays 0.

    With ``reduce`` (a cross-process sum) the mean and variance are those of the global batch, so a
    run on N processes whitens like one process holding all N shards.
    """
    mask = mask.to(x.dtype)
    # float64 sums: E[x^2] - E[x]^2 loses precision in float32
    x64, m64 = x.double(), mask.double()
    stats = torch.stack([(x64 * m64).sum(), (x64 * x64 * m64).sum(), m64.sum()])
    if reduce is not None:
        stats = reduce(stats)
    s1, s2, n = stats[0], stats[1], stats[2].clamp_min(1)
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0)
    # Bessel's correction, as the usual unbiased estimate
    var = var * n / (n - 1).clamp_min(1)
    out = ((x - mean) * torch.rsqrt(var + 1e-8)).to(x.dtype)
    if not shift_mean:
        out = out + mean.to(x.dtype)
    return out * mask
