"""KL estimators from sampled tokens (PPO's per-token penalty); the KL-penalty controllers that PPO, RLOO and
GRPO share live in ``core.kl_controller``."""

from __future__ import annotations

from typing import Literal

import torch


def kl_per_token(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: Literal["k1", "k3"] = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    k1 = log p - log p_ref is unbiased but can be negative per sample; k3 = (r - 1) - log r with
    r = p_ref / p is also unbiased (E_p[r] = 1) and never negative, with lower variance when the two
    policies are close.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        # expm1 keeps precision when the policies are close (r - 1 ~ 0)
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")
