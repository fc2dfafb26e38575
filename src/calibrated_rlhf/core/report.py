"""Side-by-side comparison of MLflow runs: one table, overlaid PPO curves, verdicts computed from the numbers.

Everything but :func:`load_runs` and :func:`load_histories` is a pure function of two DataFrames:

* ``runs``: one row per run, as ``mlflow.search_runs`` returns them (``run_id``, ``start_time``,
  ``metrics.<key>``, ``params.<key>``, ``tags.<key>``);
* ``histories``: per-step metric values in long form, columns ``run_id``, ``key``, ``step``, ``value``.

A run may lack any metric (a run of some pipelines only); its cells are NaN and every verdict that needs
them says what is missing instead of guessing. When a scenario has several runs, the verdicts use its
most recent one.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Table column -> MLflow metric key (the latest value search_runs reports).
METRICS: dict[str, str] = {
    "reward_offset": "rm/test_reward_mean",
    "rm_accuracy": "rm/test_accuracy",
    "rm_bayes_accuracy": "rm/test_bayes_accuracy",
    "temperature": "calibration/temperature",
    "nll_before": "calibration/test_nll_before",
    "nll_after": "calibration/test_nll_after",
    "bayes_nll": "calibration/test_bayes_nll",
    "ece_before": "calibration/test_ece_before",
    "ece_after": "calibration/test_ece_after",
    "oracle_ece": "calibration/test_oracle_ece",
    "norm_mean": "normalization/mean",
    "norm_std": "normalization/std",
    "norm_n": "normalization/n",
    "kl_second_half_mean": "ppo/eval/kl_second_half_mean",
    "kl_target": "ppo/objective/kl_target",
    "kl_tracking_error": "ppo/eval/kl_tracking_error",
    "final_beta": "ppo/objective/beta",
    "gold_reward": "ppo/eval/gold_policy",
    "gold_reference": "ppo/eval/gold_reference",
    "gold_gain": "ppo/eval/gold_gain",
    "gold_gain_ci_low": "ppo/eval/gold_gain_ci_low",
    "gold_gain_ci_high": "ppo/eval/gold_gain_ci_high",
    "episodes_per_s": "ppo/perf/episodes_per_s",
    "ensemble_size": "ensemble/size",
    "ensemble_nll_after": "ensemble/test_nll_after",
    "best_member_nll_after": "ensemble/best_member_test_nll_after",
    "final_gold_gap": "ppo/eval/final_gold_gap",
    "final_ensemble_std": "ppo/eval/final_ensemble_std",
}

# Table column -> flattened MLflow param key.
PARAMS: dict[str, str] = {
    "reward": "ppo.reward",
    "reward_multiplier": "ppo.raw_reward_multiplier",
    "kl_control": "ppo.trainer.kl_control",
    "center_rewards_coefficient": "reward_model.training.center_rewards_coefficient",
    "calibration_enabled": "calibration.enabled",
    "normalization_enabled": "normalization.enabled",
    "aggregation": "reward_model.ensemble.aggregation",
}

KL, KL_TARGET, BETA, GOLD, GOLD_GAP, EPISODES_PER_S = (
    "ppo/objective/kl", "ppo/objective/kl_target", "ppo/objective/beta", "ppo/rewards/gold", "ppo/rewards/gold_gap",
    "ppo/perf/episodes_per_s")
HISTORY_KEYS: tuple[str, ...] = (KL, KL_TARGET, BETA, GOLD, GOLD_GAP, EPISODES_PER_S)

# A run with none of these metric prefixes did not train anything (a reporting run, an aborted one).
PIPELINE_PREFIXES: tuple[str, ...] = ("rm/", "calibration/", "normalization/", "ppo/")

IDENTITY = ["label", "run_id", "run_name", "scenario", "start_time"]
COLUMNS = IDENTITY + list(PARAMS) + list(METRICS)

SECTIONS: dict[str, list[str]] = {
    "Runs": ["label", "run_id", "scenario", *PARAMS],
    "Reward model and calibration": ["label", "reward_offset", "rm_accuracy", "rm_bayes_accuracy", "temperature",
                                     "nll_before", "nll_after", "bayes_nll", "ece_before", "ece_after", "oracle_ece"],
    "Normalization": ["label", "norm_mean", "norm_std", "norm_n"],
    "PPO": ["label", "kl_second_half_mean", "kl_target", "kl_tracking_error", "final_beta", "gold_reward",
            "gold_reference", "gold_gain", "gold_gain_ci_low", "gold_gain_ci_high", "episodes_per_s"],
    "Reward ensembles and over-optimization": [
        "label", "ensemble_size", "aggregation", "nll_after", "best_member_nll_after", "gold_reward", "gold_gain",
        "final_gold_gap", "final_ensemble_std"],
}

SCALE_MULTIPLIERS: tuple[float, ...] = (0.25, 1.0, 4.0)
FIGURE_FILE = "comparison_curves.png"
REPORT_FILES = {"markdown": "comparison_report.md", "html": "comparison_report.html",
                "table": "comparison_table.csv", "figure": FIGURE_FILE}


# ---- selecting runs -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSelection:
    """Which runs to compare: explicit ids, or an experiment narrowed by filter, scenarios and recency."""

    experiment: str = "calibrated_rlhf"
    run_ids: tuple[str, ...] = ()
    last: int | None = None
    filter_string: str = ""
    scenarios: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.run_ids:
            return f"runs {', '.join(self.run_ids)}"
        parts = [f"experiment `{self.experiment}`"]
        if self.filter_string:
            parts.append(f"filter `{self.filter_string}`")
        if self.scenarios:
            parts.append(f"scenarios {', '.join(self.scenarios)}")
        if self.last:
            parts.append(f"the {self.last} most recent")
        return ", ".join(parts)


def is_pipeline_run(runs: pd.DataFrame) -> pd.Series:
    """True for runs that logged at least one metric of a training pipeline."""
    cols = [c for c in runs.columns if c.startswith("metrics.") and c[len("metrics."):].startswith(PIPELINE_PREFIXES)]
    if not cols:
        return pd.Series(False, index=runs.index)
    return runs[cols].notna().any(axis=1)


def select_runs(runs: pd.DataFrame, selection: RunSelection,
                exclude_run_ids: Iterable[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    """Newest first: drop excluded and non-pipeline runs, keep the chosen scenarios, then the ``last`` N.

    Returns the runs and notes on what was left out, for the report.
    """
    notes: list[str] = []
    if runs.empty:
        return runs, notes
    exclude = set(exclude_run_ids)
    if exclude & set(runs["run_id"]):
        notes.append("Left out the run this report is logged to.")
        runs = runs[~runs["run_id"].isin(exclude)]
    keep = is_pipeline_run(runs)
    if (~keep).any():
        names = ", ".join(run_labels(runs[~keep]))
        notes.append(f"Left out {int((~keep).sum())} run(s) with no rm/, calibration/, normalization/ or ppo/ "
                     f"metrics (reporting or empty runs): {names}.")
        runs = runs[keep]
    if selection.scenarios and not selection.run_ids:
        runs = runs[_tag(runs, "scenario").isin(selection.scenarios)]
    if "start_time" in runs.columns:
        runs = runs.sort_values("start_time", ascending=False, kind="stable")
    if selection.last and not selection.run_ids:
        runs = runs.head(selection.last)
    return runs.reset_index(drop=True), notes


def load_runs(selection: RunSelection, exclude_run_ids: Iterable[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    """The selected runs from the current MLflow tracking URI (``mlflow.set_tracking_uri`` to change it)."""
    import mlflow

    notes: list[str] = []
    if selection.run_ids:
        quoted = ", ".join(f"'{i}'" for i in selection.run_ids)
        runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"attributes.run_id IN ({quoted})")
        absent = sorted(set(selection.run_ids) - set(runs.get("run_id", [])))
        if absent:
            notes.append(f"Runs not found: {', '.join(absent)}.")
    elif mlflow.get_experiment_by_name(selection.experiment) is None:
        return pd.DataFrame(columns=["run_id", "start_time"]), [f"Experiment `{selection.experiment}` not found."]
    else:
        runs = mlflow.search_runs(experiment_names=[selection.experiment], filter_string=selection.filter_string,
                                  order_by=["attributes.start_time DESC"])
    runs, selected_notes = select_runs(runs, selection, exclude_run_ids)
    return runs, notes + selected_notes


def load_histories(run_ids: Iterable[str], keys: Sequence[str] = HISTORY_KEYS) -> pd.DataFrame:
    """Per-step values of ``keys`` for each run, in long form (``run_id``, ``key``, ``step``, ``value``)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    rows = [(run_id, key, m.step, m.value) for run_id in run_ids for key in keys
            for m in client.get_metric_history(run_id, key)]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


