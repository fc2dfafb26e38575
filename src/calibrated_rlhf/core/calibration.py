"""Maximum-likelihood temperature for Bradley-Terry margins.

The Bradley-Terry loss only pins down reward *differences*, and their scale depends on how training
went, so we fit one scalar ``temperature`` on held-out pairs such that ``sigmoid(margin / temperature)``
predicts the preference labels as well as possible (minimum mean binary cross-entropy).

The objective is convex in ``inv_temperature = 1 / temperature`` (a one-parameter logistic regression without
intercept), so we solve it exactly in float64 with a safeguarded Newton iteration instead of a
generic optimizer with a loose tolerance:

* every pair is folded into a *signed margin* ``x`` (``margin`` if the label is 1, ``-margin`` if it
  is 0), so all labels are 1 and the loss is ``mean(softplus(-inv_temperature * x))``;
* with ``s = inv_temperature * x`` and ``q = sigmoid(-s)`` the Newton update is
  ``inv_temperature <- inv_temperature * (1 + sum(s q) / sum(s^2 q (1 - q)))``. The step is relative,
  so the stopping rule
  is scale-free and ``a * margins`` gives ``a * temperature`` up to rounding;
* the gradient is monotone in inv_temperature, so every evaluation tightens a bracket around the root; a
  Newton step that leaves the bracket (or stalls) is replaced by geometric bisection, and the
  temperature bounds close the bracket;
* large inputs first solve a systematic subsample (within ~1% of the optimum), then take full-data
  steps, which converge quadratically. The last full-data step must be below ``rtol`` relative, so
  the returned temperature is accurate to about ``rtol**2``: float64 precision.

Degenerate inputs are rejected or flagged on purpose; see :func:`fit_temperature`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

DEFAULT_BOUNDS: tuple[float, float] = (1e-4, 1e4)
DEFAULT_MIN_PAIRS = 10

# Chunks small enough to stay in L2 cache: each evaluation makes several passes per element, and
# cache-resident passes are several times faster than streaming 80 MB float64 arrays through memory.
_CHUNK = 1 << 15
# An inv_temperature * margin beyond this overflows float64 arithmetic in the likelihood.
_MAX_ABS_MARGIN = 1e300


class CalibrationWarning(UserWarning):
    """Emitted when the fitted temperature sits at a bound (the likelihood has no interior optimum)."""


@dataclass(frozen=True)
class TemperatureFit:
    """Result of :func:`fit_temperature`.

    ``std_error`` is the asymptotic (Fisher-information) standard error of the temperature; it is
    ``None`` when the fit is at a bound. ``n_iter`` counts full-data gradient evaluations and
    ``n_subsample_iter`` those on the warm-start subsample (0 for small inputs).
    """

    temperature: float
    nll: float
    n_pairs: int
    n_iter: int
    at_bound: bool
    warning: str | None
    std_error: float | None
    converged: bool
    n_subsample_iter: int
    bounds: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable view (bounds as a list)."""
        out = asdict(self)
        out["bounds"] = list(self.bounds)
        return out


# --------------------------------------------------------------------------------------------------
# Input handling


def _as_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _is_real(dtype: np.dtype) -> bool:
    return bool(np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer))


def _offenders_message(bad: np.ndarray, what: str) -> str:
    idx = np.flatnonzero(bad)
    shown = ", ".join(str(i) for i in idx[:10])
    more = ", ..." if idx.size > 10 else ""
    return f"{idx.size} {what} (first indices: [{shown}{more}])"


