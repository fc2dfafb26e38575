"""Verdicts computed from the comparison table's numbers, never from a run's name alone.

Which scenario plays which part (the reference, the run without centering, the scale experiment's
arms, ...) is configuration, :class:`ScenarioRoles`: the names are the runs' ``scenario`` tags, which
``conf/scenario_<name>/`` sets, and the project lists the roles in ``conf/base/parameters_reporting.yml``
(``reporting.scenario_roles``). A verdict whose scenarios are missing says which instead of guessing.

The same scenario runs with ``--pipelines ppo`` or ``--pipelines rl`` (RLOO, GRPO): the verdicts about the
policy's reward (scale, normalization) run once per method present (:class:`MethodRuns`, GRPO once per
``rl.scale_rewards``), each on that method's runs. When a scenario has several runs of a method, the verdicts
use the most recent one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from calibrated_rlhf.reporting.table import METRICS, PARAMS, as_float

ARMS = ("zscore", "raw")  # the scale experiment: through the reward transform, and the raw reward
# normalization.method values in the order the normalization-methods verdict lists them; others follow.
NORMALIZATION_ORDER = ("zscore", "whiten_batch", "running_zscore", "calibrated_clip", "none", "minmax_batch", "raw")
PREFERRED_NORMALIZATIONS = ("zscore", "whiten_batch")  # what the normalization-methods verdict puts against min-max
MINMAX = "minmax_batch"


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
    # normalization.method -> the scenario that sets it, for the methods besides zscore, none and min-max
    normalizations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScenarioRoles:
        """From the ``reporting.scenario_roles`` block (plain dicts and lists, as YAML gives them)."""
        return cls(**{**data,
                      "scale": tuple(ScaleScenario(s["scenario"], s["method"], float(s["multiplier"]))
                                     for s in data["scale"]),
                      "ensembles": tuple(EnsembleRegime(e["single_model"], e["ensemble_prefix"])
                                         for e in data["ensembles"]),
                      "normalizations": dict(data.get("normalizations") or {})})

    def names(self) -> list[str]:
        """Every scenario named exactly (ensemble scenarios are named by prefix)."""
        return [self.reference, self.no_centering, self.no_normalization, self.minmax_normalization, self.fixed_kl,
                *self.normalizations.values(), *(s.scenario for s in self.scale),
                *(e.single_model for e in self.ensembles)]

    def normalization_scenarios(self) -> dict[str, str]:
        """{scenario: the normalization.method it sets} of every scenario that changes the normalization alone:
        the reference (zscore), none, min-max, the others, and the scale experiment's raw arm at a = 1."""
        raw = [s.scenario for s in self.scale if s.method == "raw" and s.multiplier == 1.0]
        return {self.reference: "zscore", self.no_normalization: "none", self.minmax_normalization: MINMAX,
                **{scenario: method for method, scenario in self.normalizations.items()},
                **{scenario: "raw" for scenario in raw}}


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


@dataclass(frozen=True)
class MethodRuns:
    """The runs of one RL method that a per-method verdict reads: ``method`` (ppo, rloo, grpo) and, for GRPO,
    one ``rl.scale_rewards`` value. PPO's include the runs of the default DAG that trained no policy (no method:
    a run of the reward-model stages), whose reward-model figures the PPO verdicts have always read."""

    method: str
    scale_rewards: str | None = None

    @property
    def title(self) -> str:
        """For a verdict's topic: ``PPO``, ``GRPO, scale_rewards=group``."""
        return self.method.upper() + (f", scale_rewards={self.scale_rewards}" if self.scale_rewards else "")

    @property
    def name(self) -> str:
        """For a sentence: ``PPO``, ``GRPO (scale_rewards=group)``."""
        return self.method.upper() + (f" (scale_rewards={self.scale_rewards})" if self.scale_rewards else "")

    def select(self, table: pd.DataFrame) -> pd.DataFrame:
        methods = table["method"]
        mine = (methods == self.method) | (methods.isna() if self.method == "ppo" else False)
        if self.scale_rewards is not None:
            mine &= table["scale_rewards"] == self.scale_rewards
        return table[mine]


PPO = MethodRuns("ppo")
RL_METHODS = ("rloo", "grpo")  # optimize the reward model's reward, as PPO does (DPO has no reward to scale)


def method_groups(table: pd.DataFrame) -> list[MethodRuns]:
    """PPO (always: its verdicts name the scenarios to run), then RLOO and GRPO, GRPO once per
    ``rl.scale_rewards`` value, where the table has runs of them."""
    groups = [PPO]
    for method in RL_METHODS:
        runs = table[table["method"] == method]
        if method == "grpo":
            groups += [MethodRuns(method, v) for v in sorted(runs["scale_rewards"].dropna().unique())]
        elif len(runs):
            groups.append(MethodRuns(method))
    return groups


