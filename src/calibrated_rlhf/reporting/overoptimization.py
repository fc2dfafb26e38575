"""The over-optimization report (scripts/overoptimization.sh): per reward-model data size, best-of-n and RL on the
gold-against-KL plane with Gao et al.'s forms fitted; over every RL run, how early each gold-free warning fires.

Runs are selected by the scenario tag ``overoptimization_rm<size>`` the script sets. Each RL run gives a frontier
point from the evaluation protocol (``reporting.frontier``) and its per-update history, read here as the
signals a user has (KL, entropy, the reward ensemble's disagreement, the normalized proxy) and the gold that
judges them (``core.early_warning``). A rule's threshold is chosen on the runs of seed 0 and scored on the
other seeds, so the table's figures are not the ones the threshold was tuned on. Plain pandas and matplotlib:
``runs`` reads MLflow.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core.early_warning import (REPEATED_WORDS, REPETITION_SURPRISAL, GoldPath, Rule, Score,
                                                best_threshold, gold_path, judge, score, smooth)
from calibrated_rlhf.core.fitted_warning import SIGNAL_KEYS, FittedWarning, features, fit_warning, labels
from calibrated_rlhf.core.overoptimization import fit_curve, held_out_r2, law
from calibrated_rlhf.core.signals import trailing_mean
from calibrated_rlhf.reporting.frontier import FIT_COLUMNS, frontier_points, overoptimization_fits
from calibrated_rlhf.reporting.render import markdown_table
from calibrated_rlhf.reporting.table import as_float, method_of

SEED_PARAMS = {"ppo": "ppo.trainer.seed", "rloo": "rl.seed", "grpo": "rl.seed"}
FITTED = "fitted_warning"  # the logistic score over the signals and the run's settings (core.fitted_warning)
GOLD = "gold"  # judges every rule; its own trailing mean is scored as the signals are: no warning, a yardstick
# per method: the history key of each signal (the fitted warning's, the disagreement's, and the gold's that judges them)
HISTORY = {method: {**SIGNAL_KEYS[method], "ensemble_std": reward("ensemble_std"), GOLD: gold}
           for method, reward, gold in (("ppo", keys.ppo_reward, keys.ppo_reward("gold")),
                                        ("rl", keys.rl_reward, keys.RL_REWARD_GOLD))}
# The candidate rules, one family per signal, each over a grid of thresholds. proxy_efficiency is the normalized
# proxy per unit of d = sqrt(KL): the frozen normalization puts it in the reference's standard deviations for
# every reward model, so one threshold can serve them all.
WINDOW = 5  # updates in the trailing mean every rule reads: one batch's KL or entropy is noisy
BASE = WINDOW - 1  # relative rules divide by the mean of the first WINDOW updates
GRIDS: dict[str, tuple[Rule, ...]] = {
    "kl": tuple(Rule("kl", t) for t in (2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32)),
    "entropy": tuple(Rule("entropy", t, relative=True, below=True, base=BASE)
                     for t in np.round(np.arange(0.50, 0.99, 0.04), 2)),
    "ensemble_std": tuple(Rule("ensemble_std", t, relative=True, base=BASE) for t in (1.1, 1.25, 1.5, 2.0, 3.0)),
    REPEATED_WORDS: tuple(Rule(REPEATED_WORDS, t, relative=True, base=BASE)
                          for t in (1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0)),
    REPETITION_SURPRISAL: tuple(Rule(REPETITION_SURPRISAL, t, relative=True, base=BASE)
                                for t in (1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0)),
    "proxy_efficiency": tuple(Rule("proxy_efficiency", t, below=True)
                              for t in np.round(np.arange(0.30, 0.80, 0.025), 3)),
    "proxy_per_nat": tuple(Rule("proxy_per_nat", t, below=True)
                           for t in (0.0, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2)),
    # the sampled responses' mean length in tokens: the best-known drift of RLHF policies (Singhal et al., 2023)
    "response_length": tuple(Rule("response_length", t, relative=True, base=BASE)
                             for t in (1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0)),
    # in logits: 0 is even odds that the run is at or past its gold's turn
    FITTED: tuple(Rule(FITTED, t) for t in np.round(np.arange(-4.0, 4.01, 0.25), 2)),
    # Not a warning: the gold itself, read as the run goes, is what no user has. How its best rule scores shows how
    # much of a turn the gold shows by the deadline, the judgement's limit rather than the signals'.
    GOLD: tuple(Rule(GOLD, t, drawdown=True, base=BASE) for t in np.round(np.arange(0.02, 0.31, 0.02), 2)),
}
SERIES_FILE = "runs.csv.gz"  # beside the report: every RL run's series (series_frame)
SERIES_IDENTITY = ("run_id", "size", "method", "kl_target", "seed", "untouched", "update")
LATE_FRACTIONS = (0.10, 0.25, 0.50, 1.00)  # the deadline table's; 1.0: fired at all before the end
EFFICIENCY_MIN_KL = 1.0
MIN_KL_RISE = 2.0
MAX_FALSE_ALARMS = 0.10
LATE_FRACTION = 0.10


@dataclass(frozen=True)
class RunSignals:
    """One RL run's per-update signals (trailing means over :data:`WINDOW`), its gold and identity."""

    run_id: str
    size: str  # the reward models' label: their data size, and a name where their own size differs (2400_large)
    method: str
    kl_target: float
    seed: int
    signals: Mapping[str, np.ndarray]
    gold: np.ndarray
    raw: Mapping[str, np.ndarray] = field(default_factory=dict)  # the series as logged: the fitted warning's input

    @functools.cached_property
    def path(self) -> GoldPath:
        """The gold's path as the judgement reads it, found once: every rule at every deadline is judged by it."""
        return gold_path(self.gold)


def raw_series(history: pd.DataFrame, method: str) -> dict[str, np.ndarray]:
    """Every :data:`HISTORY` series of one run's long-form history (``key``, ``step``, ``value``) as logged, in step
    order; NaN throughout where a series was not logged."""
    wide = history.pivot_table(index="step", columns="key", values="value").sort_index()
    return {name: wide[key].to_numpy(dtype=float) if key in wide else np.full(len(wide), np.nan)
            for name, key in HISTORY["ppo" if method == "ppo" else "rl"].items()}


