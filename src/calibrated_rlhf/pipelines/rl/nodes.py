"""Nodes of ``rl``: thin adapters over ``calibrated_rlhf.core.rl`` and ``core.evaluation``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from pydantic import Field

from calibrated_rlhf.core import evaluation, plots, scoring
from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core.gold import load_gold
from calibrated_rlhf.core.kl_tracking import summarize_kl_tracking
from calibrated_rlhf.core.normalization import NormalizationParams, RewardTransform
from calibrated_rlhf.core.preferences import distinct_prompts, plain_frame
from calibrated_rlhf.core.checkpointing import trl_checkpoints as rl_checkpoint
from calibrated_rlhf.core.rl import trainers
from calibrated_rlhf.core.rl.config import RLConfig
from calibrated_rlhf.core.rl.kl_control import BETA, SEQUENCE_KL
from calibrated_rlhf.core.rl.reward import ScoreReward
from calibrated_rlhf.core.scoring import RewardScorer, reward_fingerprint, rl_score_fn
from calibrated_rlhf.pipelines.checkpoints import CheckpointParams, checkpoint_folder, prepare_resume
from calibrated_rlhf.pipelines.metrics import as_history, as_metrics
from calibrated_rlhf.pipelines.stage import (EvaluationParams, check_transform_matches, repetition_profile,
                                             warning_stops, stage_fingerprint)
from calibrated_rlhf.serving.clients import RemoteScorer, RewardClient

log = logging.getLogger(__name__)


class RLParams(RLConfig, CheckpointParams):
    """The RL stage: the trainer's hyperparameters (``rl.algorithm`` chooses RLOO or GRPO), the reward
    optimized, and the evaluation (PPO's protocol)."""

    raw_reward_multiplier: float = Field(
        1.0, gt=0, description="Multiplies the reward model's raw output: the scale experiment (a in {0.25, 1, 4}).")
    evaluation: EvaluationParams = EvaluationParams()
    reward_url: str | None = Field(
        None, description="Score through a reward server (python -m calibrated_rlhf.serving.server) at this URL, "
        "e.g. http://127.0.0.1:5000, instead of in process; its token from CALIBRATED_RLHF_REWARD_TOKEN. It must "
        "serve this project's reward (the same reward transform); the rewards and metrics are then the in-process "
        "ones. null = in process.")
    ensemble_std_stop_multiple: float | None = Field(
        None, gt=0, description="Reward ensembles: stop once the members' disagreement on the batch's completions "
        "exceeds this multiple of their disagreement on the reference set (the over-optimization warning, "
        "docs/overoptimization.md), keeping that update's checkpoint; null = off.")
    repetition_surprisal_stop_multiple: float | None = Field(
        None, gt=0, description="Stop once the sampled responses' repetition surprisal (how rarely the reward model's "
        "training responses repeat a word as often, rl/rewards/repetition_surprisal) exceeds this multiple of its "
        "mean on the reference set: the over-optimization warning that needs no gold (docs/overoptimization.md), "
        "keeping that update's checkpoint; null = off.")
    checkpoint_root: str = Field(
        "data/06_models/rl_checkpoints",
        description="Checkpoints go to <root>/<MLflow run id>/ (logged as rl.checkpoint_dir); a run never touches "
        "another's folder. Stale staging folders of dead processes under it are removed at start.")

    def trainer_config(self) -> RLConfig:
        return RLConfig(**self.model_dump(include=set(RLConfig.model_fields)))


def train_rl(reference_policy: Any, tokenizer: Any, reward_model: Any, reward_transform: dict[str, Any],
             reference_responses: pd.DataFrame, train_pairs: pd.DataFrame, synthetic_task: dict[str, Any],
             params: RLParams, normalization: NormalizationParams = NormalizationParams(),
             ) -> tuple[Any, dict[str, list[dict[str, float]]], Figure, dict[str, dict[str, float]], dict[str, str]]:
    """RLOO or GRPO from the reference policy on the reward ``normalization.method`` names, through the
    frozen transform; returns the policy, per-update curves, the KL-control plot, the summary and tags."""
    method = normalization.method
    original = RewardTransform.from_dict(reward_transform)
    rm_fingerprint = reward_fingerprint(reward_model)
    check_transform_matches(original, reward_model, rm_fingerprint)
    transform = original.rescaled(params.raw_reward_multiplier)
    task = load_gold(synthetic_task) if synthetic_task else None
    # in process or through a server, one scoring path: the offset and the score function read the same scorer
    scorer = (served_scorer(params, original) if params.reward_url is not None
              else RewardScorer(reward_model, tokenizer, transform, raw_multiplier=params.raw_reward_multiplier))
    offset = scoring.gold_offset(scorer, task, *reference_rows(reference_responses)) if task is not None else None
    profile = repetition_profile(train_pairs)
    score_fn = rl_score_fn(scorer, method, task, offset, profile)
    config, prompts = params.trainer_config(), distinct_prompts(train_pairs)
    checkpointing = prepare_checkpoints(params, rl_checkpoint.resume_fingerprint(
        config, reference_policy, tokenizer, prompts, stage_fingerprint(rm_fingerprint, transform, params, task, offset,
                                                                         method)))
    # The KL weight follows the scale known at calibration time (the original transform), as PPO's does: in
    # the scale experiment the raw arm's beta stays tied to the a = 1 scale, so a drift goes unnoticed.
    result = trainers.train(config, reference_policy, tokenizer, prompts, ScoreReward(score_fn, tokenizer),
                            reward_scale=original.scale_of(method), checkpointing=checkpointing,
                            warning_stops=warning_stops(transform, reference_responses, profile, params, "rl"))
    if result.stop_reason is not None:
        log.warning("%s stopped early: %s", params.algorithm.upper(), result.stop_reason)
    points = [{**p, "step": int(p["step"])} for p in result.history if BETA in p]
    figure = plots.kl_control([p["step"] for p in points], [p[SEQUENCE_KL] for p in points],
                              [p[BETA] for p in points], params.kl_target, params.kl_control)
    return (result.policy, as_history(points, trainers.METRIC_KEYS), figure,
            training_summary(points, params, result.runtime_s, result.stop_reason is not None),
            {keys.RL_ALGORITHM_TAG: params.algorithm})


def served_scorer(params: RLParams, transform: RewardTransform) -> RemoteScorer:
    """The reward server at ``rl.reward_url``, refused unless it serves this project's reward unscaled."""
    if params.raw_reward_multiplier != 1.0:
        raise ValueError("rl.raw_reward_multiplier rescales the in-process reward; a served reward is not "
                         "rescaled: leave rl.reward_url null for the scale experiment")
    scorer = RemoteScorer(RewardClient(params.reward_url))
    served = scorer.transform.to_dict()
    differ = sorted(k for k, v in transform.to_dict().items() if served.get(k) != v)
    if differ:
        raise ValueError(f"rl.reward_url {params.reward_url} serves {scorer.info.get('model_uri')} whose reward "
                         f"transform differs from this project's in {differ}: serve the model this run published, "
                         "or leave rl.reward_url null")
    return scorer


def reference_rows(responses: pd.DataFrame) -> tuple[list, list]:
    """Prompts and responses of the reference set, as the scorer takes them."""
    responses = plain_frame(responses)  # read back from Parquet: message lists arrive as numpy arrays
    return list(responses["prompt"]), list(responses["response"])


def prepare_checkpoints(params: RLParams, fingerprint: dict[str, Any]) -> rl_checkpoint.Checkpointing:
    """This run's folder under ``rl.checkpoint_root`` and what it resumes (``rl.resume_from``), both logged."""
    root = Path(params.checkpoint_root)
    run_dir = checkpoint_folder(root)
    resume = prepare_resume("rl", params.algorithm.upper(), params.resume_from, root, fingerprint, run_dir,
                            saving=params.checkpoint_every is not None)
    return rl_checkpoint.Checkpointing(run_dir, fingerprint, params.checkpoint_every, params.keep_checkpoints, resume)


def training_summary(points: list[dict[str, float]], params: RLParams, runtime_s: float,
                     stopped_early: bool = False) -> dict[str, dict[str, float]]:
    """How well KL tracked its target over the second half of training (``core.kl_tracking``), the final beta."""
    tracking = summarize_kl_tracking([p[SEQUENCE_KL] for p in points], params.kl_target, [p[BETA] for p in points])
    values = {keys.EVAL_KL_SECOND_HALF_MEAN: tracking.kl_second_half_mean,
              keys.EVAL_KL_TRACKING_ERROR: tracking.kl_tracking_error, keys.EVAL_FINAL_BETA: tracking.final_beta,
              keys.EVAL_UPDATES: float(tracking.updates), keys.EVAL_RUNTIME_S: runtime_s,
              keys.EVAL_STOPPED_EARLY: float(stopped_early)}
    log.info("%s training: %s", params.algorithm.upper(), {k: round(v, 4) for k, v in values.items()})
    return as_metrics(values)


def evaluate_rl_policy(rl_policy: Any, reference_policy: Any, tokenizer: Any, test_pairs: pd.DataFrame,
                       synthetic_task: dict[str, Any], params: RLParams) -> dict[str, dict[str, float]]:
    """The one evaluation protocol (``core.evaluation``): gold gain over the reference with a 95% interval
    and the KL to the reference on the same samples, under the ``eval/`` keys of every method."""
    ev = params.evaluation
    task = load_gold(synthetic_task) if synthetic_task else None
    result = evaluation.evaluate_policy(rl_policy, reference_policy, tokenizer, distinct_prompts(test_pairs)[: ev.n_prompts],
                                        task, ev.samples_per_prompt, params.response_length, ev.seed)
    values = result.metrics()
    log.info("%s evaluation: %s", params.algorithm.upper(), {k: round(v, 4) for k, v in values.items()})
    return as_metrics(values)
