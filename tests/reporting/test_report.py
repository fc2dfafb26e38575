"""The comparison report's table, verdicts and renderings on synthetic runs (the shape search_runs returns)."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.reporting import frontier, render, table as tables, verdicts
from calibrated_rlhf.reporting.runs import RunSelection, select_runs

ROOT = Path(__file__).resolve().parents[2]
T0 = pd.Timestamp("2026-01-01", tz="UTC")
# The project's own roles: the library knows no scenario names.
ROLES = verdicts.ScenarioRoles.from_dict(
    yaml.safe_load((ROOT / "conf/base/parameters_reporting.yml").read_text())["reporting"]["scenario_roles"])


def run_row(run_id: str, scenario: str | None = None, *, minute: int = 0, name: str = "__default__",
            metrics: dict[str, float] | None = None, params: dict[str, object] | None = None) -> dict[str, object]:
    row: dict[str, object] = {"run_id": run_id, "start_time": T0 + pd.Timedelta(minutes=minute),
                              "tags.mlflow.runName": name}
    if scenario:
        row["tags.scenario"] = scenario
    row |= {f"metrics.{k}": v for k, v in (metrics or {}).items()}
    row |= {f"params.{k}": str(v) for k, v in (params or {}).items()}
    return row


def ppo_run(run_id: str, scenario: str, reward: str, a: float, kl: float, gold: float, minute: int = 0,
            tracking_error: float | None = None) -> dict[str, object]:
    return run_row(run_id, scenario, minute=minute, params={"normalization.method": reward, "ppo.raw_reward_multiplier": a},
                   metrics={"eval/kl_second_half_mean": kl, "eval/gold_policy": gold,
                            "eval/kl_tracking_error": kl / 1.0 - 1 if tracking_error is None else tracking_error})


SCALE_RUNS = [
    ppo_run("t025", "scale_0.25", "zscore", 0.25, kl=1.00, gold=0.50),
    ppo_run("t1", "scale_1", "zscore", 1.0, kl=1.02, gold=0.51),
    ppo_run("t4", "scale_4", "zscore", 4.0, kl=0.98, gold=0.49),
    ppo_run("r025", "scale_0.25_raw", "raw", 0.25, kl=0.20, gold=0.30),
    ppo_run("r1", "scale_1_raw", "raw", 1.0, kl=1.00, gold=0.50),
    ppo_run("r4", "scale_4_raw", "raw", 4.0, kl=3.00, gold=0.35),
]


def table_of(rows: list[dict[str, object]], histories: pd.DataFrame | None = None) -> pd.DataFrame:
    return tables.comparison_table(pd.DataFrame(rows), histories)


def history(run_id: str, key: str, values: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"run_id": run_id, "key": key, "step": range(len(values)), "value": values})


# ---- selection and table ----------------------------------------------------------------------------------------

def test_select_runs_drops_reporting_runs_and_the_active_run_then_keeps_the_newest():
    runs = pd.DataFrame([
        run_row("old", "baseline", minute=0, metrics={"rm/test_reward_mean": 0.1}),
        run_row("new", "scale_4", minute=5, metrics={"eval/gold_policy": 0.4}),
        run_row("mid", None, minute=3, metrics={"calibration/temperature": 2.0}),
        run_row("rep", None, minute=6, name="reporting"),  # an earlier report: no pipeline metrics
        run_row("me", None, minute=7, metrics={"ppo/objective/kl": 1.0}),
    ])
    kept, notes = select_runs(runs, RunSelection(last=2), exclude_run_ids=["me"])
    assert list(kept["run_id"]) == ["new", "mid"]
    assert any("reporting" in n for n in notes) and any("logged to" in n for n in notes)
    kept, _ = select_runs(runs, RunSelection(scenarios=("baseline",)))
    assert list(kept["run_id"]) == ["old"]


def test_select_runs_on_an_empty_search():
    kept, notes = select_runs(pd.DataFrame(columns=["run_id", "start_time"]), RunSelection())
    assert kept.empty and notes == []


def test_labels_are_scenarios_else_name_and_short_id_and_stay_unique():
    runs = pd.DataFrame([run_row("aaaaaaaa11", "baseline"), run_row("bbbbbbbb22", "baseline"),
                         run_row("cccccccc33", None, name="__default__")])
    assert tables.run_labels(runs) == ["baseline (aaaaaaaa)", "baseline (bbbbbbbb)", "__default__ (cccccccc)"]


def test_table_has_every_column_and_nan_for_metrics_a_run_did_not_log():
    table = table_of([run_row("rm_only", "no_centering", metrics={"rm/test_reward_mean": 3.0},
                              params={"calibration.enabled": True})])
    assert list(table.columns) == tables.COLUMNS
    row = table.iloc[0]
    assert row["reward_offset"] == 3.0 and row["calibration_enabled"] == "True"
    for column in ("kl_tracking_error", "final_beta", "reward_multiplier"):
        assert math.isnan(row[column]), column
    assert list(tables.comparison_table(pd.DataFrame(columns=["run_id"])).columns) == tables.COLUMNS


def test_table_reads_curves_final_beta_median_speed_and_kl_when_evaluation_is_missing():
    histories = pd.concat([
        history("r", keys.PPO_KL, [9.0, 9.0, 2.0, 4.0]),
        history("r", keys.PPO_KL_TARGET, [2.0] * 4),
        history("r", keys.PPO_BETA, [0.1, 0.2, 0.15, 0.12]),
        history("r", keys.PPO_EPISODES_PER_S, [1.0, 50.0, 52.0, 51.0]),
    ])
    row = table_of([run_row("r", "baseline", metrics={"ppo/objective/beta": 0.5})], histories).iloc[0]
    assert row["final_beta"] == 0.12  # the last by step, from the curve
    assert row["episodes_per_s"] == 50.5
    assert row["kl_target"] == 2.0 and row["kl_second_half_mean"] == 3.0
    assert row["kl_tracking_error"] == pytest.approx(0.5)


def test_relative_spread():
    assert verdicts.relative_spread([1.0, 1.1, 0.9]) == pytest.approx(0.2)
    assert math.isnan(verdicts.relative_spread([1.0, float("nan")]))
    assert verdicts.relative_spread([-1.0, 1.0]) == math.inf and verdicts.relative_spread([0.0, 0.0]) == 0.0


# ---- verdicts ---------------------------------------------------------------------------------------------------

def test_scale_verdict_transform_stays_and_raw_moves_with_numbers():
    v = verdicts.scale_verdict(table_of(SCALE_RUNS), ROLES, tolerance=0.10)
    assert v.holds is True and v.missing == ()
    assert "KL moves 4.0% (0.98 to 1.02)" in v.evidence and "gold reward moves 4.0%" in v.evidence
    assert "Without it (raw reward)" in v.evidence
    assert f"{2.8 / (4.2 / 3):.1%}" in v.evidence  # raw KL: (3.0 - 0.2) / mean
    assert "removes the dependence" in v.evidence


def test_scale_verdict_fails_when_the_transform_arm_spreads():
    rows = [*SCALE_RUNS[:2], ppo_run("t4b", "scale_4", "zscore", 4.0, kl=1.5, gold=0.49, minute=9)]
    v = verdicts.scale_verdict(table_of(rows + SCALE_RUNS[3:]), ROLES)
    assert v.holds is False and "beyond 10%" in v.evidence  # the newer scale_4 run replaced the older one


def test_scale_verdict_names_missing_scenarios_and_uses_baseline_for_a_1():
    baseline = ppo_run("b", "baseline", "zscore", 1.0, kl=1.01, gold=0.5)
    v = verdicts.scale_verdict(table_of([SCALE_RUNS[0], baseline]), ROLES)
    assert v.holds is True and "a in {0.25, 1}" in v.evidence
    assert set(v.missing) == {"scale_4", "scale_0.25_raw", "scale_1_raw", "scale_4_raw"}
    assert "how far they move without is unknown" in v.evidence
    v = verdicts.scale_verdict(table_of([SCALE_RUNS[3]]), ROLES)
    assert v.holds is None and "scale_0.25" in v.missing and v.status == "undecided"


def test_scale_verdict_counts_a_run_without_ppo_metrics_as_missing_and_decides_on_kl_without_gold():
    no_ppo = run_row("b", "baseline", params={"normalization.method": "zscore", "ppo.raw_reward_multiplier": 1.0},
                     metrics={"rm/test_reward_mean": 0.0})
    no_gold = [{k: v for k, v in r.items() if k != "metrics.eval/gold_policy"}
               for r in (SCALE_RUNS[0], SCALE_RUNS[2])]
    v = verdicts.scale_verdict(table_of([no_ppo, *no_gold]), ROLES)
    assert v.holds is True and "a in {0.25, 4}" in v.evidence and "scale_1" in v.missing
    assert "KL alone decides" in v.evidence


def test_centering_verdict():
    rows = [run_row("c", "baseline", metrics={"rm/test_reward_mean": -0.02}),
            run_row("n", "no_centering", metrics={"rm/test_reward_mean": 4.0})]
    v = verdicts.centering_verdict(table_of(rows), ROLES)
    assert v.holds is True and "0.02 with centering" in v.evidence and "200 times as large" in v.evidence
    v = verdicts.centering_verdict(table_of(rows[:1]), ROLES)
    assert v.holds is None and v.missing == ("no_centering",)
    v = verdicts.centering_verdict(table_of([rows[0], run_row("n", "no_centering", metrics={"ppo/objective/kl": 1})]), ROLES)
    assert v.holds is None and "no_centering (no rm/test_reward_mean)" in v.evidence


def cal_run(run_id: str, scenario: str, ece_after: float, nll_after: float, enabled: bool = True) -> dict:
    return run_row(run_id, scenario, params={"calibration.enabled": enabled}, metrics={
        "calibration/test_ece_before": 0.2, "calibration/test_ece_after": ece_after,
        "calibration/test_oracle_ece": 0.01, "calibration/test_nll_before": 0.7,
        "calibration/test_nll_after": nll_after})


def test_calibration_verdict_checks_every_calibrated_run_and_ignores_disabled_ones():
    ok = cal_run("a", "baseline", ece_after=0.015, nll_after=0.6)
    off = cal_run("b", "no_calibration", ece_after=0.2, nll_after=0.7, enabled=False)
    v = verdicts.calibration_verdict(table_of([ok, off]), ROLES)
    assert v.holds is True and "1 of 1 calibrated runs" in v.evidence
    bad = cal_run("c", "no_centering", ece_after=0.05, nll_after=0.6)
    v = verdicts.calibration_verdict(table_of([ok, bad]), ROLES)
    assert v.holds is False and "Failing: no_centering" in v.evidence
    v = verdicts.calibration_verdict(table_of([off]), ROLES)
    assert v.holds is None and v.missing == ("baseline",)


def test_normalization_verdict_with_one_comparison_names_the_other():
    rows = [ppo_run("z", "baseline", "zscore", 1, kl=1, gold=0.5, tracking_error=0.03),
            ppo_run("n", "norm_none", "calibrated", 1, kl=1, gold=0.5, tracking_error=-0.4)]
    v = verdicts.normalization_verdict(table_of(rows), ROLES)
    assert v.holds is True and "z-score (baseline) +3.0%" in v.evidence and "none (norm_none) -40.0%" in v.evidence
    assert v.missing == ("norm_minmax",)
    rows.append(ppo_run("m", "norm_minmax", "minmax_batch", 1, kl=1, gold=0.5, tracking_error=0.01))
    assert verdicts.normalization_verdict(table_of(rows), ROLES).holds is False
    assert verdicts.normalization_verdict(table_of(rows[1:]), ROLES).missing == ("baseline",)


def test_kl_control_verdict():
    rows = [ppo_run("a", "baseline", "zscore", 1, kl=1, gold=0.5, tracking_error=0.05),
            ppo_run("f", "kl_fixed", "zscore", 1, kl=1, gold=0.5, tracking_error=1.5)]
    v = verdicts.kl_control_verdict(table_of(rows), ROLES)
    assert v.holds is True and "fixed (kl_fixed) +150.0%" in v.evidence
    v = verdicts.kl_control_verdict(table_of(rows[:1]), ROLES)
    assert v.holds is None and "kl_fixed" in v.evidence


# ---- methods: PPO, RLOO, GRPO, DPO runs of the same scenarios ---------------------------------------------------

def rl_run(run_id: str, scenario: str | None, method: str, *, normalization: str = "zscore", a: float = 1.0,
           kl: float = 4.0, error: float = 0.0, gain: float = 0.3, half: float = 0.05, target: float = 4.0,
           minute: int = 0, scale_rewards: str | None = None) -> dict[str, object]:
    """A run of ``--pipelines ppo`` (method ppo) or ``--pipelines rl`` (rloo, grpo): the method's KL summary and
    parameters, and the one evaluation protocol under the eval/ keys of every method."""
    protocol = {"eval/kl_reference": kl, "eval/gold_gain": gain, "eval/gold_gain_ci_low": gain - half,
                "eval/gold_gain_ci_high": gain + half, "eval/gold_policy": 0.2 + gain}
    if method == "ppo":
        return run_row(run_id, scenario, minute=minute, metrics=protocol | {
            "ppo/objective/kl": kl, "eval/updates": 60.0, "eval/kl_second_half_mean": kl, "eval/kl_tracking_error": error,
            "eval/final_beta": 0.1}, params={"normalization.method": normalization, "ppo.raw_reward_multiplier": a,
                                                 "ppo.trainer.kl_target": target, "ppo.trainer.kl_control": "adaptive"})
    row = run_row(run_id, scenario, minute=minute, name="rl", metrics=protocol | {
        "eval/updates": 60.0, "eval/kl_second_half_mean": kl, "eval/kl_tracking_error": error,
        "eval/final_beta": 0.05}, params={"normalization.method": normalization, "rl.raw_reward_multiplier": a,
                                             "rl.kl_target": target, "rl.kl_control": "adaptive",
                                             "rl.scale_rewards": scale_rewards})
    return row | {"tags.rl/algorithm": method}


def test_method_is_the_rl_algorithm_tag_else_ppo_by_its_own_metrics():
    runs = pd.DataFrame([
        rl_run("p", "baseline", "ppo"), rl_run("r", "baseline", "rloo"), rl_run("g", "baseline", "grpo"),
        run_row("d", None, metrics={"eval/gold_gain": 0.1}) | {"tags.rl/algorithm": "dpo"},
        run_row("m", "no_centering", metrics={"rm/test_reward_mean": 2.0}),
        run_row("e", None, metrics={"eval/gold_gain": 0.1, "eval/kl_reference": 2.0}),  # protocol keys only
        run_row("c", None, metrics={"ppo/objective/kl": 1.0}),  # an interrupted PPO run: curves, no summary
    ])
    assert list(tables.method_of(runs)) == ["ppo", "rloo", "grpo", "dpo", None, None, "ppo"]
    assert frontier.method_of is tables.method_of  # one definition, for the table and the frontier
    table = tables.comparison_table(runs)
    assert [m if isinstance(m, str) else None for m in table["method"]] == list(tables.method_of(runs))
    # GRPO's rl.scale_rewards: null is TRL's group; the other methods do not read it
    assert [v if isinstance(v, str) else None for v in table["scale_rewards"]][:3] == [None, None, "group"]


def test_rl_runs_fill_the_tracking_columns_from_their_own_keys_and_are_labelled_by_method():
    rloo = rl_run("r", "norm_minmax", "rloo", normalization="minmax_batch", a=4.0, kl=3.0, error=-0.25, target=4.0)
    rloo |= {"params.ppo.raw_reward_multiplier": "0.25", "params.ppo.trainer.kl_target": "9"}  # not RLOO's: ignored
    runs = [rl_run("p", "norm_minmax", "ppo", kl=6.0, error=0.5, target=4.0), rloo,
            rl_run("g", "scale_4", "grpo", scale_rewards="batch", kl=5.0, error=0.25, target=4.0, a=4.0)]
    table = table_of(runs).set_index("run_id")
    r = table.loc["r"]
    assert (r["method"], r["kl_second_half_mean"], r["kl_tracking_error"], r["final_beta"]) == ("rloo", 3.0, -0.25, 0.05)
    assert (r["kl_target"], r["reward_multiplier"], r["kl_control"], r["kl_reference"]) == (4.0, 4.0, "adaptive", 3.0)
    assert (table.loc["p", "kl_second_half_mean"], table.loc["p", "final_beta"]) == (6.0, 0.1)
    assert table.loc["g", "scale_rewards"] == "batch" and table.loc["g", "reward_multiplier"] == 4.0
    assert list(table["label"]) == ["norm_minmax", "norm_minmax [rloo]", "scale_4 [grpo, batch]"]


def test_the_newest_run_of_a_scenario_is_chosen_per_method():
    # A newer RLOO run of norm_minmax that tracks well does not shadow PPO's, and PPO's older one does not RLOO's.
    rows = [rl_run("pz", "baseline", "ppo", error=0.02), rl_run("pm", "norm_minmax", "ppo", error=0.4, minute=1),
            rl_run("rz", "baseline", "rloo", error=0.1, minute=2),
            rl_run("rm", "norm_minmax", "rloo", error=0.01, minute=3)]
    table = table_of(rows)
    assert verdicts.latest_by_scenario(table, verdicts.PPO)["norm_minmax"]["run_id"] == "pm"
    assert verdicts.latest_by_scenario(table, verdicts.MethodRuns("rloo"))["norm_minmax"]["run_id"] == "rm"
    ppo = verdicts.normalization_verdict(table, ROLES, verdicts.PPO)
    rloo = verdicts.normalization_verdict(table, ROLES, verdicts.MethodRuns("rloo"))
    assert ppo.holds is True and ppo.topic == "Normalization (PPO)" and "min-max (norm_minmax) +40.0%" in ppo.evidence
    assert rloo.holds is False and rloo.topic == "Normalization (RLOO)" and "min-max (norm_minmax) +1.0%" in rloo.evidence
    assert "With the frozen z-score, RLOO tracks" in rloo.claim


def test_scale_verdicts_run_per_method_and_grpo_per_scale_rewards():
    rows = [rl_run("p", "baseline", "ppo")]
    for method, sr, kls in [("rloo", None, (4.0, 4.1, 3.9)), ("grpo", "batch", (4.0, 6.0, 2.0))]:
        rows += [rl_run(f"{method}{a}", f"scale_{a:g}", method, a=a, kl=kl, scale_rewards=sr, minute=1)
                 for a, kl in zip((0.25, 1.0, 4.0), kls)]
    rows.append(rl_run("dpo", "baseline", "dpo"))  # no reward to scale: no verdict of its own
    table = table_of(rows)
    assert verdicts.method_groups(table) == [verdicts.PPO, verdicts.MethodRuns("rloo"), verdicts.MethodRuns("grpo", "batch")]
    found = {v.topic: v for v in verdicts.all_verdicts(table, ROLES)}
    assert found["Reward scale (RLOO)"].holds is True and "KL moves 5.0% (3.9 to 4.1)" in found["Reward scale (RLOO)"].evidence
    grpo = found["Reward scale (GRPO, scale_rewards=batch)"]
    assert grpo.holds is False and "GRPO (scale_rewards=batch)'s KL" in grpo.claim and "KL moves 100.0%" in grpo.evidence
    assert found["Reward scale (PPO)"].holds is None  # only PPO's baseline: one multiplier
    assert {"Normalization methods (PPO)", "Normalization methods (RLOO)",
            "Normalization methods (GRPO, scale_rewards=batch)", "KL control (PPO)"} <= set(found)
    assert not any("DPO" in topic for topic in found)


# ---- the normalization-methods verdict ---------------------------------------------------------------------------

NORM_SCENARIOS = {"zscore": "baseline", "whiten_batch": "norm_whiten", "running_zscore": "norm_running",
                  "calibrated_clip": "norm_clip", "none": "norm_none", "minmax_batch": "norm_minmax",
                  "raw": "scale_1_raw"}


def norm_runs(method: str, figures: dict[str, tuple[float, float]], **kw) -> list[dict[str, object]]:
    """One run per normalization.method of ``figures``: {method: (KL tracking error, gold gain)}."""
    return [rl_run(f"{method}-{m}", NORM_SCENARIOS[m], method, normalization=m, error=e, gain=g, **kw)
            for m, (e, g) in figures.items()]


def test_normalization_methods_verdict_compares_every_method_present():
    figures = {"zscore": (0.05, 0.30), "whiten_batch": (-0.08, 0.32), "running_zscore": (0.1, 0.25),
               "calibrated_clip": (0.2, 0.2), "none": (-0.5, 0.1), "minmax_batch": (0.6, 0.12), "raw": (1.2, 0.05)}
    table = table_of(norm_runs("rloo", figures) + norm_runs("ppo", {"zscore": (0.3, 0.1), "minmax_batch": (0.1, 0.2)}))
    v = verdicts.normalization_methods_verdict(table, ROLES, verdicts.MethodRuns("rloo"))
    assert v.holds is True and v.missing == () and v.topic == "Normalization methods (RLOO)"
    assert v.evidence.startswith("At KL target 4, the newest run of each normalization.method: zscore (baseline [rloo])")
    for m, (e, g) in figures.items():  # every method's figures, with the interval
        assert f"{m} ({NORM_SCENARIOS[m]} [rloo]): KL tracking error {e:+.1%}, gold gain {g:.3g} [{g - 0.05:.3g}" in v.evidence
    assert "whiten_batch buys at least as much gold reward (95% intervals apart)" in v.evidence
    ppo = verdicts.normalization_methods_verdict(table, ROLES, verdicts.PPO)  # PPO's own runs: min-max wins there
    assert ppo.holds is False and "Against minmax_batch: zscore tracks the target less closely." in ppo.evidence
    assert "norm_whiten" in ppo.missing and "whiten_batch" not in ppo.evidence.split("Missing")[0]


def test_normalization_methods_verdict_not_supported_on_gold_and_undecided_without_min_max_or_gold():
    worse_gold = table_of(norm_runs("rloo", {"zscore": (0.05, 0.10), "minmax_batch": (0.6, 0.12)}))
    v = verdicts.normalization_methods_verdict(worse_gold, ROLES, verdicts.MethodRuns("rloo"))
    assert v.holds is False and "zscore buys less gold reward (95% intervals overlap)" in v.evidence
    assert set(v.missing) == {"norm_whiten", "norm_running", "norm_clip", "norm_none", "scale_1_raw"}
    no_minmax = table_of(norm_runs("rloo", {"zscore": (0.05, 0.3), "whiten_batch": (0.0, 0.3)}))
    v = verdicts.normalization_methods_verdict(no_minmax, ROLES, verdicts.MethodRuns("rloo"))
    assert v.holds is None and "norm_minmax" in v.missing and "Needs minmax_batch" in v.evidence
    no_gold = [{k: val for k, val in r.items() if "gold" not in k}
               for r in norm_runs("rloo", {"zscore": (0.05, 0.3), "minmax_batch": (0.6, 0.3)})]
    v = verdicts.normalization_methods_verdict(table_of(no_gold), ROLES, verdicts.MethodRuns("rloo"))
    assert v.holds is None and "gold gain not logged for zscore, minmax_batch" in v.evidence
    assert verdicts.normalization_methods_verdict(table_of([]), ROLES).holds is None


def test_normalization_methods_verdict_compares_at_one_kl_target_by_the_newest_run():
    rows = norm_runs("rloo", {"zscore": (0.05, 0.3), "minmax_batch": (0.6, 0.1)}, minute=1)
    rows += norm_runs("rloo", {"minmax_batch": (0.01, 0.5)}, target=2.0, minute=5)  # newer, at another target
    rows.append(rl_run("older", "norm_whiten", "rloo", normalization="whiten_batch", error=0.9, gain=0.0, minute=0))
    rows.append(rl_run("newer", "norm_whiten", "rloo", normalization="whiten_batch", error=0.1, gain=0.4, minute=2))
    table = table_of(rows)
    v = verdicts.normalization_methods_verdict(table, ROLES, verdicts.MethodRuns("rloo"))
    assert v.holds is True and "minmax_batch (norm_minmax [rloo] (rloo-min)): KL tracking error +60.0%" in v.evidence
    assert "Left out at another KL target: norm_minmax [rloo] (rloo-min) (2)." in v.evidence
    assert "whiten_batch (norm_whiten [rloo] (newer)): KL tracking error +10.0%" in v.evidence


# ---- rendering --------------------------------------------------------------------------------------------------

def ensemble_run(run_id, scenario, size, aggregation, nll, best, gap, gold, minute=0):
    return run_row(run_id, scenario, minute=minute, params={"reward_model.ensemble.aggregation": aggregation},
                   metrics={"ensemble/size": size, "ensemble/test_nll_after": nll, "ensemble/best_member_test_nll_after": best,
                            "calibration/test_nll_after": nll, "eval/final_gold_gap": gap,
                            "eval/gold_policy": gold})


def test_ensemble_calibration_verdict_checks_every_ensemble_run():
    baseline = run_row("b", "baseline", metrics={"eval/final_gold_gap": 0.9, "eval/gold_policy": 0.6})
    good = [ensemble_run("m", "ensemble_mean", 5, "mean", 0.550, 0.556, 0.5, 0.65),
            ensemble_run("n", "ensemble_min", 5, "min", 0.553, 0.556, 0.4, 0.62)]
    v = verdicts.ensemble_calibration_verdict(table_of([baseline, *good]), ROLES)
    assert v.holds is True and "ensemble_mean: 0.55 vs best member 0.556" in v.evidence
    worse = ensemble_run("s", "ensemble_mean_minus_std", 5, "mean_minus_std", 0.560, 0.556, 0.3, 0.6)
    assert verdicts.ensemble_calibration_verdict(table_of([baseline, *good, worse]), ROLES).holds is False
    assert verdicts.ensemble_calibration_verdict(table_of([baseline]), ROLES).holds is None


def test_over_optimization_verdict_compares_each_ensemble_with_one_model():
    baseline = run_row("b", "baseline", metrics={"eval/final_gold_gap": 0.9, "eval/gold_policy": 0.6})
    runs = [baseline, ensemble_run("m", "ensemble_mean", 5, "mean", 0.55, 0.556, 0.5, 0.65),
            ensemble_run("n", "ensemble_min", 5, "min", 0.55, 0.556, 0.4, 0.62)]
    v = verdicts.over_optimization_verdict(table_of(runs), ROLES)
    assert v.holds is True and "baseline 0.9 / 0.6" in v.evidence and "ensemble_min 0.4 / 0.62" in v.evidence
    runs.append(ensemble_run("s", "ensemble_mean_minus_std", 5, "mean_minus_std", 0.55, 0.556, 1.2, 0.6))
    assert verdicts.over_optimization_verdict(table_of(runs), ROLES).holds is False
    assert verdicts.over_optimization_verdict(table_of(runs[1:]), ROLES).holds is None  # no baseline
    table = table_of(runs)
    assert list(table.loc[table["scenario"] == "ensemble_min", "final_gold_gap"]) == [0.4]
    assert "Reward ensembles and over-optimization" in render.render_markdown(table, [v], experiment="e")
    assert "Every gap is negative" not in v.evidence
    cautious = [run_row("b", "baseline", metrics={"eval/final_gold_gap": -0.7, "eval/gold_policy": 0.6}),
                ensemble_run("m", "ensemble_mean", 5, "mean", 0.55, 0.556, -0.75, 0.65)]
    v = verdicts.over_optimization_verdict(table_of(cautious), ROLES)
    assert v.holds is True and "Every gap is negative" in v.evidence
    # a regime compares its own scenarios only
    lowdata = [run_row("l", "lowdata", metrics={"eval/final_gold_gap": 0.5, "eval/gold_policy": 0.3}),
               ensemble_run("lm", "lowdata_ensemble_mean", 5, "mean", 0.62, 0.63, 0.2, 0.4)]
    v = verdicts.over_optimization_verdict(table_of(cautious + lowdata), ROLES, "lowdata")
    assert v.holds is True and v.topic == "Over-optimization (lowdata)"
    assert "lowdata 0.5 / 0.3" in v.evidence and "ensemble_mean -0.75" not in v.evidence


def test_report_renders_tables_verdicts_and_an_embedded_figure():
    curves = (keys.PPO_KL, keys.PPO_KL_TARGET, keys.PPO_BETA, keys.PPO_REWARD_GOLD)
    histories = pd.concat([history(rid, key, list(np.linspace(0.5, 1.0, 6))) for rid in ("t025", "r4") for key in curves])
    runs = pd.DataFrame(SCALE_RUNS + [run_row("x<y>", None, name="a|b", metrics={"rm/test_accuracy": 0.8})])
    r = render.build_report(runs, histories, roles=ROLES, experiment="exp", source="sqlite:///m.db", selection="everything")
    assert "## Verdicts" in r.markdown and "**Reward scale (PPO): supported.**" in r.markdown
    assert "a\\|b (x<y>)" in r.markdown  # pipes escaped in Markdown table cells
    assert f"]({render.FIGURE_FILE})" in r.markdown
    assert "data:image/png;base64," in r.html and "x&lt;y&gt;" in r.html and "<script" not in r.html
    assert "Normalization" in r.markdown and "Not logged by the selected runs." in r.markdown
    assert len(r.figure.axes) == 4 and len(r.figure.axes[0].get_lines()) == 4  # two runs, each with its target
    assert not r.figure.axes[3].get_lines()  # no gold gap logged: the panel says so instead of plotting


def test_report_shows_each_method_its_curves_target_and_protocol_kl():
    runs = pd.DataFrame([rl_run("p", "norm_minmax", "ppo", normalization="minmax_batch", error=0.3),
                         rl_run("r", "norm_minmax", "rloo", normalization="minmax_batch", kl=2.5, target=3.0, minute=1)])
    histories = pd.concat([*(history("p", k, [1.0, 2.0, 3.0]) for k in (keys.PPO_KL, keys.PPO_KL_TARGET, keys.PPO_BETA,
                                                                      keys.PPO_REWARD_GOLD_GAP)),
                           *(history("r", k, [1.0, 2.0]) for k in (keys.RL_KL, keys.RL_BETA, keys.RL_REWARD_GOLD))])
    r = render.build_report(runs, histories, roles=ROLES, experiment="exp")
    kl, beta, gold, gap = r.figure.axes
    assert len(kl.get_lines()) == 4 and len(beta.get_lines()) == 2  # each run's KL and its dashed target
    assert list(kl.get_lines()[3].get_ydata()) == [3.0, 3.0]  # RLOO's target: its rl.kl_target
    assert len(gold.get_lines()) == 1 and len(gap.get_lines()) == 1  # PPO logged no gold curve, RLOO no gap
    section = r.markdown.split("## RL: KL tracking and the evaluation protocol")[1].split("##")[0]
    assert "| label | method | kl_second_half_mean | kl_target |" in section and "kl_reference" in section
    assert "| norm_minmax [rloo] | rloo | 2.5 | 3 |" in section
    assert "**Normalization (RLOO): undecided.**" in r.markdown and "Normalization methods (RLOO)" in r.html
    assert set(tables.HISTORY_KEYS) >= {keys.RL_KL, keys.RL_BETA, keys.RL_REWARD_GOLD, keys.PPO_KL}


def test_report_without_runs_says_so():
    r = render.build_report(pd.DataFrame(columns=["run_id", "start_time"]), None, roles=ROLES, experiment="exp",
                            notes=["Experiment `exp` not found."])
    assert "No matching runs" in r.markdown and "No matching runs" in r.html
    assert "Experiment `exp` not found." in r.markdown and r.verdicts == [] and r.table.empty


def test_save_report_writes_the_four_files(tmp_path):
    r = render.build_report(pd.DataFrame(SCALE_RUNS), None, roles=ROLES, experiment="exp")
    paths = render.save_report(r, tmp_path / "out")
    assert {p.name for p in paths.values()} == set(render.REPORT_FILES.values())
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pd.read_csv(paths["table"])) == len(SCALE_RUNS)


# ---- the notebook -----------------------------------------------------------------------------------------------

def test_notebook_is_nbformat_4_without_outputs_and_its_code_parses():
    nb = json.loads((ROOT / "notebooks" / "compare_runs.ipynb").read_text())
    assert nb["nbformat"] == 4 and "kernelspec" in nb["metadata"]
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    for cell in code:
        ast.parse("".join(cell["source"]))
    assert any("from calibrated_rlhf.reporting import render" in "".join(c["source"]) for c in code)
