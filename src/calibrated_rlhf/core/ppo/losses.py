"""PPO's clipped surrogate and value losses, and token-level helpers on logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calibrated_rlhf.core.ppo.gae import masked_mean


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) per position: logits [B, T, V], tokens [B, T] -> [B, T]."""
    # gather before logsumexp: avoids materialising a second [B, T, V] tensor
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: [B, T, V] -> [B, T].

    ``log_probs``: ``log_softmax(logits)`` where the caller has it already (the policy loss does),
    so the largest tensor of the update is not computed twice.
    """
    logp = F.log_softmax(logits, dim=-1) if log_probs is None else log_probs
    return -(logp.exp() * logp).sum(-1)


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> PolicyLossOutput:
    """PPO-clip surrogate, ``mean(max(-A r, -A clip(r, 1-eps, 1+eps)))`` over valid tokens.

    Where the clipped term wins (ratio beyond the clip range on the side that would increase the
    objective) its gradient is zero, which is what keeps the update near the sampling policy.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        # (r - 1) - log r: non-negative, low-variance estimate of KL(old || new)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossOutput(loss, clipfrac, approx_kl, ratio_mean)


@dataclass
class ValueLossOutput:
    loss: torch.Tensor
    clipfrac: torch.Tensor


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> ValueLossOutput:
    """``0.5 * mean(max((v - R)^2, (clip(v, v_old +- eps) - R)^2))`` over valid tokens."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)
    return ValueLossOutput(loss, clipfrac)


# A loss half as the trainer's schedule takes it: (statistics to log, the loss to backpropagate).
LossTerms = tuple[dict[str, torch.Tensor], torch.Tensor]


def policy_terms(
    logits: torch.Tensor, responses: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
    mask: torch.Tensor, cliprange: float, entropy_coef: float, with_entropy: bool,
) -> LossTerms:
    """The policy's part of the PPO loss from its logits [B, R, V]: the clipped surrogate minus
    ``entropy_coef`` times the entropy. The entropy is logged when it is in the loss or ``with_entropy``."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    new_logprobs = logp_all.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    pl = clipped_policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange)
    stats = {"policy": pl.loss, "clipfrac": pl.clipfrac, "approx_kl": pl.approx_kl, "ratio": pl.ratio_mean}
    loss = pl.loss
    if entropy_coef > 0 or with_entropy:
        with torch.set_grad_enabled(entropy_coef > 0 and torch.is_grad_enabled()):
            entropy = masked_mean(entropy_from_logits(logits, log_probs=logp_all), mask)
        if entropy_coef > 0:
            loss = loss - entropy_coef * entropy
        stats["entropy"] = entropy
    return stats, loss


def value_terms(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    cliprange_value: float, vf_coef: float,
) -> LossTerms:
    """The value function's part of the PPO loss: ``vf_coef`` times the clipped value loss."""
    vl = clipped_value_loss(values.float(), old_values, returns, mask, cliprange_value)
    return {"value": vl.loss, "vclipfrac": vl.clipfrac}, vf_coef * vl.loss