# ---- the table ------------------------------------------------------------------------------------------------

def _tag(runs: pd.DataFrame, name: str) -> pd.Series:
    """A tag's values, None where a run lacks it (search_runs gives NaN or None there)."""
    values = runs[f"tags.{name}"] if f"tags.{name}" in runs.columns else [None] * len(runs)
    return pd.Series([v if isinstance(v, str) and v else None for v in values], index=runs.index, dtype=object)


def run_labels(runs: pd.DataFrame) -> list[str]:
    """The scenario tag, else the run name and short id; a repeated label gets the short id too."""
    scenarios, names = _tag(runs, "scenario"), _tag(runs, "mlflow.runName")
    labels = [s if s else f"{n or 'run'} ({rid[:8]})" for s, n, rid in zip(scenarios, names, runs["run_id"])]
    counts = pd.Series(labels).value_counts()
    return [f"{lab} ({rid[:8]})" if counts[lab] > 1 and not lab.endswith(f"({rid[:8]})") else lab
            for lab, rid in zip(labels, runs["run_id"])]


def _float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _curve(histories: pd.DataFrame, run_id: str, key: str) -> pd.DataFrame:
    """One metric of one run, ordered by step."""
    if histories.empty:
        return histories
    return histories[(histories["run_id"] == run_id) & (histories["key"] == key)].sort_values("step", kind="stable")


