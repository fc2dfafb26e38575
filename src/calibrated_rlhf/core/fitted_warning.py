"""A fitted warning: one logistic score over the gold-free signals together and the run's own settings.

Each signal alone moves along one trade-off on the over-optimization task (docs/overoptimization.md): the
entropy's fall, the KL and the response length catch a third of the runs that lose gold before any threshold
alarms too many safe ones, because how far a run moves, and how its samples change, depends on where it was sent.
The user knows that: the method and the KL target are in the config. So the score reads the signals (trailing
means, the relative ones as log ratios to their value at update ``base``, the yardstick
:class:`~calibrated_rlhf.core.early_warning.Rule` divides by) beside two settings, the method (PPO or not) and
``log`` of the KL target.

Its weights come from runs whose gold is known (a pilot, or on the synthetic task one seed's runs), exactly as
every single-signal threshold of the report is chosen on such runs; it then needs no gold to run. It is a model
of one task's runs: a user fits it again where the task, the reward model or the method changes, and the report
measures how far it carries across reward-model sizes and methods before trusting it there.

Plain numpy: the fit is L2-penalized logistic regression by Newton's method, small enough (eight weights, a few
thousand updates) that an exact Hessian costs nothing and the solution does not depend on a learning rate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BeforeValidator

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core.signals import REPEATED_WORDS, REPETITION_SURPRISAL, trailing_mean

RELATIVE = ("entropy", REPEATED_WORDS, REPETITION_SURPRISAL, "response_length")  # divided by their value at base
SIGNALS = ("kl", "proxy", *RELATIVE)  # the per-update series a run logs (the report's names for them)
# per stage: the metric key each signal is logged under
SIGNAL_KEYS = {
    "ppo": {"kl": keys.PPO_KL, "proxy": keys.ppo_reward("normalized"), "entropy": keys.PPO_POLICY_ENTROPY,
            REPEATED_WORDS: keys.ppo_reward(REPEATED_WORDS),
            REPETITION_SURPRISAL: keys.ppo_reward(REPETITION_SURPRISAL),
            "response_length": keys.PPO_RESPONSE_LENGTH},
    "rl": {"kl": keys.RL_KL, "proxy": keys.rl_reward("normalized"), "entropy": keys.RL_ENTROPY,
           REPEATED_WORDS: keys.rl_reward(REPEATED_WORDS), REPETITION_SURPRISAL: keys.rl_reward(REPETITION_SURPRISAL),
           "response_length": keys.RL_RESPONSE_LENGTH},
}
FEATURES = ("log_kl", "proxy", *RELATIVE, "ppo", "log_kl_target")
FLOOR = 1e-3  # the least a relative signal counts as: no word repeated in the first batches is no infinity
MARGIN = 3  # updates before the gold's peak from which a turning run's updates count as positive


def features(series: Mapping[str, Sequence[float]], method: str, kl_target: float, window: int, base: int
             ) -> np.ndarray:
    """The score's inputs at every update, shape (updates, len(FEATURES)), from a run's raw per-update ``series``
    (one per name of :data:`SIGNALS`). Rows before ``base`` are NaN: a relative feature has no yardstick yet."""
    smoothed = {name: trailing_mean(np.asarray(series[name], dtype=np.float64), window) for name in SIGNALS}
    n = len(smoothed["kl"])
    if kl_target <= 0:
        raise ValueError(f"a fitted warning reads log(kl_target); got kl_target={kl_target}")
    columns = [np.log1p(np.maximum(smoothed["kl"], 0.0)), smoothed["proxy"]]
    for name in RELATIVE:
        x = np.maximum(smoothed[name], FLOOR)
        yardstick = x[base] if n > base else np.nan
        # a log ratio: a share that starts near 0 (repeated words) would make a plain ratio of tens and swamp the
        # fit, where a halving and a doubling should weigh alike; the floor keeps one that starts at 0 finite
        columns.append(np.log(x / yardstick))
    columns += [np.full(n, float(method == "ppo")), np.full(n, float(np.log(kl_target)))]
    out = np.stack(columns, axis=1)
    out[:base] = np.nan
    return out


def labels(n_updates: int, peak: int, over_optimized: bool, base: int, margin: int = MARGIN) -> np.ndarray:
    """Each update's training target: 1 from ``margin`` updates before the peak of a run that turned, 0 on a safe
    run and well before a turning run's peak, NaN where left out (before ``base``, and the ``margin`` updates just
    before the positive stretch, which are neither the run's safe start nor its turn)."""
    y = np.zeros(n_updates)
    if over_optimized:
        y[max(0, peak - 2 * margin):max(0, peak - margin)] = np.nan
        y[max(0, peak - margin):] = 1.0
    y[:base] = np.nan
    return y


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 50) -> tuple[np.ndarray, float]:
    """Weights and bias minimizing the summed log loss plus ``l2 / 2`` times the squared weights (not the bias) by
    Newton's method. The penalty keeps the weights finite where the classes separate, which a few thousand updates
    of a handful of runs easily do."""
    if not (len(x) and 0 < y.sum() < len(y)):
        raise ValueError("a fitted warning needs updates of both kinds: a turning run and a safe one")
    a = np.hstack([x, np.ones((len(x), 1))])
    theta = np.zeros(a.shape[1])
    penalty = np.full(a.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(a @ theta)))
        grad = a.T @ (p - y) + penalty * theta
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(penalty) + 1e-9 * np.eye(a.shape[1])
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return theta[:-1], float(theta[-1])