def series_frame(runs: Sequence[RunSignals], untouched: Sequence[RunSignals] = ()) -> pd.DataFrame:
    """Every run's series as logged (:func:`raw_series`) in one table, a row per update: who the run is, whether it
    is ``untouched`` (made after the rules were chosen), its ``update`` from 1, and a column per :data:`HISTORY`
    name. What the warnings section reads, so it can be written again, and a warning fitted anew, without the
    store."""
    names = list(HISTORY["ppo"])  # the same names for every method: only the metric keys differ
    frames = [pd.DataFrame({"run_id": r.run_id, "size": r.size, "method": r.method, "kl_target": r.kl_target,
                            "seed": r.seed, "untouched": flag, "update": np.arange(1, len(r.gold) + 1),
                            **{name: r.raw[name] for name in names}})
              for flag, group in ((False, runs), (True, untouched)) for r in group]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*SERIES_IDENTITY, *names])


def runs_from_series(frame: pd.DataFrame) -> tuple[list[RunSignals], list[RunSignals]]:
    """The runs of a :func:`series_frame` (read back from its file), split as it was written: the runs the rules
    are chosen on, and the untouched ones."""
    if missing := [c for c in (*SERIES_IDENTITY, *HISTORY["ppo"]) if c not in frame]:
        raise ValueError(f"a run-series table needs the columns {', '.join(missing)}")
    split: dict[bool, list[RunSignals]] = {False: [], True: []}
    for run_id, rows in frame.groupby("run_id", sort=False):
        rows = rows.sort_values("update")
        first = rows.iloc[0]
        raw = {name: rows[name].to_numpy(dtype=float) for name in HISTORY["ppo"]}
        split[bool(first["untouched"])].append(RunSignals(
            str(run_id), str(first["size"]), str(first["method"]), float(first["kl_target"]), int(first["seed"]),
            *signals_of(raw), raw))
    return split[False], split[True]


def run_signals(history: pd.DataFrame, method: str, window: int = WINDOW) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The signals of one run's long-form history (``key``, ``step``, ``value``), in step order, and its gold."""
    return signals_of(raw_series(history, method), window)


