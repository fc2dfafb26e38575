"""Nodes of ``ppo``: thin adapters over ``calibrated_rlhf.core.ppo``."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from pydantic import Field, model_validator

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core import evaluation, plots, scoring, stop_signals
from calibrated_rlhf.core.backbone import BackboneParams, prepare_for_training
from calibrated_rlhf.core.early_warning import RepetitionProfile
from calibrated_rlhf.core.gold import Gold, load_gold
from calibrated_rlhf.core.lora import merged
from calibrated_rlhf.core.kl_tracking import end_of_training_mean, summarize_kl_tracking
from calibrated_rlhf.core.normalization import NormalizationMethod, NormalizationParams, RewardTransform
from calibrated_rlhf.core.ppo import PPOConfig, PPOTrainer
from calibrated_rlhf.core.ppo.results import sample_frame
from calibrated_rlhf.core.preferences import distinct_prompts, plain_frame
from calibrated_rlhf.core.scoring import RewardScorer, reward_fingerprint, rl_score_fn
from calibrated_rlhf.pipelines.checkpoints import CheckpointParams, checkpoint_folder, prepare_resume
from calibrated_rlhf.pipelines.metrics import as_history, as_metrics
from calibrated_rlhf.pipelines.stage import (EvaluationParams, check_transform_matches, repetition_profile,
                                             warning_stops, stage_fingerprint)

log = logging.getLogger(__name__)

# The stage sets these trainer fields itself (a folder per run under checkpoint_root).
STAGE_CHECKPOINT_FIELDS = ("checkpoint_dir", "checkpoint_every", "keep_checkpoints")


class PPOParams(CheckpointParams):
    """The PPO stage: what reward the policy optimizes, the trainer's config, the evaluation, checkpoints."""

    raw_reward_multiplier: float = Field(
        1.0, gt=0, description="Multiplies the reward model's raw output: the scale experiment (a in {0.25, 1, 4})."
    )
    trainer: PPOConfig = PPOConfig()
    evaluation: EvaluationParams = EvaluationParams()
    checkpoint_root: str = Field(
        "data/06_models/ppo_checkpoints",
        description="Checkpoints go to <root>/<MLflow run id>/ (logged as ppo.checkpoint_dir); a run never "
        "touches another's folder. Stale staging folders of dead processes under it are removed at start.")
    ensemble_std_stop_multiple: float | None = Field(
        None, gt=0, description="Reward ensembles: stop early when the members' disagreement on the sampled "
        "responses (ppo/rewards/ensemble_std) exceeds this multiple of their disagreement on the reference "
        "set (stored in the reward transform); null = off.")
    repetition_surprisal_stop_multiple: float | None = Field(
        None, gt=0, description="Stop once the sampled responses' repetition surprisal (how rarely the reward model's "
        "training responses repeat a word as often, ppo/rewards/repetition_surprisal) exceeds this multiple of its "
        "mean on the reference set: the over-optimization warning that needs no gold (docs/overoptimization.md), "
        "keeping that batch's policy; null = off.")

    @model_validator(mode="after")
    def _checkpoints_are_the_stages(self) -> "PPOParams":
        given = [f"trainer.{k}" for k in STAGE_CHECKPOINT_FIELDS if getattr(self.trainer, k) is not None]
        if given:
            raise ValueError(f"ppo.{', ppo.'.join(given)}: set by the stage; use ppo.checkpoint_root, "
                             "ppo.checkpoint_every and ppo.keep_checkpoints")
        return self


def make_score_fn(reward_model: Any, tokenizer: Any, transform: RewardTransform, task: Gold | None,
                  method: NormalizationMethod, multiplier: float, offset: float | None = None,
                  profile: RepetitionProfile | None = None):
    """The trainer's ``score_fn`` over the library's one scoring path (see ``core.scoring.rl_score_fn``)."""
    return rl_score_fn(RewardScorer(reward_model, tokenizer, transform, raw_multiplier=multiplier), method, task,
                       offset, profile)