def _signed_margins(margins: Any, labels: Any | None) -> np.ndarray:
    """Validate inputs and fold labels into the margin sign (label 0 -> -margin).

    float32 input stays float32 (every later pass casts chunk-wise to float64, which is exact) so
    that 10^7 margins do not need an extra 80 MB float64 copy; other dtypes become float64.
    """
    m = _as_numpy(margins)
    if m.ndim != 1:
        raise ValueError(f"margins must be a 1-D array, got shape {m.shape}")
    if m.dtype not in (np.float32, np.float64):
        if not _is_real(m.dtype):
            raise ValueError(f"margins must be numeric, got dtype {m.dtype}")
        m = m.astype(np.float64)
    if m.size and not (np.isfinite(m.min()) and np.isfinite(m.max())):  # min/max propagate NaN
        raise ValueError("margins contain " + _offenders_message(~np.isfinite(m), "non-finite values (NaN or inf)"))
    if labels is None:
        return m
    y = _as_numpy(labels)
    if y.shape != m.shape:
        raise ValueError(f"labels must have the same shape as margins: {y.shape} != {m.shape}")
    if y.dtype != np.bool_:
        if not _is_real(y.dtype):
            raise ValueError(f"labels must be numeric or bool, got dtype {y.dtype}")
        if np.count_nonzero(y == 1) + np.count_nonzero(y == 0) != y.size:
            valid = (y == 0) | (y == 1)
            raise ValueError("labels must be 0 or 1; found " + _offenders_message(~valid, "other values"))
    # Multiplying by +-1 is exact, so folding labels into the sign loses nothing.
    signed = np.multiply(y, 2, dtype=m.dtype)
    signed -= 1
    signed *= m
    return signed


# --------------------------------------------------------------------------------------------------
# Likelihood evaluations on signed margins x (all labels 1):
# loss(inv_temperature) = mean(softplus(-inv_temperature * x))


def _chunks(x: np.ndarray):
    for start in range(0, x.size, _CHUNK):
        yield x[start : start + _CHUNK]


@dataclass(frozen=True)
class _Moments:
    """Beta-independent sums that let each Newton evaluation skip two of its passes."""

    n: int
    sum_x: float
    sum_xx: float
    sum_abs: float

    @classmethod
    def of(cls, x: np.ndarray) -> "_Moments":
        sum_x = sum_xx = sum_abs = 0.0
        buf = np.empty(min(_CHUNK, x.size))
        for chunk in _chunks(x):
            c = buf[: chunk.size]
            np.copyto(c, chunk)
            sum_x += float(c.sum())
            sum_xx += float(np.einsum("i,i->", c, c))  # einsum, not np.dot: no BLAS thread start-up per chunk
            np.abs(c, out=c)
            sum_abs += float(c.sum())
        return cls(int(x.size), sum_x, sum_xx, sum_abs)


def _newton_sums(x: np.ndarray, moments: _Moments, inv_temperature: float) -> tuple[float, float]:
    """Return ``A = sum(s q)`` and ``B = sum(s^2 q (1 - q))`` with ``s = inv_temperature x``, ``q = sigmoid(-s)``.

    The loss gradient is ``-A / (n inv_temperature)``, and the Newton update is ``inv_temperature * (1 + A / B)``.
    With ``t = tanh(s / 2)`` we have ``q = (1 - t) / 2`` and ``q (1 - q) = (1 - t^2) / 4``, so
    ``A = (inv_temperature sum(x) - sum(s t)) / 2`` and ``B = (inv_temperature^2 sum(x^2) - sum((s t)^2)) / 4``: one
    transcendental and four cheap passes per element, and tanh never overflows. The cancellation
    in A is the one inherent in a gradient at its root; B only steers the step size.
    """
    half = np.float64(0.5 * inv_temperature)  # a float64 scalar promotes float32 chunks to float64
    size = min(_CHUNK, x.size)
    v_buf = np.empty(size)
    u_buf = np.empty(size)
    sum_u = sum_uu = 0.0
    for chunk in _chunks(x):
        v = v_buf[: chunk.size]
        u = u_buf[: chunk.size]
        np.multiply(chunk, half, out=v)  # s / 2
        np.tanh(v, out=u)
        np.multiply(v, u, out=u)  # s t / 2
        sum_u += float(u.sum())
        sum_uu += float(np.einsum("i,i->", u, u))
    a_sum = 0.5 * inv_temperature * moments.sum_x - sum_u
    b_sum = 0.25 * inv_temperature * inv_temperature * moments.sum_xx - sum_uu
    return a_sum, b_sum


