"""What the RL stages (PPO, RLOO and GRPO, DPO) share: the evaluation's parameters, the refusal of a reward
transform made for other weights, and the stage's part of the resume fingerprint.

Here rather than in one stage's nodes, so that no pipeline imports another's."""

from __future__ import annotations

from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from calibrated_rlhf.core.checkpointing import digest
from calibrated_rlhf.core.early_warning import REPETITION_SURPRISAL, RepetitionProfile
from calibrated_rlhf.core.gold import Gold
from calibrated_rlhf.core.preferences import plain_frame
from calibrated_rlhf.core.normalization import NormalizationMethod, RewardTransform
from calibrated_rlhf.core.scoring import reward_fingerprint


class EvaluationParams(BaseModel):
    """Gold-reward comparison of the final policy with the reference policy on test prompts."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key must fail, not leave the default in force

    n_prompts: int = Field(128, ge=2, description="Test prompts sampled from (the first n).")
    samples_per_prompt: int = Field(4, ge=1, description="Responses sampled per prompt and policy.")
    seed: int = Field(1234, description="Sampling seed, the same for the final and the reference policy.")


def check_transform_matches(transform: RewardTransform, reward_model: Any, fingerprint: str | None = None) -> None:
    """Refuse a transform computed for other weights (another run's model, or one model vs an ensemble).

    ``fingerprint``: the reward model's, when already computed (it hashes every weight)."""
    if transform.reward_model_version is None:
        return
    actual = fingerprint or reward_fingerprint(reward_model)
    if actual != transform.reward_model_version:
        kind = "an ensemble" if transform.ensemble else "one reward model"
        raise ValueError(f"reward_transform was computed for {kind} with fingerprint "
                         f"{transform.reward_model_version[:12]}..., but the reward model given has {actual[:12]}...: "
                         "pin matching versions with --load-versions, or rerun normalization")


def stage_fingerprint(reward_model: str, transform: RewardTransform, params: Any, task: Gold | None,
                      gold_offset: float | None, method: NormalizationMethod = "zscore") -> dict[str, Any]:
    """What changes the run's result beyond the trainer's own fingerprint: the reward model's weights,
    the reward transform applied (the rescaled one in the scale experiment), which reward is optimized,
    and on the synthetic task the gold reward behind the logged gold metrics. ``params``: the stage's
    parameters (PPO's or RL's), of which only ``raw_reward_multiplier`` counts."""
    applied = transform.to_dict()
    return {
        "reward_model": reward_model,
        "normalization.method": method,
        "raw_reward_multiplier": params.raw_reward_multiplier,
        **{f"reward_transform.{k}": applied[k] for k in ("temperature", "mean", "std", "clip")},
        "reward_transform": digest(applied),
        "synthetic_task": digest(task.to_dict()) if task is not None else None,
        "gold_offset": gold_offset,
    }


def ensemble_std_stop(transform: RewardTransform, multiple: float | None, stage: str) -> float | None:
    """A trainer's absolute threshold on the reward ensemble's disagreement, from ``<stage>.ensemble_std_stop_multiple``
    times the disagreement on the reference set that the transform records."""
    if multiple is None:
        return None
    reference = (transform.ensemble or {}).get("reference_ensemble_std")
    if reference is None:
        raise ValueError(f"{stage}.ensemble_std_stop_multiple needs a reward ensemble (reward_model.ensemble_size > 1) "
                         "whose transform records its reference disagreement")
    return multiple * reference


def repetition_profile(train_pairs: pd.DataFrame) -> RepetitionProfile:
    """How the reward model's training responses (both sides of its pairs) repeat words: the support the
    repetition warning measures a policy's samples against."""
    pairs = plain_frame(train_pairs)  # read back from Parquet: message lists arrive as numpy arrays
    return RepetitionProfile.of([*pairs["chosen"], *pairs["rejected"]])


def repetition_surprisal_stop(profile: RepetitionProfile, reference_responses: pd.DataFrame,
                              multiple: float | None) -> float | None:
    """A trainer's absolute threshold on the sampled responses' repetition surprisal, from
    ``<stage>.repetition_surprisal_stop_multiple`` times its mean on the reference set (the reference policy's own
    samples, so a policy that writes as it did never trips it)."""
    if multiple is None:
        return None
    return multiple * float(profile.surprisal(list(plain_frame(reference_responses)["response"])).mean())


def warning_stops(transform: RewardTransform, reference_responses: pd.DataFrame, profile: RepetitionProfile,
                  params: Any, stage: str) -> dict[str, float]:
    """The gold-free stop rules a stage's params turn on, as ``{score-function entry: threshold}``."""
    stops = {"ensemble_std": ensemble_std_stop(transform, params.ensemble_std_stop_multiple, stage),
             REPETITION_SURPRISAL: repetition_surprisal_stop(profile, reference_responses,
                                                             params.repetition_surprisal_stop_multiple)}
    return {name: threshold for name, threshold in stops.items() if threshold is not None}
