"""Verdicts computed from the comparison table's numbers, never from a run's name alone.

Which scenario plays which part (the reference, the run without centering, the scale experiment's
arms, ...) is configuration, :class:`ScenarioRoles`: the names are the runs' ``scenario`` tags, which
``conf/scenario_<name>/`` sets, and the project lists the roles in ``conf/base/parameters_reporting.yml``
(``reporting.scenario_roles``). A verdict whose scenarios are missing says which instead of guessing.
When a scenario has several runs, the verdicts use its most recent one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from calibrated_rlhf.reporting.table import METRICS, as_float

ARMS = ("zscore", "raw")  # the scale experiment: through the reward transform, and the raw reward


@dataclass(frozen=True)
class ScaleScenario:
    """One run of the scale experiment: the normalization method (what PPO optimizes) and the multiplier a
    of the raw outputs."""

    scenario: str
    method: str
    multiplier: float


@dataclass(frozen=True)
class EnsembleRegime:
    """A one-model scenario and the prefix of the ensemble scenarios compared with it."""

    single_model: str
    ensemble_prefix: str


@dataclass(frozen=True)
class ScenarioRoles:
    """Which scenario tag plays which part in the verdicts."""

    reference: str  # the project's defaults; it also stands in for the transform at a = 1
    no_centering: str
    no_normalization: str
    minmax_normalization: str
    fixed_kl: str
    scale: tuple[ScaleScenario, ...]
    ensembles: tuple[EnsembleRegime, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScenarioRoles:
        """From the ``reporting.scenario_roles`` block (plain dicts and lists, as YAML gives them)."""
        return cls(**{**data,
                      "scale": tuple(ScaleScenario(s["scenario"], s["method"], float(s["multiplier"]))
                                     for s in data["scale"]),
                      "ensembles": tuple(EnsembleRegime(e["single_model"], e["ensemble_prefix"])
                                         for e in data["ensembles"])})

    def names(self) -> list[str]:
        """Every scenario named exactly (ensemble scenarios are named by prefix)."""
        return [self.reference, self.no_centering, self.no_normalization, self.minmax_normalization, self.fixed_kl,
                *(s.scenario for s in self.scale), *(e.single_model for e in self.ensembles)]


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


# ---- reward scale ----------------------------------------------------------------------------------------------

def _scale_member(scenario: str, row: pd.Series, roles: ScenarioRoles) -> tuple[str, float] | None:
    """(arm, a) of a scale-experiment run: what its parameters say, else what its role says."""
    role = next((s for s in roles.scale if s.scenario == scenario), None)
    if role is None and scenario != roles.reference:
        return None
    a = row["reward_multiplier"]
    if not np.isfinite(a):
        a = role.multiplier if role else 1.0
    method = row["normalization_method"]
    arm = method if isinstance(method, str) else (role.method if role else "zscore")
    return (arm, float(a)) if arm in ARMS else None


def scale_arms(table: pd.DataFrame, roles: ScenarioRoles) -> dict[str, dict[float, pd.Series]]:
    """{"zscore" | "raw": {a: run}} from the scale scenarios with PPO's KL logged; the reference stands
    in for an absent a = 1 with the transform (it is the transform at a = 1)."""
    arms: dict[str, dict[float, pd.Series]] = {arm: {} for arm in ARMS}
    latest = latest_by_scenario(table)
    for scenario in sorted(latest, key=lambda s: s == roles.reference):  # scale scenarios first, reference last
        member = _scale_member(scenario, latest[scenario], roles)
        if member and np.isfinite(latest[scenario]["kl_second_half_mean"]):
            arms[member[0]].setdefault(member[1], latest[scenario])
    return arms


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


def scale_verdict(table: pd.DataFrame, roles: ScenarioRoles, tolerance: float = 0.10) -> Verdict:
    """Across the reward multiplier a: KL (second-half mean) and gold reward spread with and without the transform."""
    multipliers = sorted({s.multiplier for s in roles.scale})
    claim = (f"With the reward transform, PPO's KL and gold reward stay within {tolerance:.0%} across "
             f"a in {{{', '.join(f'{a:g}' for a in multipliers)}}}.")
    arms = scale_arms(table, roles)
    missing = tuple(s.scenario for arm in ARMS for s in roles.scale if s.method == arm and s.multiplier not in arms[arm])
    transform = _arm_spreads(arms["zscore"])
    if "KL" not in transform:  # fewer than two multipliers with KL
        return Verdict("Reward scale", claim, None, "Needs at least two multipliers with the transform and PPO's "
                       f"KL logged; missing: {', '.join(missing)}.", missing)
    a_values = ", ".join(f"{a:g}" for a in sorted(arms["zscore"]))
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


# ---- centering, calibration ------------------------------------------------------------------------------------

def centering_verdict(table: pd.DataFrame, roles: ScenarioRoles) -> Verdict:
    """|reward offset| (mean test reward) with the centering loss (reference) against without it."""
    claim = "The centering loss keeps the reward offset (mean test reward) closer to zero than training without it."
    with_name, without_name = roles.reference, roles.no_centering
    latest = latest_by_scenario(table)
    missing = tuple(s for s in (with_name, without_name) if s not in latest)
    if missing:
        return Verdict("Centering", claim, None, f"Needs scenarios {with_name} and {without_name}; missing: "
                       f"{', '.join(missing)}.", missing)
    rows = {s: latest[s] for s in (with_name, without_name)}
    lacking = _lacking(rows, "reward_offset")
    if lacking:
        return Verdict("Centering", claim, None, f"Reward offset not logged: {', '.join(lacking)}.")
    with_c, without = abs(rows[with_name]["reward_offset"]), abs(rows[without_name]["reward_offset"])
    ratio = f", {without / with_c:.3g} times as large" if with_c > 0 else ""
    return Verdict("Centering", claim, bool(with_c < without),
                   f"|reward offset| is {_num(with_c)} with centering ({with_name}) and {_num(without)} without it "
                   f"({without_name}){ratio}.")


def _disabled(value: object) -> bool:
    return str(value).strip().lower() in ("false", "0", "no")


def calibration_verdict(table: pd.DataFrame, roles: ScenarioRoles, ece_margin: float = 0.01) -> Verdict:
    """Every calibrated run: ECE after <= oracle ECE + margin, and NLL after <= NLL before."""
    claim = (f"After temperature scaling, test ECE is at most the oracle ECE + {ece_margin:g} and test NLL does "
             "not increase.")
    runs = table[~table["calibration_enabled"].map(_disabled)]
    runs = runs[runs[["ece_after", "oracle_ece", "nll_before", "nll_after"]].notna().all(axis=1)]
    if runs.empty:
        return Verdict("Calibration", claim, None,
                       f"No calibrated run logged ECE after, oracle ECE and NLL before/after ({roles.reference}, "
                       "say).", (roles.reference,))
    ece_excess = runs["ece_after"] - runs["oracle_ece"]
    nll_change = runs["nll_after"] - runs["nll_before"]
    ok = (ece_excess <= ece_margin) & (nll_change <= 0)
    evidence = (f"{int(ok.sum())} of {len(runs)} calibrated runs meet both; ECE after minus oracle ECE is "
                f"{_num(ece_excess.min())} to {_num(ece_excess.max())}, NLL change {_num(nll_change.min())} to "
                f"{_num(nll_change.max())}.")
    if not ok.all():
        evidence += f" Failing: {', '.join(runs.loc[~ok, 'label'])}."
    return Verdict("Calibration", claim, bool(ok.all()), evidence)


# ---- KL tracking: normalization and KL control -----------------------------------------------------------------

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


def normalization_verdict(table: pd.DataFrame, roles: ScenarioRoles) -> Verdict:
    """KL tracking error of the frozen z-score (reference) against no normalization and per-batch min-max."""
    return _tracking_verdict(
        table, "Normalization",
        "With the frozen z-score, PPO tracks the KL target more closely than without normalization or with "
        "per-batch min-max.",
        (roles.reference, "z-score"), [(roles.no_normalization, "none"), (roles.minmax_normalization, "min-max")])


def kl_control_verdict(table: pd.DataFrame, roles: ScenarioRoles) -> Verdict:
    """KL tracking error of the adaptive controller (reference) against a fixed beta."""
    return _tracking_verdict(table, "KL control",
                             "The adaptive KL controller tracks the KL target more closely than a fixed beta.",
                             (roles.reference, "adaptive"), [(roles.fixed_kl, "fixed")])


# ---- ensembles -------------------------------------------------------------------------------------------------

def _is_ensemble(row: pd.Series) -> bool:
    return as_float(row.get("ensemble_size")) > 1


def ensemble_calibration_verdict(table: pd.DataFrame, roles: ScenarioRoles) -> Verdict:
    """Every ensemble run: the calibrated ensemble's test NLL <= its best calibrated member's."""
    claim = "A calibrated reward ensemble predicts held-out preferences at least as well (test NLL) as its best member."
    runs = table[table.apply(_is_ensemble, axis=1)] if len(table) else table
    runs = runs[runs[["ensemble_nll_after", "best_member_nll_after"]].notna().all(axis=1)]
    if runs.empty:
        patterns = tuple(f"{e.ensemble_prefix}*" for e in roles.ensembles)
        return Verdict("Ensemble calibration", claim, None, "No ensemble run (reward_model.ensemble_size > 1) "
                       f"logged ensemble/test_nll_after; run the {', '.join(patterns)} scenarios.", patterns)
    gain = runs["best_member_nll_after"] - runs["ensemble_nll_after"]
    evidence = "; ".join(f"{r['label']}: {_num(r['ensemble_nll_after'])} vs best member "
                         f"{_num(r['best_member_nll_after'])}" for _, r in runs.iterrows()) + "."
    return Verdict("Ensemble calibration", claim, bool((gain >= 0).all()), evidence)


def over_optimization_verdict(table: pd.DataFrame, roles: ScenarioRoles, single_model: str | None = None) -> Verdict:
    """Each ensemble scenario of a regime against its one-model scenario: final proxy-gold gap, gold reward.

    ``single_model``: the one-model scenario of one of ``roles.ensembles`` (the first when None).
    """
    regime = (next(e for e in roles.ensembles if e.single_model == single_model) if single_model
              else roles.ensembles[0])
    single, prefix = regime.single_model, regime.ensemble_prefix
    topic = "Over-optimization" if single == roles.reference else f"Over-optimization ({single})"
    claim = ("Optimizing an ensemble leaves no more over-optimization (final proxy-gold gap, positive when the proxy "
             f"has run ahead of the gold reward) than optimizing one reward model ({single}), for every aggregation.")
    latest = latest_by_scenario(table)
    ensembles = {s: r for s, r in latest.items() if s.startswith(prefix) and _is_ensemble(r)}
    if single not in latest or not ensembles:
        missing = tuple(s for s in (single, f"{prefix}*") if s not in latest)
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


def all_verdicts(table: pd.DataFrame, roles: ScenarioRoles, tolerance: float = 0.10,
                 ece_margin: float = 0.01) -> list[Verdict]:
    return [scale_verdict(table, roles, tolerance), centering_verdict(table, roles),
            calibration_verdict(table, roles, ece_margin), normalization_verdict(table, roles),
            kl_control_verdict(table, roles), ensemble_calibration_verdict(table, roles),
            *(over_optimization_verdict(table, roles, e.single_model) for e in roles.ensembles)]
