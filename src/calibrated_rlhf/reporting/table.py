"""The comparison table: one row per run, from plain run records (no MLflow here).

Inputs are two DataFrames:

* ``runs``: one row per run, as ``mlflow.search_runs`` returns them (``run_id``, ``start_time``,
  ``metrics.<key>``, ``params.<key>``, ``tags.<key>``);
* ``histories``: per-step metric values in long form, columns ``run_id``, ``key``, ``step``, ``value``.

A run may lack any metric (a run of some pipelines only); its cells are NaN, never guessed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core.kl_tracking import end_of_training_mean, kl_tracking_error, summarize_kl_tracking

# Table column -> MLflow metric key (the latest value search_runs reports), the same for every method.
METRICS: dict[str, str] = {
    "reward_offset": keys.RM_TEST_REWARD_MEAN,
    "rm_accuracy": keys.RM_TEST_ACCURACY,
    "rm_bayes_accuracy": keys.RM_TEST_BAYES_ACCURACY,
    "temperature": keys.CALIBRATION_TEMPERATURE,
    "nll_before": keys.CALIBRATION_TEST_NLL_BEFORE,
    "nll_after": keys.CALIBRATION_TEST_NLL_AFTER,
    "bayes_nll": keys.CALIBRATION_TEST_BAYES_NLL,
    "ece_before": keys.CALIBRATION_TEST_ECE_BEFORE,
    "ece_after": keys.CALIBRATION_TEST_ECE_AFTER,
    "oracle_ece": keys.CALIBRATION_TEST_ORACLE_ECE,
    "norm_mean": keys.NORMALIZATION_MEAN,
    "norm_std": keys.NORMALIZATION_STD,
    "norm_n": keys.NORMALIZATION_N,
    # The one evaluation protocol: every method logs its final policy's figures under the same ``eval/`` keys.
    "kl_reference": keys.EVAL_KL_REFERENCE,
    "gold_reward": keys.EVAL_GOLD_POLICY,
    "gold_reference": keys.EVAL_GOLD_REFERENCE,
    "gold_gain": keys.EVAL_GOLD_GAIN,
    "gold_gain_ci_low": keys.EVAL_GOLD_GAIN_CI_LOW,
    "gold_gain_ci_high": keys.EVAL_GOLD_GAIN_CI_HIGH,
    "episodes_per_s": keys.EVAL_EPISODES_PER_S,
    "ensemble_size": keys.ENSEMBLE_SIZE,
    "ensemble_nll_after": keys.ENSEMBLE_TEST_NLL_AFTER,
    "best_member_nll_after": keys.ENSEMBLE_BEST_MEMBER_TEST_NLL_AFTER,
    "final_gold_gap": keys.EVAL_FINAL_GOLD_GAP,
    "final_ensemble_std": keys.EVAL_FINAL_ENSEMBLE_STD,
}

# Table column -> flattened MLflow param key, the same for every method.
PARAMS: dict[str, str] = {
    "normalization_method": "normalization.method",
    "center_rewards_coefficient": "reward_model.training.center_rewards_coefficient",
    "calibration_enabled": "calibration.enabled",
    "aggregation": "reward_model.ensemble.aggregation",
}
ENSEMBLE_SIZE_PARAM = "reward_model.ensemble_size"


@dataclass(frozen=True)
class MethodKeys:
    """Where one RL method logs the columns whose key depends on the method (a metric wins over a param)."""

    metrics: Mapping[str, str] = field(default_factory=dict)  # table column -> metric key
    params: Mapping[str, str] = field(default_factory=dict)  # table column -> flattened param key
    curves: Mapping[str, str] = field(default_factory=dict)  # curve (kl, kl_target, beta, gold, gold_gap) -> key


_PPO_KEYS = MethodKeys(
    metrics={"kl_second_half_mean": keys.EVAL_KL_SECOND_HALF_MEAN, "kl_tracking_error": keys.EVAL_KL_TRACKING_ERROR,
             "final_beta": keys.EVAL_FINAL_BETA, "kl_target": keys.PPO_KL_TARGET},
    params={"kl_target": "ppo.trainer.kl_target", "reward_multiplier": "ppo.raw_reward_multiplier",
            "kl_control": "ppo.trainer.kl_control"},
    curves={"kl": keys.PPO_KL, "kl_target": keys.PPO_KL_TARGET, "beta": keys.PPO_BETA, "gold": keys.PPO_REWARD_GOLD,
            "gold_gap": keys.PPO_REWARD_GOLD_GAP})
_RL_KEYS = MethodKeys(
    metrics={"kl_second_half_mean": keys.EVAL_KL_SECOND_HALF_MEAN, "kl_tracking_error": keys.EVAL_KL_TRACKING_ERROR,
             "final_beta": keys.EVAL_FINAL_BETA},
    params={"kl_target": "rl.kl_target", "reward_multiplier": "rl.raw_reward_multiplier", "kl_control": "rl.kl_control"},
    curves={"kl": keys.RL_KL, "beta": keys.RL_BETA, "gold": keys.RL_REWARD_GOLD,
            "gold_gap": keys.rl_reward("gold_gap")})  # the target is a parameter
# The one mapping from a run's method to its keys. A run of the default DAG that stopped before PPO has no
# method and reads PPO's keys (it logged none of them). DPO has no KL target or controller: its budget is its
# beta (``dpo.trainer.beta``), which the frontier reads.
METHOD_KEYS: dict[str | None, MethodKeys] = {
    None: _PPO_KEYS, "ppo": _PPO_KEYS, "rloo": _RL_KEYS,
    "grpo": MethodKeys(_RL_KEYS.metrics, {**_RL_KEYS.params, "scale_rewards": "rl.scale_rewards"}, _RL_KEYS.curves),
    "dpo": MethodKeys(),
}
METHOD_COLUMNS = ["kl_target", "kl_second_half_mean", "kl_tracking_error", "final_beta", "reward_multiplier",
                  "kl_control", "scale_rewards"]
NUMERIC_METHOD_COLUMNS = ("kl_target", "kl_second_half_mean", "kl_tracking_error", "final_beta", "reward_multiplier")
GRPO_DEFAULT_SCALE_REWARDS = "group"  # rl.scale_rewards: null leaves TRL's default

# The per-update curves the figure draws (every method's) and the table falls back on (PPO's).
HISTORY_KEYS: tuple[str, ...] = (*dict.fromkeys(k for m in (_PPO_KEYS, _RL_KEYS) for k in m.curves.values()),
                                 keys.PPO_REWARD_ENSEMBLE_STD, keys.PPO_EPISODES_PER_S)
HISTORY_COLUMNS = ["run_id", "key", "step", "value"]

IDENTITY = ["label", "run_id", "run_name", "scenario", "method", "start_time"]
COLUMNS = IDENTITY + list(PARAMS) + METHOD_COLUMNS + list(METRICS)

SECTIONS: dict[str, list[str]] = {
    "Runs": ["label", "run_id", "scenario", "method", "normalization_method", "reward_multiplier", "kl_control",
             "scale_rewards", "center_rewards_coefficient", "calibration_enabled", "aggregation"],
    "Reward model and calibration": ["label", "reward_offset", "rm_accuracy", "rm_bayes_accuracy", "temperature",
                                     "nll_before", "nll_after", "bayes_nll", "ece_before", "ece_after", "oracle_ece"],
    "Normalization": ["label", "norm_mean", "norm_std", "norm_n"],
    "RL: KL tracking and the evaluation protocol": [
        "label", "method", "kl_second_half_mean", "kl_target", "kl_tracking_error", "final_beta", "kl_reference",
        "gold_reward", "gold_reference", "gold_gain", "gold_gain_ci_low", "gold_gain_ci_high", "episodes_per_s"],
    "Reward ensembles and over-optimization": [
        "label", "ensemble_size", "aggregation", "nll_after", "best_member_nll_after", "gold_reward", "gold_gain",
        "final_gold_gap", "final_ensemble_std"],
}


# Columns that name a run rather than report a value: they never decide whether a run shows in a section.
NAMING_COLUMNS = ("label", "run_id", "scenario", "method")


def empty_histories() -> pd.DataFrame:
    return pd.DataFrame(columns=HISTORY_COLUMNS)


def tag_values(runs: pd.DataFrame, name: str) -> pd.Series:
    """A tag's values, None where a run lacks it (search_runs gives NaN or None there)."""
    values = runs[f"tags.{name}"] if f"tags.{name}" in runs.columns else [None] * len(runs)
    return pd.Series([v if isinstance(v, str) and v else None for v in values], index=runs.index, dtype=object)


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs[name] if name in runs.columns else pd.Series([None] * len(runs), index=runs.index, dtype=object)


