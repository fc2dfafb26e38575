"""Nodes of ``reward_ensemble``: thin adapters over ``calibrated_rlhf.core.ensemble``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core.ensemble import EnsembleSpec, RewardEnsemble
from calibrated_rlhf.core.metric_keys import member_key
from calibrated_rlhf.core.metrics import preference_report
from calibrated_rlhf.core.reward_model import model_fingerprint
from calibrated_rlhf.pipelines.metrics import as_metrics
from calibrated_rlhf.core.ensemble import EnsembleParams

log = logging.getLogger(__name__)

Metrics = dict[str, Any]


def member_metrics_namer(member: int) -> Callable[..., Metrics]:
    """The node that renames one member's metrics and curves under its own keys."""

    def name_member_metrics(rm_training_history: Metrics, rm_test_metrics: Metrics,
                            calibration_metrics: Metrics) -> Metrics:
        """One member's training curves, test metrics and calibration metrics, keyed by member."""
        out: Metrics = {}
        for metrics in (rm_training_history, rm_test_metrics, calibration_metrics):
            out.update({member_key(k, member): v for k, v in metrics.items()})
        return out

    return name_member_metrics


def assemble_reward_ensemble(params: EnsembleParams, *models_then_fits: Any) -> RewardEnsemble:
    """The members (models first, then their temperature fits, in member order) as one scorer."""
    if len(models_then_fits) % 2 or not models_then_fits:
        raise ValueError("assemble_reward_ensemble needs each member's model and temperature fit")
    k = len(models_then_fits) // 2
    models, fits = models_then_fits[:k], models_then_fits[k:]
    spec = EnsembleSpec(aggregation=params.aggregation, std_penalty=params.std_penalty,
                        member_temperatures=tuple(float(f["temperature"]) for f in fits),
                        member_versions=tuple(model_fingerprint(m) for m in models))
    log.info("reward ensemble: %d members, %s, member temperatures %s", k, spec.aggregation,
             [round(t, 4) for t in spec.member_temperatures])
    return RewardEnsemble(list(models), spec)


def aggregate_scores(reward_ensemble: RewardEnsemble, *member_scores: pd.DataFrame) -> pd.DataFrame:
    """The ensemble's reward of both sides of every pair, from the members' raw scores of the same pairs.

    Columns as one model's scores (pair_id, reward_chosen, reward_rejected, true_prob), plus the
    ensemble_std of each side (ensemble_std_chosen, ensemble_std_rejected).
    """
    first = member_scores[0]
    for i, scores in enumerate(member_scores[1:], start=1):
        if not np.array_equal(scores["pair_id"].to_numpy(), first["pair_id"].to_numpy()):
            raise ValueError(f"member_{i}'s scores are not of the same pairs, in the same order, as member_0's")
    out = pd.DataFrame({"pair_id": first["pair_id"].to_numpy()})
    spec = reward_ensemble.spec
    for side in ("chosen", "rejected"):
        raw = np.stack([s[f"reward_{side}"].to_numpy(dtype=np.float64) for s in member_scores], axis=1)
        out[f"reward_{side}"], out[f"ensemble_std_{side}"] = spec.aggregate(raw)
    if "true_prob" in first.columns:
        out["true_prob"] = first["true_prob"].to_numpy(dtype=float)
    return out


def _test_nll(scores: pd.DataFrame, temperature_fit: dict[str, Any]) -> float:
    margins = (scores["reward_chosen"] - scores["reward_rejected"]).to_numpy(dtype=np.float64)
    return float(preference_report(margins, float(temperature_fit["temperature"]))["nll"])


def report_ensemble(test_scores: pd.DataFrame, temperature_fit: dict[str, Any],
                    *member_scores_then_fits: Any) -> Metrics:
    """The ensemble against its members on the test pairs: NLL after calibration, best member, ensemble_std.

    ``member_scores_then_fits``: the members' test scores, then their temperature fits, in member order.
    """
    k = len(member_scores_then_fits) // 2
    member_nll = [_test_nll(s, f) for s, f in zip(member_scores_then_fits[:k], member_scores_then_fits[k:])]
    nll = _test_nll(test_scores, temperature_fit)
    best = min(member_nll)
    ensemble_std = np.concatenate([test_scores["ensemble_std_chosen"], test_scores["ensemble_std_rejected"]])
    values = {
        keys.ENSEMBLE_SIZE: k,
        keys.ENSEMBLE_TEST_NLL_AFTER: nll,
        keys.ENSEMBLE_BEST_MEMBER_TEST_NLL_AFTER: best,
        keys.ENSEMBLE_WORST_MEMBER_TEST_NLL_AFTER: max(member_nll),
        # >= 0: the ensemble, calibrated, predicts held-out preferences at least as well as its best member.
        keys.ENSEMBLE_NLL_GAIN_OVER_BEST_MEMBER: best - nll,
        keys.ENSEMBLE_TEST_STD_MEAN: float(ensemble_std.mean()),
    }
    log.info("ensemble on test: %s", {k: round(v, 4) for k, v in values.items()})
    return as_metrics(values)
