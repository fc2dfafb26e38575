"""Nodes of ``ppo``: thin adapters over ``calibrated_rlhf.core.ppo``."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from pydantic import BaseModel, Field

from calibrated_rlhf.core.ensemble import reward_fingerprint, score_rewards
from calibrated_rlhf.core.normalization import RewardTransform
from calibrated_rlhf.core.policy import sample_responses
from calibrated_rlhf.core.ppo import PPOConfig, PPOTrainer
from calibrated_rlhf.core.preferences import render_ids, text_prompts
from calibrated_rlhf.core.synthetic import SyntheticTask
from calibrated_rlhf.pipelines.metrics import as_history, as_metrics

log = logging.getLogger(__name__)

RewardKind = Literal["normalized", "calibrated", "raw", "minmax_batch"]


class EvaluationParams(BaseModel):
    """Gold-reward comparison of the final policy with the reference policy on test prompts."""

    n_prompts: int = Field(128, ge=2)
    samples_per_prompt: int = Field(4, ge=1)
    seed: int = Field(1234)


class PPOParams(BaseModel):
    """The PPO stage: what reward the policy optimizes, the trainer's config, the evaluation."""

    reward: RewardKind = Field(
        "normalized",
        description="normalized: the frozen reward transform (default); calibrated: r / T; raw: the reward "
        "model's output; minmax_batch: per-batch min-max rescaling (the baseline the project argues against).",
    )
    raw_reward_multiplier: float = Field(
        1.0, gt=0, description="Multiplies the reward model's raw output: the scale experiment (a in {0.25, 1, 4})."
    )
    trainer: PPOConfig = PPOConfig()
    evaluation: EvaluationParams = EvaluationParams()
    checkpoint_root: str = Field("data/06_models/ppo_checkpoints",
                                 description="Checkpoints go to <root>/<run timestamp>/; earlier runs' are never touched.")
    checkpoint_every: int | None = Field(20, gt=0, description="Updates between checkpoints; null = none.")
    keep_checkpoints: int | None = Field(2, gt=0, description="Newest checkpoints kept per run; null = all.")
    resume_from: str | None = Field(None, description="A checkpoint folder to resume from (its run's config).")
    ensemble_std_stop_multiple: float | None = Field(
        None, gt=0, description="Reward ensembles: stop early when the members' disagreement on the sampled "
        "responses (ppo/rewards/ensemble_std) exceeds this multiple of their disagreement on the reference "
        "set (stored in the reward transform); null = off.")