def _mean_nll(x: np.ndarray, moments: _Moments, inv_temperature: float) -> float:
    """Mean ``softplus(-inv_temperature x)`` as ``log1p(exp(-|s|)) + max(-s, 0)``, which never overflows.

    ``sum(max(-s, 0)) = inv_temperature (sum|x| - sum x) / 2`` comes from the moments.
    """
    neg_inv_temperature = np.float64(-inv_temperature)
    buf = np.empty(min(_CHUNK, x.size))
    total = 0.0
    for chunk in _chunks(x):
        t = buf[: chunk.size]
        np.abs(chunk, out=t)
        t *= neg_inv_temperature
        np.exp(t, out=t)
        np.log1p(t, out=t)
        total += float(t.sum())
    total += 0.5 * inv_temperature * (moments.sum_abs - moments.sum_x)
    return total / x.size


@dataclass(frozen=True)
class _Solution:
    inv_temperature: float
    n_iter: int
    converged: bool
    bound: str | None  # "inv_temperature_min", "inv_temperature_max" or None
    curvature_sum: float  # B at the last evaluation, for the standard error


def _solve_inv_temperature(
    sums: Callable[[float], tuple[float, float]],
    inv_temperature: float,
    inv_temperature_min: float,
    inv_temperature_max: float,
    rtol: float,
    max_iter: int,
) -> _Solution:
    """Safeguarded Newton on the monotone gradient, constrained to ``[inv_temperature_min, inv_temperature_max]``.

    Every evaluation moves one end of the bracket ``[lo, hi]`` around the root. A Newton step is
    taken when it lands inside the bracket and (once both ends are known) shrinks at least by half
    relative to the previous step; otherwise we bisect geometrically. A bracket end that has not
    been evaluated is just the bound, and only evaluating the bound itself can tell whether the
    optimum lies beyond it.
    """
    lo, hi = inv_temperature_min, inv_temperature_max
    lo_known = hi_known = False
    prev_step = math.inf
    b_sum = math.nan
    for it in range(1, max_iter + 1):
        a_sum, b_sum = sums(inv_temperature)
        if a_sum == 0.0:
            return _Solution(inv_temperature, it, True, None, b_sum)
        if a_sum > 0.0:  # gradient < 0: the optimum lies above inv_temperature
            if inv_temperature >= inv_temperature_max:
                return _Solution(inv_temperature_max, it, True, "inv_temperature_max", b_sum)
            lo, lo_known = inv_temperature, True
        else:
            if inv_temperature <= inv_temperature_min:
                return _Solution(inv_temperature_min, it, True, "inv_temperature_min", b_sum)
            hi, hi_known = inv_temperature, True
        step = inv_temperature * (a_sum / b_sum) if b_sum > 0.0 else math.nan
        candidate = inv_temperature + step
        stalled = lo_known and hi_known and abs(step) > 0.5 * abs(prev_step)
        if lo < candidate < hi and not stalled:
            if abs(step) <= rtol * inv_temperature:
                return _Solution(candidate, it, True, None, b_sum)
        elif a_sum > 0.0 and not hi_known:
            candidate = inv_temperature_max
        elif a_sum < 0.0 and not lo_known:
            candidate = inv_temperature_min
        else:
            candidate = math.sqrt(lo * hi)  # inv_temperature may span decades: bisect in log space
        if hi - lo <= rtol * lo:
            return _Solution(0.5 * (lo + hi), it, True, None, b_sum)
        prev_step = candidate - inv_temperature
        inv_temperature = candidate
    return _Solution(inv_temperature, max_iter, False, None, b_sum)