# The protocol's keys as older runs logged them, under PPO's name for every method: they do not make a run a PPO run.
LEGACY_PROTOCOL_KEYS = frozenset(old for key in keys.EVAL_PROTOCOL_KEYS for old in keys.legacy_keys(key))


def with_current_keys(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with each renamed metric (``keys.LEGACY_KEYS``) filled from its older keys where a run did not
    log it under the current one: runs logged before the one ``eval/`` prefix read like new ones. The older
    columns stay (:func:`method_of` reads them); ``runs`` itself is not changed."""
    out = runs
    for key, olds in keys.LEGACY_KEYS.items():
        present = [f"metrics.{old}" for old in olds if f"metrics.{old}" in runs.columns]
        if not present:
            continue
        if out is runs:
            out = runs.copy()
        column = f"metrics.{key}"
        values = out[column] if column in out.columns else pd.Series(math.nan, index=out.index, dtype=object)
        for old in present:
            values = values.where(values.map(as_float).notna(), out[old])
        out[column] = values
    return out


def method_of(runs: pd.DataFrame) -> pd.Series:
    """Each run's RL method: its ``rl/algorithm`` tag (ppo, rloo, grpo, dpo), else ``ppo`` where it logged a PPO
    metric beyond the shared evaluation protocol (a PPO run logged before PPO set the tag), else None (a run that
    trained no policy)."""
    tagged = tag_values(runs, keys.RL_ALGORITHM_TAG)
    ppo_columns = [c for c in runs.columns
                   if c.startswith("metrics.ppo/") and c[len("metrics."):] not in LEGACY_PROTOCOL_KEYS]
    ppo = runs[ppo_columns].map(as_float).notna().any(axis=1) if ppo_columns else pd.Series(False, index=runs.index)
    return pd.Series([t if t else ("ppo" if p else None) for t, p in zip(tagged, ppo)], index=runs.index, dtype=object)


def scale_rewards_of(runs: pd.DataFrame, methods: pd.Series) -> pd.Series:
    """GRPO's ``rl.scale_rewards`` (null: TRL's ``group``); None for the other methods, which do not read it."""
    values = _column(runs, f"params.{METHOD_KEYS['grpo'].params['scale_rewards']}")
    return pd.Series([(v if isinstance(v, str) and v.strip() not in ("", "None", "null") else GRPO_DEFAULT_SCALE_REWARDS)
                      if m == "grpo" else None for v, m in zip(values, methods)], index=runs.index, dtype=object)


def method_name(method: str | None, scale_rewards: str | None = None) -> str:
    """How the report names a method: ``rloo``, or ``grpo, batch`` where GRPO's reward scaling tells runs apart."""
    return f"{method}, {scale_rewards}" if method == "grpo" and scale_rewards else str(method)


