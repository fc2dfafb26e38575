"""Nodes of ``normalization``: thin adapters over ``calibrated_rlhf.core.normalization``."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import Field

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core import plots
from calibrated_rlhf.core.ensemble import RewardEnsemble
from calibrated_rlhf.core.normalization import (NormalizationParams, RewardStats, RewardTransform, identity_transform,
                                                transform_from_stats)
from calibrated_rlhf.core.preferences import distinct_prompts, plain_frame, text_key
from calibrated_rlhf.core.scoring import RewardScorer, reference_statistics, reward_fingerprint
from calibrated_rlhf.pipelines.metrics import as_metrics
from calibrated_rlhf.pipelines import tracking
from calibrated_rlhf.pipelines.params import StrictParams

log = logging.getLogger(__name__)


def reference_set(pairs: pd.DataFrame, reference_policy: Any, tokenizer: Any,
                  params: NormalizationParams) -> pd.DataFrame:
    """The reference distribution: the reference policy's responses to held-out prompts (conversational ones
    rendered with the chat template), or the pairs' own."""
    if params.reference == "dataset_responses":
        return reference_responses(pairs)
    from calibrated_rlhf.core.policy import sample_responses

    rows = sample_responses(reference_policy, tokenizer, distinct_prompts(pairs), params.samples_per_prompt,
                            params.max_new_tokens, seed=params.seed, desc="reference samples")
    return pd.DataFrame(rows, columns=["prompt", "response"])


def reference_responses(pairs: pd.DataFrame) -> pd.DataFrame:
    """Distinct (prompt, response) rows from both sides of held-out pairs."""
    rows = pd.DataFrame({"prompt": list(pairs["prompt"]) * 2,
                         "response": list(pairs["chosen"]) + list(pairs["rejected"])})
    keys = rows["prompt"].map(text_key) + "\x00" + rows["response"].map(text_key)
    return rows[~keys.duplicated()].reset_index(drop=True)


def compute_reward_transform(
    reward_model: Any,
    tokenizer: Any,
    responses: pd.DataFrame,
    temperature_fit: dict[str, Any],
    params: NormalizationParams,
) -> tuple[dict[str, Any], dict[str, dict[str, float]], Figure]:
    """Stream calibrated rewards of the reference responses through mergeable stats; freeze the transform.

    ``reward_model`` is one model or a ``RewardEnsemble``; an ensemble's transform also carries its
    members, their aggregation and their mean ensemble_std on the reference set.
    """
    temperature = float(temperature_fit["temperature"])
    responses = plain_frame(responses)  # read back from Parquet: message lists arrive as numpy arrays
    scorer = RewardScorer(reward_model, tokenizer, batch_size=params.batch_size)
    stats, raw, ensemble_std = reference_statistics(scorer, list(responses["prompt"]), list(responses["response"]),
                                                    temperature)
    ensemble = None
    if isinstance(reward_model, RewardEnsemble):
        ensemble = {**reward_model.spec.to_dict(), "reference_ensemble_std": float(ensemble_std.mean())}
    version = reward_fingerprint(reward_model)
    if params.method != "none":
        transform = transform_from_stats(temperature, stats, params.clip, params.reference, version, ensemble=ensemble)
    else:
        transform = identity_transform(temperature, stats, params.clip, version, ensemble=ensemble)
    log.info("reward transform: T=%.4f mean=%.4f std=%.4f on %d %s", temperature, transform.mean, transform.std,
             transform.n, transform.computed_on)
    figure = plots.reward_distributions(raw, transform.calibrate(raw), transform.normalize(raw))
    return transform.to_dict(), as_metrics(_transform_metrics(transform, stats, raw)), figure


def _transform_metrics(transform: RewardTransform, stats: RewardStats, raw: np.ndarray) -> dict[str, float]:
    z = (transform.calibrate(raw) - transform.mean) / transform.std
    values = {
        keys.NORMALIZATION_MEAN: transform.mean,
        keys.NORMALIZATION_STD: transform.std,
        keys.NORMALIZATION_N: transform.n,
        keys.NORMALIZATION_CLIP_FRACTION: float(np.mean(np.abs(z) > (transform.clip or np.inf))),
        **{keys.normalization_calibrated_quantile(k): v for k, v in stats.quantiles().items()},
    }
    if transform.ensemble is not None:
        values[keys.NORMALIZATION_ENSEMBLE_STD] = transform.ensemble["reference_ensemble_std"]
    return values


class ServingParams(StrictParams):
    """How the deployable reward model is logged to MLflow."""

    enabled: bool = Field(True, description="Log the pyfunc bundle (reward model + tokenizer + transform).")
    name: str = Field("calibrated_reward_model", description="Name of the logged model in the run.")
    registered_model_name: str | None = Field(
        "calibrated-rlhf-reward-model", description="Model-registry name; null logs without registering."
    )


def publish_reward_model(
    reward_model: Any, tokenizer: Any, reward_transform: dict[str, Any], pairs: pd.DataFrame, params: ServingParams
) -> dict[str, Any]:
    """Log the reward model, its tokenizer and transform as one MLflow pyfunc model; returns where it went.

    The model is registered under ``registered_model_name`` only once the whole run has finished (a
    hook does it), so a failed or killed run never becomes the registry's latest version.
    """
    run_id = tracking.active_run_id()
    if not params.enabled or run_id is None:
        log.warning("no active MLflow run (or serving.enabled is false): the pyfunc model is not logged")
        return {"logged": False}
    example = plain_frame(pairs[["prompt", "chosen", "rejected"]].head(2).reset_index(drop=True))
    info = tracking.log_reward_model(reward_model, tokenizer, reward_transform, params.name, example)
    log.info("logged %s%s", info.model_uri, f" (registered as {params.registered_model_name} when the run ends)"
             if params.registered_model_name else "")
    return {"logged": True, "model_uri": info.model_uri, "run_id": run_id,
            "registered_model_name": params.registered_model_name}
