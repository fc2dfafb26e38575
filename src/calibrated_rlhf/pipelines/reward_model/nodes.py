"""Nodes of ``reward_model``: thin adapters over ``calibrated_rlhf.core``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core import reward_model as rm
from calibrated_rlhf.core.backbone import BackboneParams, build_reward_backbone
from calibrated_rlhf.core.ensemble import EnsembleParams, bootstrap_indices
from calibrated_rlhf.core.preferences import tokenize_pairs
from calibrated_rlhf.pipelines.metrics import as_history, as_metrics
from calibrated_rlhf.pipelines.params import StrictParams

log = logging.getLogger(__name__)

# TRL's log keys -> this project's MLflow keys.
TRAIN_CURVES = {
    "loss": keys.RM_TRAIN_LOSS,
    "accuracy": keys.RM_TRAIN_ACCURACY,
    "margin": keys.RM_TRAIN_MARGIN,
    "mean_reward": keys.RM_TRAIN_REWARD_MEAN,
    "grad_norm": keys.RM_TRAIN_GRAD_NORM,
    "learning_rate": keys.RM_TRAIN_LEARNING_RATE,
    "eval_loss": keys.RM_VALIDATION_LOSS,
    "eval_accuracy": keys.RM_VALIDATION_ACCURACY,
    "eval_margin": keys.RM_VALIDATION_MARGIN,
    "eval_mean_reward": keys.RM_VALIDATION_REWARD_MEAN,
    "train_runtime": keys.RM_TRAIN_RUNTIME_S,
    "train_samples_per_second": keys.RM_TRAIN_PAIRS_PER_S,
    "packed_batch_fraction": keys.RM_TRAIN_PACKED_BATCH_FRACTION,
    "trimmed_batch_fraction": keys.RM_TRAIN_TRIMMED_BATCH_FRACTION,
}


class RewardModelSize(StrictParams):
    """The reward model's own size where it differs from the shared ``backbone`` block (null: the backbone's), so a
    reward model can be larger or smaller than the policy (Gao et al. vary it). Only a backbone built from config has
    a size to change: a pretrained one has the size it has."""

    hidden_size: int | None = Field(None, ge=8)
    intermediate_size: int | None = Field(None, ge=8)
    num_hidden_layers: int | None = Field(None, ge=1)
    num_attention_heads: int | None = Field(None, ge=1)


def reward_backbone(backbone: BackboneParams, size: RewardModelSize) -> BackboneParams:
    """The shared backbone with the reward model's own size; refused for a pretrained backbone."""
    changes = size.model_dump(exclude_none=True)
    if changes and backbone.name_or_path is not None:
        raise ValueError(f"reward_model.size {changes} applies to a backbone built from config, but "
                         f"backbone.name_or_path is {backbone.name_or_path!r}: leave reward_model.size null")
    return backbone.model_copy(update=changes)


def train_reward_model(
    tokenizer: Any,
    train_pairs: pd.DataFrame,
    validation_pairs: pd.DataFrame,
    backbone: BackboneParams,
    training: rm.RewardTrainingParams,
    size: RewardModelSize = RewardModelSize(),
) -> tuple[Any, dict[str, list[dict[str, float]]]]:
    """Build the backbone (at the reward model's own size) and train it with the centering (and, with margins, the
    margin) loss."""
    model = build_reward_backbone(reward_backbone(backbone, size), tokenizer)
    model, history = rm.train_reward_model(
        model,
        tokenizer,
        tokenize_pairs(train_pairs, tokenizer),
        tokenize_pairs(validation_pairs, tokenizer) if len(validation_pairs) else None,
        training,
        backbone.gradient_checkpointing,
    )
    return model, as_history(history, TRAIN_CURVES)


def member_trainer(member: int) -> Callable[..., tuple[Any, dict[str, list[dict[str, float]]]]]:
    """The training node of ensemble member ``member``: its seed is ``training.seed + member``."""

    def train_member(
        tokenizer: Any,
        train_pairs: pd.DataFrame,
        validation_pairs: pd.DataFrame,
        backbone: BackboneParams,
        training: rm.RewardTrainingParams,
        ensemble: EnsembleParams,
        size: RewardModelSize = RewardModelSize(),
    ) -> tuple[Any, dict[str, list[dict[str, float]]]]:
        """Train one member: its own seed (initialization and data order), and its own resample if asked."""
        seed = training.seed + member
        if ensemble.bootstrap:
            train_pairs = train_pairs.iloc[bootstrap_indices(len(train_pairs), seed)].reset_index(drop=True)
        log.info("ensemble member %d: seed %d, %d training pairs%s", member, seed, len(train_pairs),
                 " (bootstrap)" if ensemble.bootstrap else "")
        return train_reward_model(tokenizer, train_pairs, validation_pairs, backbone,
                                  training.model_copy(update={"seed": seed}), size)

    return train_member


def evaluate_reward_model(test_scores: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Test accuracy, reward offset and spread, mean margin; Bayes figures on the synthetic task."""
    true_prob = test_scores["true_prob"].to_numpy() if "true_prob" in test_scores.columns else None
    m = rm.pair_metrics(test_scores["reward_chosen"].to_numpy(), test_scores["reward_rejected"].to_numpy(), true_prob)
    log.info("reward model on test: %s", {k: round(v, 4) for k, v in m.items()})
    return as_metrics({keys.rm_test(k): v for k, v in m.items() if np.isfinite(v)})