def latest_by_scenario(table: pd.DataFrame, runs: MethodRuns = PPO) -> dict[str, pd.Series]:
    """The most recent run of each scenario among ``runs``' (a PPO and an RLOO run of one scenario are two)."""
    tagged = runs.select(table)
    tagged = tagged[tagged["scenario"].notna()]
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


def scale_arms(table: pd.DataFrame, roles: ScenarioRoles, runs: MethodRuns = PPO) -> dict[str, dict[float, pd.Series]]:
    """{"zscore" | "raw": {a: run}} from ``runs``' scale scenarios with the KL logged; the reference stands
    in for an absent a = 1 with the transform (it is the transform at a = 1)."""
    arms: dict[str, dict[float, pd.Series]] = {arm: {} for arm in ARMS}
    latest = latest_by_scenario(table, runs)
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


def scale_verdict(table: pd.DataFrame, roles: ScenarioRoles, tolerance: float = 0.10,
                  runs: MethodRuns = PPO) -> Verdict:
    """Across the reward multiplier a: KL (second-half mean) and gold reward spread with and without the
    transform, on ``runs``' scale scenarios."""
    multipliers = sorted({s.multiplier for s in roles.scale})
    topic = f"Reward scale ({runs.title})"
    claim = (f"With the reward transform, {runs.name}'s KL and gold reward stay within {tolerance:.0%} across "
             f"a in {{{', '.join(f'{a:g}' for a in multipliers)}}}.")
    arms = scale_arms(table, roles, runs)
    missing = tuple(s.scenario for arm in ARMS for s in roles.scale if s.method == arm and s.multiplier not in arms[arm])
    transform = _arm_spreads(arms["zscore"])
    if "KL" not in transform:  # fewer than two multipliers with KL
        return Verdict(topic, claim, None, f"Needs at least two multipliers with the transform and {runs.name}'s "
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
    if runs.scale_rewards in ("group", "batch"):
        evidence += (f" (scale_rewards={runs.scale_rewards} divides the rewards by a standard deviation, which "
                     "cancels a with or without the transform.)")
    if missing:
        evidence += f" Missing: {', '.join(missing)}."
    return Verdict(topic, claim, holds, evidence, missing)


# ---- centering, calibration ------------------------------------------------------------------------------------

def centering_verdict(table: pd.DataFrame, roles: ScenarioRoles) -> Verdict:
    """|reward offset| (mean test reward) with the centering loss (reference) against without it."""
    claim = "The centering loss keeps the reward offset (mean test reward) closer to zero than training without it."
    with_name, without_name = roles.reference, roles.no_centering
    latest = latest_by_scenario(table, PPO)  # the reward model's figures: runs of the default DAG
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
                      others: Sequence[tuple[str, str]], runs: MethodRuns = PPO) -> Verdict:
    """``best`` (scenario, description) tracks the KL target more closely (|tracking error|) than each of
    ``others``, on ``runs``' newest run of each."""
    latest = latest_by_scenario(table, runs)
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


def normalization_verdict(table: pd.DataFrame, roles: ScenarioRoles, runs: MethodRuns = PPO) -> Verdict:
    """KL tracking error of the frozen z-score (reference) against no normalization and per-batch min-max."""
    return _tracking_verdict(
        table, f"Normalization ({runs.title})",
        f"With the frozen z-score, {runs.name} tracks the KL target more closely than without normalization or "
        "with per-batch min-max.",
        (roles.reference, "z-score"), [(roles.no_normalization, "none"), (roles.minmax_normalization, "min-max")], runs)


def kl_control_verdict(table: pd.DataFrame, roles: ScenarioRoles) -> Verdict:
    """KL tracking error of PPO's adaptive controller (reference) against a fixed beta (the kl_fixed scenario
    sets PPO's ``kl_control``)."""
    return _tracking_verdict(table, "KL control (PPO)",
                             "The adaptive KL controller tracks the KL target more closely than a fixed beta.",
                             (roles.reference, "adaptive"), [(roles.fixed_kl, "fixed")])


def _same_target(a: float, b: float) -> bool:
    return bool(np.isclose(a, b, rtol=1e-9, atol=0.0)) if np.isfinite(a) and np.isfinite(b) else bool(
        np.isnan(a) and np.isnan(b))


def _gain(row: pd.Series) -> str:
    interval = (f" [{_num(row['gold_gain_ci_low'])}, {_num(row['gold_gain_ci_high'])}]"
                if np.isfinite(row["gold_gain_ci_low"]) and np.isfinite(row["gold_gain_ci_high"]) else "")
    return f"gold gain {_num(row['gold_gain'])}{interval}"


