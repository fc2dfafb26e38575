"""How closely PPO's KL tracked its target, from the per-update curves (plain library).

One summary for both readers: the PPO stage logs it at the end of training (``eval/*``), and
the report recomputes it from a run's logged curves when that run did not log it (an older run, an
interrupted one), so the two can never disagree about what "tracking error" means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Over-optimization signals are read at the end of training: the mean over this last fraction of updates.
END_OF_TRAINING_FRACTION = 0.1


@dataclass(frozen=True)
class KLTracking:
    """The summary of one PPO run's KL control; NaN where the curve it needs is empty."""

    kl_second_half_mean: float  # the first half is the controller settling in
    kl_tracking_error: float  # kl_second_half_mean / kl_target - 1; NaN without a positive target
    final_beta: float  # the beta the last update was penalized with
    episodes_per_s: float  # median over updates: the first, warming-up update would skew a mean
    updates: int


def _finite(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def kl_second_half_mean(kl: Sequence[float]) -> float:
    """Mean KL over the second half of the updates (the later half when their number is odd)."""
    arr = _finite(kl)
    return float(arr[len(arr) // 2:].mean()) if arr.size else math.nan


def kl_tracking_error(kl_mean: float, kl_target: float) -> float:
    """Relative miss of the target: 0 on target, +0.5 for 50% above it."""
    return kl_mean / kl_target - 1.0 if kl_target > 0 else math.nan


def summarize_kl_tracking(kl: Sequence[float], kl_target: float, beta: Sequence[float] = (),
                          episodes_per_s: Sequence[float] = ()) -> KLTracking:
    """The summary from the per-update curves in update order (``beta`` and ``episodes_per_s`` may be
    absent: their fields are then NaN)."""
    mean = kl_second_half_mean(kl)
    betas, speed = _finite(beta), _finite(episodes_per_s)
    return KLTracking(
        kl_second_half_mean=mean,
        kl_tracking_error=kl_tracking_error(mean, kl_target),
        final_beta=float(betas[-1]) if betas.size else math.nan,
        episodes_per_s=float(np.median(speed)) if speed.size else math.nan,
        updates=len(_finite(kl)),
    )


def end_of_training_mean(values: Sequence[float], fraction: float = END_OF_TRAINING_FRACTION) -> float:
    """Mean over the last ``fraction`` of the updates (at least the last one); NaN for an empty curve."""
    arr = _finite(values)
    if not arr.size:
        return math.nan
    return float(arr[-max(1, int(len(arr) * fraction)):].mean())
