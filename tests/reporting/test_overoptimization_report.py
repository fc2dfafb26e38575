"""The over-optimization report (reporting.overoptimization) from an MLflow store holding runs shaped as the
script's: RL runs with their per-update histories, a best-of-n run with its curve and rankings."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from calibrated_rlhf.core.fitted_warning import FittedWarning
from calibrated_rlhf.reporting import overoptimization as report

UPDATES = 60


def ppo_records(over: bool) -> list[dict[str, float]]:
    """A PPO run's per-update metrics: its KL climbs to 40 while its gold peaks at update 20 and falls (``over``), or
    it holds KL 4 while its gold rises."""
    steps = np.arange(1, UPDATES + 1)
    kl = np.linspace(0.0, 40.0 if over else 4.0, UPDATES)
    gold = np.where(steps <= 20, steps / 20, 1.0 - (steps - 20) / 40) if over else steps / UPDATES
    surprisal = 0.05 + (0.01 * np.maximum(steps - 15, 0) if over else 0.0 * steps)  # repetition grows as gold turns
    length = 6.0 + (0.6 * np.maximum(steps - 20, 0) if over else 0.0 * steps)  # and, after the turn, length
    return [{"ppo/objective/kl": k, "ppo/rewards/gold": g, "ppo/policy/entropy": 3.0,
             "ppo/rewards/normalized": np.sqrt(k), "ppo/rewards/calibrated": 0.2 + np.sqrt(k),
             "ppo/rewards/ensemble_std": 0.1, "ppo/rewards/repetition_surprisal": rep,
             "ppo/rewards/repeated_words": 0.1 + rep, "ppo/rollout/response_length": n}
            for k, g, rep, n in zip(kl, gold, surprisal, length)]


def log_ppo_run(mlflow, target: float, seed: int, over: bool, scenario: str = "overoptimization_rm100") -> None:
    records = ppo_records(over)
    with mlflow.start_run():
        mlflow.set_tags({"scenario": scenario, "rl/algorithm": "ppo"})
        mlflow.log_params({"ppo.trainer.kl_target": target, "ppo.trainer.seed": seed})
        last = records[-1]
        mlflow.log_metrics({"eval/kl_reference": last["ppo/objective/kl"], "eval/gold_gain": last["ppo/rewards/gold"],
                            "eval/gold_gain_ci_low": last["ppo/rewards/gold"] - .1,
                            "eval/gold_gain_ci_high": last["ppo/rewards/gold"] + .1})
        for step, metrics in enumerate(records, start=1):
            mlflow.log_metrics(metrics, step=step)


def log_best_of_n_run(mlflow, tmp_path) -> None:
    ns = [1, 2, 4, 8, 16, 32, 64]
    kl = [np.log(n) - (n - 1) / n for n in ns]
    d = np.sqrt(kl)
    with mlflow.start_run():
        mlflow.set_tags({"scenario": "overoptimization_rm100"})
        mlflow.log_metric("best_of_n/fit/alpha", 0.3)
        for n, k, dd in zip(ns, kl, d):
            for name, value in {"kl": k, "kl_bound": k, "d": dd, "gold_gain": dd * (0.3 - 0.05 * dd),
                                "proxy_gain": 0.4 * dd, "gold_gain_ci_low": 0.0, "gold_gain_ci_high": 1.0}.items():
                mlflow.log_metric(f"best_of_n/curve/{name}", value, step=n)
        # each ranking's gold follows best-of-n's form, d (a - b d): member_0's peaks at d = 1 (n = 8 measured) and
        # falls far below its interval; mean_minus_std's peaks at n = 32 and falls within it; the rest still rise
        forms = {"mean": (0.3, 0.05), "member_1": (0.3, 0.05), "min": (0.25, 0.02), "member_0": (0.4, 0.2),
                 "mean_minus_std": (0.35, 0.11)}
        rankings = pd.DataFrame([{"ranking": r, "n": n, "d": dd, "gold_gain": dd * (a - b * dd),
                                  "gold_gain_ci_low": dd * (a - b * dd) - 0.02, "gold_gain_ci_high": dd * (a - b * dd)
                                  + 0.02, "proxy_gain": 0.4 * dd} for r, (a, b) in forms.items()
                                 for n, dd in zip(ns, d)])
        rankings.to_csv(tmp_path / "best_of_n_rankings.csv", index=False)
        mlflow.log_artifact(str(tmp_path / "best_of_n_rankings.csv"), "best_of_n")


def test_report_reads_the_runs_fits_the_curves_and_scores_the_warnings(tmp_path):
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        mlflow.set_experiment("calibrated_rlhf")
        for seed in (0, 1):
            log_ppo_run(mlflow, 64.0, seed, over=True)
            log_ppo_run(mlflow, 4.0, seed, over=False)
        log_best_of_n_run(mlflow, tmp_path)
        for over, target in ((True, 64.0), (False, 4.0)):  # made after the rules were chosen: scored, not chosen on
            log_ppo_run(mlflow, target, 2, over, scenario="overoptimization_rm100_untouched")
        report.main(["--sizes", "100", "--untouched", "100", "--out", str(tmp_path / "out")])
    finally:
        mlflow.set_tracking_uri(previous)
    text = (tmp_path / "out" / "README.md").read_text()
    assert (tmp_path / "out" / "rm_100.png").stat().st_size > 0
    # the KL rule: the lowest threshold the safe runs (KL <= 4) never reach catches both over-optimizing runs, on
    # the seed it was chosen on and on the other; a flat entropy and a flat disagreement catch nothing
    assert "| kl | kl > 4 | 1 | 1.0 | 1 | 0.0 | 1 | 1.0 | 1 | 0.0 |" in text
    assert "| entropy | entropy / its value at update 5 < 0.5 | 1 | 0.0 | 1 | 0.0 | 1 | 0.0 | 1 | 0.0 |" in text
    # the repetition surprisal: its lowest threshold, 1.1 times its mean over the first 5 updates (0.05), fires at
    # update 17 (the trailing mean of 0.05, 0.05, 0.05, 0.06, 0.07 is 0.056; at 16 it is 0.052), by the deadline
    # (update 21 + 6) on both seeds, never on the safe runs
    assert ("| repetition_surprisal | repetition_surprisal / its value at update 5 > 1.1 | 1 | 1.0 | 1 | 0.0 | 1 | 1.0 "
            "| 1 | 0.0 |" in text)
    # every threshold over all four runs: 5x its start (0.25) comes after the deadline on both over-optimizing runs
    assert "| repetition_surprisal / its value at update 5 > 1.1 | 2 | 2 | 2 | 2 | 0 |" in text
    assert "| repetition_surprisal / its value at update 5 > 5 | 2 | 0 | 2 | 2 | 0 |" in text
    # the response length: its mean over updates 19-23 (6.72) is the first above 1.1 times its start (6.6), in time
    assert ("| response_length | response_length / its value at update 5 > 1.1 | 1 | 1.0 | 1 | 0.0 | 1 | 1.0 | 1 "
            "| 0.0 |" in text)
    # the gold itself, the yardstick: its trailing mean falls 0.02 below its maximum at update 25, by the deadline
    assert ("| gold | gold more than 0.02 below its maximum since update 5 | 1 | 1.0 | 1 | 0.0 | 1 | 1.0 | 1 | 0.0 |"
            in text)
    # the fitted warning, chosen and scored as the rest; saved with its threshold, it stops the over-optimizing run
    # by the deadline and never the safe one
    scores = r"\| 1 \| 1.0 \| 1 \| 0.0 \| 1 \| 1.0 \| 1 \| 0.0 \|"
    assert re.search(r"\| fitted_warning \| fitted_warning > -?[0-9.]+ " + scores, text)
    assert "| the other seeds | seed 0 |" in text
    assert "| seed 0, all but size 100 | the other seeds, size 100 | none:" in text
    untouched = text.split("## The rules on untouched runs (seed 2)")[1]
    assert "| kl | kl > 4 | 1 of 1 | 0 of 1 |" in untouched
    assert re.search(r"\| fitted_warning \| fitted_warning > -?[0-9.]+ \| 1 of 1 \| 0 of 1 \|", untouched)
    warning = FittedWarning.load(tmp_path / "out" / "fitted_warning.json")
    assert f"fitted_warning > {warning.threshold:g} |" in text
    for over, target in ((True, 64.0), (False, 4.0)):
        records = ppo_records(over)
        fired = next((i for i in range(UPDATES) if warning.stop_reason(records[:i + 1], "ppo", target)), None)
        assert (fired is not None and fired <= 20 + 6) if over else fired is None
    # the smoothed gold peaks at update 21 (it rises twice as fast as it falls) and falls by 0.935; KL > 4 fires at 9
    assert ("| 100 | ppo | 64.0 | 0 | 60 | 21 | 0.935 | True | 9.0 | nan | nan | 21.0 | 17.0 | nan | 25.0 | 23.0 | 6.0 "
            "| 25.0 |" in text)
    # best-of-n: its form fits its curve exactly; the conservative rankings peak at larger n than the mean's
    assert "| best_of_n | bon | 7 | 0.3 | 0.3 | 0.3 | 0.05 | 0.05 | 0.05 | 1.0 | 1.0 | 3.0 |" in text
    assert ("conservative ensembles delay the peak: supported (mean: does not turn, peak at n = 64 (gain 0.376; 0.376 "
            "at n = 64); mean_minus_std: does not turn, peak at n = 32") in text
    assert "member_0: turns, peak at n = 8" in text and "member_1" not in text.split("delay the peak")[1].split("\n")[0]
    # member_0's curve is best-of-n's form exactly: held-out R^2 1, d* = 1 against the observed 1.10 (9%)
    assert "observed peak: best_of_n by member_0, bon form." in text
    assert "| best_of_n by member_0 | bon | 7 | 0.4 |" in text
    assert "best-of-n is more KL-efficient than RL" in text
    # every RL run's series, written beside the report, gives the same warnings section and warning without the store
    report.main(["--series", str(tmp_path / "out" / "runs.csv.gz"), "--out", str(tmp_path / "again"),
                 "--warning", str(tmp_path / "out" / "fitted_warning.json")])
    again = (tmp_path / "again" / "README.md").read_text()
    assert "## Warnings that need no gold" in again and "(seed 2)" in again
    warnings, saved_section = again.split("## Warnings that need no gold")[1].split("## A saved warning on these runs")
    assert warnings == text.split("## Warnings that need no gold")[1]
    # the first report's warning scored as it is on all six runs: every over-optimizing one caught, no false alarm
    assert "| every run | 3 of 3 | 0 of 3 |" in saved_section and "| method ppo | 3 of 3 | 0 of 3 |" in saved_section
    saved = tmp_path / "saved.json"  # another report's warning: fires on no run, its threshold above every score
    FittedWarning.from_dict({**warning.to_dict(), "threshold": 50.0}).save(saved)
    report.main(["--series", str(tmp_path / "out" / "runs.csv.gz"), "--out", str(tmp_path / "quiet"),
                 "--warning", str(saved)])
    assert "| every run | 0 of 3 | 0 of 3 |" in (tmp_path / "quiet" / "README.md").read_text()
    with pytest.raises(ValueError, match="missing.json"):
        report.main(["--series", str(tmp_path / "out" / "runs.csv.gz"), "--out", str(tmp_path / "none"),
                     "--warning", str(tmp_path / "missing.json")])
    assert not (tmp_path / "none").exists()
    refit = FittedWarning.load(tmp_path / "again" / "fitted_warning.json")  # the file keeps 10 digits of each value
    assert refit.threshold == warning.threshold and np.allclose(refit.weights, warning.weights, rtol=1e-6)
    assert not (tmp_path / "again" / "runs.csv.gz").exists() and not list((tmp_path / "again").glob("*.png"))


def test_the_report_links_its_guide_from_any_depth_of_the_docs_folder(tmp_path):
    assert report.guide_link(tmp_path / "docs" / "results" / "overoptimization") == "../../overoptimization.md"
    rerun = tmp_path / "docs" / "results" / "overoptimization" / "rerun"
    assert report.guide_link(rerun) == "../../../overoptimization.md"
    assert report.guide_link(tmp_path / "out") == "docs/overoptimization.md"


def test_run_series_round_trip_through_their_file_with_every_signal_and_gap(tmp_path):
    history = pd.DataFrame([{"key": key, "step": step, "value": value}
                            for step, metrics in enumerate(ppo_records(True), start=1)
                            for key, value in metrics.items() if not (key == "ppo/policy/entropy" and step == 7)])
    raw = report.raw_series(history, "ppo")
    run = report.RunSignals("a1", "2400_large", "ppo", 64.0, 3, *report.signals_of(raw), raw)
    safe = report.RunSignals("b2", "600", "rloo", 4.0, 1, *report.signals_of(raw), raw)
    report.series_frame([safe], [run]).to_csv(tmp_path / "runs.csv.gz", index=False, float_format="%.10g")
    (chosen_on,), (untouched,) = report.runs_from_series(pd.read_csv(tmp_path / "runs.csv.gz"))
    for got, want in ((chosen_on, safe), (untouched, run)):
        assert (got.run_id, got.size, got.method, got.kl_target, got.seed) == (
            want.run_id, want.size, want.method, want.kl_target, want.seed)
        for name, series in want.raw.items():
            np.testing.assert_allclose(got.raw[name], series, rtol=1e-9)
        np.testing.assert_allclose(got.signals["proxy_per_nat"], want.signals["proxy_per_nat"], rtol=1e-9)
    assert np.isnan(untouched.raw["entropy"][6]) and np.isfinite(untouched.raw["entropy"][5])
    with pytest.raises(ValueError, match="gold"):
        report.runs_from_series(pd.read_csv(tmp_path / "runs.csv.gz").drop(columns="gold"))


def test_a_size_can_come_from_another_store(tmp_path):
    import mlflow

    previous = mlflow.get_tracking_uri()
    other = f"sqlite:///{tmp_path / 'other.db'}"
    mlflow.set_tracking_uri(other)
    try:
        mlflow.set_experiment("calibrated_rlhf")
        log_ppo_run(mlflow, 64.0, 0, over=True)
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'empty.db'}")
        report.main(["--sizes", f"100@{other},7_large", "--out", str(tmp_path / "out")])
        assert mlflow.get_tracking_uri().endswith("empty.db")  # put back
    finally:
        mlflow.set_tracking_uri(previous)
    text = (tmp_path / "out" / "README.md").read_text()
    assert "| 100 | ppo | 64.0 | 0 | 60 | 21 |" in text and "## 7 preference pairs, large reward models" in text


def test_the_deadline_table_chooses_and_scores_each_deadline_on_its_own():
    """KL jumps 12 updates after the gold's peak, 20% of a 60-update run: late by the peak + 10%, in time by 25%."""
    steps = np.arange(UPDATES)
    hump = np.where(steps < 20, steps / 20, 1.0 - (steps - 20) / 40)
    runs = []
    for seed in (0, 1):
        for over in (True, False):
            signals = {family: np.full(UPDATES, np.nan) for family in report.GRIDS}
            signals["kl"] = np.where(over & (steps >= 32), 40.0, 1.0)
            gold = hump if over else steps / UPDATES
            runs.append(report.RunSignals(f"{seed}{over}", "100", "ppo", 64.0, seed, signals, gold))
    table = report.deadline_table(runs, late_fractions=(0.10, 0.25))
    kl = table.set_index("signal").loc["kl"]
    assert kl["by the peak + 10%"] == "0 of 1, 0 of 1" and kl["by the peak + 25%"] == "1 of 1, 0 of 1"
    # a signal never measured fires on nothing: caught none, alarmed none, at every deadline
    assert table.set_index("signal").loc["entropy", "by the peak + 25%"] == "0 of 1, 0 of 1"
    # held-out runs that are all over-optimizing: no safe run to alarm, counted as none of none
    only_over = [r for r in runs if r.seed == 0 or r.gold is hump]
    assert report.deadline_table(only_over, late_fractions=(0.25,)).set_index("signal").loc[
        "kl", "by the peak + 25%"] == "1 of 1, 0 of 0"


