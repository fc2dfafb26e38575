"""The figures one PPO update logs, reduced over processes so every rank sees (and acts on) the same."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from calibrated_rlhf.core import metric_keys as K
from calibrated_rlhf.core.early_warning import REPETITION_SURPRISAL, warning_reason
from calibrated_rlhf.core.fitted_warning import FittedWarning
from calibrated_rlhf.core.ppo.config import PPOConfig

Reducer = Callable[[torch.Tensor], torch.Tensor]

# Per-minibatch statistics averaged over the update, in the order they are reduced.
OPTIM_STATS = ("policy", "value", "clipfrac", "vclipfrac", "approx_kl", "entropy", "ratio", "grad_norm")


def rollout_metrics(
    *, kl: torch.Tensor, score: torch.Tensor, mask: torch.Tensor, has_eos: torch.Tensor, values: torch.Tensor,
    returns: torch.Tensor, scores: Mapping[str, torch.Tensor], checked: Sequence[torch.Tensor],
    beta: float, beta_eff: float, kl_target: float, n_episodes: int, reduce: Reducer,
) -> tuple[dict[str, float], bool]:
    """The rollout's global means in one reduction, and whether any ``checked`` tensor is non-finite.

    ``kl`` is per token (masked), ``score`` the optimized score per episode after any penalty.
    """
    seq_kl = kl.sum(1)
    nonfinite = sum(int(not bool(torch.isfinite(x).all())) for x in checked)
    resid = (returns - values) * mask
    local = [
        seq_kl.sum(), (-beta_eff * seq_kl).sum(), score.sum(), mask.sum(),
        has_eos.float().sum(), torch.tensor(float(nonfinite)),
        (returns * mask).sum(), (returns * returns * mask).sum(), resid.sum(), (resid * resid).sum(),
        (values * mask).sum(),
        *[scores[k].sum() for k in scores],
    ]
    g = reduce(torch.stack([x.double().cpu() for x in local]))
    n_ep = float(n_episodes)
    n_tok = max(float(g[3]), 1.0)
    var_ret = float(g[7]) / n_tok - (float(g[6]) / n_tok) ** 2
    var_res = float(g[9]) / n_tok - (float(g[8]) / n_tok) ** 2
    metrics: dict[str, float] = {
        K.PPO_KL: float(g[0]) / n_ep,
        K.PPO_BETA: beta,
        K.PPO_BETA_EFFECTIVE: beta_eff,
        K.PPO_KL_TARGET: kl_target,
        K.PPO_NON_SCORE_REWARD: float(g[1]) / n_ep,
        K.PPO_SCORE: float(g[2]) / n_ep,
        K.PPO_RLHF_REWARD: (float(g[2]) + float(g[1])) / n_ep,
        K.PPO_RESPONSE_LENGTH: float(g[3]) / n_ep,
        K.PPO_EOS_FRACTION: float(g[4]) / n_ep,
        K.PPO_VALUE_EXPLAINED_VARIANCE: 1.0 - var_res / var_ret if var_ret > 1e-12 else float("nan"),
        K.PPO_VALUE_MEAN: float(g[10]) / n_tok,
    }
    for j, k in enumerate(scores):
        metrics[K.ppo_reward(k)] = float(g[11 + j]) / n_ep
    return metrics, float(g[5]) > 0


def stop_reason(metrics: Mapping[str, float], nonfinite: bool, config: PPOConfig) -> str | None:
    """Why the run must stop after this rollout (non-finite numbers, KL blow-up, a gold-free warning), or None."""
    if nonfinite:
        return "non-finite reward, logprob, value or advantage in the rollout"
    kl = metrics[K.PPO_KL]
    if config.kl_stop_multiple is not None and kl > config.kl_stop_multiple * config.kl_target:
        return (f"KL {kl:.3f} exceeds kl_stop_multiple * kl_target = "
                f"{config.kl_stop_multiple * config.kl_target:.3f}")
    # The gold-free warnings (docs/overoptimization.md): past them the proxy is not to be trusted.
    for name, threshold in (("ensemble_std", config.ensemble_std_stop),
                            (REPETITION_SURPRISAL, config.repetition_surprisal_stop)):
        value = metrics.get(K.ppo_reward(name))
        if threshold is not None and value is not None and value > threshold:
            return warning_reason(name, value, threshold)
    return None


def fitted_warning_reason(history: Sequence[Mapping[str, float]], config: PPOConfig) -> str | None:
    """Why the run must stop after its last finished update (``config.fitted_warning``), or None. Unlike the
    batch rules above it reads the update's optimization figures (the entropy) too, so it judges a finished update
    and keeps the policy that update made, as RLOO's and GRPO's rules do."""
    if config.fitted_warning is None:
        return None
    return FittedWarning.from_dict(config.fitted_warning).stop_reason(history, "ppo", config.kl_target)


def optimization_metrics(stats: Mapping[str, list[torch.Tensor]], reduce: Reducer, world_size: int,
                         vf_coef: float, lr: float) -> dict[str, float]:
    """Means over the update's minibatches (then over processes) of the losses and their diagnostics."""
    names = list(stats)
    local_means = torch.stack([torch.stack(stats[k]).mean() for k in names])
    gm = dict(zip(names, (float(x) for x in reduce(local_means) / world_size)))
    return {
        K.PPO_LOSS_POLICY: gm["policy"],
        K.PPO_LOSS_TOTAL: gm["policy"] + vf_coef * gm["value"],
        K.PPO_VALUE_LOSS: gm["value"],
        K.PPO_VALUE_CLIPFRAC: gm["vclipfrac"],
        K.PPO_POLICY_CLIPFRAC: gm["clipfrac"],
        K.PPO_POLICY_APPROX_KL: gm["approx_kl"],
        K.PPO_POLICY_ENTROPY: gm["entropy"],
        K.PPO_POLICY_RATIO: gm["ratio"],
        K.PPO_GRAD_NORM: gm["grad_norm"],
        K.PPO_LR: lr,
    }


def perf_metrics(n_episodes: int, t_start: float, t_gen: float, t_score: float, t_rollout: float,
                 t_end: float) -> dict[str, float]:
    """Wall-clock figures of one update (seconds since its start, unless a rate)."""
    return {
        K.PPO_EPISODES_PER_S: n_episodes / (t_end - t_start),
        K.PPO_ROLLOUT_S: t_rollout - t_start,
        K.PPO_GENERATE_S: t_gen - t_start,
        # decoding and scoring; when overlapped, with the old-logprob and value forwards beside them
        K.PPO_SCORE_S: t_rollout - t_score,
        K.PPO_UPDATE_S: t_end - t_start,
    }