def _history(histories: pd.DataFrame, run_id: str, key: str) -> np.ndarray:
    return _curve(histories, run_id, key)["value"].to_numpy(dtype=np.float64)


def comparison_table(runs: pd.DataFrame, histories: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per run with the columns of :data:`COLUMNS`, NaN where a run did not log a metric.

    Histories refine what the summary metrics cannot say: ``final_beta`` is the last beta by step,
    ``episodes_per_s`` the median over updates (the first, warming-up update would skew a mean), and
    the KL columns are recomputed from the KL curve when the PPO evaluation did not log them.
    """
    histories = histories if histories is not None else pd.DataFrame(columns=["run_id", "key", "step", "value"])
    rows = []
    labels = run_labels(runs) if len(runs) else []
    names, scenarios = _tag(runs, "mlflow.runName"), _tag(runs, "scenario")
    for label, name, scenario, (_, run) in zip(labels, names, scenarios, runs.iterrows()):
        run_id = run["run_id"]
        row: dict[str, object] = {"label": label, "run_id": run_id, "run_name": name, "scenario": scenario,
                                  "start_time": run.get("start_time")}
        row |= {col: run.get(f"params.{key}") for col, key in PARAMS.items()}
        row["reward_multiplier"] = _float(row["reward_multiplier"])
        row |= {col: _float(run.get(f"metrics.{key}")) for col, key in METRICS.items()}

        kl, target = _history(histories, run_id, KL), _history(histories, run_id, KL_TARGET)
        beta, speed = _history(histories, run_id, BETA), _history(histories, run_id, EPISODES_PER_S)
        if math.isnan(row["kl_target"]):
            row["kl_target"] = target[-1] if target.size else _float(run.get("params.ppo.trainer.kl_target"))
        if math.isnan(row["kl_second_half_mean"]) and kl.size:
            row["kl_second_half_mean"] = float(kl[len(kl) // 2:].mean())
        if math.isnan(row["kl_tracking_error"]) and row["kl_target"] > 0:
            row["kl_tracking_error"] = row["kl_second_half_mean"] / row["kl_target"] - 1.0
        if beta.size:
            row["final_beta"] = float(beta[-1])
        if speed.size:
            row["episodes_per_s"] = float(np.median(speed))
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


# ---- verdicts -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """A claim, whether the runs support it (None: not enough runs to tell), and the numbers behind it."""

    topic: str
    claim: str
    holds: bool | None
    evidence: str
    missing: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        return {True: "supported", False: "not supported", None: "undecided"}[self.holds]


def relative_spread(values: Iterable[float]) -> float:
    """(max - min) / |mean| of the finite values; NaN with fewer than two, inf around a zero mean."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size < 2:
        return math.nan
    centre = abs(v.mean())
    spread = v.max() - v.min()
    return float(spread / centre) if centre > 0 else (0.0 if spread == 0 else math.inf)


def latest_by_scenario(table: pd.DataFrame) -> dict[str, pd.Series]:
    """The most recent run of each scenario."""
    tagged = table[table["scenario"].notna()]
    if "start_time" in tagged and tagged["start_time"].notna().any():
        tagged = tagged.sort_values("start_time", ascending=False, kind="stable")
    return {row["scenario"]: row for _, row in tagged.drop_duplicates("scenario").iterrows()}


def _num(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3g}"


def _pct(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:+.1%}"


def _lacking(rows: Mapping[str, pd.Series], column: str) -> list[str]:
    return [f"{name} (no {METRICS.get(column, column)})" for name, row in rows.items() if not np.isfinite(row[column])]


def _scale_member(scenario: str, row: pd.Series) -> tuple[str, float] | None:
    """(arm, a) of a scale-experiment run: arm from ``ppo.reward``, a from the multiplier param or the tag."""
    match = re.fullmatch(r"scale_([0-9.]+)(_raw)?", scenario)
    if not match and scenario != "baseline":
        return None
    a = row["reward_multiplier"]
    if not np.isfinite(a):
        a = float(match.group(1)) if match else 1.0
    arm = row["reward"] if isinstance(row["reward"], str) else ("raw" if match and match.group(2) else "normalized")
    return (arm, float(a)) if arm in ("normalized", "raw") else None


def scale_arms(table: pd.DataFrame) -> dict[str, dict[float, pd.Series]]:
    """{"normalized" | "raw": {a: run}} from the scale_* scenarios with PPO's KL logged; the baseline stands
    in for an absent ``scale_1`` (it is the transform at a = 1)."""
    arms: dict[str, dict[float, pd.Series]] = {"normalized": {}, "raw": {}}
    latest = latest_by_scenario(table)
    for scenario in sorted(latest, key=lambda s: s == "baseline"):  # scale_* first, baseline last
        member = _scale_member(scenario, latest[scenario])
        if member and np.isfinite(latest[scenario]["kl_second_half_mean"]):
            arms[member[0]].setdefault(member[1], latest[scenario])
    return arms


def _scale_name(a: float, arm: str) -> str:
    return f"scale_{a:g}" + ("_raw" if arm == "raw" else "")


def _arm_spreads(runs: Mapping[float, pd.Series]) -> dict[str, tuple[float, float, float]]:
    """{"KL": (spread, min, max), "gold reward": ...} over the runs with the value logged."""
    out = {}
    for name, column in (("KL", "kl_second_half_mean"), ("gold reward", "gold_reward")):
        values = [row[column] for row in runs.values() if np.isfinite(row[column])]
        if len(values) >= 2:
            out[name] = (relative_spread(values), min(values), max(values))
    return out


def _describe_spreads(spreads: Mapping[str, tuple[float, float, float]]) -> str:
    return " and ".join(f"{name} moves {s:.1%} ({_num(lo)} to {_num(hi)})" for name, (s, lo, hi) in spreads.items())


def scale_verdict(table: pd.DataFrame, tolerance: float = 0.10) -> Verdict:
    """Across the reward multiplier a: KL (second-half mean) and gold reward spread with and without the transform."""
    claim = (f"With the reward transform, PPO's KL and gold reward stay within {tolerance:.0%} across "
             f"a in {{{', '.join(f'{a:g}' for a in SCALE_MULTIPLIERS)}}}.")
    arms = scale_arms(table)
    missing = tuple(_scale_name(a, arm) for arm in ("normalized", "raw") for a in SCALE_MULTIPLIERS
                    if a not in arms[arm])
    transform = _arm_spreads(arms["normalized"])
    if "KL" not in transform:  # fewer than two multipliers with KL
        return Verdict("Reward scale", claim, None, "Needs at least two multipliers with the transform and PPO's "
                       f"KL logged; missing: {', '.join(missing)}.", missing)
    a_values = ", ".join(f"{a:g}" for a in sorted(arms["normalized"]))
    holds = all(s <= tolerance for s, _, _ in transform.values())
    evidence = (f"With the transform, across a in {{{a_values}}}, {_describe_spreads(transform)}: "
                f"{'within' if holds else 'beyond'} {tolerance:.0%}.")
    if "gold reward" not in transform:
        evidence += " Gold reward not logged (no synthetic task), so KL alone decides."
    raw = _arm_spreads(arms["raw"])
    if "KL" in raw:
        raw_a = ", ".join(f"{a:g}" for a in sorted(arms["raw"]))
        raw_moves = any(s > tolerance for s, _, _ in raw.values())
        evidence += f" Without it (raw reward), across a in {{{raw_a}}}, {_describe_spreads(raw)}"
        evidence += (": the transform is what removes the dependence on a." if holds and raw_moves
                     else "." if raw_moves else f": also within {tolerance:.0%}, so a barely matters on these runs.")
    else:
        evidence += " The raw arm has fewer than two runs with KL logged, so how far they move without is unknown."
    if missing:
        evidence += f" Missing: {', '.join(missing)}."
    return Verdict("Reward scale", claim, holds, evidence, missing)


def centering_verdict(table: pd.DataFrame) -> Verdict:
    """|reward offset| (mean test reward) with the centering loss (baseline) against without (no_centering)."""
    claim = "The centering loss keeps the reward offset (mean test reward) closer to zero than training without it."
    latest = latest_by_scenario(table)
    missing = tuple(s for s in ("baseline", "no_centering") if s not in latest)
    if missing:
        return Verdict("Centering", claim, None, f"Needs scenarios baseline and no_centering; missing: "
                       f"{', '.join(missing)}.", missing)
    rows = {s: latest[s] for s in ("baseline", "no_centering")}
    lacking = _lacking(rows, "reward_offset")
    if lacking:
        return Verdict("Centering", claim, None, f"Reward offset not logged: {', '.join(lacking)}.")
    with_c, without = abs(rows["baseline"]["reward_offset"]), abs(rows["no_centering"]["reward_offset"])
    ratio = f", {without / with_c:.3g} times as large" if with_c > 0 else ""
    return Verdict("Centering", claim, bool(with_c < without),
                   f"|reward offset| is {_num(with_c)} with centering (baseline) and {_num(without)} without it "
                   f"(no_centering){ratio}.")


def _disabled(value: object) -> bool:
    return str(value).strip().lower() in ("false", "0", "no")


def calibration_verdict(table: pd.DataFrame, ece_margin: float = 0.01) -> Verdict:
    """Every calibrated run: ECE after <= oracle ECE + margin, and NLL after <= NLL before."""
    claim = (f"After temperature scaling, test ECE is at most the oracle ECE + {ece_margin:g} and test NLL does "
             "not increase.")
    runs = table[~table["calibration_enabled"].map(_disabled)]
    runs = runs[runs[["ece_after", "oracle_ece", "nll_before", "nll_after"]].notna().all(axis=1)]
    if runs.empty:
        return Verdict("Calibration", claim, None,
                       "No calibrated run logged ECE after, oracle ECE and NLL before/after (baseline, say).",
                       ("baseline",))
    ece_excess = runs["ece_after"] - runs["oracle_ece"]
    nll_change = runs["nll_after"] - runs["nll_before"]
    ok = (ece_excess <= ece_margin) & (nll_change <= 0)
    evidence = (f"{int(ok.sum())} of {len(runs)} calibrated runs meet both; ECE after minus oracle ECE is "
                f"{_num(ece_excess.min())} to {_num(ece_excess.max())}, NLL change {_num(nll_change.min())} to "
                f"{_num(nll_change.max())}.")
    if not ok.all():
        evidence += f" Failing: {', '.join(runs.loc[~ok, 'label'])}."
    return Verdict("Calibration", claim, bool(ok.all()), evidence)


def _tracking_verdict(table: pd.DataFrame, topic: str, claim: str, best: tuple[str, str],
                      others: Sequence[tuple[str, str]]) -> Verdict:
    """``best`` (scenario, description) tracks the KL target more closely (|tracking error|) than each of ``others``."""
    latest = latest_by_scenario(table)
    present = [(s, d) for s, d in others if s in latest]
    missing = tuple(s for s, _ in [best, *others] if s not in latest)
    if best[0] not in latest or not present:
        return Verdict(topic, claim, None, f"Needs {best[0]} and at least one of "
                       f"{', '.join(s for s, _ in others)}; missing: {', '.join(missing)}.", missing)
    rows = {s: latest[s] for s, _ in [best, *present]}
    lacking = _lacking(rows, "kl_tracking_error")
    if lacking:
        return Verdict(topic, claim, None, f"KL tracking error not logged: {', '.join(lacking)}.", missing)
    err = {s: abs(row["kl_tracking_error"]) for s, row in rows.items()}
    holds = all(err[best[0]] < err[s] for s, _ in present)
    evidence = "KL tracking error (second-half mean KL / target - 1): " + ", ".join(
        f"{d} ({s}) {_pct(rows[s]['kl_tracking_error'])}" for s, d in [best, *present]) + "."
    if missing:
        evidence += f" Missing: {', '.join(missing)}."
    return Verdict(topic, claim, holds, evidence, missing)


def normalization_verdict(table: pd.DataFrame) -> Verdict:
    """KL tracking error of the frozen z-score (baseline) against no normalization and per-batch min-max."""
    return _tracking_verdict(
        table, "Normalization",
        "With the frozen z-score, PPO tracks the KL target more closely than without normalization or with "
        "per-batch min-max.",
        ("baseline", "z-score"), [("norm_none", "none"), ("norm_minmax", "min-max")])


def kl_control_verdict(table: pd.DataFrame) -> Verdict:
    """KL tracking error of the adaptive controller (baseline) against a fixed beta (kl_fixed)."""
    return _tracking_verdict(table, "KL control",
                             "The adaptive KL controller tracks the KL target more closely than a fixed beta.",
                             ("baseline", "adaptive"), [("kl_fixed", "fixed")])


def _is_ensemble(row: pd.Series) -> bool:
    return _float(row.get("ensemble_size")) > 1


def ensemble_calibration_verdict(table: pd.DataFrame) -> Verdict:
    """Every ensemble run: the calibrated ensemble's test NLL <= its best calibrated member's."""
    claim = "A calibrated reward ensemble predicts held-out preferences at least as well (test NLL) as its best member."
    runs = table[table.apply(_is_ensemble, axis=1)] if len(table) else table
    runs = runs[runs[["ensemble_nll_after", "best_member_nll_after"]].notna().all(axis=1)]
    if runs.empty:
        return Verdict("Ensemble calibration", claim, None, "No ensemble run (reward_model.ensemble_size > 1) "
                       "logged ensemble/test_nll_after; run the ensemble_* scenarios.", ("ensemble_mean",))
    gain = runs["best_member_nll_after"] - runs["ensemble_nll_after"]
    evidence = "; ".join(f"{r['label']}: {_num(r['ensemble_nll_after'])} vs best member "
                         f"{_num(r['best_member_nll_after'])}" for _, r in runs.iterrows()) + "."
    return Verdict("Ensemble calibration", claim, bool((gain >= 0).all()), evidence)


def over_optimization_verdict(table: pd.DataFrame, regime: str = "") -> Verdict:
    """Each ensemble scenario of a regime against its one-model scenario: final proxy-gold gap, gold reward.

    Regime "" compares ``ensemble_*`` with ``baseline``; regime "lowdata" compares
    ``lowdata_ensemble_*`` with ``lowdata``.
    """
    single = regime or "baseline"
    prefix = f"{regime}_ensemble_" if regime else "ensemble_"
    topic = f"Over-optimization ({regime})" if regime else "Over-optimization"
    claim = ("Optimizing an ensemble leaves no more over-optimization (final proxy-gold gap, positive when the proxy "
             f"has run ahead of the gold reward) than optimizing one reward model ({single}), for every aggregation.")
    latest = latest_by_scenario(table)
    ensembles = {s: r for s, r in latest.items() if s.startswith(prefix) and _is_ensemble(r)}
    if single not in latest or not ensembles:
        missing = tuple(s for s in (single, f"{prefix}mean") if s not in latest)
        return Verdict(topic, claim, None, f"Needs {single} and at least one {prefix}* scenario.", missing)
    rows = {single: latest[single], **ensembles}
    lacking = _lacking(rows, "final_gold_gap")
    if lacking:
        return Verdict(topic, claim, None, f"Proxy-gold gap not logged: {', '.join(lacking)}.")
    base = rows[single]["final_gold_gap"]
    holds = all(r["final_gold_gap"] <= base for r in ensembles.values())
    evidence = "Final proxy-gold gap (calibrated-logit units) and gold reward: " + ", ".join(
        f"{s} {_num(r['final_gold_gap'])} / {_num(r['gold_reward'])}" for s, r in rows.items()) + "."
    if all(r["final_gold_gap"] <= 0 for r in rows.values()):
        evidence += (" Every gap is negative: the proxy under-credits the gold improvement, so at this KL budget "
                     "none of these runs is over-optimized and the comparison is between degrees of caution.")
    return Verdict(topic, claim, holds, evidence)


def all_verdicts(table: pd.DataFrame, tolerance: float = 0.10, ece_margin: float = 0.01) -> list[Verdict]:
    return [scale_verdict(table, tolerance), centering_verdict(table), calibration_verdict(table, ece_margin),
            normalization_verdict(table), kl_control_verdict(table), ensemble_calibration_verdict(table),
            over_optimization_verdict(table), over_optimization_verdict(table, "lowdata")]


# ---- figure ---------------------------------------------------------------------------------------------------

def curves_figure(histories: pd.DataFrame, labels: Mapping[str, str]) -> Figure:
    """KL per update (dashed: each run's target), beta, gold reward and proxy-gold gap, one line per run
    (``labels``: id -> label)."""
    fig = Figure(figsize=(19.0, 4.4), layout="constrained")
    FigureCanvasAgg(fig)  # an Agg canvas of its own: no pyplot state, nothing opens a window
    axes = fig.subplots(1, 4)
    panels = ((KL, "KL per update (nats)"), (BETA, "beta"), (GOLD, "gold reward (batch mean)"),
              (GOLD_GAP, "proxy - gold gap (calibrated logits)"))
    # One colour per run across the three panels; tab20 keeps up to 20 runs apart.
    palette = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    for ax, (key, title) in zip(axes, panels):
        drawn = False
        for i, (run_id, label) in enumerate(labels.items()):
            color = palette(i % palette.N)
            curve = _curve(histories, run_id, key)
            if curve.empty:
                continue
            ax.plot(curve["step"], curve["value"], color=color, linewidth=1.2, label=label)
            drawn = True
            target = _curve(histories, run_id, KL_TARGET) if key == KL else curve.iloc[:0]
            if not target.empty:
                ax.plot(target["step"], target["value"], color=color, linestyle="--", linewidth=0.9)
        ax.set_title(title + (" (dashed: target)" if key == KL else ""))
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged by the selected runs", ha="center", va="center", transform=ax.transAxes)
    if any(ax.get_lines() for ax in axes):
        fig.legend(*next(ax for ax in axes if ax.get_lines()).get_legend_handles_labels(), loc="outside right upper",
                   fontsize="small")
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# ---- rendering ------------------------------------------------------------------------------------------------

def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)) or value is pd.NaT:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d %H:%M")
    return str(value)