def test_an_rl_history_gives_the_same_signals_under_its_own_keys():
    """RLOO's and GRPO's histories log under rl/...: the response length and the gold reach the rules as PPO's do."""
    steps = np.arange(1, 11)
    history = pd.DataFrame([{"key": key, "step": int(s), "value": float(v)}
                            for key, values in {"rl/rollout/response_length": 6.0 + steps,
                                                "rl/rewards/gold": 0.1 * steps}.items()
                            for s, v in zip(steps, values)])
    signals, gold = report.run_signals(history, "rloo")
    np.testing.assert_allclose(gold, 0.1 * steps)
    np.testing.assert_allclose(signals["response_length"][-1], np.mean(6.0 + steps[-5:]))
    np.testing.assert_allclose(signals[report.GOLD][-1], np.mean(0.1 * steps[-5:]))
    assert np.isnan(signals["kl"]).all()  # not logged: no evidence, never fires


def test_trailing_mean_uses_only_past_updates_and_skips_gaps():
    x = np.array([1.0, 3.0, np.nan, 5.0, 7.0])
    np.testing.assert_allclose(report.trailing_mean(x, 2), [1.0, 2.0, 3.0, 5.0, 6.0])
    assert np.isnan(report.trailing_mean(np.array([np.nan]), 3)[0])


