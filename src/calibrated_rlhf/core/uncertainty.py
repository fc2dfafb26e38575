"""How sure the calibration figures are: bootstrap intervals over the test pairs, and whether the
calibration split pins the temperature down.

* :func:`bootstrap_calibration` resamples the test pairs with replacement and recomputes ECE, NLL and
  Brier of ``sigmoid(margin / T)`` on each resample; with the true probabilities known it scores the
  oracle (the true probabilities) on *the same* resamples and takes the paired difference model -
  oracle per resample. The two figures share most of their sampling noise (the same hard pairs), so
  the difference's interval is much narrower than the two intervals side by side suggest: "ECE after
  calibration within 0.01 of the oracle's" is a statement about that interval. T is held fixed (the
  calibration split's uncertainty is the next point's).
* :func:`temperature_precision`: the relative standard error of the fitted temperature is
  ``1 / sqrt(sum s^2 q (1 - q))`` (the Fisher information in ``inv_temperature``, the curvature the
  Newton solve already sums), which shrinks as ``1 / sqrt(n)``; so the number of calibration pairs
  that would bring it under a target is ``n * (relative_se / target)^2``.

Percentile intervals; ``level`` is their coverage. All of it is float64 numpy, deterministic given ``seed``.
The ECE's bootstrap distribution sits above its full-sample value (resampling duplicates pairs, and
binning noise only adds), so on small test splits the full-sample ECE can fall at or below its own
interval's low end; the paired difference with the oracle, biased alike on both sides, is the figure to
read an ECE claim from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibrated_rlhf.core import metrics

FIGURES: tuple[str, ...] = ("ece", "nll", "brier")


@dataclass(frozen=True)
class Interval:
    """A figure on all test pairs (``value``) and the percentile interval of its bootstrap distribution."""

    value: float
    low: float
    high: float

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


def _percentile(samples: np.ndarray, value: float, level: float) -> Interval:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return Interval(float(value), float(low), float(high))


def _resampled_mean(counts: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Each resample's mean loss; an infinite loss (a true probability of 0 on the observed side) counts only
    where that pair is drawn, instead of turning every row into NaN through 0 * inf."""
    finite = np.isfinite(losses)
    out = counts[:, finite] @ losses[finite] / counts.shape[1]
    return np.where(counts[:, ~finite].sum(axis=1) > 0, np.inf, out)


