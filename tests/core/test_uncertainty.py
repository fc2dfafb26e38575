"""Bootstrap intervals of the calibration figures and the temperature's standard error, checked against
simulation: the intervals cover, the paired difference is tighter than the figures', and the standard
error the fit reports is the spread of temperatures fitted on fresh calibration splits."""

from __future__ import annotations

import numpy as np
import pytest

from calibrated_rlhf.core import metrics
from calibrated_rlhf.core.calibration import fit_temperature
from calibrated_rlhf.core.uncertainty import bootstrap_calibration, ece_of_resamples, temperature_precision


def split(rng: np.random.Generator, n: int, true_temperature: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Signed margins of ``n`` pairs labelled from ``sigmoid(margin / true_temperature)``, and the true
    P(chosen preferred) of each."""
    m = rng.normal(0.0, 3.0, n)
    p = 1.0 / (1.0 + np.exp(-m / true_temperature))
    chosen_first = rng.random(n) < p
    return np.where(chosen_first, m, -m), np.where(chosen_first, p, 1.0 - p)


def test_the_standard_error_is_the_spread_of_temperatures_over_fresh_splits():
    rng = np.random.default_rng(0)
    fits = [fit_temperature(split(rng, 300)[0]) for _ in range(300)]
    spread = np.std([f.temperature for f in fits], ddof=1)
    reported = np.median([f.std_error for f in fits])
    assert reported == pytest.approx(spread, rel=0.15)


def test_the_sufficient_size_brings_the_relative_error_to_the_target():
    rng = np.random.default_rng(1)
    small = fit_temperature(split(rng, 60)[0])
    precision = temperature_precision(small.temperature, small.std_error, small.n_pairs, target=0.05)
    assert not precision.enough and precision.sufficient_pairs > 60
    warning = precision.warning()
    assert "60 calibration pairs" in warning and f"about {precision.sufficient_pairs} pairs" in warning
    big = fit_temperature(split(rng, precision.sufficient_pairs)[0])
    at_size = temperature_precision(big.temperature, big.std_error, big.n_pairs, target=0.05)
    assert at_size.relative_std_error == pytest.approx(0.05, rel=0.15)
    large = fit_temperature(split(rng, 20000)[0])
    assert temperature_precision(large.temperature, large.std_error, large.n_pairs).warning() is None
    assert temperature_precision(1.0, None, 50) is None  # a fit at a bound has no standard error


def test_the_values_are_the_reports_figures_and_a_perfect_model_differs_from_the_oracle_by_nothing():
    rng = np.random.default_rng(2)
    margins, p_true = split(rng, 400)
    out = bootstrap_calibration(margins, 2.0, p_true, n_resamples=200)
    report = metrics.preference_report(margins, 2.0, p_true)
    assert out["ece"].value == pytest.approx(report["ece_equal_mass"], abs=1e-12)
    assert out["nll"].value == pytest.approx(report["nll"], abs=1e-12)
    assert out["brier"].value == pytest.approx(report["brier"], abs=1e-12)
    assert out["oracle_ece"].value == pytest.approx(report["oracle_ece"], abs=1e-12)
    assert out["oracle_nll"].value == pytest.approx(report["oracle_nll"], abs=1e-12)
    for figure in ("ece", "nll", "brier"):  # the model is the oracle here: every resample's difference is 0
        diff = out[f"{figure}_minus_oracle"]
        assert abs(diff.value) < 1e-12 and abs(diff.low) < 1e-12 and abs(diff.high) < 1e-12
        assert out[figure].low < out[figure].value < out[figure].high


def test_the_paired_difference_is_tighter_and_sees_a_miscalibrated_model():
    rng = np.random.default_rng(3)
    margins, p_true = split(rng, 600)
    out = bootstrap_calibration(margins, 4.0, p_true, n_resamples=400)  # T twice the true one: underconfident
    for figure in ("nll", "brier"):
        diff, oracle = out[f"{figure}_minus_oracle"], out[f"oracle_{figure}"]
        assert diff.low > 0  # worse than the oracle, and the interval says so
        assert diff.high - diff.low < 0.5 * (oracle.high - oracle.low)
    assert out["ece_minus_oracle"].low > 0


def test_the_intervals_cover_the_population_figure():
    rng = np.random.default_rng(4)
    covered = []
    for _ in range(60):
        margins, p_true = split(rng, 200)
        interval = bootstrap_calibration(margins, 2.0, None, n_resamples=200, seed=int(rng.integers(1 << 30)))["nll"]
        # the population NLL of the true model is the mean binary entropy, here estimated on 200k pairs
        covered.append(interval.contains(POPULATION_NLL))
    assert 0.85 <= np.mean(covered) <= 1.0


POPULATION_NLL = float(np.mean(metrics.binary_entropy(split(np.random.default_rng(99), 200_000)[1])))


@pytest.mark.parametrize("n", [2, 7, 300])
def test_the_resamples_ece_is_the_reports_ece_of_the_resampled_pairs(n):
    rng = np.random.default_rng(n)
    p = np.round(rng.random(n), 1)  # ties, as resamples are full of
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=40)
    for n_bins in (2, 15):
        expected = [metrics.ece(*metrics.symmetrize(np.repeat(p, c), np.ones(n)), n_bins) for c in counts]
        np.testing.assert_allclose(ece_of_resamples(p, counts, n_bins), expected, atol=1e-12)


def test_degenerate_inputs_fail_clearly():
    with pytest.raises(ValueError, match="at least 2 test pairs"):
        bootstrap_calibration([1.0], 1.0)
    with pytest.raises(ValueError, match="n_resamples must be >= 100"):
        bootstrap_calibration([1.0, -1.0], 1.0, n_resamples=10)
    with pytest.raises(ValueError, match="same shape"):
        bootstrap_calibration([1.0, -1.0], 1.0, [0.5])
