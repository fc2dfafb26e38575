"""The temperature fit against an independent optimizer: its root, its cost, its standard error, its bounds."""

import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from calibrated_rlhf.core.calibration import CalibrationWarning, fit_temperature, fixed_temperature, preference_nll


def _logistic_margins(n, true_t, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.normal(scale=3.0, size=n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-m / true_t))).astype(np.int64)
    return m, labels


def _nll(m, labels, t):
    x = np.where(labels == 1, m, -m)
    return float(np.mean(np.logaddexp(0.0, -x / t)))


def test_fit_is_the_likelihood_optimum_found_in_few_newton_steps():
    m, labels = _logistic_margins(4000, 2.0)
    fit = fit_temperature(m, labels)
    ref = minimize_scalar(lambda t: _nll(m, labels, t), bounds=(0.05, 50), method="bounded",
                          options={"xatol": 1e-10})
    assert fit.temperature == pytest.approx(ref.x, rel=1e-6)
    assert fit.nll == pytest.approx(_nll(m, labels, fit.temperature), rel=1e-12)
    assert fit.converged and fit.at_bound is False and fit.warning is None
    assert fit.n_pairs == 4000 and fit.n_subsample_iter == 0
    # safeguarded Newton from the IRLS start: quadratic convergence, a handful of evaluations
    assert fit.n_iter <= 12


def _scipy_temperature(m, labels, lo=1e-4, hi=1e4):
    # bounded search over log T: an independent optimizer on the same likelihood
    res = minimize_scalar(lambda u: _nll(m, labels, math.exp(u)), bounds=(math.log(lo), math.log(hi)),
                          method="bounded", options={"xatol": 1e-12})
    return math.exp(res.x)


@pytest.mark.parametrize("true_t, n, max_evals", [(0.05, 4000, 20), (1.0, 200, 12), (50.0, 4000, 8),
                                                  (2.0, 30, 12)])
def test_fit_finds_the_optimum_across_scales(true_t, n, max_evals):
    m, labels = _logistic_margins(n, true_t, seed=2)
    fit = fit_temperature(m, labels)
    assert fit.temperature == pytest.approx(_scipy_temperature(m, labels), rel=1e-5)
    assert fit.converged and not fit.at_bound
    assert 1 <= fit.n_iter <= max_evals


def test_fit_is_scale_equivariant_and_label_folding_is_a_sign_flip():
    m, labels = _logistic_margins(1000, 1.5, seed=3)
    base = fit_temperature(m, labels)
    assert fit_temperature(8.0 * m, labels).temperature == pytest.approx(8.0 * base.temperature, rel=1e-9)
    signed = np.where(labels == 1, m, -m)
    assert fit_temperature(signed).temperature == pytest.approx(base.temperature, rel=1e-12)
    assert fit_temperature(signed.astype(np.float32)).temperature == pytest.approx(
        fit_temperature(signed.astype(np.float32).astype(np.float64)).temperature, rel=1e-12)
    assert fit_temperature(m, labels.astype(bool)).temperature == base.temperature


def test_standard_error_is_the_inverse_root_of_the_curvature_in_temperature():
    m, labels = _logistic_margins(3000, 2.0, seed=4)
    fit = fit_temperature(m, labels)
    t, h = fit.temperature, 1e-3 * fit.temperature
    total = lambda tt: len(m) * _nll(m, labels, tt)  # noqa: E731
    curvature = (total(t + h) - 2 * total(t) + total(t - h)) / h**2
    assert fit.std_error == pytest.approx(1 / math.sqrt(curvature), rel=1e-3)


def test_a_capped_fit_reports_that_it_did_not_converge():
    m, labels = _logistic_margins(1000, 2.0, seed=5)
    fit = fit_temperature(m, labels, max_iter=2)
    assert not fit.converged and fit.n_iter == 2
    assert fit.temperature != pytest.approx(fit_temperature(m, labels).temperature, rel=1e-6)
    full = fit_temperature(m, labels)
    # max_iter counts evaluations exactly: the full fit's own count is enough, one fewer is not
    assert fit_temperature(m, labels, max_iter=full.n_iter).converged
    assert not fit_temperature(m, labels, max_iter=full.n_iter - 1).converged
    loose = fit_temperature(m, labels, rtol=0.5)
    assert loose.converged and loose.n_iter < fit_temperature(m, labels).n_iter


def test_a_large_input_is_warm_started_on_a_subsample_and_reaches_the_same_optimum():
    m, labels = _logistic_margins(1 << 19, 2.0, seed=6)
    fit = fit_temperature(m, labels)
    assert fit.n_subsample_iter > 0 and fit.n_iter <= 4  # the full data only polishes the warm start
    signed = np.where(labels == 1, m, -m)
    # on a sorted input the strided sample still spans the data, and the root is the same
    assert fit_temperature(np.sort(signed)).temperature == pytest.approx(fit.temperature, rel=1e-9)
    assert fit.temperature == pytest.approx(_scipy_temperature(m, labels), rel=1e-5)
    small = fit_temperature(m[:5000], labels[:5000])
    assert small.n_subsample_iter == 0


