import numpy as np
import pandas as pd
import pytest

from calibrated_rlhf.core.synthetic import SyntheticSpec, make_pairs, make_task
from calibrated_rlhf.pipelines.calibration import create_pipeline
from calibrated_rlhf.pipelines.calibration import nodes
from tests.pipelines.helpers import run


def scores_from_gold(pairs: pd.DataFrame, a: float, b: float = 0.0) -> pd.DataFrame:
    """A 'reward model' that outputs a * gold + b: the calibration must undo a and ignore b."""
    return pd.DataFrame({"pair_id": pairs["pair_id"], "reward_chosen": a * pairs["gold_chosen"] + b,
                         "reward_rejected": a * pairs["gold_rejected"] + b, "true_prob": pairs["true_prob"]})


@pytest.fixture(scope="module")
def task_pairs():
    spec = SyntheticSpec(seed=5, n_pairs=9600, n_words=40, scale=4.0)
    task = make_task(spec)
    df = make_pairs(spec, task).reset_index(names="pair_id")
    return df, {**task.to_dict(), "spec": spec.to_dict()}


@pytest.mark.parametrize("a", [0.1, 1.0, 7.0])
def test_fit_on_gold_margins_recovers_the_true_scale_for_any_multiple(task_pairs, a):
    df, task = task_pairs
    fit = nodes.fit_calibration(scores_from_gold(df, a, b=3.0), nodes.CalibrationParams())
    # P = sigmoid(4 * gold_diff) and margins = a * gold_diff, so the ML temperature is a / 4.
    assert fit["temperature"] == pytest.approx(a / 4.0, rel=0.05)
    m, _, _ = nodes.report_calibration(scores_from_gold(df, a, b=3.0), df, fit, task,
                                       nodes.CalibrationParams(n_bootstrap=100))
    assert m["calibration/recovered_scale"]["value"] == pytest.approx(4.0, rel=0.05)


def test_pipeline_reports_before_and_after_and_plots(task_pairs):
    df, task = task_pairs
    cal, test = df.iloc[:4800], df.iloc[4800:]
    out = run(create_pipeline().only_nodes("fit_temperature", "report_calibration"), {
        "calibration_scores": scores_from_gold(cal, 9.0),
        "test_scores": scores_from_gold(test, 9.0),
        "test_pairs": test,
        "synthetic_task": task,
        "params:calibration": nodes.CalibrationParams(n_bootstrap=100),
    })
    m = {k: v["value"] for k, v in out["calibration_metrics"].items()}
    for key in ("temperature", "test_nll_before", "test_nll_after", "test_ece_before", "test_ece_after",
                "test_brier_before", "test_brier_after", "test_oracle_ece", "test_bayes_nll"):
        assert np.isfinite(m[f"calibration/{key}"]), key
    # an over-confident model (9x the true scale) is fixed by the temperature
    assert m["calibration/test_nll_after"] < m["calibration/test_nll_before"]
    assert m["calibration/test_ece_after"] < m["calibration/test_ece_before"]
    assert m["calibration/test_ece_after"] <= m["calibration/test_oracle_ece"] + 0.01
    assert m["calibration/test_accuracy_after"] == m["calibration/test_accuracy_before"]  # T > 0 keeps the order
    assert out["reliability_diagram"].axes and out["margin_histograms"].axes


def test_disabled_calibration_keeps_unit_temperature(task_pairs):
    df, _ = task_pairs
    assert nodes.fit_calibration(scores_from_gold(df, 9.0), nodes.CalibrationParams(enabled=False))["temperature"] == 1.0


def test_too_few_or_broken_margins_fail_clearly(task_pairs):
    df, _ = task_pairs
    with pytest.raises(ValueError, match="pairs"):
        nodes.fit_calibration(scores_from_gold(df.iloc[:3], 1.0), nodes.CalibrationParams())
    broken = scores_from_gold(df.iloc[:100], 1.0)
    broken.loc[7, "reward_chosen"] = np.nan
    with pytest.raises(ValueError, match="NaN|non-finite|finite"):
        nodes.fit_calibration(broken, nodes.CalibrationParams())


def test_a_small_calibration_split_is_warned_about_with_the_size_that_would_do(task_pairs, caplog):
    df, _ = task_pairs
    with caplog.at_level("WARNING", logger="calibrated_rlhf.pipelines.calibration.nodes"):
        small = nodes.fit_calibration(scores_from_gold(df.iloc[:40], 9.0), nodes.CalibrationParams())
    (warning,) = [r.getMessage() for r in caplog.records if "calibration split too small" in r.getMessage()]
    assert small["relative_std_error"] > 0.05 and small["sufficient_pairs"] > 40
    assert f"about {small['sufficient_pairs']} pairs" in warning and "40 calibration pairs" in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="calibrated_rlhf.pipelines.calibration.nodes"):
        big = nodes.fit_calibration(scores_from_gold(df, 9.0), nodes.CalibrationParams())
    assert big["relative_std_error"] < 0.05 and not caplog.records


def test_the_report_gives_intervals_with_the_oracle_on_the_same_resamples(task_pairs):
    df, task = task_pairs
    cal, test = df.iloc[:4800], df.iloc[4800:6000]
    params = nodes.CalibrationParams(n_bootstrap=200)
    fit = nodes.fit_calibration(scores_from_gold(cal, 9.0), params)
    m = {k: v["value"] for k, v in nodes.report_calibration(scores_from_gold(test, 9.0), test, fit, task, params)[0].items()}
    assert m["calibration/temperature_rel_std_error"] == pytest.approx(fit["relative_std_error"])
    for figure in ("ece", "nll", "brier"):
        assert m[f"calibration/test_{figure}_after_low"] <= m[f"calibration/test_{figure}_after"] \
            <= m[f"calibration/test_{figure}_after_high"]
        assert m[f"calibration/test_oracle_{figure}_low"] <= m[f"calibration/test_oracle_{figure}"] \
            <= m[f"calibration/test_oracle_{figure}_high"]
        diff = m[f"calibration/test_{figure}_minus_oracle"]
        assert diff == pytest.approx(m[f"calibration/test_{figure}_after"] - m[f"calibration/test_oracle_{figure}"])
        # gold margins calibrated: as good as the oracle, and the paired interval is the narrower one
        assert m[f"calibration/test_{figure}_minus_oracle_low"] <= 0.01
        assert (m[f"calibration/test_{figure}_minus_oracle_high"] - m[f"calibration/test_{figure}_minus_oracle_low"]
                < m[f"calibration/test_oracle_{figure}_high"] - m[f"calibration/test_oracle_{figure}_low"])
