"""Nodes of ``calibration``: thin adapters over ``calibrated_rlhf.core.calibration`` and ``metrics``."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import Field

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core import metrics, plots
from calibrated_rlhf.core.calibration import fit_temperature, fixed_temperature
from calibrated_rlhf.core.uncertainty import bootstrap_calibration, temperature_precision
from calibrated_rlhf.pipelines.metrics import as_metrics
from calibrated_rlhf.pipelines.params import StrictParams

log = logging.getLogger(__name__)


class CalibrationParams(StrictParams):
    """How the temperature is fitted."""

    enabled: bool = Field(True, description="false keeps T = 1 (the uncalibrated baseline of the scenarios).")
    min_pairs: int = Field(10, ge=2, description="Fewer calibration pairs than this is an error.")
    min_temperature: float = Field(1e-3, gt=0)
    max_temperature: float = Field(1e3, gt=0)
    n_bins: int = Field(15, ge=2, description="Bins of the ECEs and the reliability diagram.")
    n_bootstrap: int = Field(1000, ge=100, description="Resamples of the test pairs behind the intervals of ECE, "
                             "NLL and Brier (the oracle's on the same resamples, and the paired difference).")
    interval_level: float = Field(0.95, gt=0, lt=1, description="Coverage of those intervals.")
    max_temperature_rel_std_error: float = Field(
        0.05, gt=0, description="A warning, with the calibration size that would be enough, when the "
        "temperature's standard error is over this fraction of it.")


def _margins(scores: pd.DataFrame) -> np.ndarray:
    return (scores["reward_chosen"] - scores["reward_rejected"]).to_numpy(dtype=np.float64)


def fit_calibration(calibration_scores: pd.DataFrame, params: CalibrationParams) -> dict[str, Any]:
    """The maximum-likelihood temperature on the held-out calibration pairs (exact, float64); with
    calibration off, T = 1 in the same record (``enabled`` says which)."""
    margins = _margins(calibration_scores)
    if not params.enabled:
        return {**fixed_temperature(margins, 1.0).to_dict(), "enabled": False}
    fit = fit_temperature(margins, min_pairs=params.min_pairs, bounds=(params.min_temperature, params.max_temperature))
    if fit.warning:
        log.warning("temperature fit: %s", fit.warning)
    log.info("temperature %.4f on %d calibration pairs", fit.temperature, fit.n_pairs)
    precision = temperature_precision(fit.temperature, fit.std_error, fit.n_pairs,
                                      params.max_temperature_rel_std_error)
    if precision is None:
        return {**fit.to_dict(), "enabled": True}
    if precision.warning():
        log.warning("calibration split too small: %s", precision.warning())
    return {**fit.to_dict(), "enabled": True, "relative_std_error": precision.relative_std_error,
            "sufficient_pairs": precision.sufficient_pairs}


def recovered_scale(margins: np.ndarray, gold_diff: np.ndarray, temperature: float) -> float:
    """Least-squares slope of calibrated margins on gold-reward differences (through the origin).

    On the synthetic task the true model is p = sigmoid(scale * gold_diff), so a calibrated reward
    model should show a slope near ``scale``; noise in the learned rewards pulls it below.
    """
    return float(np.dot(margins / temperature, gold_diff) / np.dot(gold_diff, gold_diff))


def interval_metrics(margins: np.ndarray, temperature: float, true_prob: np.ndarray | None,
                     params: CalibrationParams) -> dict[str, float]:
    """Bootstrap intervals of the after-calibration test figures; with true probabilities, the oracle's
    figures on the same resamples and the paired difference model - oracle."""
    intervals = bootstrap_calibration(margins, temperature, true_prob, n_bins=params.n_bins,
                                      n_resamples=params.n_bootstrap, level=params.interval_level)
    values: dict[str, float] = {}
    for name, interval in intervals.items():
        # the model's own figure is logged as test_<figure>_after; its interval is named the same way
        key = f"{name}_after" if name in ("ece", "nll", "brier") else name
        values[keys.calibration_interval(key, "low")] = interval.low
        values[keys.calibration_interval(key, "high")] = interval.high
        if key != f"{name}_after":
            values[keys.calibration_interval(key, "value")] = interval.value
    if true_prob is not None:
        log.info("test ECE after calibration minus the oracle's: %.4f [%.4f, %.4f]",
                 *(getattr(intervals["ece_minus_oracle"], a) for a in ("value", "low", "high")))
    return values


def report_calibration(
    test_scores: pd.DataFrame,
    test_pairs: pd.DataFrame,
    temperature_fit: dict[str, Any],
    synthetic_task: dict[str, Any],
    params: CalibrationParams,
) -> tuple[dict[str, dict[str, float]], Figure, Figure]:
    """Test-split NLL, Brier, ECE and accuracy before (T = 1) and after; reliability diagram; margins."""
    margins = _margins(test_scores)
    temperature = float(temperature_fit["temperature"])
    true_prob = test_scores["true_prob"].to_numpy() if "true_prob" in test_scores.columns else None
    before = metrics.preference_report(margins, 1.0, true_prob, n_bins=params.n_bins)
    after = metrics.preference_report(margins, temperature, true_prob, n_bins=params.n_bins)
    values = {keys.CALIBRATION_TEMPERATURE: temperature, keys.CALIBRATION_N_PAIRS: temperature_fit["n_pairs"]}
    for name, key in (("nll", "nll"), ("ece", "ece_equal_mass"), ("ece_equal_width", "ece_equal_width"),
                      ("brier", "brier"), ("accuracy", "accuracy")):
        values[keys.calibration_test(name, "before")] = before[key]
        values[keys.calibration_test(name, "after")] = after[key]
    if temperature_fit.get("std_error") is not None:
        values[keys.CALIBRATION_TEMPERATURE_STD_ERROR] = temperature_fit["std_error"]
    if true_prob is not None:
        values[keys.CALIBRATION_TEST_BAYES_NLL] = after["bayes_nll"]
        values[keys.CALIBRATION_TEST_ORACLE_ECE] = after["oracle_ece"]
        values[keys.CALIBRATION_TEST_NLL_GAP_TO_BAYES] = after["nll"] - after["bayes_nll"]
    if "relative_std_error" in temperature_fit:
        values[keys.CALIBRATION_TEMPERATURE_REL_STD_ERROR] = temperature_fit["relative_std_error"]
        values[keys.CALIBRATION_SUFFICIENT_PAIRS] = temperature_fit["sufficient_pairs"]
    values |= interval_metrics(margins, temperature, true_prob, params)
    if synthetic_task and {"gold_chosen", "gold_rejected"} <= set(test_pairs.columns):
        gold = test_pairs.set_index("pair_id").loc[test_scores["pair_id"]]
        gold_diff = (gold["gold_chosen"] - gold["gold_rejected"]).to_numpy(dtype=np.float64)
        values[keys.CALIBRATION_TRUE_SCALE] = float(synthetic_task["scale"])
        values[keys.CALIBRATION_RECOVERED_SCALE] = recovered_scale(margins, gold_diff, temperature)
    log.info("calibration on test: %s", {k: round(v, 4) for k, v in values.items()})

    curves = {
        "before (T = 1)": metrics.preference_reliability(margins, 1.0, n_bins=params.n_bins),
        f"after (T = {temperature:.3g})": metrics.preference_reliability(margins, temperature, n_bins=params.n_bins),
    }
    if true_prob is not None:
        # The true probabilities' own curve: the best any model can look on these finite pairs.
        logit = np.log(true_prob) - np.log1p(-true_prob)
        curves["true probabilities"] = metrics.preference_reliability(logit, 1.0, n_bins=params.n_bins)
    diagram = plots.reliability_diagram(curves, title="Test pairs, both orientations, equal-mass bins")
    histograms = plots.margin_histograms(margins, margins / temperature)
    return as_metrics(values), diagram, histograms
