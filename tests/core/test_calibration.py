"""Temperature fit: exactness, statistical recovery, invariances and every degenerate input."""

from __future__ import annotations

import math
import warnings

import mpmath  # declared in the `test` extra: a missing one is an error, never a silent skip
import numpy as np
import pytest
from scipy import optimize
from hypothesis import given, settings
from hypothesis import strategies as st

from calibrated_rlhf.core.calibration import (
    DEFAULT_BOUNDS,
    CalibrationWarning,
    TemperatureFit,
    fit_temperature,
    preference_nll,
)

N_PAIRS = 20_000


def draw_pairs(n: int, temperature: float, z_std: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Margins drawn under a known temperature: labels ~ Bernoulli(sigmoid(margin / temperature))."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, z_std, size=n)
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(np.float64)
    return temperature * z, labels, z


def brute_nll(margins: np.ndarray, labels: np.ndarray, temperature: np.ndarray | float) -> np.ndarray:
    """Mean BCE by the textbook formula, vectorized over a grid of temperatures."""
    s = np.multiply.outer(1.0 / np.atleast_1d(temperature), margins)
    softplus = np.maximum(s, 0.0) + np.log1p(np.exp(-np.abs(s)))
    return np.mean(softplus - labels * s, axis=-1)


def signed(margins: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.where(labels == 1, margins, -margins).astype(np.float64)


def mp_reference_temperature(margins: np.ndarray, labels: np.ndarray, digits: int = 40) -> float:
    """Root of the likelihood gradient in inv_temperature = 1/T, in `digits`-digit arithmetic (Newton from the
    IRLS start)."""
    with mpmath.workdps(digits):
        x = [mpmath.mpf(float(v)) for v in signed(margins, labels)]
        inv_temperature = 2 * mpmath.fsum(x) / mpmath.fsum(v * v for v in x)
        for _ in range(100):
            q = [1 / (1 + mpmath.exp(inv_temperature * v)) for v in x]
            grad = -mpmath.fsum(v * qi for v, qi in zip(x, q))
            hess = mpmath.fsum(v * v * qi * (1 - qi) for v, qi in zip(x, q))
            step = grad / hess
            inv_temperature -= step
            if abs(step) < mpmath.mpf(10) ** (-digits + 5) * inv_temperature:
                return float(1 / inv_temperature)
    raise AssertionError("reference Newton did not converge")


def brentq_reference_temperature(margins: np.ndarray, labels: np.ndarray) -> float:
    """Root of the float64 gradient by Brent's method to the last bits (independent of Newton)."""
    x = signed(margins, labels)

    def grad(inv_temperature: float) -> float:
        with np.errstate(over="ignore"):
            return -float(np.mean(x / (1.0 + np.exp(inv_temperature * x))))

    inv_temperature = optimize.brentq(grad, 1e-14, 1e14, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)
    return 1.0 / inv_temperature


# --------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_high_precision_reference(seed):
    margins, labels, _ = draw_pairs(1500, temperature=2.5, z_std=1.5, seed=seed)
    margins = margins.astype(np.float32)  # the reference sees the same (exactly representable) values
    fit = fit_temperature(margins, labels)
    reference = mp_reference_temperature(margins, labels)
    assert abs(fit.temperature / reference - 1.0) <= 1e-10  # spec: 1e-6; Newton gives float64 precision


@pytest.mark.parametrize("seed", [3, 4])
def test_matches_brent_root_of_float64_gradient(seed):
    margins, labels, _ = draw_pairs(N_PAIRS, temperature=0.7, z_std=2.0, seed=seed)
    fit = fit_temperature(margins, labels)
    assert abs(fit.temperature / brentq_reference_temperature(margins, labels) - 1.0) <= 1e-10


def test_warm_start_path_on_float32_input_is_exact():
    # Above 2^19 pairs the solver starts from a subsample; the result must not depend on it.
    margins, labels, _ = draw_pairs(600_000, temperature=2.5, z_std=1.5, seed=5)
    margins32 = margins.astype(np.float32)
    fit = fit_temperature(margins32, labels)
    assert fit.n_subsample_iter > 0 and fit.converged
    assert fit.n_iter <= 4  # quadratic convergence from the warm start
    reference = brentq_reference_temperature(margins32.astype(np.float64), labels)
    assert abs(fit.temperature / reference - 1.0) <= 1e-10


def test_nll_is_the_mean_bce_at_the_fitted_temperature():
    margins, labels, _ = draw_pairs(5000, temperature=1.3, z_std=1.0, seed=6)
    fit = fit_temperature(margins, labels)
    assert fit.nll == pytest.approx(brute_nll(margins, labels, fit.temperature)[0], rel=1e-12)
    assert fit.nll == pytest.approx(preference_nll(margins, fit.temperature, labels), rel=1e-15)


# --------------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    temperature=st.floats(0.05, 50.0),
    z_std=st.floats(0.5, 3.0),
)
def test_recovers_the_generating_temperature(seed, temperature, z_std):
    margins, labels, z = draw_pairs(N_PAIRS, temperature, z_std, seed)
    fit = fit_temperature(margins, labels)
    p = 1.0 / (1.0 + np.exp(-z))
    # Asymptotic relative standard error of T from the Fisher information at the true value.
    rel_se = 1.0 / math.sqrt(np.sum(z * z * p * (1.0 - p)))
    assert abs(fit.temperature / temperature - 1.0) <= 5.0 * rel_se
    assert fit.std_error == pytest.approx(rel_se * fit.temperature, rel=0.25)
    assert not fit.at_bound and fit.warning is None and fit.converged


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), temperature=st.floats(0.1, 10.0), z_std=st.floats(0.3, 3.0))
def test_agrees_with_a_brute_force_grid_search(seed, temperature, z_std):
    margins, labels, _ = draw_pairs(1000, temperature, z_std, seed)
    fit = fit_temperature(margins, labels)
    grid = np.geomspace(1e-2, 1e3, 1501)  # neighbours 0.8% apart
    best = int(np.argmin(brute_nll(margins, labels, grid)))
    assert 0 < best < grid.size - 1
    assert grid[best - 1] <= fit.temperature <= grid[best + 1]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(1e-2, 1e2),
    temperature=st.floats(0.1, 10.0),
    n=st.integers(50, 3000),
)
def test_scaling_margins_scales_the_temperature(seed, scale, temperature, n):
    margins, labels, _ = draw_pairs(n, temperature, 1.5, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # tiny samples can be separable
        base = fit_temperature(margins, labels)
        scaled = fit_temperature(scale * margins, labels)
    if base.at_bound:
        return
    assert scaled.temperature == pytest.approx(scale * base.temperature, rel=1e-11)
    assert scaled.nll == pytest.approx(base.nll, rel=1e-11, abs=1e-14)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["cauchy", "mixed_scales", "outliers", "shifted"]),
    log_scale=st.floats(-3.0, 3.0),
    p_agree=st.floats(0.55, 0.99),
)
def test_heavy_tails_and_mixed_scales_match_brent(seed, kind, log_scale, p_agree):
    # Newton's safeguards (bracket, bisection, bound checks) must still land on the exact root.
    rng = np.random.default_rng(seed)
    n = 2000
    base = {
        "cauchy": lambda: rng.standard_cauchy(n),
        "mixed_scales": lambda: rng.normal(size=n) * 10.0 ** rng.uniform(-3, 3, n),
        "outliers": lambda: np.concatenate([rng.normal(size=n - 2), [1e5, -1e5]]),
        "shifted": lambda: rng.normal(0.7, 1.0, n),
    }[kind]()
    margins = np.abs(base) * 10.0**log_scale
    labels = (rng.random(n) < p_agree).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        fit = fit_temperature(margins, labels, bounds=(1e-8, 1e8))
    if fit.at_bound:
        return
    assert fit.converged
    assert fit.temperature == pytest.approx(brentq_reference_temperature(margins, labels), rel=1e-9)