def test_nearly_separable_pairs_stop_at_the_lower_bound_with_a_warning():
    m = np.concatenate([np.linspace(1.0, 5.0, 50), [-1e-3]])  # optimum near T = 0.09
    assert _scipy_temperature(m, np.ones(51, dtype=int), lo=1e-3) < 0.5
    with pytest.warns(CalibrationWarning, match="below the lower bound t_min=0.5"):
        fit = fit_temperature(m, bounds=(0.5, 100.0))
    assert fit.at_bound and fit.temperature == 0.5 and fit.std_error is None and fit.converged
    assert fit.bounds == (0.5, 100.0) and fit.n_iter >= 1
    assert "nearly separable" in fit.warning
    assert fit.nll == pytest.approx(_nll(m, np.ones_like(m, dtype=int), 0.5), rel=1e-12)


def test_margins_no_better_than_chance_stop_at_the_upper_bound():
    m = np.array([1.0, -2.0] * 10)  # the right order on half the pairs, by less than the wrong one
    labels = np.ones(20, dtype=int)
    with pytest.warns(CalibrationWarning, match="no better than chance at any temperature up to t_max=1000"):
        fit = fit_temperature(m, labels, bounds=(1e-3, 1e3))
    assert fit.at_bound and fit.temperature == 1e3 and fit.std_error is None and fit.n_iter >= 1
    assert fit.n_subsample_iter == 0 and fit.n_pairs == 20
    assert fit.nll == pytest.approx(_nll(m, labels, 1e3), rel=1e-12)


def test_separable_pairs_return_the_lower_bound():
    with pytest.warns(CalibrationWarning, match="perfectly separable"):
        fit = fit_temperature(np.array([0.0, 1.0, 2.0, 0.5] * 3), bounds=(0.5, 2.0))
    assert fit.temperature == 0.5 and fit.at_bound and fit.n_iter == 0 and fit.n_pairs == 12
    assert fit.n_subsample_iter == 0 and fit.bounds == (0.5, 2.0)
    with pytest.warns(CalibrationWarning):
        narrow = fit_temperature(np.array([1.0, 2.0] * 6), bounds=(0.5, 0.9))
    assert narrow.temperature == 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"bounds": (0.0, 1.0)}, r"^bounds must satisfy 0 < t_min < t_max < inf, got \(0\.0, 1\.0\)$"),
    ({"bounds": (2.0, 1.0)}, r"bounds must satisfy"),
    ({"bounds": (1.0, math.inf)}, r"bounds must satisfy"),
    ({"min_pairs": 0}, r"^min_pairs must be >= 1, got 0$"),
    ({"rtol": 0.0}, r"^need 0 < rtol < 1 and max_iter >= 1, got rtol=0\.0, max_iter=100$"),
    ({"rtol": 1.0}, r"need 0 < rtol < 1"),
    ({"max_iter": 0}, r"^need 0 < rtol < 1 and max_iter >= 1, got rtol=1e-08, max_iter=0$"),
    ({"min_pairs": 41}, r"^too few pairs to fit a temperature: got 40, need at least min_pairs=41$"),
])
def test_bad_settings_are_refused(kwargs, message):
    m, labels = _logistic_margins(40, 1.0)
    with pytest.raises(ValueError, match=message):
        fit_temperature(m, labels, **kwargs)
    if "min_pairs" in kwargs and kwargs["min_pairs"] == 41:
        assert fit_temperature(m, labels, min_pairs=40).n_pairs == 40


@pytest.mark.parametrize("margins, labels, message", [
    (np.zeros((3, 4)), None, r"^margins must be a 1-D array, got shape \(3, 4\)$"),
    (np.array(["a"] * 12), None, r"^margins must be numeric, got dtype <U1$"),
    (np.array([1.0, np.nan, 2.0, np.inf] + [1.0] * 8), None,
     r"^margins contain 2 non-finite values \(NaN or inf\) \(first indices: \[1, 3\]\)$"),
    (np.full(12, np.nan), None, r"\(first indices: \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \.\.\.\]\)$"),
    (np.full(11, np.nan), None, r"^margins contain 11 non-finite .*\[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \.\.\.\]\)$"),
    (np.full(10, np.nan), None, r"^margins contain 10 non-finite .*\[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\]\)$"),
    (np.ones(12), np.ones(11), r"^labels must have the same shape as margins: \(11,\) != \(12,\)$"),
    (np.ones(12), np.array(["1"] * 12), r"^labels must be numeric or bool, got dtype <U1$"),
    (np.ones(12), np.array([1, 0, 2, 1, 1, 1, 1, 1, 1, 1, -1, 1]),
     r"^labels must be 0 or 1; found 2 other values \(first indices: \[2, 10\]\)$"),
    (np.zeros(12), None, r"^all margins are 0"),
    (-np.arange(12.0), None, r"^every pair with a nonzero margin is ordered against its label"),
    (np.array([1e301] + [-1.0] * 11), None, r"^\|margins\| must be <= 1e\+300, got 1e\+301$"),
])
def test_bad_margins_and_labels_are_refused_naming_the_offenders(margins, labels, message):
    with pytest.raises(ValueError, match=message):
        fit_temperature(margins, labels)


