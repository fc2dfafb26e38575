"""KL estimators and the KL-penalty controllers (adaptive, after Ziegler et al. 2019, and fixed).

A controller is a plain object, free of any trainer: ``value`` is the KL weight to apply,
``update(kl, n_episodes)`` folds in one batch's KL, and ``state_dict()`` / ``load_state_dict()``
carry its state through checkpoints as a JSON-able dict. PPOTrainer drives it through exactly that
interface, so a TRL RLOO/GRPO callback can drive the same class::

    ctl = make_kl_controller("adaptive", beta=0.05, kl_target=6.0, horizon=10000)
    # at the end of each step, with the batch mean of each sequence's summed KL:
    trainer_args.beta = ctl.update(kl=mean_seq_kl, n_episodes=batch_size)
"""

from __future__ import annotations

from typing import Any, Literal

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


class AdaptiveKLController:
    """Proportional controller of the KL weight (Ziegler et al. 2019, section 2.2).

    ``err = clip(kl / kl_target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + err * n / horizon)``, where
    ``kl`` is the batch mean of each sequence's summed per-token KL and ``n`` the episodes in it.
    """

    kind = "adaptive"

    def __init__(self, beta: float, kl_target: float, horizon: int) -> None:
        self.beta = float(beta)
        self.kl_target = float(kl_target)
        self.horizon = int(horizon)
        self.steps = 0  # updates seen, kept for diagnostics and resume checks

    @property
    def value(self) -> float:
        """The KL weight to apply now (``beta``)."""
        return self.beta

    def update(self, kl: float, n_episodes: int) -> float:
        """Fold in one batch's KL; returns the new beta."""
        err = min(max(kl / self.kl_target - 1.0, -0.2), 0.2)
        self.beta = self.beta * (1.0 + err * n_episodes / self.horizon)
        self.steps += 1
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "beta": self.beta, "kl_target": self.kl_target,
                "horizon": self.horizon, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"controller state is for {state['kind']!r}, not {self.kind!r}")
        self.beta = float(state["beta"])
        self.kl_target = float(state["kl_target"])
        self.horizon = int(state["horizon"])
        self.steps = int(state["steps"])


class FixedKLController(AdaptiveKLController):
    """Constant beta; still counts steps so checkpoints look alike."""

    kind = "fixed"

    def update(self, kl: float, n_episodes: int) -> float:
        self.steps += 1
        return self.beta


def make_kl_controller(
    kind: Literal["adaptive", "fixed"], beta: float, kl_target: float, horizon: int
) -> AdaptiveKLController:
    """Controller for ``PPOConfig.kl_control``."""
    if kind == "adaptive":
        return AdaptiveKLController(beta, kl_target, horizon)
    if kind == "fixed":
        return FixedKLController(beta, kl_target, horizon)
    raise ValueError(f"unknown kl_control {kind!r}")