def _section_frame(table: pd.DataFrame, title: str) -> pd.DataFrame | None:
    """A section's columns as display strings for the runs that logged any of its values (every run in
    "Runs"), or None when there are none."""
    columns = SECTIONS[title]
    values = [c for c in columns if c not in ("label", "run_id", "scenario")]
    logged = table[values].notna().any(axis=1) | (title == "Runs")
    if not logged.any():
        return None
    shown = table.loc[logged, list(columns)].copy()
    if "run_id" in shown:
        shown["run_id"] = shown["run_id"].str[:8]
    return shown.map(_cell)


def markdown_table(frame: pd.DataFrame) -> str:
    def row(cells: Iterable[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [row(frame.columns), row(["---"] * len(frame.columns))]
    return "\n".join(lines + [row(r) for r in frame.itertuples(index=False)])


@dataclass(frozen=True)
class Report:
    """Everything one comparison produces; ``markdown`` links the figure as :data:`FIGURE_FILE`."""

    table: pd.DataFrame
    verdicts: list[Verdict]
    figure: Figure
    markdown: str
    html: str


def _header_lines(table: pd.DataFrame, experiment: str, source: str, selection: str) -> list[str]:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"{len(table)} run(s) of experiment `{experiment}`" + (f" from `{source}`" if source else "")
             + f", generated {when}."]
    if selection:
        lines.append(f"Selection: {selection}.")
    if not table.empty:
        lines.append("Where a scenario has several runs, the verdicts use its most recent one.")
    return lines


def render_markdown(table: pd.DataFrame, verdicts: Sequence[Verdict], *, experiment: str, source: str = "",
                    selection: str = "", notes: Sequence[str] = ()) -> str:
    """The report as Markdown; the figure is referenced as :data:`FIGURE_FILE` beside it."""
    out = [f"# Run comparison: {experiment}", "", *_header_lines(table, experiment, source, selection), ""]
    out += [f"- {n}" for n in notes] + ([""] if notes else [])
    if table.empty:
        out += ["**No matching runs**: nothing to compare. Run some pipelines (or scenarios) first, or widen "
                "the selection.", ""]
        return "\n".join(out)
    out += ["## Verdicts", ""]
    out += [f"- **{v.topic}: {v.status}.** {v.claim} {v.evidence}" for v in verdicts] + [""]
    for title in SECTIONS:
        frame = _section_frame(table, title)
        shown = markdown_table(frame) if frame is not None else "Not logged by the selected runs."
        out += [f"## {title}", "", shown, ""]
    out += ["## Curves", "", f"![KL per update with its target, beta and gold reward, per run]({FIGURE_FILE})", ""]
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}.supported{color:#1a7f37}.not-supported{color:#c62828}
.undecided{color:#8a6d00}img{max-width:100%}"""


def _inline(text: str) -> str:
    """Escaped text with Markdown's `code` spans as <code>, so both renderings share their sentences."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def render_html(table: pd.DataFrame, verdicts: Sequence[Verdict], figure: Figure, *, experiment: str,
                source: str = "", selection: str = "", notes: Sequence[str] = ()) -> str:
    """The report as one self-contained HTML page: the figure is embedded as a base64 PNG."""
    esc = html.escape
    body = [f"<h1>Run comparison: {esc(experiment)}</h1>"]
    body += [f"<p>{_inline(line)}</p>" for line in _header_lines(table, experiment, source, selection)]
    if notes:
        body.append("<ul>" + "".join(f"<li>{_inline(n)}</li>" for n in notes) + "</ul>")
    if table.empty:
        body.append("<p><strong>No matching runs</strong>: nothing to compare. Run some pipelines (or scenarios) "
                    "first, or widen the selection.</p>")
    else:
        body.append("<h2>Verdicts</h2><ul>")
        body += [f'<li><strong class="{v.status.replace(" ", "-")}">{esc(v.topic)}: {v.status}.</strong> '
                 f"{_inline(v.claim)} {_inline(v.evidence)}</li>" for v in verdicts]
        body.append("</ul>")
        for title in SECTIONS:
            frame = _section_frame(table, title)
            body.append(f"<h2>{esc(title)}</h2>")
            body.append(frame.to_html(index=False, border=0) if frame is not None
                        else "<p>Not logged by the selected runs.</p>")
        png = base64.b64encode(figure_png(figure)).decode("ascii")
        body.append("<h2>Curves</h2>")
        body.append(f'<img alt="KL per update with its target, beta and gold reward, per run" '
                    f'src="data:image/png;base64,{png}">')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Run comparison: {esc(experiment)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def build_report(runs: pd.DataFrame, histories: pd.DataFrame | None = None, *, experiment: str, source: str = "",
                 selection: str = "", notes: Sequence[str] = (), tolerance: float = 0.10,
                 ece_margin: float = 0.01) -> Report:
    """Table, verdicts, figure and both renderings from runs (``search_runs`` shape) and their histories."""
    histories = histories if histories is not None else pd.DataFrame(columns=["run_id", "key", "step", "value"])
    table = comparison_table(runs, histories)
    verdicts = all_verdicts(table, tolerance, ece_margin) if not table.empty else []
    figure = curves_figure(histories, dict(zip(table["run_id"], table["label"])))
    context = dict(experiment=experiment, source=source, selection=selection, notes=notes)
    return Report(table, verdicts, figure, render_markdown(table, verdicts, **context),
                  render_html(table, verdicts, figure, **context))


def save_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write the four files of :data:`REPORT_FILES` into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, name in REPORT_FILES.items()}
    paths["markdown"].write_text(report.markdown, encoding="utf-8")
    paths["html"].write_text(report.html, encoding="utf-8")
    report.table.to_csv(paths["table"], index=False)
    paths["figure"].write_bytes(figure_png(report.figure))
    return paths