def gold_offset(reward_model: Any, tokenizer: Any, transform: RewardTransform, task: Gold,
                responses: pd.DataFrame, multiplier: float = 1.0) -> float | None:
    """Where the proxy-gold gap counts from, on the reference set (``core.scoring.gold_offset``)."""
    scorer = RewardScorer(reward_model, tokenizer, transform, raw_multiplier=multiplier)
    responses = plain_frame(responses)  # read back from Parquet: message lists arrive as numpy arrays
    return scoring.gold_offset(scorer, task, list(responses["prompt"]), list(responses["response"]))


def train_ppo(
    reference_policy: Any,
    tokenizer: Any,
    reward_model: Any,
    reward_transform: dict[str, Any],
    reference_responses: pd.DataFrame,
    train_pairs: pd.DataFrame,
    synthetic_task: dict[str, Any],
    params: PPOParams,
    normalization: NormalizationParams = NormalizationParams(),
    backbone: BackboneParams = BackboneParams(),
) -> tuple[Any, dict[str, list[dict[str, float]]], pd.DataFrame, Figure, dict[str, dict[str, float]],
           dict[str, str]]:
    """PPO from the reference policy against the frozen reward transform, optimizing the reward that
    ``normalization.method`` names; returns the final policy,
    per-update metrics, sample responses, the KL-control plot, a summary of the run and its method tag.

    ``reward_model`` is one model or a ``RewardEnsemble``; ``reference_responses`` (the normalization's
    reference set) anchors the proxy-gold gap on the synthetic task. Checkpoints go to
    ``<checkpoint_root>/<MLflow run id>/``; ``resume_from`` continues a run of the same configuration
    (its resume fingerprint: the trainer's plus :func:`stage_fingerprint`)."""
    method = normalization.method
    original = RewardTransform.from_dict(reward_transform)
    rm_fingerprint = reward_fingerprint(reward_model)
    check_transform_matches(original, reward_model, rm_fingerprint)
    transform = original.rescaled(params.raw_reward_multiplier)
    task = load_gold(synthetic_task) if synthetic_task else None
    root = Path(params.checkpoint_root)
    run_dir = checkpoint_folder(root)
    profile = repetition_profile(train_pairs)
    config = trainer_config(params, original, method, run_dir,
                            warning_stops(transform, reference_responses, profile, params, "ppo"))
    offset = (gold_offset(reward_model, tokenizer, transform, task, reference_responses, params.raw_reward_multiplier)
              if task is not None else None)
    reference_policy = prepare_for_training(reference_policy, backbone)
    # trainable whatever the reference's flags: the trainer freezes the reference in place, and a second
    # run in the same process (a resume) must build the same optimizer as the first. With LoRA the
    # reference is the policy's base weights (adapters off): no copy.
    policy = reference_policy if config.lora else copy.deepcopy(reference_policy).requires_grad_(True)
    trainer = PPOTrainer(config, policy, tokenizer, distinct_prompts(train_pairs),
                         make_score_fn(reward_model, tokenizer, transform, task, method,
                                       params.raw_reward_multiplier, offset, profile),
                         ref_policy=None if config.lora else reference_policy,
                         fingerprint=stage_fingerprint(rm_fingerprint, transform, params, task, offset, method))
    resume = prepare_resume("ppo", "PPO", params.resume_from, root, trainer.fingerprint, run_dir,
                            saving=trainer.config.checkpoint_dir is not None)
    with stop_signals.deferred():  # SIGTERM/SIGINT: stop after the update under way, with a checkpoint
        result = trainer.train(resume_from=resume.checkpoint if resume is not None else None)
    if result.stopped_early:
        log.warning("PPO stopped early: %s", result.stop_reason)
    # published merged: every later stage loads a plain transformers model
    return merged(trainer.policy).to("cpu").eval(), *_outputs(result, config)


