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
    assert fit.converged and not fit.at_bound and fit.warning is None
    assert fit.n_pairs == 4000 and fit.n_subsample_iter == 0
    # safeguarded Newton from the IRLS start: quadratic convergence, a handful of evaluations
    assert fit.n_iter <= 12