finite_margins = st.lists(
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, allow_subnormal=True), min_size=10, max_size=200
)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), values=finite_margins)
def test_never_returns_nan_on_arbitrary_finite_input(data, values):
    labels = data.draw(st.lists(st.sampled_from([0, 1]), min_size=len(values), max_size=len(values)))
    margins = np.asarray(values)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            fit = fit_temperature(margins, labels)
    except ValueError as err:
        # Only the two documented degenerate inputs may be refused.
        assert "all margins are 0" in str(err) or "ranking is reversed" in str(err)
        return
    t_min, t_max = DEFAULT_BOUNDS
    assert math.isfinite(fit.temperature) and t_min <= fit.temperature <= t_max
    assert math.isfinite(fit.nll) and fit.nll >= 0.0
    assert fit.converged


# --------------------------------------------------------------------------------------------------
# Inputs and labels


def test_default_labels_mean_margins_are_chosen_minus_rejected():
    margins, labels, _ = draw_pairs(3000, 2.0, 1.5, seed=7)
    chosen_minus_rejected = signed(margins, labels)
    assert fit_temperature(chosen_minus_rejected).temperature == pytest.approx(
        fit_temperature(margins, labels).temperature, rel=1e-13
    )


def test_label_encodings_and_torch_tensors_agree():
    import torch
    margins, labels, _ = draw_pairs(3000, 2.0, 1.5, seed=8)
    reference = fit_temperature(margins, labels).temperature
    for lab in (labels.astype(bool), labels.astype(np.int64), labels.tolist(), torch.from_numpy(labels)):
        assert fit_temperature(margins, lab).temperature == pytest.approx(reference, rel=1e-13)
    assert fit_temperature(torch.from_numpy(margins), labels).temperature == pytest.approx(reference, rel=1e-13)