def signals_of(get: Mapping[str, np.ndarray], window: int = WINDOW) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The signals (trailing means, and the proxy's efficiency and rate) of a run's :func:`raw_series`, and its gold."""
    smoothed = {name: trailing_mean(series, window) for name, series in get.items()}  # GOLD's too: the yardstick
    with np.errstate(invalid="ignore", divide="ignore"):
        # below a nat the ratio is noise over noise, and a policy that close to the reference is no concern
        smoothed["proxy_efficiency"] = np.where(smoothed["kl"] >= EFFICIENCY_MIN_KL,
                                                smoothed["proxy"] / np.sqrt(smoothed["kl"]), np.nan)
    smoothed["proxy_per_nat"] = marginal_proxy_per_nat(smoothed["proxy"], smoothed["kl"], 2 * window)
    return smoothed, get[GOLD]


def marginal_proxy_per_nat(proxy: np.ndarray, kl: np.ndarray, lag: int, min_kl_rise: float = MIN_KL_RISE
                           ) -> np.ndarray:
    """The normalized proxy the last ``lag`` updates bought per nat of KL they spent, where they spent at least
    ``min_kl_rise`` nats (NaN elsewhere: a policy holding its KL is not spending any). Once the proxy, the optimistic
    estimate of the gold, stops paying for more KL, the gold is at best flat."""
    out = np.full(len(kl), np.nan)
    if len(kl) > lag:
        rise = kl[lag:] - kl[:-lag]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lag:] = np.where(rise >= min_kl_rise, (proxy[lag:] - proxy[:-lag]) / rise, np.nan)
    return out


def family_score(rule: Rule, runs: Sequence[RunSignals], family: str, late_fraction: float = LATE_FRACTION) -> Score:
    """``rule`` on the signal ``family`` of every run, judged by each run's gold."""
    return score(rule, [judge(rule, r.signals[family], r.path, late_fraction) for r in runs])


def choose_threshold(family: str, runs: Sequence[RunSignals], late_fraction: float = LATE_FRACTION) -> Score | None:
    """The threshold of ``family``'s grid that catches the most of ``runs`` with at most :data:`MAX_FALSE_ALARMS`."""
    return best_threshold([family_score(rule, runs, family, late_fraction) for rule in GRIDS[family]],
                          MAX_FALSE_ALARMS)


def of(share: float, n: float) -> str:
    """A share of ``n`` runs as a count: "3 of 28"; a share of no runs is NaN, and so many runs none."""
    return f"{round(share * n) if n else 0} of {int(n)}"


def fitted_on_runs(runs: Sequence[RunSignals]) -> FittedWarning:
    """The fitted warning on ``runs``: each update of a run labelled by its gold (:func:`labels`)."""
    return fit_warning([(features(r.raw, r.method, r.kl_target, WINDOW, BASE),
                         labels(r.path.n_updates, r.path.peak, r.path.over_optimized, BASE)) for r in runs],
                       window=WINDOW, base=BASE)


def with_fitted_warning(runs: Sequence[RunSignals], fit_seed: int = 0
                        ) -> tuple[list[RunSignals], FittedWarning | None]:
    """The runs with the score of the warning fitted on the runs of ``fit_seed`` as one more signal, :data:`FITTED`,
    and that warning; None, and the score NaN, where those runs lack a turning run or a safe one to learn from."""
    try:
        warning = fitted_on_runs([r for r in runs if r.seed == fit_seed])
    except ValueError:
        warning = None
    return scored(runs, warning), warning


def scored(runs: Sequence[RunSignals], warning: FittedWarning | None) -> list[RunSignals]:
    """The runs with ``warning``'s score as the signal :data:`FITTED` (NaN throughout without a warning)."""
    return [replace(r, signals={**r.signals, FITTED: warning.scores(r.raw, r.method, r.kl_target) if warning
                                else np.full(len(r.gold), np.nan)}) for r in runs]


def transfer_row(fitted_on: str, scored_on: str, fit: Sequence[RunSignals], held: Sequence[RunSignals]
                 ) -> dict[str, object]:
    """The warning fitted and its threshold chosen on ``fit`` (as :func:`warning_table` chooses), scored on ``held``."""
    row: dict[str, object] = {"fitted on": fitted_on, "scored on": scored_on}
    try:
        warning = fitted_on_runs(fit)
    except ValueError:
        return {**row, "threshold": "none: no turning run or no safe run to fit on"}
    best = choose_threshold(FITTED, scored(fit, warning))
    if best is None:
        return {**row, "threshold": "none quiet enough"}
    s = family_score(best.rule, scored(held, warning), FITTED)
    return {**row, "threshold": best.rule.threshold, "caught": of(s.caught, s.n_over),
            "false alarms": of(s.false_alarms, s.n_safe)}


def transfer_table(runs: Sequence[RunSignals], fit_seed: int = 0) -> pd.DataFrame:
    """How far the fitted warning carries: fitted on the other seed's runs, and fitted on ``fit_seed``'s runs of all
    but one set of reward models (or one method) and scored on the other seeds' runs of that one, each in turn."""
    fit, held = [r for r in runs if r.seed == fit_seed], [r for r in runs if r.seed != fit_seed]
    rows = [transfer_row("the other seeds", f"seed {fit_seed}", held, fit)]
    for attribute in ("size", "method"):
        for v in sorted({getattr(r, attribute) for r in runs}):
            rows.append(transfer_row(f"seed {fit_seed}, all but {attribute} {v}", f"the other seeds, {attribute} {v}",
                                     [r for r in fit if getattr(r, attribute) != v],
                                     [r for r in held if getattr(r, attribute) == v]))
    return pd.DataFrame(rows)


def warning_table(runs: Sequence[RunSignals], fit_seed: int = 0, late_fraction: float = LATE_FRACTION
                  ) -> tuple[pd.DataFrame, dict[str, Rule]]:
    """Per signal: the threshold chosen on the runs of ``fit_seed`` (most caught by the peak plus ``late_fraction``
    of the run, with at most :data:`MAX_FALSE_ALARMS`), then its catches and false alarms on those runs and on the
    others; and the chosen rules (a signal with no threshold that quiet has none)."""
    rows, rules = [], {}
    fit = [r for r in runs if r.seed == fit_seed]
    held = [r for r in runs if r.seed != fit_seed]
    for family in GRIDS:
        best = choose_threshold(family, fit, late_fraction)
        row = {"signal": family, "rule": best.rule.describe() if best else "none quiet enough"}
        for name, subset in (("fit", fit), ("held_out", held)):
            s = family_score(best.rule, subset, family, late_fraction) if best else None
            row.update({f"{name}_over": s.n_over if s else math.nan, f"{name}_caught": s.caught if s else math.nan,
                        f"{name}_safe": s.n_safe if s else math.nan,
                        f"{name}_false_alarms": s.false_alarms if s else math.nan})
        rows.append(row)
        if best:
            rules[family] = best.rule
    return pd.DataFrame(rows), rules


def deadline_table(runs: Sequence[RunSignals], late_fractions: Sequence[float] = LATE_FRACTIONS) -> pd.DataFrame:
    """Per signal and deadline (the peak plus that fraction of the run): the held-out runs caught and the safe ones
    alarmed, by the threshold chosen on seed 0 for that deadline (:func:`warning_table`); "-" where none is quiet
    enough. Whether a later deadline lets a signal meet the target says if the signal or the deadline is short."""
    cells: dict[str, dict[str, str]] = {family: {"signal": family} for family in GRIDS}
    for late in late_fractions:
        table, rules = warning_table(runs, late_fraction=late)
        for row in table.itertuples():
            cells[row.signal][f"by the peak + {late:.0%}"] = "-" if row.signal not in rules else (
                f"{of(row.held_out_caught, row.held_out_over)}, {of(row.held_out_false_alarms, row.held_out_safe)}")
    return pd.DataFrame(list(cells.values()))


def grid_table(runs: Sequence[RunSignals], families: Sequence[str] = (REPETITION_SURPRISAL, REPEATED_WORDS)
               ) -> pd.DataFrame:
    """Every threshold of ``families`` over all runs, chosen on none: how many over-optimizing runs each catches in
    time, fires on at all, and how many safe runs it alarms. Where no threshold is quiet enough, this shows what each
    costs."""
    rows = []
    for family in families:
        for rule in GRIDS[family]:
            verdicts = [judge(rule, r.signals[family], r.path, LATE_FRACTION) for r in runs]
            over = [v for v in verdicts if v.over_optimized]
            rows.append({"rule": rule.describe(), "over": len(over), "caught": sum(v.caught for v in over),
                         "fired": sum(v.fired is not None for v in over), "safe": len(verdicts) - len(over),
                         "false_alarms": sum(v.false_alarm for v in verdicts)})
    return pd.DataFrame(rows)


def kept_gold_table(runs: Sequence[RunSignals], rules: Mapping[str, Rule], fit_seed: int = 0) -> pd.DataFrame:
    """What a stop rule would buy, in gold, replayed on the logged runs: on the runs not of ``fit_seed``, the mean
    gold gained (smoothed as the judgement smooths it, from update 1) by the policy a user keeps; beside never
    stopping, and stopping at the gold's peak, which only hindsight can. A rule fires on update ``i``'s figures
    (index ``i``, the batch the policy of ``i`` updates sampled) and keeps the policy that update makes, whose own
    batch is the next. Early firing costs gold here and late firing saves less: this weighs what catches and false
    alarms only count."""
    held = [(r, smooth(r.gold, WINDOW)) for r in runs if r.seed != fit_seed]

    def row(name: str, stop: Callable[[RunSignals], int | None]) -> dict[str, object]:
        gains = {}
        for r, g in held:
            at = stop(r)
            kept = len(g) - 1 if at is None else min(at + 1, len(g) - 1)
            gains.setdefault(r.path.over_optimized, []).append(g[kept] - g[0])
        return {"stopped by": name, "over-optimizing runs": np.mean(gains.get(True, [np.nan])),
                "safe runs": np.mean(gains.get(False, [np.nan])), "all runs": np.mean([*gains.get(True, []),
                                                                                     *gains.get(False, [])])}

    return pd.DataFrame([row("never (the end of the run)", lambda r: None),
                         *(row(rule.describe(), lambda r, f=family, rule=rule: rule.fires_at(r.signals[f]))
                           for family, rule in rules.items()),
                         row("the gold's peak (hindsight)", lambda r: r.path.peak - 1)])


def run_table(runs: Sequence[RunSignals], rules: Mapping[str, Rule]) -> pd.DataFrame:
    """One row per run: the gold's peak and drop, and the update each chosen rule fired at (updates counted from 1,
    as the runs' MLflow steps are)."""
    rows = []
    for r in runs:
        path = r.path
        row = {"size": r.size, "method": r.method, "kl_target": r.kl_target, "seed": r.seed, "updates": path.n_updates,
               "gold_peak_update": path.peak + 1, "gold_drop": path.drop, "over_optimized": path.over_optimized}
        for family, rule in rules.items():
            fired = rule.fires_at(r.signals[family])
            row[f"{family}_fires"] = math.nan if fired is None else fired + 1
        rows.append(row)
    return pd.DataFrame(rows)


# ---- the frontier per reward-model size: best-of-n and RL, gold and proxy, Gao et al.'s forms ----------------

def proxy_gain(signals_history: pd.DataFrame, method: str) -> float:
    """An RL run's calibrated proxy gained over training: the mean over its last 10% of updates minus its first
    update's (the reference policy's own samples), in the units of best-of-n's ``proxy_gain``."""
    key = keys.ppo_reward("calibrated") if method == "ppo" else keys.rl_reward("calibrated")
    values = (signals_history[signals_history["key"] == key].sort_values("step")["value"]).to_numpy(dtype=float)
    if len(values) < 2:
        return math.nan
    return float(values[-max(1, len(values) // 10):].mean() - values[0])


def curve_fit_row(method: str, d: np.ndarray, gain: np.ndarray, form: str) -> dict[str, float]:
    """One of Gao et al.'s forms fitted to gold gain against ``d``, in :data:`FIT_COLUMNS`' terms."""
    fit = fit_curve(d, gain, form)
    try:
        held = held_out_r2(d, gain, form)
    except ValueError:
        held = math.nan
    return {"method": method, "form": form, "points": len(d), "alpha": fit.alpha, "alpha_ci_low": fit.alpha_ci[0],
            "alpha_ci_high": fit.alpha_ci[1], "beta": fit.beta, "beta_ci_low": fit.beta_ci[0],
            "beta_ci_high": fit.beta_ci[1], "r2": fit.r2, "held_out_r2": held, "d_peak_fitted": fit.d_peak,
            "d_peak_observed": float(d[np.argmax(gain)]), "d_max": float(d.max())}


def bon_fit_row(curve: pd.DataFrame) -> dict[str, float]:
    """Gao et al.'s best-of-n form fitted to a best-of-n curve, in :data:`FIT_COLUMNS`' terms."""
    return curve_fit_row("best_of_n", curve["d"].to_numpy(), curve["gold_gain"].to_numpy(), "bon")


def turned(curve: pd.DataFrame) -> bool:
    """Whether a best-of-n curve turned within the n measured: its gold at the largest n lies below the 95%
    interval (over prompts) of its peak, so the fall is more than the prompts' noise."""
    curve = curve.sort_values("n")
    peak = int(np.argmax(curve["gold_gain"].to_numpy()))
    return bool(curve["gold_gain"].iloc[-1] < curve["gold_gain_ci_low"].iloc[peak])


def ranking_fits(rankings: pd.DataFrame) -> pd.DataFrame:
    """Both forms fitted to best-of-n's curve under each ranking of one pool (each member alone, each aggregation),
    and whether that curve turned (:func:`turned`): a single reward model can over-optimize where the ensemble's
    aggregate does not."""
    rows = []
    for name, curve in rankings.groupby("ranking", sort=True):
        curve = curve.sort_values("n")
        d, gain = curve["d"].to_numpy(dtype=float), curve["gold_gain"].to_numpy(dtype=float)
        rows += [{**curve_fit_row(f"best_of_n by {name}", d, gain, form), "turned": turned(curve)}
                 for form in ("bon", "rl")]
    return pd.DataFrame(rows, columns=[*FIT_COLUMNS, "turned"])


MIN_HELD_OUT_R2 = 0.95  # the marks for a fitted form
MAX_PEAK_ERROR = 0.15


def meets_marks(fit: pd.Series, peaked: bool) -> bool:
    """A form fits well enough to predict the peak: held-out R^2 of at least :data:`MIN_HELD_OUT_R2`, and its ``d*``
    within :data:`MAX_PEAK_ERROR` of an observed peak (one with less gold past it: ``peaked``)."""
    return bool(peaked and fit.held_out_r2 >= MIN_HELD_OUT_R2
                and abs(fit.d_peak_fitted / fit.d_peak_observed - 1) <= MAX_PEAK_ERROR)


def rl_marks(fits: pd.DataFrame) -> list[str]:
    """The RL methods' fits that meet :func:`meets_marks`, peaked meaning a point at larger d with less gold."""
    return [f"{fit.method}, {fit.form} form" for fit in fits[fits["method"] != "best_of_n"].itertuples()
            if meets_marks(pd.Series(fit._asdict()), fit.d_peak_observed < fit.d_max)]


def marks_line(fits: pd.DataFrame, rankings: pd.DataFrame | None = None) -> str:
    """Which fits meet :func:`meets_marks`: RL methods' (a run at larger d with less gold than the best) and each
    best-of-n ranking's (a curve that :func:`turned`)."""
    found = rl_marks(fits)
    for fit in (rankings.itertuples() if rankings is not None else ()):
        if meets_marks(pd.Series(fit._asdict()), fit.turned):
            found.append(f"{fit.method}, {fit.form} form")
    claim = (f"a form fits with held-out R^2 >= {MIN_HELD_OUT_R2} and puts d* within {MAX_PEAK_ERROR:.0%} of an "
             "observed peak")
    return f"{claim}: " + ("; ".join(found) if found else "none") + "."


TRAJECTORY_BINS = 30  # quantile bins of d per method: ten held out, each bin a mean over dozens of batches


def trajectory_points(runs: Sequence[RunSignals], bins: int = TRAJECTORY_BINS) -> pd.DataFrame:
    """Gold against ``d`` along training, as Gao et al. fit RL (checkpoints along a run, not one point per run):
    every update of every run of a method, the batch gold's gain over the reference (the first update's batch,
    averaged over the runs: all sample the reference then) against the batch KL, pooled and averaged in ``bins``
    quantile bins of ``d``. One batch's gold is noise; the bins keep the curve's shape and let every update count."""
    rows = []
    for method in sorted({r.method for r in runs}):
        mine = [r for r in runs if r.method == method and len(r.raw.get(GOLD, ())) and np.isfinite(r.raw[GOLD][0])]
        if not mine:  # no run of it logged its gold from the start: nothing to measure a gain from
            continue
        reference = float(np.mean([r.raw[GOLD][0] for r in mine]))
        d = np.sqrt(np.maximum(np.concatenate([r.raw["kl"] for r in mine]), 0.0))
        gain = np.concatenate([r.raw[GOLD] for r in mine]) - reference
        keep = np.isfinite(d) & np.isfinite(gain)
        d, gain = d[keep], gain[keep]
        if not len(d):
            continue
        which = np.clip(np.searchsorted(np.quantile(d, np.linspace(0, 1, bins + 1)), d, side="right") - 1, 0, bins - 1)
        rows += [{"method": method, "sqrt_kl": d[which == b].mean(), "gold_gain": gain[which == b].mean()}
                 for b in np.unique(which)]
    frame = pd.DataFrame(rows, columns=["method", "sqrt_kl", "gold_gain"])
    return frame.assign(kl=frame["sqrt_kl"] ** 2)


def trajectory_lines(runs: Sequence[RunSignals]) -> list[str]:
    """Both forms fitted along training (:func:`trajectory_points`), and which meet the marks."""
    fits = overoptimization_fits(trajectory_points(runs))
    if not len(fits):
        return []
    return [f"Along training, as Gao et al. fit RL: every update's batch gold gain and KL, pooled over a method's "
            f"runs and averaged in {TRAJECTORY_BINS} quantile bins of d, fitted the same way:", "",
            markdown_table(fits[FIT_COLUMNS].round(4)), "", f"- along training, {marks_line(fits)}", ""]


def describe(label: str) -> str:
    """A label as the report's headings say it: ``2400`` -> "2400 preference pairs", ``2400_large`` -> "2400
    preference pairs, large reward models"."""
    pairs, _, name = label.partition("_")
    return f"{pairs} preference pairs" + (f", {name} reward models" if name else "")


def size_figure(size: str, points: pd.DataFrame, bon: pd.DataFrame | None, fits: pd.DataFrame,
                rankings: pd.DataFrame | None = None) -> Figure:
    """Gold (left) and calibrated proxy (right) gains against d = sqrt(KL), best-of-n as a curve and each RL
    run as a point, with each method's own form fitted to its gold (dashed); best-of-n by each single member of an
    ensemble in grey (dotted)."""
    fig = Figure(figsize=(11, 4.2))
    gold_ax, proxy_ax = fig.subplots(1, 2)
    colours = {"best_of_n": "black", "ppo": "tab:blue", "rloo": "tab:orange", "grpo": "tab:green"}
    if bon is not None and len(bon):
        for ax, col in ((gold_ax, "gold_gain"), (proxy_ax, "proxy_gain")):
            ax.plot(bon["d"], bon[col], marker=".", color="black", label="best-of-n")
    members = rankings[rankings["ranking"].str.startswith("member_")] if rankings is not None and "d" in rankings \
        else pd.DataFrame(columns=["ranking"])
    for i, (name, curve) in enumerate(members.groupby("ranking", sort=True)):
        curve = curve.sort_values("n")
        for ax, col in ((gold_ax, "gold_gain"), (proxy_ax, "proxy_gain")):
            ax.plot(curve["d"], curve[col], linestyle=":", color="grey", lw=1,
                    label="best-of-n, one member" if i == 0 else None)
    for method, group in points.groupby("method", sort=True):
        gold_ax.scatter(group["sqrt_kl"], group["gold_gain"], color=colours.get(method), label=method, s=18)
        proxy_ax.scatter(group["sqrt_kl"], group["proxy_gain"], color=colours.get(method), label=method, s=18)
    for fit in fits.itertuples():
        if (fit.method == "best_of_n") != (fit.form == "bon"):
            continue  # each method with its own law: best-of-n's for best-of-n, the RL law for RL
        d = np.linspace(1e-3, fit.d_max, 100)
        shape = law(d, fit.alpha, fit.beta, fit.form)
        gold_ax.plot(d, shape, linestyle="--", linewidth=0.9, color=colours.get(fit.method, "grey"))
    for ax, what in ((gold_ax, "gold"), (proxy_ax, "calibrated proxy")):
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("d = sqrt(KL to the reference), sqrt(nats)")
        ax.set_ylabel(f"{what} gain over the reference")
        ax.legend(fontsize=8)
    gold_ax.set_title(f"Gold, {describe(size)}")
    proxy_ax.set_title(f"Proxy, {describe(size)}")
    fig.tight_layout()
    return fig


def matched_gain(x: np.ndarray, y: np.ndarray, kl: float) -> float:
    """Gain at ``kl``, linear in d between measured points; NaN outside them."""
    order = np.argsort(x)
    x, y = x[order], y[order]
    d = math.sqrt(kl)
    return float(np.interp(d, x, y)) if len(x) and x.min() <= d <= x.max() else math.nan


def bon_efficiency_verdict(points: pd.DataFrame, bon: pd.DataFrame | None, kl_levels: Sequence[float]) -> str:
    """"Best-of-n is more KL-efficient than RL": at each KL both reach, best-of-n's gold against each RL method's
    (RL interpolated between its runs' mean gains per target)."""
    if bon is None or not len(bon):
        return "best-of-n is more KL-efficient than RL: not measured (no best-of-n curve)."
    cells, wins = [], []
    for method, group in points.groupby("method", sort=True):
        mean = group.groupby("budget")[["sqrt_kl", "gold_gain"]].mean()
        for kl in kl_levels:
            b = matched_gain(bon["d"].to_numpy(), bon["gold_gain"].to_numpy(), kl)
            r = matched_gain(mean["sqrt_kl"].to_numpy(), mean["gold_gain"].to_numpy(), kl)
            if not (math.isnan(b) or math.isnan(r)):
                cells.append(f"KL {kl:g}: best-of-n {b:.3f}, {method} {r:.3f}")
                wins.append(b > r)
    if not wins:
        return "best-of-n is more KL-efficient than RL: not measured (no KL that both reach)."
    status = "supported" if all(wins) else ("not supported" if not any(wins) else "mixed")
    return f"best-of-n is more KL-efficient than RL: {status} ({'; '.join(cells)})."


def transform_verdict(points: pd.DataFrame, fits: pd.DataFrame, scale: pd.DataFrame | None) -> str:
    """"The frozen transform changes where a KL target lands on the frontier, not the frontier": the scale runs
    (PPO on the transform's reward or on the raw one, the raw outputs times ``multiplier``) against the
    RL law fitted to the size's PPO runs. Supported when the transform's runs land at one KL whatever the multiplier
    (within 5%), the raw ones do not, and every scale run's gold gain lies within twice the fit's residual
    standard deviation of the curve at its KL."""
    claim = "the frozen transform changes where a KL target lands on the frontier, not the frontier"
    rows = fits[(fits["method"] == "ppo") & (fits["form"] == "rl")]
    if scale is None or not len(scale) or rows.empty:
        return f"{claim}: not measured (no scale runs, or no PPO fit)."
    fit = rows.iloc[0]
    ppo = points[points["method"] == "ppo"]
    residual = ppo["gold_gain"].to_numpy() - law(ppo["sqrt_kl"].to_numpy(), fit.alpha, fit.beta, "rl")
    spread = 2 * float(np.std(residual, ddof=2))
    off = scale["gold_gain"].to_numpy() - law(scale["sqrt_kl"].to_numpy(), fit.alpha, fit.beta, "rl")
    kl_range = {m: g["kl"].max() / g["kl"].min() - 1 for m, g in scale.groupby("normalization")}
    on_curve = bool(np.all(np.abs(off) <= spread))
    lands = kl_range.get("transform", math.inf) <= 0.05 and kl_range.get("raw", 0.0) > 0.05
    status = "supported" if on_curve and lands else ("not supported" if not on_curve else "mixed")
    cells = "; ".join(f"{r.normalization} x{r.multiplier:g}: KL {r.kl:.2f}, gold {r.gold_gain:.3f} "
                      f"(curve {r.gold_gain - o:.3f})" for r, o in zip(scale.itertuples(), off))
    return (f"{claim}: {status} ({cells}; the curve's band +-{spread:.3f}; KL range over the multipliers: "
            + ", ".join(f"{m} {v:.0%}" for m, v in kl_range.items()) + ").")


CONSERVATIVE = ("min", "mean_minus_std")


def conservative_verdict(rankings: pd.DataFrame | None) -> str:
    """"Conservative ensembles delay the peak" (Coste et al., ICLR 2024): best-of-n ranked by ``min`` and by
    ``mean_minus_std`` against each single member whose own ranking turned (:func:`turned`). A conservative ranking
    delays the peak when it does not turn within the n measured, or turns at a larger n. Without a member that
    turns there is no peak to delay."""
    claim = "conservative ensembles delay the peak"
    if rankings is None or not set(CONSERVATIVE) <= set(rankings["ranking"]):
        return f"{claim}: not measured (no ensemble rankings)."
    curves = {name: g.sort_values("n") for name, g in rankings.groupby("ranking")}
    peak_n = {name: int(g["n"].iloc[int(np.argmax(g["gold_gain"]))]) for name, g in curves.items()}
    turns = {name: turned(g) for name, g in curves.items()}
    members = sorted(m for m in curves if m.startswith("member_") and turns[m])
    found = "; ".join(f"{name}: {'turns' if turns[name] else 'does not turn'}, peak at n = {peak_n[name]} (gain "
                      f"{g['gold_gain'].max():.3f}; {g['gold_gain'].iloc[-1]:.3f} at n = {int(g['n'].iloc[-1])})"
                      for name, g in sorted(curves.items()) if name in (*members, *CONSERVATIVE, "mean"))
    if not members:
        return f"{claim}: not measured (no single reward model's best-of-n turns; {found})."
    later = [not turns[c] or peak_n[c] > peak_n[m] for c in CONSERVATIVE for m in members]
    status = "supported" if all(later) else ("not supported" if not any(later) else "mixed")
    return f"{claim}: {status} ({found})."


# ---- reading the runs, writing the report ----------------------------------------------------------------------

@dataclass(frozen=True)
class SizeResults:
    """Everything the report shows of one reward-model data size."""

    size: str
    points: pd.DataFrame  # frontier_points plus seed and proxy_gain, one row per RL run
    bon: pd.DataFrame | None  # best-of-n ranked by the transform's proxy: n, kl, kl_bound, d, gains
    rankings: pd.DataFrame | None  # best-of-n under every ranking (an ensemble's members and aggregations)
    runs: list[RunSignals]
    scale: pd.DataFrame | None = None  # PPO on the raw or normalized reward, raw outputs times a multiplier


def bon_curve(history: pd.DataFrame) -> pd.DataFrame:
    """The best-of-n curve back from its MLflow histories (``best_of_n/curve/<column>``, step = n)."""
    prefix = keys.best_of_n_curve("")
    wide = (history.assign(column=history["key"].str[len(prefix):])
            .pivot_table(index="step", columns="column", values="value").sort_index())
    return wide.rename_axis(index="n", columns=None).reset_index()


def load_size(size: str, experiment: str) -> tuple[SizeResults, list[str]]:
    """The runs tagged ``overoptimization_rm<size>``: RL runs as frontier points and signals, the newest best-of-n."""
    from calibrated_rlhf.reporting.runs import RunSelection, load_artifact_table, load_histories, load_runs

    runs, notes = load_runs(RunSelection(experiment=experiment, scenarios=(f"overoptimization_rm{size}",)))
    points = frontier_points(runs)
    by_id = runs.set_index("run_id")
    signals, seeds, gains = [], [], []
    for p in points.itertuples():
        history = load_histories([p.run_id], [*HISTORY["ppo" if p.method == "ppo" else "rl"].values(),
                                              keys.ppo_reward("calibrated") if p.method == "ppo"
                                              else keys.rl_reward("calibrated")])
        seed = int(as_float(by_id.loc[p.run_id].get(f"params.{SEED_PARAMS[p.method]}")))
        raw = raw_series(history, p.method)
        signals.append(RunSignals(p.run_id, size, p.method, p.budget, seed, *signals_of(raw), raw))
        seeds.append(seed)
        gains.append(proxy_gain(history, p.method))
    points = points.assign(seed=seeds, proxy_gain=gains)
    bon = rankings = None
    bon_runs = runs[runs.get(f"metrics.{keys.best_of_n_fit('alpha')}", pd.Series(dtype=float)).notna()] \
        if f"metrics.{keys.best_of_n_fit('alpha')}" in runs else runs.iloc[:0]
    if len(bon_runs):
        newest = bon_runs.iloc[0]["run_id"]  # load_runs: newest first
        columns = ["kl", "kl_bound", "d", "gold_gain", "proxy_gain", "gold_gain_ci_low", "gold_gain_ci_high"]
        bon = bon_curve(load_histories([newest], [keys.best_of_n_curve(c) for c in columns]))
        rankings = load_artifact_table(newest, "best_of_n/best_of_n_rankings.csv")
    return SizeResults(size, points, bon, rankings, signals, load_scale(size, experiment)), notes


def load_scale(size: str, experiment: str) -> pd.DataFrame | None:
    """The scale runs of a set of reward models (scenario ``overoptimization_rm<label>_scale``) as frontier points
    with their reward (``raw`` or ``transform``) and multiplier; None without any."""
    from calibrated_rlhf.reporting.runs import RunSelection, load_runs

    runs, _ = load_runs(RunSelection(experiment=experiment, scenarios=(f"overoptimization_rm{size}_scale",)))
    if not len(runs):
        return None
    by_id = runs.set_index("run_id")
    scale = frontier_points(runs).query("method == 'ppo'")
    return scale.assign(
        normalization=["raw" if by_id.loc[i].get("params.normalization.method") == "raw" else "transform"
                       for i in scale["run_id"]],
        multiplier=[as_float(by_id.loc[i].get("params.ppo.raw_reward_multiplier")) for i in scale["run_id"]])


def size_fits(r: SizeResults) -> pd.DataFrame:
    """Both laws fitted to each RL method's points, and best-of-n's law to its curve."""
    fits = overoptimization_fits(r.points)
    if r.bon is not None and len(r.bon) >= 5:
        fits = pd.concat([fits, pd.DataFrame([bon_fit_row(r.bon)])], ignore_index=True).infer_objects()
    return fits


def size_section(r: SizeResults, out: Path, kl_levels: Sequence[float]) -> list[str]:
    """One set of reward models' part of the report (its figure written beside it)."""
    from calibrated_rlhf.reporting.frontier import overoptimization_verdict

    fits = size_fits(r)
    size_figure(r.size, r.points, r.bon, fits, r.rankings).savefig(out / f"rm_{r.size}.png", dpi=100)
    shown = r.points[["method", "budget", "seed", "kl", "gold_gain", "gold_gain_ci_low", "gold_gain_ci_high",
                      "proxy_gain"]].rename(columns={"budget": "kl_target"})
    lines = [f"## {describe(r.size)}", "", f"![gold and proxy against d](rm_{r.size}.png)", "",
             markdown_table(shown.sort_values(["method", "kl_target", "seed"]).round(4)), ""]
    if r.bon is not None:
        lines += ["Best-of-n, ranked by the reward transform's proxy:", "",
                  markdown_table(r.bon[["n", "kl_bound", "kl", "gold_gain", "gold_gain_ci_low", "gold_gain_ci_high",
                                        "proxy_gain"]].round(4)), ""]
    if len(fits):
        verdict = overoptimization_verdict(fits[fits["method"] != "best_of_n"])
        lines += ["Fits of gold gain against d (Gao et al.'s RL form `d (alpha - beta ln d)` and best-of-n form "
                  "`d (alpha - beta d)`; 95% intervals; held-out R^2 on every third point):", "",
                  markdown_table(fits[FIT_COLUMNS].round(4)), "", f"- {verdict.claim}: **{verdict.status}** "
                  f"({verdict.evidence})."]
    by_ranking = ranking_fits(r.rankings) if r.rankings is not None and "d" in r.rankings else None
    if by_ranking is not None:
        lines.append(f"- {marks_line(fits, by_ranking)}")
    lines += [f"- {bon_efficiency_verdict(r.points, r.bon, kl_levels)}", f"- {conservative_verdict(r.rankings)}",
              f"- {transform_verdict(r.points, fits, r.scale)}", ""]
    lines += trajectory_lines(r.runs)
    if r.rankings is not None:
        wide = r.rankings.pivot_table(index="n", columns="ranking", values="gold_gain")
        lines += ["Best-of-n's gold gain under each ranking of the same pool:", "",
                  markdown_table(wide.reset_index().round(4)), ""]
    if by_ranking is not None:
        lines += ["Both forms fitted to each ranking's curve (`turned`: its gold at the largest n below its peak's "
                  "95% interval over prompts):", "", markdown_table(by_ranking.round(4)), ""]
    return lines


def fitted_section(runs: Sequence[RunSignals], warning: FittedWarning, out: Path) -> list[str]:
    """The fitted warning at its chosen threshold, saved as ``fitted_warning.json`` beside the report: its weights,
    and how far it carries."""
    warning.save(out / "fitted_warning.json")
    weights = pd.DataFrame({"feature": warning.feature_names, "weight (per standard deviation)": warning.weights,
                            "mean over the fit": warning.mean, "standard deviation": warning.scale})
    return [f"The fitted warning (`{FITTED}`, `fitted_warning.json`): a logistic score over the signals (the relative "
            f"ones as log ratios to their value at update {BASE + 1}) and the run's settings, fitted on seed 0's "
            f"updates (bias {warning.bias:.3f}, threshold {warning.threshold:g}):", "",
            markdown_table(weights.round(3)), "",
            "How far it carries: fitted (and its threshold chosen) on some runs, scored on others:", "",
            markdown_table(transfer_table(runs).fillna("-")), ""]


def untouched_section(untouched: Sequence[RunSignals], warning: FittedWarning | None, rules: Mapping[str, Rule]
                      ) -> list[str]:
    """Every chosen rule, the fitted warning as fitted on seed 0, scored on runs made after all of them were chosen
    (scenario ``overoptimization_rm<label>_untouched``): the held-out figures of runs nothing was looked at on."""
    runs = scored(untouched, warning)
    rows = []
    for family, rule in rules.items():
        s = family_score(rule, runs, family)
        rows.append({"signal": family, "rule": rule.describe(), "caught": of(s.caught, s.n_over),
                     "false alarms": of(s.false_alarms, s.n_safe)})
    seeds = ", ".join(str(seed) for seed in sorted({r.seed for r in runs}))
    return [f"## The rules on untouched runs (seed {seeds})", "",
            f"{len(runs)} runs made after every rule above, and the fitted warning, were chosen on seed 0, with the "
            "same settings; each rule is scored as above:", "", markdown_table(pd.DataFrame(rows)), "",
            "The gold a user would keep on them:", "", markdown_table(kept_gold_table(runs, rules).round(3)), ""]


def saved_warning_section(warning: FittedWarning, source: str, runs: Sequence[RunSignals],
                          untouched: Sequence[RunSignals] = ()) -> list[str]:
    """A fitted warning saved by another report (fitted, and its threshold chosen, on other runs: another seed's,
    another machine's) scored as it is, threshold included, on these runs: nothing of it was chosen on them."""
    rule = Rule(FITTED, warning.threshold)
    every = scored([*runs, *untouched], warning)
    groups = [("every run", every), *((f"{attribute} {v}", [r for r in every if getattr(r, attribute) == v])
                                      for attribute in ("method", "size")
                                      for v in sorted({getattr(r, attribute) for r in every}))]
    rows = [{"runs": name, "caught": of(s.caught, s.n_over), "false alarms": of(s.false_alarms, s.n_safe)}
            for name, s in ((name, family_score(rule, group, FITTED)) for name, group in groups)]
    return ["## A saved warning on these runs", "",
            f"`{source}` (threshold {warning.threshold:g}) on all {len(every)} runs above, scored as the rules are:",
            "",
            markdown_table(pd.DataFrame(rows)), ""]


def warnings_section(runs: Sequence[RunSignals], out: Path, untouched: Sequence[RunSignals] = ()) -> list[str]:
    """The warning rules over every RL run: each signal's chosen threshold and scores, the fitted warning, the gold
    each rule keeps, each run's firings; then the chosen rules on ``untouched`` runs, if any."""
    runs, warning = with_fitted_warning(runs)
    table, rules = warning_table(runs)
    if warning is not None and FITTED in rules:
        warning = replace(warning, threshold=rules[FITTED].threshold)
    fitted = fitted_section(runs, warning, out) if warning is not None and FITTED in rules else []
    return ["## Warnings that need no gold", "",
            f"Each signal is a trailing mean over {WINDOW} updates; a relative rule divides it by its value at update "
            f"{BASE + 1}, the mean of the first {WINDOW}. Its threshold is the one that catches the most "
            f"over-optimizing runs of seed 0 with at most {MAX_FALSE_ALARMS:.0%} false alarms; the held-out columns "
            "score that threshold on the other seeds. A run over-optimizes when its gold, smoothed over 5 updates, "
            f"ends 0.1 or more below its peak; a warning catches it when it fires by the peak plus {LATE_FRACTION:.0%} "
            f"of the run. The row `{GOLD}` is not a warning: it reads the gold itself as the run goes (a fall from "
            "its maximum), a yardstick for the rules above.", "",
            markdown_table(table.round(3)), "", *fitted,
            "The gold a user would keep, replayed on the logged runs: the held-out runs' mean gold gain (smoothed, "
            "from update 1) of the policy each chosen rule keeps (the one the update it fires on makes), or of the "
            "last where it never fires:", "",
            markdown_table(kept_gold_table(runs, rules).round(3)), "",
            "The same choice and held-out score at later deadlines (held-out runs caught, safe runs alarmed):", "",
            markdown_table(deadline_table(runs)), "",
            "Each threshold of the signals read off the samples, over all runs (runs caught in time, fired on at all, "
            "safe runs alarmed):", "", markdown_table(grid_table(runs)), "",
            markdown_table(run_table(runs, rules).round(3)), "",
            *(untouched_section(untouched, warning, rules) if untouched else [])]


def guide_link(out: Path) -> str:
    """The link from a report written under ``out`` to the guide that explains it: relative where ``out`` lies in
    the project's docs folder (at any depth), the project path elsewhere."""
    where = out.resolve()
    docs = next((parent for parent in where.parents if parent.name == "docs"), None)
    return os.path.relpath(docs / "overoptimization.md", where) if docs else "docs/overoptimization.md"


def write_report(results: Sequence[SizeResults], out_dir: str | Path, kl_levels: Sequence[float] = (1, 2, 4),
                 untouched: Sequence[RunSignals] = (), series: Sequence[RunSignals] | None = None,
                 saved: str = "") -> Path:
    """``README.md`` (per set of reward models: the points, the fits, the verdicts; then the warning rules over every
    run, and over ``untouched`` runs), one figure per set, ``rm_<label>.png``, and every RL run's series,
    :data:`SERIES_FILE`, under ``out_dir``. With ``series`` (runs read back from that file) and no ``results``, only
    the warnings section, from those runs, and the file is left as it is. ``saved``: the path of a fitted warning
    another report saved, scored on all these runs as it is."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Over-optimization: gold and proxy against KL, per reward-model data size", "",
             "Written by `python -m calibrated_rlhf.reporting.overoptimization` from the runs of "
             "`scripts/overoptimization.sh`; how to read it: "
             f"[docs/overoptimization.md]({guide_link(out)}).", ""]
    for r in results:
        lines += size_section(r, out, kl_levels)
    runs = [run for r in results for run in r.runs] if series is None else list(series)
    if series is None and (runs or untouched):
        # mtime 0: the same runs give the same bytes, so a report written again shows no change in git
        series_frame(runs, untouched).to_csv(out / SERIES_FILE, index=False, float_format="%.10g",
                                             compression={"method": "gzip", "mtime": 0})
    if runs:
        lines += warnings_section(runs, out, untouched)
    if saved and (runs or untouched):
        lines += saved_warning_section(FittedWarning.load(saved), saved, runs, untouched)
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "README.md"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m calibrated_rlhf.reporting.overoptimization --sizes 9600,2400,600 --out DIR``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="calibrated_rlhf")
    parser.add_argument("--sizes", default="9600,2400,600",
                        help="the reward models' labels (scenario overoptimization_rm<label>): their data size in "
                        "preference pairs, then _NAME where their own size differs (2400_large); comma separated; "
                        "LABEL@URI reads that label's runs from another MLflow store than $MLFLOW_TRACKING_URI's")
    parser.add_argument("--untouched", default="",
                        help="labels as --sizes whose runs tagged overoptimization_rm<label>_untouched were made after "
                        "the rules were chosen: every chosen rule is scored on them too")
    parser.add_argument("--series", default="",
                        help=f"a {SERIES_FILE} an earlier report wrote: the warnings section again from its runs, "
                        "with no store (--sizes and --untouched are not read)")
    parser.add_argument("--warning", default="",
                        help="a fitted_warning.json another report saved: scored as it is on every run read here")
    parser.add_argument("--out", default="docs/results/overoptimization")
    args = parser.parse_args(argv)
    if args.warning:
        FittedWarning.load(args.warning)  # a missing or broken file is named before any run is read
    if args.series:
        runs, untouched = runs_from_series(pd.read_csv(args.series))
        path = write_report([], args.out, untouched=untouched, series=runs, saved=args.warning)
        print(f"over-optimization report: {path}")
        return
    results = [load_labelled(item, "", args.experiment) for item in args.sizes.split(",")]
    untouched = [run for item in filter(None, args.untouched.split(","))
                 for run in load_labelled(item, "_untouched", args.experiment).runs]
    print(f"over-optimization report: {write_report(results, args.out, untouched=untouched, saved=args.warning)}")


def load_labelled(item: str, suffix: str, experiment: str) -> SizeResults:
    """``LABEL`` or ``LABEL@URI`` of ``--sizes``: the runs of scenario ``overoptimization_rm<LABEL><suffix>``."""
    from calibrated_rlhf.reporting.runs import tracking_store

    size, _, uri = item.partition("@")
    with tracking_store(uri):
        result, notes = load_size(size + suffix, experiment)
    for note in notes:
        print(f"rm_{size}{suffix}: {note}")
    return result


if __name__ == "__main__":
    main()
