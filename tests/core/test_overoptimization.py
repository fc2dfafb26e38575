"""Best-of-n over a pool, exactly, and Gao et al.'s curve fits."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from calibrated_rlhf.core.overoptimization import bon_kl_bound, best_of_n, fit_curve, held_out_r2


def _brute_force(proxy: np.ndarray, gold: np.ndarray, n: int) -> tuple[float, float]:
    """Expected gold and KL of best-of-n by enumerating every draw of n pool members; a tie at the top is
    broken by picking one of the drawn responses that share it, uniformly."""
    m = len(proxy)
    chosen = np.zeros(m)
    for draw in itertools.product(range(m), repeat=n):
        top = max(proxy[i] for i in draw)
        winners = [i for i in draw if proxy[i] == top]
        for i in winners:
            chosen[i] += 1.0 / len(winners) / m**n
    kl = sum(p * math.log(p * m) for p in chosen if p > 0)
    return float(chosen @ gold), kl


def test_the_bound_is_zero_at_one_and_grows_like_log_n():
    assert bon_kl_bound(1) == 0.0
    assert bon_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert bon_kl_bound(1024) == pytest.approx(math.log(1024) - 1023 / 1024)
    with pytest.raises(ValueError, match="n >= 1"):
        bon_kl_bound(0)


@pytest.mark.parametrize("proxy", [[0.3, -1.0, 2.0, 0.5], [1.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 1.0]])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_exact_best_of_n_equals_enumerating_every_draw(proxy, n):
    proxy, gold = np.array(proxy), np.array([1.0, -2.0, 0.5, 3.0])
    got = best_of_n(proxy, gold, n)
    want_gold, want_kl = _brute_force(proxy, gold, n)
    assert got.gold == pytest.approx(want_gold, abs=1e-12)
    assert got.kl == pytest.approx(want_kl, abs=1e-12)
    assert got.proxy == pytest.approx(_brute_force(proxy, proxy, n)[0], abs=1e-12)


def test_best_of_one_is_the_reference_and_a_proxy_that_cannot_rank_buys_nothing():
    rng = np.random.default_rng(0)
    gold = rng.normal(size=50)
    one = best_of_n(rng.normal(size=50), gold, 1)
    assert one.kl == pytest.approx(0.0, abs=1e-12) and one.gold == pytest.approx(gold.mean())
    flat = best_of_n(np.zeros(50), gold, 16)  # every response ties: best-of-16 is the reference
    assert flat.kl == pytest.approx(0.0, abs=1e-12) and flat.gold == pytest.approx(gold.mean())


def test_measured_kl_stays_under_the_bound_and_approaches_it_as_the_pool_grows():
    rng = np.random.default_rng(1)
    for m in (64, 4096):
        proxy = rng.normal(size=m)
        for n in (1, 2, 4, 16, 64):
            assert best_of_n(proxy, proxy, n).kl <= bon_kl_bound(n) + 1e-12
    coarse = np.round(rng.normal(size=4096), 1)  # ties lower the KL further
    assert best_of_n(coarse, coarse, 64).kl < best_of_n(rng.normal(size=4096), coarse, 64).kl
    big = rng.normal(size=200_000)
    assert best_of_n(big, big, 16).kl == pytest.approx(bon_kl_bound(16), rel=2e-3)


def test_best_of_n_matches_sampling_it():
    """The exact expectation against drawing n responses and keeping the proxy's favourite, 20,000 times."""
    rng = np.random.default_rng(2)
    proxy, gold = rng.normal(size=30), rng.normal(size=30)
    draws = rng.integers(0, 30, size=(20_000, 8))
    picked = draws[np.arange(len(draws)), np.argmax(proxy[draws], axis=1)]
    assert best_of_n(proxy, gold, 8).gold == pytest.approx(gold[picked].mean(), abs=4 * gold.std() / math.sqrt(20_000))


def test_a_pool_smaller_than_n_or_of_another_shape_is_refused():
    with pytest.raises(ValueError, match="pool of at least 8"):
        best_of_n(np.zeros(4), np.zeros(4), 8)
    with pytest.raises(ValueError, match="one length"):
        best_of_n(np.zeros(4), np.zeros(5), 2)


@pytest.mark.parametrize(("form", "alpha", "beta", "peak"),
                         [("bon", 1.2, 0.3, 2.0), ("rl", 0.8, 0.4, math.exp(0.8 / 0.4 - 1))])
def test_fits_recover_the_coefficients_and_the_peak(form, alpha, beta, peak):
    d = np.linspace(0.1, 6.0, 25)
    g = np.log(d) if form == "rl" else d
    gain = d * (alpha - beta * g)
    fit = fit_curve(d, gain, form)
    assert (fit.alpha, fit.beta) == pytest.approx((alpha, beta), rel=1e-9)
    assert fit.d_peak == pytest.approx(peak, rel=1e-9) and fit.r2 == pytest.approx(1.0)
    noisy = gain + np.random.default_rng(3).normal(scale=0.05, size=len(d))
    fit = fit_curve(d, noisy, form)
    assert fit.alpha_ci[0] < alpha < fit.alpha_ci[1] and fit.beta_ci[0] < beta < fit.beta_ci[1]
    assert held_out_r2(d, noisy, form) > 0.95


def test_held_out_points_tell_the_forms_apart():
    """RL's form cannot bend like best-of-n's parabola over a wide range of d, and the held-out R^2 shows it."""
    d = np.linspace(0.2, 8.0, 30)
    parabola = d * (1.0 - 0.12 * d)
    assert held_out_r2(d, parabola, "bon") == pytest.approx(1.0)
    assert held_out_r2(d, parabola, "rl") < held_out_r2(d, parabola, "bon") - 0.01


def test_a_curve_that_never_turns_has_no_peak_and_too_few_points_are_refused():
    d = np.array([0.5, 1.0, 2.0, 3.0])
    assert fit_curve(d, d * (1.0 + 0.1 * d), "bon").d_peak == math.inf
    with pytest.raises(ValueError, match="at least 3 distinct"):
        fit_curve(np.array([0.0, 1.0, 1.0, 2.0]), np.zeros(4), "rl")
    with pytest.raises(ValueError, match="d >= 0"):
        fit_curve(np.array([-1.0, 1.0, 2.0]), np.zeros(3), "bon")
