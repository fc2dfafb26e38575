"""The fitted warning (core.fitted_warning): its features, labels, solver, and the stop rule it makes."""

from __future__ import annotations

import numpy as np
import pytest

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core.fitted_warning import (FEATURES, FLOOR, RELATIVE, SIGNAL_KEYS, SIGNALS, FittedWarning,
                                                 features, fit_logistic, fit_warning, labels, read_fitted_warning)

WINDOW, BASE = 5, 4


def run(n: int = 40, turn: int | None = None) -> dict[str, np.ndarray]:
    """Raw per-update series: every signal flat, except that from ``turn`` on the KL and the length climb."""
    steps = np.arange(n, dtype=float)
    climb = np.maximum(steps - turn, 0.0) if turn is not None else 0.0 * steps
    return {"kl": 1.0 + climb, "proxy": 0.5 + 0.0 * steps, "entropy": 2.0 + 0.0 * steps,
            "repeated_words": 0.1 + 0.0 * steps, "repetition_surprisal": 0.3 + 0.0 * steps,
            "response_length": 6.0 + climb}


def test_features_are_trailing_means_the_relative_ones_as_log_ratios_to_their_base_with_the_settings():
    series = run()
    series["entropy"] = np.linspace(2.0, 1.0, 40)
    x = features(series, "ppo", 8.0, WINDOW, BASE)
    assert x.shape == (40, len(FEATURES)) and np.isnan(x[:BASE]).all()
    col = dict(zip(FEATURES, x.T))
    smoothed = np.mean(series["entropy"][35:40])
    base = np.mean(series["entropy"][:5])  # the trailing mean at update BASE averages the first WINDOW batches
    assert col["entropy"][39] == pytest.approx(np.log(smoothed / base))
    assert col["log_kl"][39] == pytest.approx(np.log1p(1.0)) and col["proxy"][39] == pytest.approx(0.5)
    assert col["repeated_words"][BASE] == pytest.approx(0.0)  # a flat signal: its log ratio is 0 from its base on
    assert (col["ppo"][BASE:] == 1.0).all() and col["log_kl_target"][BASE:] == pytest.approx(np.log(8.0))
    assert (dict(zip(FEATURES, features(series, "rloo", 8.0, WINDOW, BASE).T))["ppo"][BASE:] == 0.0).all()
    # a signal at 0 at its base (no word repeated yet): the floor keeps its log ratio finite, 0 while it stays there
    series["repeated_words"] = np.where(np.arange(40) < 30, 0.0, 0.2)
    rep = dict(zip(FEATURES, features(series, "ppo", 8.0, WINDOW, BASE).T))["repeated_words"]
    assert (rep[BASE:30] == 0.0).all() and rep[39] == pytest.approx(np.log(0.2 / FLOOR))
    with pytest.raises(ValueError, match="kl_target"):
        features(series, "ppo", 0.0, WINDOW, BASE)


def test_labels_mark_a_turning_run_from_just_before_its_peak_and_leave_a_gap_before_that():
    y = labels(20, peak=12, over_optimized=True, base=2, margin=3)
    assert np.isnan(y[:2]).all() and (y[2:6] == 0).all() and np.isnan(y[6:9]).all() and (y[9:] == 1).all()
    safe = labels(20, peak=12, over_optimized=False, base=2, margin=3)
    assert np.isnan(safe[:2]).all() and (safe[2:] == 0).all()
    early = labels(20, peak=1, over_optimized=True, base=2, margin=3)  # a peak before the base: all positive after
    assert np.isnan(early[:2]).all() and (early[2:] == 1).all()


def test_the_solver_recovers_known_weights_and_refuses_one_class():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 2))
    p = 1 / (1 + np.exp(-(x @ np.array([1.5, -0.5]) + 0.3)))
    y = (rng.random(20000) < p).astype(float)
    w, b = fit_logistic(x, y, l2=1.0)
    assert w == pytest.approx([1.5, -0.5], abs=0.06) and b == pytest.approx(0.3, abs=0.05)
    # separable classes: the penalty keeps the weights finite, and more penalty shrinks them
    sep = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    w1, _ = fit_logistic(sep, np.array([0, 0, 1, 1.0]), l2=1.0)
    w10, _ = fit_logistic(sep, np.array([0, 0, 1, 1.0]), l2=10.0)
    assert np.isfinite(w1).all() and 0 < w10[0] < w1[0]
    with pytest.raises(ValueError, match="both kinds"):
        fit_logistic(x, np.zeros(len(x)))


