"""Calibration metrics for pairwise preference probabilities.

Every function takes ``p``, the predicted probability that item ``a`` of a pair is preferred, and
binary labels ``y`` (1 if ``a`` was preferred). Logs are natural (NLL and entropy in nats).

Why ECE and reliability curves are *symmetrized*: the held-out pairs are stored as
(chosen, rejected), so every label is 1. A reliability curve of ``p`` against an all-ones label
would have frequency 1 in every bin and would only register under-confidence. Presenting each pair
in both orientations, ``(p, y)`` and ``(1 - p, 1 - y)`` (see :func:`symmetrize`), measures the model
as a classifier that is not told which item was chosen: both classes appear, the curve is symmetric
about (1/2, 1/2), and NLL, Brier score and accuracy are unchanged by the doubling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from calibrated_rlhf.core.calibration import preference_nll

BinStrategy = Literal["equal_mass", "equal_width"]


def _probabilities(p: Any, name: str = "p") -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if not np.all((arr >= 0.0) & (arr <= 1.0)):  # also rejects NaN
        raise ValueError(f"{name} must contain probabilities in [0, 1] (no NaN)")
    return arr


def _check(p: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    p_arr = _probabilities(p)
    y_arr = np.asarray(y, dtype=np.float64)
    if y_arr.shape != p_arr.shape:
        raise ValueError(f"labels must have the same shape as p: {y_arr.shape} != {p_arr.shape}")
    if not np.all((y_arr == 0.0) | (y_arr == 1.0)):
        raise ValueError("labels must be 0 or 1")
    if p_arr.size == 0:
        raise ValueError("metrics need at least one prediction")
    return p_arr, y_arr


def sigmoid(z: Any) -> np.ndarray:
    """Logistic function with full relative precision in both tails and no overflow."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