def trainer_config(params: PPOParams, transform: RewardTransform, method: NormalizationMethod,
                   run_dir: Path, stops: dict[str, float] | None = None) -> PPOConfig:
    """The trainer's config: the stage's checkpoints, and the KL weight's scale for the optimized reward."""
    return PPOConfig(**{
        **params.trainer.model_dump(),
        # The KL weight follows the scale known at calibration time: with the transform the optimized
        # score is scale-free; without it (raw) a drift of the reward model's scale goes unnoticed.
        "reward_scale": transform.scale_of(method),
        "score_key": "score",
        "checkpoint_dir": str(run_dir) if params.checkpoint_every else None,
        "checkpoint_every": params.checkpoint_every,
        "keep_checkpoints": params.keep_checkpoints,
        **{f"{name}_stop": threshold for name, threshold in (stops or {}).items()},
    })


def _outputs(result: Any, config: PPOConfig) -> tuple[dict, pd.DataFrame, Figure, dict, dict[str, str]]:
    """The stage's outputs besides the policy: curves, samples, the KL-control plot, the summary, and the run's
    method tag (every RL method's, so the ``eval/*`` figures say whose they are)."""
    points = [{**p, "step": int(p[keys.PPO_STEP])} for p in result.history]
    history = as_history(points, {k: k for p in points for k in p if k not in ("step", keys.PPO_STEP)})
    figure = plots.kl_control([h[keys.PPO_STEP] for h in result.history], [h[keys.PPO_KL] for h in result.history],
                              [h[keys.PPO_BETA] for h in result.history], config.kl_target, config.kl_control)
    return (history, sample_frame(result.samples), figure,
            training_summary(result.history, config, result.stopped_early), {keys.RL_ALGORITHM_TAG: "ppo"})


def training_summary(history: list[dict[str, float]], config: PPOConfig, stopped_early: bool) -> dict[str, dict[str, float]]:
    """How well KL tracked its target over the second half of training, the final beta, the throughput."""
    tracking = summarize_kl_tracking([h[keys.PPO_KL] for h in history], config.kl_target,
                                     [h[keys.PPO_BETA] for h in history], [h[keys.PPO_EPISODES_PER_S] for h in history])
    values = {
        keys.EVAL_KL_SECOND_HALF_MEAN: tracking.kl_second_half_mean,
        keys.EVAL_KL_TRACKING_ERROR: tracking.kl_tracking_error,
        keys.EVAL_FINAL_BETA: tracking.final_beta,
        keys.EVAL_EPISODES_PER_S: tracking.episodes_per_s,
        keys.EVAL_UPDATES: float(tracking.updates),
        keys.EVAL_STOPPED_EARLY: float(stopped_early),
    }
    # Over-optimization signals at the end of training.
    for key, eval_key in ((keys.PPO_REWARD_GOLD_GAP, keys.EVAL_FINAL_GOLD_GAP),
                          (keys.PPO_REWARD_ENSEMBLE_STD, keys.EVAL_FINAL_ENSEMBLE_STD)):
        if history and key in history[-1]:  # a stop rule may fire on the first rollout: no update, no history
            values[eval_key] = end_of_training_mean([h[key] for h in history])
    log.info("PPO training: %s", {k: round(v, 4) for k, v in values.items()})
    return as_metrics(values)


def evaluate_policy(policy: Any, reference_policy: Any, tokenizer: Any, test_pairs: pd.DataFrame,
                    synthetic_task: dict[str, Any], params: PPOParams) -> dict[str, dict[str, float]]:
    """Gold reward of the final policy against the reference policy on test prompts, with a 95% interval
    of the gain paired by prompt, and the KL to the reference on the same samples: the one evaluation
    protocol of every RL method (``core.evaluation``). Off the synthetic task there is no gold reward, and
    only the KL is reported."""
    ev = params.evaluation
    task = load_gold(synthetic_task) if synthetic_task else None
    values = evaluation.evaluate_policy(policy, reference_policy, tokenizer, distinct_prompts(test_pairs)[: ev.n_prompts],
                                        task, ev.samples_per_prompt, params.trainer.response_length, ev.seed).metrics()
    log.info("PPO evaluation: %s", {k: round(v, 4) for k, v in values.items()})
    return as_metrics(values)