def test_integer_and_tensor_margins_are_accepted():
    import torch
    m, labels = _logistic_margins(500, 1.0, seed=8)
    ints = np.round(m * 4).astype(np.int64)
    assert fit_temperature(ints, labels).temperature == pytest.approx(
        fit_temperature(ints.astype(np.float64), labels).temperature, rel=1e-12)
    half = m.astype(np.float16)
    assert fit_temperature(half, labels).temperature == pytest.approx(
        fit_temperature(half.astype(np.float64), labels).temperature, rel=1e-12)
    assert fit_temperature(torch.tensor(m), torch.tensor(labels)).temperature == pytest.approx(
        fit_temperature(m, labels).temperature, rel=1e-12)


def test_preference_nll_and_fixed_temperature_are_the_mean_cross_entropy():
    m, labels = _logistic_margins(300, 1.0, seed=9)
    assert preference_nll(m, 2.0, labels) == pytest.approx(_nll(m, labels, 2.0), rel=1e-12)
    assert preference_nll(np.array([0.0]), 3.0) == pytest.approx(math.log(2.0))
    assert preference_nll(np.array([-800.0]), 1.0) == pytest.approx(800.0)  # a confident mistake is finite
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be positive and finite"):
            preference_nll(m, bad, labels)
    with pytest.raises(ValueError, match="^preference_nll needs at least one pair$"):
        preference_nll(np.array([]), 1.0)
    fixed = fixed_temperature(m, 2.0)
    assert fixed.temperature == 2.0 and fixed.bounds == (2.0, 2.0) and fixed.n_pairs == 300
    assert (fixed.n_iter, fixed.at_bound, fixed.warning, fixed.std_error, fixed.converged,
            fixed.n_subsample_iter) == (0, False, None, None, True, 0)
    assert fixed.nll == pytest.approx(_nll(m, np.ones(300, dtype=int), 2.0), rel=1e-12)
    assert fixed_temperature(m).temperature == 1.0
    for bad in (0.0, math.inf):
        with pytest.raises(ValueError, match=r"^temperature must be finite and > 0, got"):
            fixed_temperature(m, bad)


def test_fit_record_serializes_with_bounds_as_a_list():
    m, labels = _logistic_margins(100, 1.0)
    d = fit_temperature(m, labels).to_dict()
    assert isinstance(d["bounds"], list) and d["bounds"] == [1e-4, 1e4]
    assert set(d) == {"temperature", "nll", "n_pairs", "n_iter", "at_bound", "warning", "std_error", "converged",
                      "n_subsample_iter", "bounds"}


@pytest.mark.parametrize("curvature", ["exact", "none", "tiny"])
@pytest.mark.parametrize("root", [3e-4, 0.7, 2.5e3])
def test_the_safeguarded_newton_solver_brackets_and_bisects_when_newton_steps_fail(curvature, root):
    """The solver's contract on any monotone gradient: a root inside the bounds is found to rtol, whatever the
    curvature estimate (exact, missing or far too small); Newton steps that leave the bracket or
    stall fall back to jumps to the bounds and geometric bisection."""
    from calibrated_rlhf.core.calibration import _solve_inv_temperature

    scale = {"exact": 1.0, "none": 0.0, "tiny": 1e-6}[curvature]

    def sums(b):  # A > 0 below the root (the optimum lies above), B the curvature estimate Newton divides by
        return math.log(root / b), scale * 1.0

    sol = _solve_inv_temperature(sums, 1e-4, 1e-4, 1e4, rtol=1e-10, max_iter=200)
    assert sol.bound is None and sol.converged
    assert sol.inv_temperature == pytest.approx(root, rel=1e-8)


def test_the_solver_reports_a_root_beyond_either_bound():
    from calibrated_rlhf.core.calibration import _solve_inv_temperature

    up = _solve_inv_temperature(lambda b: (math.log(1e5 / b), 1.0), 1e-4, 1e-4, 1e4, rtol=1e-10, max_iter=200)
    assert (up.bound, up.inv_temperature) == ("inv_temperature_max", 1e4)
    down = _solve_inv_temperature(lambda b: (math.log(1e-5 / b), 1.0), 1.0, 1e-4, 1e4, rtol=1e-10, max_iter=200)
    assert (down.bound, down.inv_temperature) == ("inv_temperature_min", 1e-4)