def preference_probabilities(margins: Any, temperature: float) -> np.ndarray:
    """``sigmoid(margins / temperature)``: probability that item ``a`` is preferred."""
    if not (temperature > 0.0 and np.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return sigmoid(np.asarray(margins, dtype=np.float64) / temperature)


# --------------------------------------------------------------------------------------------------
# Scalar metrics


def nll(p: Any, y: Any) -> float:
    """Mean negative log-likelihood; ``inf`` if a label has predicted probability 0.

    For probabilities that come from margins prefer
    :func:`calibrated_rlhf.core.calibration.preference_nll`, which stays finite and exact there.
    """
    p_arr, y_arr = _check(p, y)
    with np.errstate(divide="ignore"):
        return float(-np.mean(np.log(np.where(y_arr == 1.0, p_arr, 1.0 - p_arr))))


def brier(p: Any, y: Any) -> float:
    """Mean squared error of the probability against the 0/1 label."""
    p_arr, y_arr = _check(p, y)
    return float(np.mean((p_arr - y_arr) ** 2))


def accuracy(p: Any, y: Any) -> float:
    """Fraction of pairs whose more likely item was preferred; a tie (``p == 1/2``) counts 1/2.

    Counting ties as half is the expected accuracy of breaking them at random, and keeps accuracy
    invariant under :func:`symmetrize`.
    """
    p_arr, y_arr = _check(p, y)
    correct = np.where(p_arr > 0.5, y_arr, np.where(p_arr < 0.5, 1.0 - y_arr, 0.5))
    return float(np.mean(correct))


def binary_entropy(p: Any) -> np.ndarray:
    """Elementwise ``-p log p - (1 - p) log(1 - p)`` in nats, with ``0 log 0 = 0``.

    The mean binary entropy of the true preference probabilities is the Bayes NLL: the expected
    NLL of a perfect model, which no reward model can beat on average.
    """
    p_arr = np.asarray(p, dtype=np.float64)
    if not np.all((p_arr >= 0.0) & (p_arr <= 1.0)):
        raise ValueError("binary_entropy needs probabilities in [0, 1] (no NaN)")
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(p_arr > 0.0, p_arr * np.log(p_arr), 0.0)
        b = np.where(p_arr < 1.0, (1.0 - p_arr) * np.log1p(-p_arr), 0.0)
    return -(a + b)


def symmetrize(p: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both orientations of every pair: ``(concat(p, 1 - p), concat(y, 1 - y))``.

    Used for ECE and reliability curves because the pipeline's held-out labels are all 1 (see the
    module docstring).
    """
    p_arr, y_arr = _check(p, y)
    return np.concatenate([p_arr, 1.0 - p_arr]), np.concatenate([y_arr, 1.0 - y_arr])


# --------------------------------------------------------------------------------------------------
# Binned calibration


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per-bin mean predicted probability (``confidence``), label frequency and counts.

    Arrays have one entry per bin; empty bins have count 0 and NaN confidence and frequency.
    ``edges`` has ``n_bins + 1`` entries; bin ``i`` holds ``edges[i] <= p < edges[i + 1]`` (the last
    bin is closed). For equal-mass bins the edges are order statistics of ``p``, so ties are never
    split across bins and bins may be unequal or empty.
    """

    edges: np.ndarray
    confidence: np.ndarray
    frequency: np.ndarray
    counts: np.ndarray
    strategy: str

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def ece(self) -> float:
        """Count-weighted mean ``|confidence - frequency|`` over non-empty bins."""
        filled = self.counts > 0
        gaps = np.abs(self.confidence[filled] - self.frequency[filled])
        return float(np.sum(self.counts[filled] * gaps) / self.n)


def _bin_edges(p: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    if strategy == "equal_width":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if strategy == "equal_mass":
        ordered = np.sort(p)
        inner = ordered[(np.arange(1, n_bins) * p.size) // n_bins]
        return np.concatenate([[ordered[0]], inner, [ordered[-1]]])
    raise ValueError(f"strategy must be 'equal_mass' or 'equal_width', got {strategy!r}")


def reliability_curve(p: Any, y: Any, n_bins: int = 15, strategy: BinStrategy = "equal_mass") -> ReliabilityCurve:
    """Bin predictions by ``p`` and compare each bin's mean ``p`` with its label frequency.

    Equal-mass bins (quantiles of ``p``) give every bin about the same number of pairs, so each
    point is equally reliable; equal-width bins are the classic fixed grid on [0, 1], which leaves
    most bins empty when predictions concentrate near 1/2.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p_arr, y_arr = _check(p, y)
    edges = _bin_edges(p_arr, n_bins, strategy)
    # side="right" puts a value equal to an inner edge in the upper bin, so equal values share a bin.
    idx = np.searchsorted(edges[1:-1], p_arr, side="right")
    counts = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p_arr, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y_arr, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.where(counts > 0, sum_p / counts, np.nan)
        frequency = np.where(counts > 0, sum_y / counts, np.nan)
    return ReliabilityCurve(edges, confidence, frequency, counts, strategy)


def ece(p: Any, y: Any, n_bins: int = 15, strategy: BinStrategy = "equal_mass") -> float:
    """Expected calibration error: ``sum_bins (n_b / n) |mean p_b - mean y_b|``.

    Pass symmetrized inputs for preference pairs (see :func:`symmetrize`).
    """
    return reliability_curve(p, y, n_bins, strategy).ece


# --------------------------------------------------------------------------------------------------
# Reports on margins


def _labels_or_ones(labels: Any | None, n: int) -> np.ndarray:
    if labels is None:
        return np.ones(n)
    return np.asarray(labels, dtype=np.float64)


def preference_reliability(
    margins: Any,
    temperature: float,
    labels: Any | None = None,
    *,
    n_bins: int = 15,
    strategy: BinStrategy = "equal_mass",
) -> ReliabilityCurve:
    """Symmetrized reliability curve of ``sigmoid(margins / temperature)`` (labels default to 1)."""
    p = preference_probabilities(margins, temperature)
    return reliability_curve(*symmetrize(p, _labels_or_ones(labels, p.size)), n_bins, strategy)


def preference_report(
    margins: Any,
    temperature: float,
    true_prob: Any | None = None,
    *,
    labels: Any | None = None,
    n_bins: int = 15,
) -> dict[str, float]:
    """Calibration metrics of ``sigmoid(margins / temperature)`` on held-out pairs.

    Args:
        margins: ``r_a - r_b`` per pair; with ``labels=None`` these are ``r_chosen - r_rejected``.
        temperature: divide margins by this (1.0 reports the uncalibrated model).
        true_prob: optional known ``P(a preferred)`` per pair, in the same orientation as
            ``margins`` (for the synthetic task: P(chosen preferred)).
        labels: 1 where ``a`` was preferred; default all 1.
        n_bins: bins for the ECEs.

    Returns:
        ``nll``, ``brier``, ``ece_equal_mass``, ``ece_equal_width`` (both symmetrized) and
        ``accuracy``; with ``true_prob`` also ``bayes_nll`` (mean binary entropy of the true
        probabilities: the expected NLL of a perfect model), ``oracle_nll`` (NLL of the true
        probabilities on these labels), ``oracle_ece`` and ``oracle_ece_equal_width`` (the ECE the
        true probabilities score on the same pairs, symmetrized the same way: the finite-sample
        noise floor of the ECE) and ``bayes_accuracy`` (``mean(max(p, 1 - p))`` of the true
        probabilities). Keys carry no prefix.
    """
    p = preference_probabilities(margins, temperature)
    y = _labels_or_ones(labels, p.size)
    p_sym, y_sym = symmetrize(p, y)
    report = {
        "nll": preference_nll(margins, temperature, None if labels is None else y),
        "brier": brier(p, y),
        "ece_equal_mass": ece(p_sym, y_sym, n_bins, "equal_mass"),
        "ece_equal_width": ece(p_sym, y_sym, n_bins, "equal_width"),
        "accuracy": accuracy(p, y),
    }
    if true_prob is not None:
        p_true = _probabilities(true_prob, "true_prob")
        if p_true.shape != p.shape:
            raise ValueError(f"true_prob must have the same shape as margins: {p_true.shape} != {p.shape}")
        t_sym, _ = symmetrize(p_true, y)
        report |= {
            "bayes_nll": float(np.mean(binary_entropy(p_true))),
            "oracle_nll": nll(p_true, y),
            "oracle_ece": ece(t_sym, y_sym, n_bins, "equal_mass"),
            "oracle_ece_equal_width": ece(t_sym, y_sym, n_bins, "equal_width"),
            "bayes_accuracy": float(np.mean(np.maximum(p_true, 1.0 - p_true))),
        }
    return report
