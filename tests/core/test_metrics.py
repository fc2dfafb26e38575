"""Calibration metrics on hand-computed examples, binning behaviour, reports and figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.figure import Figure

from calibrated_rlhf.core import plots
from calibrated_rlhf.core.calibration import fit_temperature
from calibrated_rlhf.core.metrics import (
    accuracy,
    binary_entropy,
    brier,
    ece,
    nll,
    preference_probabilities,
    preference_reliability,
    preference_report,
    reliability_curve,
    sigmoid,
    symmetrize,
)

P = np.array([0.8, 0.4, 0.5, 0.3])
Y = np.array([1.0, 1.0, 0.0, 0.0])


# --------------------------------------------------------------------------------------------------
# Scalar metrics by hand


def test_nll_by_hand():
    expected = -(math.log(0.8) + math.log(0.4) + math.log(0.5) + math.log(0.7)) / 4
    assert nll(P, Y) == pytest.approx(expected, rel=1e-15)


def test_nll_of_a_certain_mistake_is_infinite():
    assert nll([0.0, 0.5], [1, 1]) == math.inf


def test_brier_by_hand():
    assert brier(P, Y) == pytest.approx((0.2**2 + 0.6**2 + 0.5**2 + 0.3**2) / 4, rel=1e-15)


def test_accuracy_counts_ties_as_half():
    # 0.8 -> 1 right, 0.4 -> 0 wrong, 0.5 tie, 0.3 -> 0 right.
    assert accuracy(P, Y) == pytest.approx(2.5 / 4)


def test_binary_entropy_by_hand():
    h = binary_entropy([0.0, 0.5, 1.0, 0.2])
    assert h[0] == 0.0 and h[2] == 0.0
    assert h[1] == pytest.approx(math.log(2.0))
    assert h[3] == pytest.approx(-(0.2 * math.log(0.2) + 0.8 * math.log(0.8)))


def test_symmetrize_adds_the_other_orientation_and_keeps_pair_metrics():
    p2, y2 = symmetrize(P, Y)
    np.testing.assert_allclose(p2, [0.8, 0.4, 0.5, 0.3, 0.2, 0.6, 0.5, 0.7], rtol=1e-15, atol=1e-16)
    np.testing.assert_array_equal(y2, [1, 1, 0, 0, 0, 0, 1, 1])
    assert nll(p2, y2) == pytest.approx(nll(P, Y))
    assert brier(p2, y2) == pytest.approx(brier(P, Y))
    assert accuracy(p2, y2) == pytest.approx(accuracy(P, Y))


def test_sigmoid_is_stable_in_both_tails():
    z = np.array([-800.0, -40.0, 0.0, 40.0, 800.0])
    p = sigmoid(z)
    assert np.all(np.isfinite(p))
    assert p[0] == 0.0 and p[2] == 0.5 and p[4] == 1.0
    assert p[1] == pytest.approx(math.exp(-40.0), rel=1e-12)  # full relative precision in the tail
    np.testing.assert_allclose(preference_probabilities([2.0, -2.0], 2.0), sigmoid([1.0, -1.0]))


@pytest.mark.parametrize(
    ("p", "y", "message"),
    [
        ([0.5, 1.2], [1, 0], r"probabilities in \[0, 1\]"),
        ([0.5, np.nan], [1, 0], "no NaN"),
        ([0.5, 0.5], [1, 2], "0 or 1"),
        ([0.5, 0.5], [1], "same shape"),
        ([], [], "at least one"),
    ],
)
def test_invalid_inputs(p, y, message):
    with pytest.raises(ValueError, match=message):
        brier(p, y)


# --------------------------------------------------------------------------------------------------
# Binning


def test_ece_by_hand_for_both_strategies():
    p = np.array([0.2, 0.2, 0.8, 0.8])
    y = np.array([0.0, 1.0, 1.0, 1.0])
    # Two groups: |0.2 - 0.5| and |0.8 - 1.0|, each with half the weight.
    assert ece(p, y, n_bins=5, strategy="equal_width") == pytest.approx(0.25)
    assert ece(p, y, n_bins=2, strategy="equal_mass") == pytest.approx(0.25)


def test_reliability_curve_fields():
    p = np.array([0.05, 0.1, 0.55, 0.6, 0.95])
    y = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    curve = reliability_curve(p, y, n_bins=4, strategy="equal_width")
    np.testing.assert_allclose(curve.edges, [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(curve.counts, [2, 0, 2, 1])
    np.testing.assert_allclose(curve.confidence[[0, 2, 3]], [0.075, 0.575, 0.95])
    np.testing.assert_allclose(curve.frequency[[0, 2, 3]], [0.5, 0.5, 1.0])
    assert np.isnan(curve.confidence[1]) and np.isnan(curve.frequency[1])
    assert curve.n == 5
    assert curve.ece == pytest.approx((2 * 0.425 + 2 * 0.075 + 0.05) / 5)


def test_a_value_on_an_inner_edge_goes_to_the_upper_bin():
    """The documented bin rule: bin i holds edges[i] <= p < edges[i + 1], the last bin closed."""
    # equal width, 4 bins: edges 0, .25, .5, .75, 1 (exact in binary), a value on each edge
    p = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    y = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    curve = reliability_curve(p, y, n_bins=4, strategy="equal_width")
    np.testing.assert_array_equal(curve.counts, [1, 1, 1, 2])
    np.testing.assert_allclose(curve.confidence, [0.0, 0.25, 0.5, 0.875])
    np.testing.assert_allclose(curve.frequency, [0.0, 1.0, 1.0, 0.5])
    # by hand: (|0 - 0| + |.25 - 1| + |.5 - 1| + 2 |.875 - .5|) / 5
    assert curve.ece == pytest.approx((0.0 + 0.75 + 0.5 + 2 * 0.375) / 5)
    # equal mass, 2 bins over 4 values: the inner edge is the 3rd smallest value, which opens the upper bin
    q = np.array([0.1, 0.3, 0.6, 0.9])
    mass = reliability_curve(q, np.array([0.0, 0.0, 1.0, 1.0]), n_bins=2, strategy="equal_mass")
    np.testing.assert_allclose(mass.edges, [0.1, 0.6, 0.9])
    np.testing.assert_array_equal(mass.counts, [2, 2])
    np.testing.assert_allclose(mass.confidence, [0.2, 0.75])


def test_equal_mass_bins_never_split_ties():
    p = np.full(100, 0.5)
    y = np.r_[np.ones(50), np.zeros(50)]
    curve = reliability_curve(p, y, n_bins=10)
    assert curve.counts.max() == 100 and curve.ece == 0.0
    # Same answer whatever the order of the tied items.
    assert reliability_curve(p, y[::-1], n_bins=10).ece == 0.0


def test_equal_mass_and_equal_width_differ_as_expected():
    # Anti-calibrated predictions that straddle 1/2 inside one equal-width bin ([0.467, 0.533)):
    # equal-width averages the errors away, equal-mass separates them.
    p = np.r_[np.full(500, 0.48), np.full(500, 0.52)]
    y = np.r_[np.ones(260), np.zeros(240), np.ones(240), np.zeros(260)]  # frequencies 0.52 and 0.48
    assert ece(p, y, n_bins=15, strategy="equal_width") == pytest.approx(0.0, abs=1e-12)
    assert ece(p, y, n_bins=15, strategy="equal_mass") == pytest.approx(0.04)
    # Predictions concentrated near 1/2: equal-width leaves most bins empty, equal-mass fills them evenly.
    q = np.random.default_rng(0).uniform(0.4, 0.6, 15_000)
    yq = (np.random.default_rng(1).random(q.size) < q).astype(float)
    assert np.count_nonzero(reliability_curve(q, yq, 15, "equal_width").counts) == 3  # [0.4, 0.6] is 3 bins
    counts = reliability_curve(q, yq, 15, "equal_mass").counts
    assert counts.min() == counts.max() == 1000


@pytest.mark.parametrize("strategy", ["equal_mass", "equal_width"])
def test_ece_of_a_perfectly_calibrated_large_sample_is_small(strategy):
    rng = np.random.default_rng(2)
    p = rng.random(200_000)
    y = (rng.random(p.size) < p).astype(float)
    assert ece(p, y, 15, strategy) < 0.005


def test_ece_of_an_overconfident_model_is_large():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, 50_000)
    y = (rng.random(z.size) < sigmoid(z)).astype(float)
    assert ece(*symmetrize(sigmoid(3 * z), y)) > 0.1


def test_unknown_strategy_and_bins():
    with pytest.raises(ValueError, match="strategy"):
        ece(P, Y, strategy="quantile")
    with pytest.raises(ValueError, match="n_bins"):
        ece(P, Y, n_bins=0)


# --------------------------------------------------------------------------------------------------
# Reports on margins


def synthetic_pairs(n: int, seed: int, true_temperature: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """chosen - rejected margins and the true P(chosen preferred)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    prefers_a = rng.random(n) < sigmoid(z)
    margins = np.where(prefers_a, true_temperature * z, -true_temperature * z)
    true_prob = np.where(prefers_a, sigmoid(z), 1.0 - sigmoid(z))
    return margins, true_prob