def _normalization_runs(table: pd.DataFrame, roles: ScenarioRoles,
                        runs: MethodRuns) -> tuple[float, dict[str, pd.Series], list[pd.Series]]:
    """(KL target, {normalization.method: newest run at that target}, runs left out at another target) among
    ``runs``' runs of the normalization scenarios that tracked KL. The target is the newest reference run's,
    else the newest run's; a run's method is its logged ``normalization.method``, else its scenario's."""
    scenarios = roles.normalization_scenarios()
    candidates = runs.select(table)
    candidates = candidates[candidates["scenario"].isin(list(scenarios)) & candidates["kl_tracking_error"].notna()]
    if candidates.empty:
        return math.nan, {}, []
    candidates = candidates.sort_values("start_time", ascending=False, kind="stable")
    reference = candidates[candidates["scenario"] == roles.reference]
    target = float((reference if len(reference) else candidates).iloc[0]["kl_target"])
    chosen: dict[str, pd.Series] = {}
    elsewhere = []
    for _, row in candidates.iterrows():
        method = row["normalization_method"] if isinstance(row["normalization_method"], str) else scenarios[row["scenario"]]
        if not _same_target(float(row["kl_target"]), target):
            elsewhere.append(row)
        else:
            chosen.setdefault(method, row)
    order = {m: i for i, m in enumerate(NORMALIZATION_ORDER)}
    return target, dict(sorted(chosen.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))), elsewhere


def normalization_methods_verdict(table: pd.DataFrame, roles: ScenarioRoles, runs: MethodRuns = PPO) -> Verdict:
    """Every ``normalization.method`` ``runs`` ran at one KL target, each by its newest run: |KL tracking error|
    and gold gain; z-score and whitened rewards against per-batch min-max."""
    topic = f"Normalization methods ({runs.title})"
    claim = (f"With {runs.name}, z-score or whitened rewards track the KL target more closely than per-batch "
             "min-max and buy at least as much gold reward.")
    target, chosen, elsewhere = _normalization_runs(table, roles, runs)
    missing = tuple(s for s, method in roles.normalization_scenarios().items() if method not in chosen)
    figures = "; ".join(f"{m} ({row['label']}): KL tracking error {_pct(row['kl_tracking_error'])}, {_gain(row)}"
                        for m, row in chosen.items())
    evidence = (f"At KL target {_num(target)}, the newest run of each {PARAMS['normalization_method']}: {figures}."
                if chosen else f"No run of {runs.name} in the normalization scenarios tracked KL.")
    if elsewhere:
        evidence += " Left out at another KL target: " + ", ".join(
            f"{r['label']} ({_num(r['kl_target'])})" for r in elsewhere) + "."
    preferred = [m for m in PREFERRED_NORMALIZATIONS if m in chosen]
    if MINMAX not in chosen or not preferred:
        return Verdict(topic, claim, None, evidence + f" Needs {MINMAX} and zscore or whiten_batch; missing: "
                       f"{', '.join(missing)}.", missing)
    base = chosen[MINMAX]
    tracks = {m: abs(chosen[m]["kl_tracking_error"]) < abs(base["kl_tracking_error"]) for m in preferred}
    found = [f"{m} tracks the target {'more' if ok else 'less'} closely" for m, ok in tracks.items()]
    lacking = [m for m in (*preferred, MINMAX) if not np.isfinite(chosen[m]["gold_gain"])]
    holds: bool | None
    if not all(tracks.values()):
        holds = False  # the claim fails on tracking, whatever the gold reward
    elif lacking:
        holds = None
        found.append(f"gold gain not logged for {', '.join(lacking)} (no synthetic task), so the gold half is open")
    else:
        more = {m: chosen[m]["gold_gain"] >= base["gold_gain"] for m in preferred}
        holds = all(more.values())
        found += [f"{m} buys {'at least as much' if ok else 'less'} gold reward{_overlap(chosen[m], base)}"
                  for m, ok in more.items()]
    evidence += f" Against {MINMAX}: {'; '.join(found)}."
    if missing:
        evidence += f" Missing: {', '.join(missing)}."
    return Verdict(topic, claim, holds, evidence, missing)


def _overlap(row: pd.Series, base: pd.Series) -> str:
    """Whether two runs' 95% gold-gain intervals overlap: then the difference is within their noise."""
    bounds = [row["gold_gain_ci_low"], row["gold_gain_ci_high"], base["gold_gain_ci_low"], base["gold_gain_ci_high"]]
    if not all(np.isfinite(bounds)):
        return ""
    return " (95% intervals overlap)" if bounds[0] <= bounds[3] and bounds[2] <= bounds[1] else " (95% intervals apart)"


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
    latest = latest_by_scenario(table, PPO)
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
    """Every verdict; scale and normalization once per method present (:func:`method_groups`)."""
    groups = method_groups(table)
    return [*(scale_verdict(table, roles, tolerance, g) for g in groups), centering_verdict(table, roles),
            calibration_verdict(table, roles, ece_margin), *(normalization_verdict(table, roles, g) for g in groups),
            *(normalization_methods_verdict(table, roles, g) for g in groups),
            kl_control_verdict(table, roles), ensemble_calibration_verdict(table, roles),
            *(over_optimization_verdict(table, roles, e.single_model) for e in roles.ensembles)]