def run_labels(runs: pd.DataFrame) -> list[str]:
    """The scenario tag, else the run name and short id, then ``[method]`` for the methods besides PPO (the same
    scenario runs with ``--pipelines ppo`` or ``rl``); a repeated label gets the short id too."""
    scenarios, names = tag_values(runs, "scenario"), tag_values(runs, "mlflow.runName")
    methods = method_of(runs)
    scale = scale_rewards_of(runs, methods)
    labels = [(s if s else f"{n or 'run'} ({rid[:8]})") + (f" [{method_name(m, r)}]" if m not in (None, "ppo") else "")
              for s, n, rid, m, r in zip(scenarios, names, runs["run_id"], methods, scale)]
    counts = pd.Series(labels).value_counts()
    return [f"{lab} ({rid[:8]})" if counts[lab] > 1 and f"({rid[:8]})" not in lab else lab
            for lab, rid in zip(labels, runs["run_id"])]


def as_float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def curve(histories: pd.DataFrame, run_id: str, key: str) -> pd.DataFrame:
    """One metric of one run, ordered by step."""
    if histories.empty:
        return histories
    return histories[(histories["run_id"] == run_id) & (histories["key"] == key)].sort_values("step", kind="stable")


def curve_values(histories: pd.DataFrame, run_id: str, key: str) -> np.ndarray:
    return curve(histories, run_id, key)["value"].to_numpy(dtype=np.float64)


def _fill(row: dict[str, object], column: str, value: float) -> None:
    """Set ``column`` only where the run did not log it: the logged summary is what the run reported."""
    if math.isnan(row[column]):  # type: ignore[arg-type]
        row[column] = value