@dataclass(frozen=True)
class FittedWarning:
    """Fires at the first update whose logistic score (in logits) exceeds ``threshold``. ``mean`` and ``scale``
    standardize the features as they were over the fit's updates, so ``weights`` compare across features."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    threshold: float = 0.0
    window: int = 5
    base: int = 4
    feature_names: tuple[str, ...] = FEATURES

    def __post_init__(self) -> None:
        if self.feature_names != FEATURES:
            raise ValueError(f"a fitted warning over {list(self.feature_names)} cannot read this version's "
                             f"features {list(FEATURES)}: fit it again")

    def scores(self, series: Mapping[str, Sequence[float]], method: str, kl_target: float) -> np.ndarray:
        """The score at every update (NaN before ``base``, and where a signal is missing)."""
        return self._standardized(features(series, method, kl_target, self.window, self.base))

    def _standardized(self, x: np.ndarray) -> np.ndarray:
        return ((x - np.array(self.mean)) / np.array(self.scale)) @ np.array(self.weights) + self.bias

    def stop_reason(self, records: Sequence[Mapping[str, float]], method: str, kl_target: float) -> str | None:
        """Why a run whose per-update metrics so far are ``records`` (keyed as :data:`SIGNAL_KEYS` logs them) must
        stop after its last update, or None. The whole series is scored again each time: the trailing means and
        the relative features' yardstick at ``base`` need the run from its start, and a hundred updates cost
        nothing against one update's training. A signal the run does not log, or one with no value at ``base``,
        would leave every score NaN: a stop rule that cannot fire is refused, not run quietly."""
        if not records:
            return None
        names = SIGNAL_KEYS["ppo" if method == "ppo" else "rl"]
        if missing := [key for key in names.values() if key not in records[0]]:
            raise ValueError(f"the fitted warning reads {', '.join(missing)}, which this run does not log")
        series = {name: [float(r.get(key, np.nan)) for r in records] for name, key in names.items()}
        x = features(series, method, kl_target, self.window, self.base)
        if len(records) > self.base and (blank := [f for f, v in zip(FEATURES, x[self.base]) if not np.isfinite(v)]):
            raise ValueError(f"the fitted warning's {', '.join(blank)} had no value at update {self.base + 1}")
        last = float(self._standardized(x)[-1])
        if not last > self.threshold:  # NaN before the base never fires
            return None
        return f"fitted warning score {last:.3f} exceeds its threshold {self.threshold:.3f} at update {len(records)}"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> FittedWarning:
        return cls(**{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in raw.items()})

    @classmethod
    def load(cls, path: str | Path) -> FittedWarning:
        """A warning :meth:`save` wrote; a missing or unreadable file is named in the error."""
        try:
            raw = json.loads(Path(path).read_text())
            return cls.from_dict(raw)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"fitted warning {path}: {e}") from e


def read_fitted_warning(value: Any) -> dict[str, Any] | None:
    """A config's ``fitted_warning``: the path of a saved warning, read and checked when the config is built (before
    any training), or the warning's own dict; the config keeps the dict, so a checkpoint's fingerprint holds what
    the rule reads, not where it was."""
    if value is None:
        return None
    warning = FittedWarning.load(value) if isinstance(value, str | Path) else FittedWarning.from_dict(value)
    return warning.to_dict()


# A trainer config's field: set it to a saved warning's path (or its dict); None leaves the rule off.
FittedWarningField = Annotated[dict[str, Any] | None, BeforeValidator(read_fitted_warning)]


def fit_warning(runs: Sequence[tuple[np.ndarray, np.ndarray]], l2: float = 1.0, window: int = 5, base: int = 4
                ) -> FittedWarning:
    """The warning fitted on ``runs``, each a pair of its :func:`features` and :func:`labels`; its threshold is
    left at 0 (even odds) for the caller to choose by the false alarms it can bear."""
    if not runs:
        raise ValueError("a fitted warning needs updates of both kinds: a turning run and a safe one; got no runs")
    x = np.concatenate([f for f, _ in runs])
    y = np.concatenate([lab for _, lab in runs])
    keep = np.isfinite(y) & np.isfinite(x).all(axis=1)
    x, y = x[keep], y[keep]
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)  # a feature constant over the fit (one method only) carries no weight
    weights, bias = fit_logistic((x - mean) / scale, y, l2)
    return FittedWarning(tuple(mean), tuple(scale), tuple(weights), bias, window=window, base=base)
