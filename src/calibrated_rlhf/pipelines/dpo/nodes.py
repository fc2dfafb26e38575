"""Nodes of ``dpo``: thin adapters over ``calibrated_rlhf.core.rl.dpo`` and ``core.evaluation``."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from pydantic import Field

from calibrated_rlhf.core import evaluation
from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core.gold import load_gold
from calibrated_rlhf.core.preferences import distinct_prompts
from calibrated_rlhf.core.rl import dpo
from calibrated_rlhf.pipelines.metrics import as_history, as_metrics
from calibrated_rlhf.pipelines.params import StrictParams
from calibrated_rlhf.pipelines.stage import EvaluationParams

log = logging.getLogger(__name__)

Metrics = dict[str, Any]


class DPOParams(StrictParams):
    """The DPO stage: TRL's DPO, and the evaluation (the RL methods' one protocol)."""

    trainer: dpo.DPOConfig = dpo.DPOConfig()
    response_length: int = Field(24, gt=0, description="Maximum new tokens sampled per evaluation response.")
    evaluation: EvaluationParams = EvaluationParams()


def train_dpo(reference_policy: Any, tokenizer: Any, train_pairs: pd.DataFrame, params: DPOParams
              ) -> tuple[Any, Metrics, dict[str, str]]:
    """DPO on the train pairs from the reference policy; its curves under ``dpo/train/``, its tag."""
    policy, points = dpo.train_dpo(reference_policy, tokenizer, train_pairs, params.trainer)
    names = {"loss": "loss", "rewards/margins": "margin", "rewards/accuracies": "accuracy",
             "train_runtime": "runtime_s"}
    return policy, as_history(points, {k: keys.dpo_train(v) for k, v in names.items()}), {keys.RL_ALGORITHM_TAG: "dpo"}


def score_dpo_pairs(dpo_policy: Any, reference_policy: Any, tokenizer: Any, pairs: pd.DataFrame,
                    params: DPOParams) -> pd.DataFrame:
    """Both sides of every pair scored with the implicit reward beta * log(pi / pi_ref)."""
    return dpo.score_pairs(dpo_policy, reference_policy, tokenizer, pairs, params.trainer.beta)


def name_dpo_metrics(calibration_metrics: Metrics) -> Metrics:
    """The implicit reward's calibration figures under ``dpo/calibration/...``, apart from the reward model's."""
    return {keys.dpo_key(k): v for k, v in calibration_metrics.items()}


def evaluate_dpo_policy(dpo_policy: Any, reference_policy: Any, tokenizer: Any, test_pairs: pd.DataFrame,
                        synthetic_task: dict[str, Any], params: DPOParams) -> Metrics:
    """The one evaluation protocol (``core.evaluation``), under the keys every method's evaluation uses."""
    ev = params.evaluation
    task = load_gold(synthetic_task) if synthetic_task else None
    values = evaluation.evaluate_policy(dpo_policy, reference_policy, tokenizer, distinct_prompts(test_pairs)[: ev.n_prompts],
                                        task, ev.samples_per_prompt, params.response_length, ev.seed).metrics()
    log.info("DPO evaluation: %s", {k: round(v, 4) for k, v in values.items()})
    return as_metrics(values)