def test_proxy_efficiency_waits_for_a_nat_of_kl():
    history = pd.DataFrame({"key": ["ppo/objective/kl"] * 3 + ["ppo/rewards/normalized"] * 3 + ["ppo/rewards/gold"] * 3,
                            "step": [1, 2, 3] * 3, "value": [0.0, 0.5, 4.0, 0.0, 1.0, 2.0, 0.1, 0.2, 0.3]})
    signals, gold = report.run_signals(history, "ppo", window=1)
    assert np.isnan(signals["proxy_efficiency"][:2]).all() and signals["proxy_efficiency"][2] == pytest.approx(1.0)
    np.testing.assert_allclose(gold, [0.1, 0.2, 0.3])


def test_transform_verdict_reads_the_scale_runs_against_the_ppo_curve():
    from calibrated_rlhf.reporting.frontier import overoptimization_fits

    d = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0])
    wiggle = 0.01 * np.array([1, -1, 1, -1, 1, -1, 1, -1])
    points = pd.DataFrame({"method": "ppo", "sqrt_kl": d, "kl": d ** 2,
                           "gold_gain": d * (0.4 - 0.2 * np.log(d)) + wiggle})
    fits = overoptimization_fits(points)

    def scale(rows):
        frame = pd.DataFrame(rows, columns=["normalization", "multiplier", "kl", "gold_gain"])
        return frame.assign(sqrt_kl=np.sqrt(frame["kl"]))

    def on_curve(kl):
        return float(np.sqrt(kl) * (0.4 - 0.2 * np.log(np.sqrt(kl))))

    landed = scale([("transform", 0.25, 4.0, on_curve(4.0)), ("transform", 4.0, 4.0, on_curve(4.0)),
                    ("raw", 0.25, 1.0, on_curve(1.0)), ("raw", 4.0, 16.0, on_curve(16.0))])
    assert report.transform_verdict(points, fits, landed).split(" (")[0].endswith(": supported")
    off = landed.assign(gold_gain=landed["gold_gain"] + np.array([0.0, 0.0, 0.0, 0.3]))  # a raw run above the curve
    assert ": not supported (" in report.transform_verdict(points, fits, off)
    moved = landed.assign(kl=[4.0, 4.6, 1.0, 16.0], sqrt_kl=np.sqrt([4.0, 4.6, 1.0, 16.0]))
    moved = moved.assign(gold_gain=[on_curve(k) for k in moved["kl"]])
    assert ": mixed (" in report.transform_verdict(points, fits, moved)
    assert report.transform_verdict(points, fits, None).endswith("not measured (no scale runs, or no PPO fit).")