def make_score_fn(reward_model: Any, tokenizer: Any, transform: RewardTransform, task: SyntheticTask | None,
                  reward: RewardKind, multiplier: float, gold_offset: float | None = None):
    """score_fn(prompts, responses) -> raw, calibrated, normalized (and gold) rewards, plus the optimized
    ``score``. The reward model sees exactly its training format: prompt + response + EOS.

    A reward ensemble adds ``ensemble_std``, its members' disagreement. With a gold reward and
    ``gold_offset`` (see :func:`gold_offset`) it adds ``gold_gap``: calibrated proxy minus the true logit
    ``scale * gold``, relative to the reference set, so it starts near 0 and grows when PPO exploits the
    reward model's errors (calibrated-logit units).
    """

    def score_fn(prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
        ids = [render_ids(tokenizer, p, r) for p, r in zip(prompts, responses)]
        raw, spread = score_rewards(reward_model, ids, tokenizer.pad_token_id)
        raw = multiplier * raw
        out = {"raw": raw, "calibrated": transform.calibrate(raw), "normalized": transform.normalize(raw)}
        if spread is not None:
            out["ensemble_std"] = spread
        if reward == "minmax_batch":
            span = raw.max() - raw.min()
            out["score"] = (raw - raw.min()) / span if span > 0 else np.zeros_like(raw)
        else:
            out["score"] = out[reward]
        if task is not None:
            out["gold"] = np.array([task.gold_reward(r) for r in responses])
            if gold_offset is not None:
                out["gold_gap"] = out["calibrated"] - task.scale * out["gold"] - gold_offset
        return {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in out.items()}

    return score_fn


def gold_offset(reward_model: Any, tokenizer: Any, transform: RewardTransform, task: SyntheticTask,
                responses: pd.DataFrame, multiplier: float = 1.0) -> float | None:
    """Mean of ``calibrated - scale * gold`` over the reference set: where the proxy-gold gap counts from.

    A calibrated reward model estimates the true logit ``scale * gold`` up to a constant; this is that
    constant on the distribution PPO starts from (None when there is no reference set).
    """
    if not len(responses):
        return None
    ids = [render_ids(tokenizer, p, r) for p, r in zip(responses["prompt"], responses["response"])]
    raw, _ = score_rewards(reward_model, ids, tokenizer.pad_token_id)
    gold = np.array([task.gold_reward(r) for r in responses["response"]])
    return float(np.mean(transform.calibrate(multiplier * raw) - task.scale * gold))


def reward_scale_of(reward: RewardKind, transform: RewardTransform) -> float:
    """Spread of the optimized score relative to normalized units, so beta keeps its meaning.

    Only the ratio of reward scale to KL weight matters; without normalization the applied KL
    weight must follow the reward's own scale (logged as ppo/objective/beta_effective).
    """
    if reward == "normalized":
        return 1.0
    if reward == "calibrated":
        return transform.std
    if reward == "raw":
        return transform.std * transform.temperature
    return 1.0  # min-max has no fixed scale: that is exactly its problem


def train_ppo(
    reference_policy: Any,
    tokenizer: Any,
    reward_model: Any,
    reward_transform: dict[str, Any],
    reference_responses: pd.DataFrame,
    train_pairs: pd.DataFrame,
    synthetic_task: dict[str, Any],
    params: PPOParams,
) -> tuple[Any, dict[str, list[dict[str, float]]], pd.DataFrame, Figure, dict[str, dict[str, float]]]:
    """PPO from the reference policy against the frozen reward transform; returns the final policy,
    per-update metrics, sample responses, the KL-control plot and a summary of the run.

    ``reward_model`` is one model or a ``RewardEnsemble``; ``reference_responses`` (the normalization's
    reference set) anchors the proxy-gold gap on the synthetic task."""
    original = RewardTransform.from_dict(reward_transform)
    check_transform_matches(original, reward_model)
    transform = rescaled_transform(original, params.raw_reward_multiplier)
    task = SyntheticTask.from_dict(synthetic_task) if synthetic_task else None
    run_dir = _shared_run_dir(Path(params.checkpoint_root))
    config = PPOConfig(**{
        **params.trainer.model_dump(),
        # The KL weight follows the scale known at calibration time: with the transform the optimized
        # score is scale-free; without it (raw) a drift of the reward model's scale goes unnoticed.
        "reward_scale": reward_scale_of(params.reward, original),
        "score_key": "score",
        "checkpoint_dir": str(run_dir) if params.checkpoint_every else None,
        "checkpoint_every": params.checkpoint_every,
        "keep_checkpoints": params.keep_checkpoints,
        "ensemble_std_stop": ensemble_std_stop(original, params.ensemble_std_stop_multiple),
    })
    offset = (gold_offset(reward_model, tokenizer, transform, task, reference_responses, params.raw_reward_multiplier)
              if task is not None else None)
    policy = copy.deepcopy(reference_policy)
    trainer = PPOTrainer(config, policy, tokenizer, text_prompts(train_pairs),
                         make_score_fn(reward_model, tokenizer, transform, task, params.reward,
                                       params.raw_reward_multiplier, offset),
                         ref_policy=reference_policy)
    result = trainer.train(resume_from=params.resume_from)
    if result.stopped_early:
        log.warning("PPO stopped early: %s", result.stop_reason)
    points = [{**p, "step": int(p["ppo/step"])} for p in result.history]
    history = as_history(points, {k: k for p in points for k in p if k not in ("step", "ppo/step")})
    samples = pd.DataFrame(result.samples)
    summary = training_summary(result.history, config, result.stopped_early)
    return trainer.policy.to("cpu").eval(), history, samples, kl_control_plot(result.history, config), summary


def check_transform_matches(transform: RewardTransform, reward_model: Any) -> None:
    """Refuse a transform computed for other weights (another run's model, or one model vs an ensemble)."""
    if transform.reward_model_version is None:
        return
    actual = reward_fingerprint(reward_model)
    if actual != transform.reward_model_version:
        kind = "an ensemble" if transform.ensemble else "one reward model"
        raise ValueError(f"reward_transform was computed for {kind} with fingerprint "
                         f"{transform.reward_model_version[:12]}..., but the reward model given has {actual[:12]}...: "
                         "pin matching versions with --load-versions, or rerun normalization")


def ensemble_std_stop(transform: RewardTransform, multiple: float | None) -> float | None:
    """The trainer's absolute threshold on the ensemble's disagreement, from a multiple of the reference one."""
    if multiple is None:
        return None
    reference = (transform.ensemble or {}).get("reference_std")
    if reference is None:
        raise ValueError("ppo.ensemble_std_stop_multiple needs a reward ensemble (reward_model.ensemble_size > 1) "
                         "whose transform records its reference disagreement")
    return multiple * reference


def _shared_run_dir(root: Path) -> Path:
    """This run's checkpoint folder, named by the main process's clock and the same on every rank."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    name = [time.strftime("%Y%m%dT%H%M%S")]
    state = PartialState()
    if state.num_processes > 1:
        broadcast_object_list(name, from_process=0)
    return root / name[0]


def training_summary(history: list[dict[str, float]], config: PPOConfig, stopped_early: bool) -> dict[str, dict[str, float]]:
    """How well KL tracked its target over the second half of training, the final beta, the throughput."""
    kl = np.array([h["ppo/objective/kl"] for h in history])
    second = kl[len(kl) // 2:]
    values = {
        "ppo/eval/kl_second_half_mean": float(second.mean()),
        "ppo/eval/kl_tracking_error": float(second.mean() / config.kl_target - 1.0),
        "ppo/eval/final_beta": float(history[-1]["ppo/objective/beta"]),
        "ppo/eval/episodes_per_s": float(np.median([h["ppo/perf/episodes_per_s"] for h in history])),
        "ppo/eval/updates": float(len(history)),
        "ppo/eval/stopped_early": float(stopped_early),
    }
    # Over-optimization signals at the end of training (the last tenth of the updates).
    tail = history[-max(1, len(history) // 10):]
    for key, name in (("ppo/rewards/gold_gap", "final_gold_gap"), ("ppo/rewards/ensemble_std", "final_ensemble_std")):
        if key in history[-1]:
            values[f"ppo/eval/{name}"] = float(np.mean([h[key] for h in tail]))
    log.info("PPO training: %s", {k: round(v, 4) for k, v in values.items()})
    return as_metrics(values)


def rescaled_transform(transform: RewardTransform, multiplier: float) -> RewardTransform:
    """The transform that calibration would produce for raw outputs multiplied by ``multiplier``.

    Temperature fitting is scale-equivariant (a * r gives a * T) and the stats are taken on r / T, so
    only the temperature changes; this is what recalibrating a rescaled reward model yields.
    """
    if multiplier == 1.0:
        return transform
    return RewardTransform.from_dict({**transform.to_dict(), "temperature": transform.temperature * multiplier})


def kl_control_plot(history: list[dict[str, float]], config: PPOConfig) -> Figure:
    """KL against its target, and beta, per update."""
    from calibrated_rlhf.core.plots import _figure

    fig = _figure(10.0, 3.6)
    ax_kl, ax_beta = fig.subplots(1, 2)
    steps = [h["ppo/step"] for h in history]
    ax_kl.plot(steps, [h["ppo/objective/kl"] for h in history], label="KL (batch mean of sequence sums)")
    ax_kl.axhline(config.kl_target, color="k", ls="--", label=f"target {config.kl_target:g}")
    ax_kl.set_xlabel("update"), ax_kl.set_ylabel("nats"), ax_kl.legend()
    ax_beta.plot(steps, [h["ppo/objective/beta"] for h in history], color="tab:orange")
    ax_beta.set_xlabel("update"), ax_beta.set_ylabel("beta (normalized-reward units per nat)")
    ax_kl.set_title(f"KL control: {config.kl_control}")
    return fig


def evaluate_policy(policy: Any, reference_policy: Any, tokenizer: Any, test_pairs: pd.DataFrame,
                    synthetic_task: dict[str, Any], params: PPOParams) -> dict[str, dict[str, float]]:
    """Gold reward of the final policy against the reference policy on test prompts, with a 95% interval
    of the gain paired by prompt (synthetic task only: elsewhere there is no gold reward)."""
    values: dict[str, float] = {}
    if synthetic_task:
        task = SyntheticTask.from_dict(synthetic_task)
        ev = params.evaluation
        prompts = text_prompts(test_pairs)[: ev.n_prompts]
        length = params.trainer.response_length

        def gold_per_prompt(model: Any) -> np.ndarray:
            rows = sample_responses(model, tokenizer, prompts, ev.samples_per_prompt, length, seed=ev.seed)
            g = np.array([task.gold_reward(r) for _, r in rows]).reshape(len(prompts), ev.samples_per_prompt)
            return g.mean(axis=1)

        ref, new = gold_per_prompt(reference_policy), gold_per_prompt(policy)
        gain = new - ref
        half = 1.96 * gain.std(ddof=1) / np.sqrt(len(gain))
        values |= {"ppo/eval/gold_reference": float(ref.mean()), "ppo/eval/gold_policy": float(new.mean()),
                   "ppo/eval/gold_gain": float(gain.mean()), "ppo/eval/gold_gain_ci_low": float(gain.mean() - half),
                   "ppo/eval/gold_gain_ci_high": float(gain.mean() + half)}
    log.info("PPO evaluation: %s", {k: round(v, 4) for k, v in values.items()})
    return as_metrics(values)
