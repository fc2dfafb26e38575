"""The gold-against-KL frontier from recorded runs (the search_runs shape): method per run, points, matched-KL
table and its verdict."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from calibrated_rlhf.reporting import frontier


def _run(run_id, method, budget, kl, gain, half=0.02):
    row = {"run_id": run_id, "metrics.eval/kl_reference": kl, "metrics.eval/gold_gain": gain,
           "metrics.eval/gold_gain_ci_low": gain - half, "metrics.eval/gold_gain_ci_high": gain + half}
    if method == "ppo":
        row |= {"metrics.ppo/objective/kl": kl, "metrics.eval/updates": 60.0, "params.ppo.trainer.kl_target": str(budget)}
    else:
        row |= {"tags.rl/algorithm": method,
                ("params.dpo.trainer.beta" if method == "dpo" else "params.rl.kl_target"): str(budget)}
    return row


RUNS = pd.DataFrame([
    _run("a", "ppo", 1.0, 1.0, 0.20), _run("b", "ppo", 4.0, 4.0, 0.50),
    _run("c", "rloo", 1.0, 1.0, 0.30), _run("d", "rloo", 4.0, 9.0, 0.45),
    _run("e", "dpo", 0.1, 16.0, 0.10),
    {"run_id": "f", "metrics.rm/test_accuracy": 0.7},  # a run of another stage: no point
])


def test_points_methods_and_budgets_from_recorded_runs():
    points = frontier.frontier_points(RUNS)
    assert list(points["run_id"]) == ["e", "a", "b", "c", "d"]  # by method, then KL
    assert list(points["method"]) == ["dpo", "ppo", "ppo", "rloo", "rloo"]
    assert points.set_index("run_id").loc["d", "sqrt_kl"] == 3.0
    assert points.set_index("run_id").loc["e", "budget"] == 0.1  # DPO's budget is its beta
    assert frontier.frontier_figure(points).axes[0].get_legend() is not None


def test_matched_kl_table_interpolates_in_sqrt_kl_and_never_extrapolates():
    table = frontier.matched_kl_table(frontier.frontier_points(RUNS), [1.0, 4.0, 12.0])
    assert table.loc[1.0, "ppo"] == pytest.approx(0.20) and table.loc[1.0, "rloo"] == pytest.approx(0.30)
    # sqrt(4) = 2 lies a half of the way from sqrt(1) = 1 to sqrt(9) = 3 for RLOO
    assert table.loc[4.0, "rloo"] == pytest.approx(0.375)
    assert math.isnan(table.loc[12.0, "ppo"]) and math.isnan(table.loc[1.0, "dpo"])
    verdict = frontier.frontier_verdict(table)
    assert verdict.holds is False  # RLOO leads at KL 1, PPO at KL 4
    assert "at KL 1: rloo" in verdict.evidence and "at KL 4: ppo" in verdict.evidence
    assert verdict.missing == ("grpo",)
    assert frontier.frontier_verdict(table[["ppo"]]).holds is None


def test_report_files_from_recorded_runs(tmp_path):
    paths = frontier.write_report(frontier.frontier_points(RUNS), [1.0, 4.0], str(tmp_path))
    text = (tmp_path / "frontier.md").read_text()
    assert "not supported" in text and "Missing methods: grpo." in text and "| rloo |" in text
    assert (tmp_path / "frontier.png").stat().st_size > 1000 and paths["figure"].endswith("frontier.png")


def test_dpo_calibration_table_reads_each_dpo_runs_implicit_reward_figures(tmp_path):
    runs = RUNS.copy()
    runs.loc[runs["run_id"] == "e", ["metrics.dpo/calibration/temperature", "metrics.dpo/calibration/test_ece_before",
                                     "metrics.dpo/calibration/test_ece_after"]] = [0.21, 0.149, 0.033]
    table = frontier.dpo_calibration_table(runs)
    assert list(table["run_id"]) == ["e"]  # the DPO run only; PPO and RLOO runs have no implicit reward
    row = table.iloc[0]
    assert (row["beta"], row["temperature"], row["ece_before"], row["ece_after"]) == (0.1, 0.21, 0.149, 0.033)
    assert math.isnan(row["bayes_nll"])  # not logged: NaN, never guessed
    points = frontier.frontier_points(runs)
    text = open(frontier.write_report(points, [1.0, 4.0], str(tmp_path), table)["markdown"]).read()
    assert "## DPO's implicit reward" in text and "| e | 0.1 | 0.21 | 0.149 | 0.033 |" in text


def _curve_runs(method: str, alpha: float, beta: float, ds) -> list[dict]:
    """Runs whose gold gain lies on Gao et al.'s RL law d (alpha - beta ln d), at KL d^2."""
    return [_run(f"{method}{i}", method, d * d, d * d, d * (alpha - beta * math.log(d))) for i, d in enumerate(ds)]


def test_the_rl_law_is_recovered_with_its_peak_and_the_verdict_sees_where_it_turns():
    ds = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0]
    runs = pd.DataFrame(_curve_runs("grpo", 0.5, 0.25, ds) + _curve_runs("ppo", 0.3, 0.05, ds)
                        + _curve_runs("rloo", 0.4, 0.1, ds[:2]) + _curve_runs("dpo", 0.5, 0.25, ds))
    fits = frontier.overoptimization_fits(frontier.frontier_points(runs))
    assert set(fits["method"]) == {"grpo", "ppo"}  # RLOO has 2 points; DPO is not a policy pushed along a proxy
    rl = fits[fits["form"] == "rl"].set_index("method")
    assert rl.loc["grpo", "alpha"] == pytest.approx(0.5) and rl.loc["grpo", "beta"] == pytest.approx(0.25)
    assert rl.loc["grpo", "r2"] == pytest.approx(1.0) and rl.loc["grpo", "held_out_r2"] == pytest.approx(1.0)
    assert rl.loc["grpo", "d_peak_fitted"] == pytest.approx(math.exp(0.5 / 0.25 - 1))  # e: inside the range run
    assert rl.loc["grpo", "d_peak_observed"] == 3.0  # the run nearest e, on the way down beyond it
    assert rl.loc["ppo", "d_peak_fitted"] == pytest.approx(math.exp(0.3 / 0.05 - 1))  # e^5: far past d = 5
    bon = fits[fits["form"] == "bon"].set_index("method")
    assert bon.loc["grpo", "r2"] < rl.loc["grpo", "r2"]  # the other law fits these points worse
    verdict = frontier.overoptimization_verdict(fits)
    assert verdict.holds is False and "grpo: fitted peak d* 2.72" in verdict.evidence  # PPO has not turned yet
    assert frontier.overoptimization_verdict(fits[fits["method"] == "grpo"]).holds is True
    # Runs that only flatten: the fitted peak (e, 2.72) lies inside the range, but no run has less gold than one
    # before it, so nothing has turned down yet.
    flat = fits[fits["method"] == "grpo"].assign(d_peak_observed=5.0)
    assert frontier.overoptimization_verdict(flat).holds is False
    assert frontier.overoptimization_verdict(fits.iloc[:0]).holds is None


def test_the_report_shows_the_fits_and_their_verdict(tmp_path):
    runs = pd.DataFrame(_curve_runs("grpo", 0.5, 0.25, [0.5, 1.0, 2.0, 3.0, 4.0]))
    text = open(frontier.write_report(frontier.frontier_points(runs), [1.0], str(tmp_path))["markdown"]).read()
    assert "## Gao et al.'s forms fitted" in text and "| grpo | rl | 5 | 0.5 |" in text
    assert "**RL's gold reward peaks and turns down within the KL measured: supported.**" in text