def _oracle_nll(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return -np.log(p)  # inf where a true probability is 0 and the label says otherwise, as metrics.nll


def _ece(p: np.ndarray, n_bins: int) -> float:
    return metrics.ece(*metrics.symmetrize(p, np.ones_like(p)), n_bins, "equal_mass")


def ece_of_resamples(p: np.ndarray, counts: np.ndarray, n_bins: int) -> np.ndarray:
    """``metrics.ece`` (symmetrized, equal-mass bins, labels 1) of each resample of ``p``, given as a row of
    ``counts`` (how often each pair is drawn), without sorting any resample.

    The symmetrized values ``p`` and ``1 - p`` are sorted once; a resample is that sorted list with each
    value repeated ``count`` times, so its order statistics (the inner bin edges of
    :func:`metrics.reliability_curve`) are found on the cumulative counts. A value equal to an edge goes to
    the upper bin, as there, so ties are never split; a bin's gap ``n_b |mean p - mean y|`` is
    ``|sum p - sum y|``.
    """
    rows, n = counts.shape
    values = np.concatenate([p, 1.0 - p])
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    order = np.argsort(values, kind="stable")
    values, labels = values[order], labels[order]
    draws = np.concatenate([counts, counts], axis=1)[:, order]
    width = 2 * int(counts[0].sum())
    # Rows are offset so that one searchsorted serves them all; the offsets are integers, exact, so no two
    # close values are merged (adding a float offset to the values themselves would round them together).
    row = np.arange(rows)[:, None]
    cumulative = np.cumsum(draws, axis=1) + 2 * width * row
    positions = (np.arange(1, n_bins) * width) // n_bins + 2 * width * row  # the order statistics' positions
    # first element whose cumulative count exceeds the position: the order statistic there
    edge_at = np.searchsorted(cumulative.ravel(), positions.ravel(), side="right").reshape(rows, n_bins - 1)
    # an edge as the first index of its value in the sorted list: element j is in the upper bin of every
    # edge whose first index is <= j, ties included, as in metrics.reliability_curve
    first = np.searchsorted(values, values[edge_at - 2 * n * row], side="left") + 2 * n * row
    idx = np.searchsorted(first.ravel(), (np.arange(2 * n) + 2 * n * row).ravel(), side="right")
    idx = idx.reshape(rows, 2 * n) + row  # row r had r * (n_bins - 1) edges before it; its bins start at r * n_bins
    weights = draws.astype(np.float64)
    flat = idx.ravel()
    sum_p = np.bincount(flat, weights=(weights * values).ravel(), minlength=rows * n_bins)
    sum_y = np.bincount(flat, weights=(weights * labels).ravel(), minlength=rows * n_bins)
    return np.abs(sum_p - sum_y).reshape(rows, n_bins).sum(axis=1) / width


def bootstrap_calibration(
    margins: Any,
    temperature: float,
    true_prob: Any | None = None,
    *,
    n_bins: int = 15,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Bootstrap intervals of the test figures of ``sigmoid(margins / temperature)`` (labels all 1).

    Returns ``{figure: Interval}`` for ``ece`` (symmetrized, equal-mass bins), ``nll`` and ``brier``; with
    ``true_prob`` (P(chosen preferred) per pair) also ``oracle_<figure>`` on the same resamples and
    ``<figure>_minus_oracle``, the paired difference. The values are the full-sample figures, the same
    ones ``metrics.preference_report`` gives.

    Degenerate cases: fewer than 2 pairs is an error (a resample of one pair has no spread to show);
    ``n_resamples`` below 100 is an error (the 2.5% tails would rest on fewer than 3 resamples).
    """
    if n_resamples < 100:
        raise ValueError(f"n_resamples must be >= 100 for a percentile interval, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    p = metrics.preference_probabilities(margins, temperature)
    n = p.size
    if n < 2:
        raise ValueError(f"bootstrap intervals need at least 2 test pairs, got {n}")
    # the model's per-pair NLL from the margin itself (softplus), exact where p rounds to 0 or 1
    scaled = np.asarray(margins, dtype=np.float64) / temperature
    scored = {"": (p, np.logaddexp(0.0, -scaled))}
    if true_prob is not None:
        p_true = np.asarray(true_prob, dtype=np.float64)
        if p_true.shape != p.shape:
            raise ValueError(f"true_prob must have the same shape as margins: {p_true.shape} != {p.shape}")
        scored["oracle_"] = (p_true, _oracle_nll(p_true))

    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples)  # how often each pair is drawn
    samples: dict[str, np.ndarray] = {}
    values: dict[str, float] = {}
    for prefix, (probs, nll) in scored.items():
        sq = (1.0 - probs) ** 2
        samples[f"{prefix}nll"], values[f"{prefix}nll"] = _resampled_mean(counts, nll), float(nll.mean())
        samples[f"{prefix}brier"], values[f"{prefix}brier"] = counts @ sq / n, float(sq.mean())
        chunk = max(1, 1_000_000 // (2 * n))  # rows per call: a few tens of MB whatever the split's size
        samples[f"{prefix}ece"] = np.concatenate([ece_of_resamples(probs, counts[i:i + chunk], n_bins)
                                                  for i in range(0, n_resamples, chunk)])
        values[f"{prefix}ece"] = _ece(probs, n_bins)
    out = {name: _percentile(samples[name], values[name], level) for name in samples}
    if true_prob is not None:
        for figure in FIGURES:
            diff = samples[figure] - samples[f"oracle_{figure}"]
            out[f"{figure}_minus_oracle"] = _percentile(diff, values[figure] - values[f"oracle_{figure}"], level)
    return out


@dataclass(frozen=True)
class TemperaturePrecision:
    """The fitted temperature's relative standard error and the calibration size that would meet ``target``."""

    relative_std_error: float
    n_pairs: int
    target: float
    sufficient_pairs: int

    @property
    def enough(self) -> bool:
        return self.relative_std_error <= self.target

    def warning(self) -> str | None:
        if self.enough:
            return None
        return (f"the temperature's standard error is {100 * self.relative_std_error:.1f}% of it on "
                f"{self.n_pairs} calibration pairs, over the {100 * self.target:.0f}% target; about "
                f"{self.sufficient_pairs} pairs would bring it under")


def temperature_precision(temperature: float, std_error: float | None, n_pairs: int,
                          target: float = 0.05) -> TemperaturePrecision | None:
    """How precisely ``n_pairs`` calibration pairs fix the temperature; ``None`` without a standard error
    (a fit at a bound, or a fixed T = 1, has none)."""
    if std_error is None or not math.isfinite(std_error) or temperature <= 0:
        return None
    if target <= 0:
        raise ValueError(f"target must be > 0, got {target}")
    rel = std_error / temperature
    return TemperaturePrecision(relative_std_error=rel, n_pairs=n_pairs, target=target,
                                sufficient_pairs=max(n_pairs, math.ceil(n_pairs * (rel / target) ** 2)))