def _warm_start_sample(x: np.ndarray) -> np.ndarray | None:
    """A systematic subsample for the warm start, or None when the input is small enough to solve directly.

    A strided slice is a contiguous-cost copy (a random gather of 2^18 indices costs ~10x more) and
    stratifies sorted inputs; the sample only affects speed, never the result, because the
    full-data iterations that follow are safeguarded and converge to the same root.
    """
    n = x.size
    if n < 1 << 19:
        return None
    size = min(1 << 18, max(1 << 16, n // 16))
    stride = n // size
    return x[stride // 2 :: stride][:size].copy()


# --------------------------------------------------------------------------------------------------
# Public API


def fit_temperature(
    margins: Any,
    labels: Any | None = None,
    *,
    min_pairs: int = DEFAULT_MIN_PAIRS,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    rtol: float = 1e-8,
    max_iter: int = 100,
) -> TemperatureFit:
    """Fit the temperature that maximizes the likelihood of ``labels`` under ``sigmoid(margins / T)``.

    Args:
        margins: ``r_a - r_b`` per pair (1-D; float32 or float64, other dtypes are converted;
            a CPU torch tensor is accepted).
        labels: 1 where ``a`` was preferred, 0 otherwise. ``None`` means all 1, i.e. the margins are
            ``r_chosen - r_rejected``.
        min_pairs: fewer pairs than this raise ``ValueError``.
        bounds: ``(t_min, t_max)``; the temperature is constrained to this interval. The bounds are
            absolute, so scale invariance (``a * margins -> a * T``) holds for fits inside them.
        rtol: stop once a full-data Newton step changes inv_temperature by at most ``rtol`` relative; quadratic
            convergence leaves an error of order ``rtol**2``, i.e. float64 precision.
        max_iter: cap on gradient evaluations per stage (warm start, full data).

    Degenerate inputs:
        * NaN/inf margins, labels other than 0/1, fewer than ``min_pairs`` pairs, or all margins 0
          raise ``ValueError``.
        * Perfectly separable pairs (every nonzero margin agrees with its label) have no finite
          optimum: the likelihood keeps improving as the temperature goes to 0. The fit returns
          ``t_min`` with ``at_bound=True``, a ``CalibrationWarning`` and the reason in ``warning``.
          A single label class is fine unless it is separable in this sense.
        * Every nonzero margin ordered against its label raises ``ValueError``: no positive
          temperature can reverse a ranking, so this almost always means a swapped sign convention.
        * Margins that predict no better than chance (optimum at ``inv_temperature <= 1/t_max``) return
          ``t_max`` with ``at_bound=True`` and a warning, as does an optimum below ``t_min``.
        * Pairs with margin 0 carry no information about the temperature; they count in
          ``n_pairs`` and in the NLL (``log 2`` each) but do not move the optimum.
    """
    t_min, t_max = (float(b) for b in bounds)
    if not (0.0 < t_min < t_max < math.inf):
        raise ValueError(f"bounds must satisfy 0 < t_min < t_max < inf, got {bounds}")
    if min_pairs < 1:
        raise ValueError(f"min_pairs must be >= 1, got {min_pairs}")
    if not (0.0 < rtol < 1.0) or max_iter < 1:
        raise ValueError(f"need 0 < rtol < 1 and max_iter >= 1, got rtol={rtol}, max_iter={max_iter}")
    x = _signed_margins(margins, labels)
    n = int(x.size)
    if n < min_pairs:
        raise ValueError(f"too few pairs to fit a temperature: got {n}, need at least min_pairs={min_pairs}")

    x_min, x_max = float(x.min()), float(x.max())
    if max(-x_min, x_max) > _MAX_ABS_MARGIN:
        raise ValueError(f"|margins| must be <= {_MAX_ABS_MARGIN:g}, got {max(-x_min, x_max):g}")
    if x_min == 0.0 and x_max == 0.0:
        raise ValueError(
            "all margins are 0: the reward model gives identical scores to both items of every pair, "
            "so there is nothing to calibrate"
        )
    if x_max <= 0.0:
        raise ValueError(
            "every pair with a nonzero margin is ordered against its label: the ranking is reversed, "
            "which no positive temperature can fix (check the sign convention: margin = r_a - r_b, "
            "label 1 = a preferred)"
        )
    moments = _Moments.of(x)
    inv_temperature_min, inv_temperature_max = 1.0 / t_max, 1.0 / t_min
    done = _FitBuilder(x, moments, n, (t_min, t_max))

    if x_min >= 0.0:
        return done.at_bound(
            inv_temperature_max,
            f"pairs are perfectly separable (every nonzero margin agrees with its label), so the "
            f"likelihood keeps increasing as the temperature goes to 0; returning the lower bound "
            f"t_min={t_min:g}. Calibrate on more (or harder) held-out pairs.",
        )

    # The IRLS start (p = 1/2 everywhere) is safe; a Newton start at inv_temperature = 1 can diverge.
    inv_temperature0, n_sub_iter = inv_temperature_min, 0
    sample = _warm_start_sample(x)
    if sample is not None:
        sample_moments = _Moments.of(sample)
        pre = _solve_inv_temperature(lambda b: _newton_sums(sample, sample_moments, b), inv_temperature0,
                                     inv_temperature_min, inv_temperature_max, rtol, max_iter)
        inv_temperature0, n_sub_iter = pre.inv_temperature, pre.n_iter
    sol = _solve_inv_temperature(lambda b: _newton_sums(x, moments, b), inv_temperature0, inv_temperature_min,
                                 inv_temperature_max, rtol, max_iter)

    if sol.bound == "inv_temperature_max":
        return done.at_bound(
            inv_temperature_max,
            f"the maximum-likelihood temperature is below the lower bound t_min={t_min:g} "
            f"(nearly separable pairs); returning t_min",
            sol.n_iter,
            n_sub_iter,
        )
    if sol.bound == "inv_temperature_min":
        return done.at_bound(
            inv_temperature_min,
            f"the margins predict the labels no better than chance at any temperature up to "
            f"t_max={t_max:g}; returning t_max (calibrated probabilities are all close to 1/2)",
            sol.n_iter,
            n_sub_iter,
        )
    return done.interior(sol, n_sub_iter)


@dataclass(frozen=True)
class _FitBuilder:
    """Assembles a TemperatureFit once the solve is over (interior optimum or a bound)."""

    x: np.ndarray
    moments: _Moments
    n: int
    bounds: tuple[float, float]

    def interior(self, sol: _Solution, n_sub_iter: int) -> TemperatureFit:
        temperature = 1.0 / sol.inv_temperature
        if not math.isfinite(temperature):
            raise FloatingPointError(f"temperature fit produced a non-finite value ({temperature})")
        # Var(inv_temperature_hat) = 1 / (n * mean Hessian) = inv_temperature^2 / B, and
        # dT = -d_inv_temperature / inv_temperature^2.
        std_error = temperature / math.sqrt(sol.curvature_sum) if sol.curvature_sum > 0 else None
        return TemperatureFit(
            temperature=temperature,
            nll=_mean_nll(self.x, self.moments, sol.inv_temperature),
            n_pairs=self.n,
            n_iter=sol.n_iter,
            at_bound=False,
            warning=None,
            std_error=std_error,
            converged=sol.converged,
            n_subsample_iter=n_sub_iter,
            bounds=self.bounds,
        )

    def at_bound(self, inv_temperature: float, message: str, n_iter: int = 0, n_sub_iter: int = 0) -> TemperatureFit:
        warnings.warn(message, CalibrationWarning, stacklevel=3)
        return TemperatureFit(
            temperature=self.bounds[0] if inv_temperature > 1.0 / self.bounds[1] else self.bounds[1],
            nll=_mean_nll(self.x, self.moments, inv_temperature),
            n_pairs=self.n,
            n_iter=n_iter,
            at_bound=True,
            warning=message,
            std_error=None,
            converged=True,
            n_subsample_iter=n_sub_iter,
            bounds=self.bounds,
        )


def preference_nll(margins: Any, temperature: float, labels: Any | None = None) -> float:
    """Mean binary cross-entropy of ``sigmoid(margins / temperature)`` against ``labels`` (default 1).

    Computed from the margins with a stable softplus, so confident mistakes cost a finite, exact
    amount instead of ``log(0)``.
    """
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    x = _signed_margins(margins, labels)
    if x.size == 0:
        raise ValueError("preference_nll needs at least one pair")
    return _mean_nll(x, _Moments.of(x), 1.0 / temperature)


def fixed_temperature(margins: Any, temperature: float = 1.0) -> TemperatureFit:
    """A temperature that is set, not fitted (calibration switched off: the T = 1 baseline), in the shape of
    a fit, so every stage reads one kind of record: its mean NLL on the same pairs, no iterations, no
    standard error, and ``bounds`` pinned at the temperature."""
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    x = _signed_margins(margins, None)
    return TemperatureFit(temperature=float(temperature), nll=_mean_nll(x, _Moments.of(x), 1.0 / temperature),
                          n_pairs=int(x.size), n_iter=0, at_bound=False, warning=None, std_error=None,
                          converged=True, n_subsample_iter=0, bounds=(float(temperature), float(temperature)))