def fitted(turn_at: int = 20) -> FittedWarning:
    """Fitted on two turning runs (KL and length climbing from ``turn_at``, the gold peaking there) and two safe."""
    data = []
    for over in (True, False, True, False):
        series = run(turn=turn_at if over else None)
        data.append((features(series, "ppo", 8.0, WINDOW, BASE), labels(40, turn_at, over, BASE)))
    return fit_warning(data, window=WINDOW, base=BASE)


def first_above(warning: FittedWarning, series: dict[str, np.ndarray], method: str = "ppo") -> int | None:
    with np.errstate(invalid="ignore"):
        hits = np.flatnonzero(warning.scores(series, method, 8.0) > warning.threshold)
    return int(hits[0]) if len(hits) else None


def test_a_fitted_warning_scores_the_turning_run_above_the_safe_one_and_round_trips(tmp_path):
    warning = fitted()
    fired = first_above(warning, run(turn=20))
    assert fired is not None and 20 <= fired <= 24  # the trailing means see the climb within a window
    assert first_above(warning, run()) is None
    path = tmp_path / "w.json"
    warning.save(path)
    again = FittedWarning.load(path)
    assert again == warning
    np.testing.assert_allclose(again.scores(run(turn=20), "ppo", 8.0), warning.scores(run(turn=20), "ppo", 8.0))
    # a config reads the file once, when it is built, and keeps the warning itself
    assert read_fitted_warning(str(path)) == warning.to_dict() == read_fitted_warning(warning.to_dict())
    assert read_fitted_warning(None) is None


def test_the_stop_rule_reads_a_stages_records_under_its_keys_and_never_fires_on_what_is_missing():
    warning = fitted()
    series = run(turn=20)
    for stage, method in (("ppo", "ppo"), ("rl", "rloo")):
        names = SIGNAL_KEYS[stage]
        records = [{names[s]: float(series[s][i]) for s in SIGNALS} for i in range(40)]
        reasons = [warning.stop_reason(records[:i + 1], method, 8.0) for i in range(40)]
        first = next(i for i, r in enumerate(reasons) if r is not None)
        want = first_above(warning, series, method)
        assert first == want and f"at update {first + 1}" in reasons[first]
        assert "exceeds its threshold" in reasons[first]
    # a signal never logged (say, the entropy under another key) would leave every score NaN, a rule that cannot
    # fire: refused by name at the first update
    full = [{SIGNAL_KEYS["ppo"][s]: float(series[s][i]) for s in SIGNALS} for i in range(40)]
    records = [{k: v for k, v in r.items() if k != keys.PPO_POLICY_ENTROPY} for r in full]
    with pytest.raises(ValueError, match=keys.PPO_POLICY_ENTROPY):
        warning.stop_reason(records[:1], "ppo", 8.0)
    # one logged but blank at the base leaves its log ratio NaN for good: refused when the base is reached
    blank = [{**r, keys.PPO_POLICY_ENTROPY: float("nan")} if i <= BASE else r for i, r in enumerate(full)]
    assert all(warning.stop_reason(blank[:i + 1], "ppo", 8.0) is None for i in range(BASE))
    with pytest.raises(ValueError, match=f"entropy had no value at update {BASE + 1}"):
        warning.stop_reason(blank[:BASE + 1], "ppo", 8.0)
    assert warning.stop_reason([], "ppo", 8.0) is None


def test_a_bad_file_and_a_warning_of_other_features_are_refused_by_name(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        FittedWarning.load(bad)
    with pytest.raises(ValueError, match="missing.json"):
        FittedWarning.load(tmp_path / "missing.json")
    n = len(FEATURES)
    with pytest.raises(ValueError, match="fit it again"):
        FittedWarning((0.0,) * n, (1.0,) * n, (0.0,) * n, 0.0, feature_names=FEATURES[:-1] + ("other",))
    assert set(RELATIVE) < set(FEATURES)
    # a trainer config reads the file when it is built: a bad one stops the stage before any training
    from calibrated_rlhf.core.ppo.config import PPOConfig
    from calibrated_rlhf.core.rl.config import RLConfig

    for config in (PPOConfig, RLConfig):
        with pytest.raises(ValueError, match="broken.json"):
            config(fitted_warning=str(bad))