def test_report_keys_and_values():
    margins, true_prob = synthetic_pairs(20_000, seed=4)
    report = preference_report(margins, 2.0, true_prob)
    assert set(report) == {
        "nll", "brier", "ece_equal_mass", "ece_equal_width", "accuracy",
        "bayes_nll", "oracle_nll", "oracle_ece", "oracle_ece_equal_width", "bayes_accuracy",
    }  # fmt: skip
    p = sigmoid(margins / 2.0)
    ones = np.ones_like(p)
    assert report["brier"] == pytest.approx(brier(p, ones))
    assert report["accuracy"] == pytest.approx(np.mean(margins > 0))
    assert report["nll"] == pytest.approx(nll(p, ones), rel=1e-9)
    assert report["ece_equal_mass"] == pytest.approx(ece(*symmetrize(p, ones)))
    assert report["bayes_nll"] == pytest.approx(np.mean(binary_entropy(true_prob)))
    assert report["bayes_accuracy"] == pytest.approx(np.mean(np.maximum(true_prob, 1 - true_prob)))
    assert report["oracle_ece"] == pytest.approx(ece(*symmetrize(true_prob, ones)))
    assert set(preference_report(margins, 2.0)) == {"nll", "brier", "ece_equal_mass", "ece_equal_width", "accuracy"}


