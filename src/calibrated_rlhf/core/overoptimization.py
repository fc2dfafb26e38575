"""Reward over-optimization: best-of-n over a pool of reference samples, and Gao et al.'s curves of gold
reward against the distance ``d = sqrt(KL(pi || pi_ref))``.

Gao, Schulman and Hilton (2022, "Scaling Laws for Reward Model Overoptimization") found that gold reward
follows ``d * (alpha - beta * d)`` for best-of-n and ``d * (alpha - beta * ln d)`` for RL. Both are linear in
``(alpha, beta)``, so :func:`fit_curve` solves them by least squares without an intercept (a policy at
``d = 0`` is the reference, whose gain is 0 by definition) and reads the peak off the fit.

Best-of-n is evaluated exactly over an empirical pool instead of by drawing n samples again and again: a
prompt's pool of ``m`` reference responses is the reference distribution (each response ``1/m``), and
best-of-n by the proxy picks the one ranked ``k``-th lowest of ``m`` with probability
``(k/m)^n - ((k-1)/m)^n``. Ties in the proxy are one outcome, shared out evenly, so no ordering that the
proxy cannot make is credited to it. This gives the expected gold and proxy of best-of-n and its exact KL
to the pool, which Beirami et al. (2024) show never exceeds the usual ``log n - (n - 1) / n``; the bound is
reached only as the pool grows without ties. The KL of the pool is at most ``log m``: a pool must be much
larger than ``n`` for the figure at ``n`` to mean anything (:func:`best_of_n` refuses ``n > m``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Form = Literal["bon", "rl"]
# Student t's 97.5% points by degrees of freedom (the library keeps scipy out of its dependencies)
T_95 = dict(enumerate((12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
                       2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
                       2.052, 2.048, 2.045, 2.042), start=1))


def bon_kl_bound(n: int) -> float:
    """The usual best-of-n KL, ``log n - (n - 1) / n`` nats: exact for a continuous reward, an upper bound."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def _selection_probabilities(proxy: np.ndarray, n: int) -> np.ndarray:
    """Probability that best-of-n by ``proxy`` returns each pool member (ties split evenly)."""
    m = len(proxy)
    order = np.argsort(proxy, kind="stable")
    ranked = proxy[order]
    # a block of equal proxies is one outcome: its mass is F(top)^n - F(below)^n, spread over its members
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    ends = np.r_[starts[1:], m]
    block_mass = (ends / m) ** n - (starts / m) ** n
    probs = np.empty(m)
    probs[order] = np.repeat(block_mass / (ends - starts), ends - starts)
    return probs


@dataclass(frozen=True)
class BestOfN:
    """Best-of-n of one pool: expected proxy and gold of the chosen response, and its KL to the pool, nats."""

    n: int
    proxy: float
    gold: float
    kl: float