def test_single_label_class_is_fine_when_not_separable():
    margins, labels, _ = draw_pairs(3000, 2.0, 1.5, seed=9)
    # The same pairs written with the other item first: every label is 0.
    flipped = -signed(margins, labels)
    fit = fit_temperature(flipped, np.zeros_like(flipped))
    assert not fit.at_bound
    assert fit.temperature == pytest.approx(fit_temperature(margins, labels).temperature, rel=1e-13)


def test_zero_margin_pairs_count_but_do_not_move_the_optimum():
    margins, labels, _ = draw_pairs(2000, 2.0, 1.5, seed=10)
    base = fit_temperature(margins, labels)
    padded = fit_temperature(np.concatenate([margins, np.zeros(500)]), np.concatenate([labels, np.ones(500)]))
    assert padded.temperature == pytest.approx(base.temperature, rel=1e-12)
    assert padded.n_pairs == 2500
    assert padded.nll == pytest.approx((2000 * base.nll + 500 * math.log(2.0)) / 2500, rel=1e-12)


def test_result_serializes():
    fit = fit_temperature(*draw_pairs(500, 2.0, 1.5, seed=11)[:2])
    assert isinstance(fit, TemperatureFit)
    as_dict = fit.to_dict()
    assert as_dict["temperature"] == fit.temperature and as_dict["bounds"] == list(DEFAULT_BOUNDS)
    with pytest.raises(AttributeError):
        fit.temperature = 1.0  # frozen


# --------------------------------------------------------------------------------------------------
# Degenerate input


def test_non_finite_margins_are_reported_with_count_and_indices():
    margins = np.linspace(-2, 3, 50)
    margins[[3, 17]] = np.nan
    margins[40] = np.inf
    with pytest.raises(ValueError, match=r"3 non-finite values \(NaN or inf\) \(first indices: \[3, 17, 40\]\)"):
        fit_temperature(margins)


def test_float32_nan_is_caught_too():
    margins = np.linspace(-2, 3, 50, dtype=np.float32)
    margins[7] = np.float32("-inf")
    with pytest.raises(ValueError, match=r"1 non-finite values .*\[7\]"):
        fit_temperature(margins)


def test_too_few_pairs():
    with pytest.raises(ValueError, match=r"too few pairs.*got 5, need at least min_pairs=10"):
        fit_temperature(np.array([1.0, -1.0, 2.0, 0.5, -0.3]))
    with pytest.raises(ValueError, match="got 0"):
        fit_temperature(np.array([]))
    # A lower min_pairs is honoured.
    assert fit_temperature(np.array([1.0, -1.0, 2.0, 0.5, -0.3]), min_pairs=5).temperature > 0


def test_all_zero_margins_mean_identical_scores():
    with pytest.raises(ValueError, match="identical scores.*nothing to calibrate"):
        fit_temperature(np.zeros(100))


def test_separable_pairs_go_to_the_lower_bound_with_a_warning():
    margins = np.abs(np.random.default_rng(0).normal(size=200)) + 0.1
    with pytest.warns(CalibrationWarning, match="perfectly separable"):
        fit = fit_temperature(margins, bounds=(0.01, 100.0))
    assert fit.at_bound and fit.temperature == 0.01
    assert "separable" in fit.warning and "temperature goes to 0" in fit.warning
    assert fit.std_error is None
    assert fit.nll == pytest.approx(brute_nll(margins, np.ones(200), 0.01)[0], rel=1e-9)