def _from_method_keys(row: dict[str, object], run: pd.Series, method: str | None) -> None:
    """The columns whose key depends on the run's method (:data:`METHOD_KEYS`): the metric, else the param."""
    source = METHOD_KEYS.get(method, MethodKeys())
    for column in METHOD_COLUMNS:
        metric, param = source.metrics.get(column), source.params.get(column)
        value: object = as_float(run.get(f"metrics.{metric}")) if metric else math.nan
        if column in NUMERIC_METHOD_COLUMNS:
            row[column] = value if not math.isnan(value) or not param else as_float(run.get(f"params.{param}"))  # type: ignore[arg-type]
        else:
            row[column] = run.get(f"params.{param}") if param else None


def _from_curves(row: dict[str, object], run: pd.Series, histories: pd.DataFrame) -> None:
    """The PPO summary columns a PPO run did not log, recomputed from its curves with the stage's own summary.

    PPO only: RLOO and GRPO log their summary from the same node that logs their curves, so a run with the
    curves has the summary."""
    run_id = run["run_id"]
    target = curve_values(histories, run_id, keys.PPO_KL_TARGET)
    if target.size:
        _fill(row, "kl_target", target[-1])
    tracking = summarize_kl_tracking(curve_values(histories, run_id, keys.PPO_KL), row["kl_target"],  # type: ignore[arg-type]
                                     curve_values(histories, run_id, keys.PPO_BETA),
                                     curve_values(histories, run_id, keys.PPO_EPISODES_PER_S))
    _fill(row, "kl_second_half_mean", tracking.kl_second_half_mean)
    _fill(row, "kl_tracking_error", kl_tracking_error(row["kl_second_half_mean"], row["kl_target"]))  # type: ignore[arg-type]
    _fill(row, "final_beta", tracking.final_beta)
    _fill(row, "episodes_per_s", tracking.episodes_per_s)
    _fill(row, "final_gold_gap", end_of_training_mean(curve_values(histories, run_id, keys.PPO_REWARD_GOLD_GAP)))
    _fill(row, "final_ensemble_std",
          end_of_training_mean(curve_values(histories, run_id, keys.PPO_REWARD_ENSEMBLE_STD)))


def comparison_table(runs: pd.DataFrame, histories: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per run with the columns of :data:`COLUMNS`, NaN where a run did not log a value.

    ``method`` is the run's RL method (:func:`method_of`); the KL-tracking columns, the KL target, the reward
    multiplier and the KL control come from that method's keys (:data:`METHOD_KEYS`). A logged summary wins;
    the PPO summary columns a PPO run did not log (an older or interrupted run) are recomputed from its curves
    with ``core.kl_tracking``, the function the PPO stage logs them with. Runs logged before the one ``eval/``
    prefix are read through their older keys (:func:`with_current_keys`).
    One reward model counts as an ensemble of size 1 (its ``reward_model.ensemble_size`` parameter).
    """
    histories = histories if histories is not None else empty_histories()
    runs = with_current_keys(runs)
    rows = []
    labels = run_labels(runs) if len(runs) else []
    names, scenarios, methods = tag_values(runs, "mlflow.runName"), tag_values(runs, "scenario"), method_of(runs)
    scale = scale_rewards_of(runs, methods)
    for label, name, scenario, method, (i, run) in zip(labels, names, scenarios, methods, runs.iterrows()):
        row: dict[str, object] = {"label": label, "run_id": run["run_id"], "run_name": name, "scenario": scenario,
                                  "method": method, "start_time": run.get("start_time")}
        row |= {col: run.get(f"params.{key}") for col, key in PARAMS.items()}
        row |= {col: as_float(run.get(f"metrics.{key}")) for col, key in METRICS.items()}
        _from_method_keys(row, run, method)
        row["scale_rewards"] = scale[i]  # the param as logged, null read as TRL's default
        _fill(row, "ensemble_size", as_float(run.get(f"params.{ENSEMBLE_SIZE_PARAM}")))
        if METHOD_KEYS.get(method) is _PPO_KEYS:
            _from_curves(row, run, histories)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def is_empty(value: object) -> bool:
    """No value: None, NaN, NaT or an empty string."""
    if value is None or value is pd.NaT:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


def empty_columns(table: pd.DataFrame) -> list[str]:
    """Columns without a value in any row: nothing the selected runs logged fills them."""
    return [c for c in table.columns if all(is_empty(v) for v in table[c])]