def test_calibration_brings_the_model_to_the_noise_floor():
    margins, true_prob = synthetic_pairs(20_000, seed=5)
    fit = fit_temperature(margins)
    before = preference_report(margins, 1.0, true_prob)
    after = preference_report(margins, fit.temperature, true_prob)
    assert after["nll"] == pytest.approx(fit.nll, rel=1e-12)
    assert after["nll"] < before["nll"]
    assert before["ece_equal_mass"] > 0.1
    assert after["ece_equal_mass"] < 2.5 * after["oracle_ece"] + 0.005
    # The margins here are exactly the true logits times 2.5, so the ranking (accuracy) is Bayes-optimal.
    assert after["accuracy"] == before["accuracy"]
    assert abs(after["nll"] - after["bayes_nll"]) < 0.02


def test_report_does_not_depend_on_pair_orientation():
    margins, true_prob = synthetic_pairs(5_000, seed=6)
    flip = np.random.default_rng(7).random(margins.size) < 0.5
    labels = np.where(flip, 0.0, 1.0)
    oriented = preference_report(np.where(flip, -margins, margins), 1.7, np.where(flip, 1 - true_prob, true_prob), labels=labels)
    reference = preference_report(margins, 1.7, true_prob)
    for key, value in reference.items():
        assert oriented[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_report_validates_true_prob():
    with pytest.raises(ValueError, match="true_prob"):
        preference_report(np.ones(5), 1.0, np.full(5, 1.5))
    with pytest.raises(ValueError, match="same shape"):
        preference_report(np.ones(5), 1.0, np.full(4, 0.5))


# --------------------------------------------------------------------------------------------------
# Figures


def test_figures_render_to_png(tmp_path):
    margins, _ = synthetic_pairs(3_000, seed=8)
    fit = fit_temperature(margins)
    rng = np.random.default_rng(9)
    raw = rng.normal(3.0, 2.0, 2_000)
    figures = {
        "reliability": plots.reliability_diagram(
            {
                "before (T=1)": preference_reliability(margins, 1.0),
                f"after (T={fit.temperature:.2f})": preference_reliability(margins, fit.temperature),
            }
        ),
        "margins": plots.margin_histograms(margins, margins / fit.temperature),
        "rewards": plots.reward_distributions(raw, raw / fit.temperature, (raw / fit.temperature - 1.0) / 0.8),
    }
    for name, fig in figures.items():
        assert isinstance(fig, Figure)
        path = tmp_path / f"{name}.png"
        fig.savefig(path)
        assert path.stat().st_size > 1000


def test_reliability_diagram_needs_a_curve():
    with pytest.raises(ValueError, match="at least one"):
        plots.reliability_diagram({})