def test_the_fitted_warning_reads_the_kl_against_the_runs_target_where_neither_alone_can():
    """At each of two targets, 4 and 16, one run overshoots to twice its target and turns while another holds its
    target and stays safe. The target alone cannot tell them apart (each target has both), nor can a KL threshold
    (the turning run at 4 reaches KL 8, the safe one at 16 holds 16); the KL read against the target can."""
    steps = np.arange(UPDATES)
    runs = []
    for seed in (0, 1):
        for target in (4.0, 16.0):
            for over in (True, False):
                top = 2 * target if over else target
                raw = {"kl": np.minimum(steps, 20) / 20 * top + 0.1 * seed, "proxy": 0.5 + 0.0 * steps,
                       "entropy": 2.0 + 0.0 * steps, "repeated_words": 0.1 + 0.0 * steps,
                       "repetition_surprisal": 0.3 + 0.0 * steps, "response_length": 6.0 + 0.0 * steps}
                gold = np.where(steps < 20, steps / 20, 1.0 - (steps - 20) / 40) if over else steps / UPDATES
                signals = {family: np.full(UPDATES, np.nan) for family in report.GRIDS}
                signals["kl"] = report.trailing_mean(raw["kl"], report.WINDOW)
                runs.append(report.RunSignals(f"{seed}{target}{over}", "100", "ppo", target, seed, signals, gold,
                                              raw))
    runs, warning = report.with_fitted_warning(runs)
    table = report.warning_table(runs)[0].set_index("signal")
    assert table.loc["kl", "held_out_caught"] < 1.0  # a quiet KL threshold sits above the turning run at 4
    fitted = table.loc[report.FITTED]
    assert (fitted["held_out_caught"], fitted["held_out_false_alarms"]) == (1.0, 0.0)
    weights = dict(zip(warning.feature_names, warning.weights))
    assert weights["log_kl"] > 0 > weights["log_kl_target"]  # the KL counts against the target it was told


