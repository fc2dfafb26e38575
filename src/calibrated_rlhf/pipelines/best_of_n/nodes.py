"""Nodes of ``best_of_n``: thin adapters over ``calibrated_rlhf.core.best_of_n``."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field, model_validator

from calibrated_rlhf.core import best_of_n, plots
from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core.gold import load_gold
from calibrated_rlhf.core.normalization import RewardTransform
from calibrated_rlhf.core.preferences import distinct_prompts
from calibrated_rlhf.core.scoring import RewardScorer
from calibrated_rlhf.pipelines.metrics import as_metrics

log = logging.getLogger(__name__)


class BestOfNParams(BaseModel):
    """Best-of-n over a pool of reference samples per test prompt (``core.best_of_n``)."""

    model_config = ConfigDict(extra="forbid")
    n_prompts: int = Field(16, ge=1, description="Test prompts, each with its own pool.")
    pool_size: int = Field(2048, ge=1, description="Reference samples per prompt. The KL measured at n is at most "
                           "log(pool_size): keep the pool several times larger than the largest n.")
    ns: list[int] = Field([1, 2, 4, 8, 16, 32, 64, 128, 256, 512], min_length=1,
                          description="The n of best-of-n, each at most pool_size.")
    response_length: int = Field(24, ge=1, description="Tokens per sampled response.")
    seed: int = Field(4321, description="Sampling seed of the pool.")

    @model_validator(mode="after")
    def _ns_fit_the_pool(self) -> BestOfNParams:
        if any(not 1 <= n <= self.pool_size for n in self.ns):
            raise ValueError(f"best_of_n.ns must lie in [1, pool_size = {self.pool_size}], got {self.ns}")
        return self


def best_of_n_curve(reference_policy: Any, tokenizer: Any, reward_model: Any, reward_transform: dict[str, Any],
                    test_pairs: pd.DataFrame, synthetic_task: dict[str, Any], params: BestOfNParams
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The best-of-n curve over ``params.ns``: KL (measured and bound), proxy and gold gains with intervals; and
    the same curve for every ranking of the pool (an ensemble's members and aggregations; one model: its own)."""
    scorer = RewardScorer(reward_model, tokenizer, RewardTransform.from_dict(reward_transform))
    task = load_gold(synthetic_task) if synthetic_task else None
    prompts = distinct_prompts(test_pairs)[: params.n_prompts]
    pool = best_of_n.sample_pool(reference_policy, tokenizer, scorer, task, prompts, params.pool_size,
                                 params.response_length, params.seed)
    return best_of_n.curve(pool, params.ns), best_of_n.ranking_curves(pool, params.ns)


def report_best_of_n(points: pd.DataFrame) -> tuple[dict[str, list[dict[str, float]]], dict[str, dict[str, float]],
                                                     Figure]:
    """The curve as MLflow histories (step = n), Gao et al.'s fit to the gold gain where it can be made, a figure."""
    history = {keys.best_of_n_curve(c): [{"value": float(v), "step": int(n)} for n, v in zip(points["n"], points[c])]
               for c in best_of_n.CURVE_COLUMNS if c != "n" and points[c].notna().all()}
    fitted, values = None, {}
    if points["gold_gain"].notna().all() and (points["d"] > 0).sum() >= 5:
        fitted, r2_held_out, d_observed = best_of_n.fit(points)
        values = {"alpha": fitted.alpha, "beta": fitted.beta, "r2": fitted.r2, "r2_held_out": r2_held_out,
                  "d_peak": fitted.d_peak, "d_peak_observed": d_observed}
        log.info("best-of-n fit: %s", {k: round(v, 4) for k, v in values.items()})
    return history, as_metrics({keys.best_of_n_fit(k): v for k, v in values.items()}), plots.best_of_n(points, fitted)