def best_of_n(proxy: np.ndarray, gold: np.ndarray, n: int) -> BestOfN:
    """Best-of-``n`` by ``proxy`` over one prompt's pool of reference samples, exactly (no resampling)."""
    proxy, gold = np.asarray(proxy, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if proxy.shape != gold.shape or proxy.ndim != 1:
        raise ValueError(f"proxy and gold must be 1-D and of one length, got {proxy.shape} and {gold.shape}")
    m = len(proxy)
    if not 1 <= n <= m:
        # past the pool's size the KL saturates at log m and says nothing about n
        raise ValueError(f"best-of-{n} needs a pool of at least {n} samples, got {m}")
    p = _selection_probabilities(proxy, n)
    chosen = p > 0
    kl = float(np.sum(p[chosen] * np.log(p[chosen] * m)))
    return BestOfN(n=n, proxy=float(p @ proxy), gold=float(p @ gold), kl=max(kl, 0.0))


@dataclass(frozen=True)
class CurveFit:
    """One of Gao et al.'s forms fitted to gold gain against ``d``; intervals are 95% (Student t)."""

    form: Form
    alpha: float
    beta: float
    alpha_ci: tuple[float, float]
    beta_ci: tuple[float, float]
    r2: float  # on the points fitted
    d_peak: float  # the fitted curve's maximum; inf when it has none (beta <= 0)

    def predict(self, d: np.ndarray) -> np.ndarray:
        return law(d, self.alpha, self.beta, self.form)


def law(d: np.ndarray, alpha: float, beta: float, form: Form) -> np.ndarray:
    """Gao et al.'s gold gain at ``d`` under ``form`` with coefficients ``alpha`` and ``beta``."""
    return _design(np.asarray(d, dtype=np.float64), form) @ np.array([alpha, beta])


def _design(d: np.ndarray, form: Form) -> np.ndarray:
    if form == "bon":
        return np.column_stack([d, -d * d])
    if form == "rl":
        # d ln d -> 0 as d -> 0; written so that d = 0 gives 0 rather than nan
        return np.column_stack([d, -d * np.log(np.where(d > 0, d, 1.0))])
    raise ValueError(f"unknown form {form!r}: 'bon' or 'rl'")


def _peak(form: Form, alpha: float, beta: float) -> float:
    if beta <= 0:
        return math.inf
    # bon: d (alpha - beta d) peaks at alpha / (2 beta); rl: alpha - beta (ln d + 1) = 0
    return alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination of ``predicted`` against ``y`` (1 is exact; can be negative)."""
    y = np.asarray(y, dtype=np.float64)
    total = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - predicted) ** 2)) / total if total > 0 else math.nan


def fit_curve(d: np.ndarray, gain: np.ndarray, form: Form) -> CurveFit:
    """Least-squares ``(alpha, beta)`` of ``gain ~ d * (alpha - beta * g(d))`` (g = d for 'bon', ln d for 'rl').

    Needs at least three points with distinct ``d > 0``: two parameters and one degree of freedom left for
    the intervals."""
    d, gain = np.asarray(d, dtype=np.float64), np.asarray(gain, dtype=np.float64)
    if d.shape != gain.shape or d.ndim != 1 or np.any(d < 0) or not np.all(np.isfinite(np.r_[d, gain])):
        raise ValueError("d and gain must be 1-D, of one length, finite, with d >= 0")
    if len(np.unique(d[d > 0])) < 3:
        raise ValueError(f"a fit needs at least 3 distinct d > 0, got {len(np.unique(d[d > 0]))}")
    x = _design(d, form)
    coef, *_ = np.linalg.lstsq(x, gain, rcond=None)
    dof = len(d) - 2
    residual = gain - x @ coef
    sigma2 = float(residual @ residual) / dof
    se = np.sqrt(np.diag(sigma2 * np.linalg.inv(x.T @ x)))
    t = T_95.get(dof, 1.96 + 2.4 / dof)  # past 30 degrees of freedom within 0.001 of the exact point
    alpha, beta = float(coef[0]), float(coef[1])
    return CurveFit(form=form, alpha=alpha, beta=beta, alpha_ci=(alpha - t * se[0], alpha + t * se[0]),
                    beta_ci=(beta - t * se[1], beta + t * se[1]), r2=r_squared(gain, x @ coef),
                    d_peak=_peak(form, alpha, beta))


def held_out_r2(d: np.ndarray, gain: np.ndarray, form: Form, every: int = 3) -> float:
    """R^2 on every ``every``-th point (ordered by ``d``) of a fit made without them: does the form
    predict points it has not seen, rather than merely pass through those it has."""
    d, gain = np.asarray(d, dtype=np.float64), np.asarray(gain, dtype=np.float64)
    order = np.argsort(d, kind="stable")
    held = np.zeros(len(d), dtype=bool)
    held[order[1::every]] = True  # never the smallest d, so the fit keeps the curve's start
    fit = fit_curve(d[~held], gain[~held], form)
    return r_squared(gain[held], fit.predict(d[held]))