def test_the_kept_gold_table_weighs_each_rule_by_the_gold_of_the_policy_it_keeps():
    """A KL rule firing at update 11 keeps the over-optimizing run's policy before its gold's fall (less than the
    peak's) and never fires on the safe run, which keeps its end; only the held-out seed is counted."""
    from calibrated_rlhf.core.early_warning import Rule, smooth

    steps = np.arange(UPDATES)
    hump = np.where(steps < 20, steps / 20, 1.0 - (steps - 20) / 40)
    runs = []
    for seed in (0, 1):
        for over in (True, False):
            kl = np.where(over & (steps >= 10), 40.0, 1.0)
            gold = hump if over else steps / UPDATES * (3.0 if seed == 0 else 1.0)  # seed 0 must not count
            runs.append(report.RunSignals(f"{seed}{over}", "100", "ppo", 64.0, seed, {"kl": kl}, gold))
    table = report.kept_gold_table(runs, {"kl": Rule("kl", 32)}).set_index("stopped by")
    h, s = smooth(hump, report.WINDOW), smooth(steps / UPDATES, report.WINDOW)
    # it fires on update 11's figures (index 10) and keeps the policy that update makes, sampled at index 11
    assert table.loc["kl > 32", "over-optimizing runs"] == pytest.approx(h[11] - h[0])
    assert table.loc["kl > 32", "safe runs"] == pytest.approx(s[-1] - s[0])
    never = table.loc["never (the end of the run)"]
    assert never["over-optimizing runs"] == pytest.approx(h[-1] - h[0])
    assert never["over-optimizing runs"] < table.loc["kl > 32", "over-optimizing runs"]
    peak = table.loc["the gold's peak (hindsight)"]
    assert peak["over-optimizing runs"] == pytest.approx(h.max() - h[0])
    assert peak["all runs"] == pytest.approx(np.mean([h.max() - h[0], s.max() - s[0]]))