def test_separable_with_one_label_class_and_zero_margins():
    # labels all 0 and margins <= 0: still separable (zero margins are uninformative).
    margins = -np.abs(np.random.default_rng(1).normal(size=100))
    margins[:5] = 0.0
    with pytest.warns(CalibrationWarning, match="separable"):
        fit = fit_temperature(margins, np.zeros(100))
    assert fit.at_bound and fit.temperature == DEFAULT_BOUNDS[0]


def test_reversed_ranking_is_an_error():
    margins = np.abs(np.random.default_rng(2).normal(size=100)) + 0.1
    with pytest.raises(ValueError, match="ranking is reversed.*sign convention"):
        fit_temperature(-margins)


def test_chance_level_margins_go_to_the_upper_bound_with_a_warning():
    # Mean signed margin < 0: the likelihood is maximized at inv_temperature <= 0, i.e. beyond t_max.
    margins = np.tile([1.0, 1.0, -2.0, -2.0], 25)
    with pytest.warns(CalibrationWarning, match="no better than chance"):
        fit = fit_temperature(margins, bounds=(0.1, 1000.0))
    assert fit.at_bound and fit.temperature == 1000.0
    assert fit.nll == pytest.approx(brute_nll(margins, np.ones(100), 1000.0)[0], rel=1e-9)


def test_optimum_below_the_lower_bound_is_flagged():
    margins, labels, _ = draw_pairs(2000, temperature=0.05, z_std=1.5, seed=12)
    with pytest.warns(CalibrationWarning, match="below the lower bound"):
        fit = fit_temperature(margins, labels, bounds=(1.0, 100.0))
    assert fit.at_bound and fit.temperature == 1.0


def test_newton_from_unit_temperature_would_diverge_but_the_fit_does_not():
    # Large margins: inv_temperature = 1 puts every pair deep in saturation (the naive start fails here).
    margins, labels, _ = draw_pairs(5000, temperature=300.0, z_std=1.5, seed=13)
    fit = fit_temperature(margins, labels)
    assert fit.temperature == pytest.approx(brentq_reference_temperature(margins, labels), rel=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(margins=np.ones((4, 5))), "1-D"),
        (dict(margins=np.ones(20), labels=np.ones(19)), "same shape"),
        (dict(margins=np.ones(20), labels=np.full(20, 2.0)), r"labels must be 0 or 1; found 20 other values"),
        (dict(margins=np.ones(20), labels=np.array(["a"] * 20)), "numeric or bool"),
        (dict(margins=np.array(["1"] * 20)), "numeric"),
        (dict(margins=np.ones(20), bounds=(0.0, 1.0)), "0 < t_min < t_max"),
        (dict(margins=np.ones(20), bounds=(2.0, 1.0)), "0 < t_min < t_max"),
        (dict(margins=np.ones(20), min_pairs=0), "min_pairs"),
        (dict(margins=np.full(20, 1e305)), "must be <="),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_temperature(**kwargs)


def test_preference_nll_validates_temperature():
    with pytest.raises(ValueError, match="positive and finite"):
        preference_nll(np.ones(3), 0.0)


def test_a_fixed_temperature_is_a_record_of_the_same_shape_with_its_own_nll():
    from calibrated_rlhf.core.calibration import fixed_temperature

    rng = np.random.default_rng(3)
    margins = rng.normal(0.5, 2.0, size=500)
    fixed, fitted = fixed_temperature(margins, 1.0), fit_temperature(margins)
    assert fixed.to_dict().keys() == fitted.to_dict().keys()
    assert (fixed.temperature, fixed.n_pairs, fixed.n_iter, fixed.std_error) == (1.0, 500, 0, None)
    assert fixed.bounds == (1.0, 1.0)
    # the mean NLL at T = 1, computed independently; the fitted temperature can only do better
    assert fixed.nll == pytest.approx(float(np.mean(np.logaddexp(0.0, -margins))), rel=1e-12)
    assert fitted.nll <= fixed.nll
    with pytest.raises(ValueError, match="temperature must be finite"):
        fixed_temperature(margins, 0.0)