def test_trajectory_points_pool_every_update_against_the_reference_and_recover_the_law():
    """Two runs climbing to different KL along training, their batch gold exactly Gao et al.'s RL law above a
    reference gold of 0.3: the binned trajectory follows the law, the fit recovers it and meets the marks."""
    law_gain = lambda d: d * (0.4 - 0.2 * np.log(np.maximum(d, 1e-12)))  # noqa: E731
    runs = []
    for top in (16.0, 49.0):
        kl = np.linspace(0.0, top, UPDATES)
        gold = 0.3 + law_gain(np.sqrt(kl))
        runs.append(report.RunSignals(str(top), "100", "rloo", top, 0, {}, gold, {"kl": kl, report.GOLD: gold}))
    points = report.trajectory_points(runs, bins=20)
    assert len(points) == 20 and set(points["method"]) == {"rloo"}
    assert points["sqrt_kl"].is_monotonic_increasing
    assert points["kl"].to_numpy() == pytest.approx(points["sqrt_kl"].to_numpy() ** 2)
    # the reference's gold (0.3) is taken off: each bin sits on the law, up to averaging over the bin
    np.testing.assert_allclose(points["gold_gain"], law_gain(points["sqrt_kl"].to_numpy()), atol=0.05)
    lines = report.trajectory_lines(runs)
    fits = report.overoptimization_fits(points).set_index("form")
    # binning averages the curve inside each bin, so the law is recovered closely, not exactly
    assert fits.loc["rl", "alpha"] == pytest.approx(0.4, abs=0.02)
    assert fits.loc["rl", "beta"] == pytest.approx(0.2, abs=0.02)
    assert "along training, a form fits with held-out R^2 >= 0.95 and puts d* within 15% of an observed peak: rloo, " \
           "rl form" in "\n".join(lines)
    # a method whose runs never logged their gold (or not from the start) gives no points, not an error
    unlogged = report.RunSignals("x", "100", "ppo", 4.0, 0, {}, np.zeros(UPDATES),
                                 {"kl": kl, report.GOLD: gold * np.nan})
    assert set(report.trajectory_points([*runs, unlogged], bins=20)["method"]) == {"rloo"}
    assert report.trajectory_lines([unlogged]) == []
