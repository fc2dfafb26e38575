"""DPO (TRL ``DPOTrainer``) from the reference policy, and its implicit reward as a Bradley-Terry reward.

DPO's optimum satisfies ``r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) + const(x)``: the trained policy
carries a reward whose pair margins are Bradley-Terry logits, on a scale set by ``beta``. Scoring
held-out pairs with it (:func:`score_pairs`, the reward model's ``reward_chosen``/``reward_rejected``
columns) lets the project's temperature fit and calibration report judge it as they judge a reward model.
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from calibrated_rlhf.core import chat
from calibrated_rlhf.core.evaluation import sequence_logprobs
from calibrated_rlhf.core.history import HistoryCallback
from calibrated_rlhf.core.progress import attach_progress
from calibrated_rlhf.core.preferences import render_ids
from calibrated_rlhf.core.staging import staging_dir


class DPOConfig(BaseModel):
    """What :func:`train_dpo` hands to TRL's ``DPOConfig`` (sigmoid loss: the Bradley-Terry likelihood)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key must fail, not leave the default in force

    beta: float = Field(0.1, gt=0, description="DPO's KL weight: the implicit reward is beta * log(pi / pi_ref).")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate, linear decay.")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the train pairs.")
    per_device_train_batch_size: int = Field(32, ge=1, description="Pairs per step and process.")
    max_length: int = Field(128, ge=8, description="Prompt + completion tokens kept (TRL keeps the start).")
    logging_steps: int = Field(5, ge=1, description="Steps between log records.")
    seed: int = Field(0, description="Seed of the pair order and initialization.")


def train_dpo(reference_policy: Any, tokenizer: Any, pairs: pd.DataFrame, config: DPOConfig
              ) -> tuple[Any, list[dict[str, float]]]:
    """DPO on ``pairs`` (prompt, chosen, rejected) from a copy of ``reference_policy``, which stays the frozen
    reference; returns the policy on CPU and TRL's log records."""
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    history = HistoryCallback()
    with staging_dir(tempfile.gettempdir(), "dpo") as out:
        args = TRLDPOConfig(
            output_dir=str(out), beta=config.beta, loss_type=["sigmoid"], learning_rate=config.learning_rate,
            num_train_epochs=config.num_train_epochs, per_device_train_batch_size=config.per_device_train_batch_size,
            max_length=config.max_length, logging_steps=config.logging_steps, seed=config.seed,
            data_seed=config.seed, bf16=False, activation_checkpointing=False, save_strategy="no", report_to=[],
            disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available())
        data = Dataset.from_dict({k: list(pairs[k]) for k in ("prompt", "chosen", "rejected")})
        policy = copy.deepcopy(reference_policy).requires_grad_(True)
        trainer = DPOTrainer(model=policy, ref_model=reference_policy, args=args, train_dataset=data,
                             processing_class=tokenizer, callbacks=[history])
        attach_progress(trainer, "DPO", {"loss": "loss", "margin": "rewards/margins"})
        trainer.train()
    return trainer.model.to("cpu").eval(), history.points


def completion_ids(tokenizer: Any, prompt: Any, completion: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids with EOS) split as DPO splits them: where the tokenized prompt and
    the tokenized prompt + completion first differ. Text, or messages through the chat template (the prompt
    with the assistant's generation prompt)."""
    prompt_ids = chat.prompt_ids(tokenizer, [prompt])[0]
    full = render_ids(tokenizer, prompt, completion)
    n = next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), min(len(prompt_ids), len(full)))
    return full[:n], full[n:]


def implicit_rewards(policy: Any, reference: Any, tokenizer: Any, prompts: list[Any], completions: list[Any],
                     beta: float) -> np.ndarray:
    """``beta * log(pi(y|x) / pi_ref(y|x))`` of each completion (summed over its tokens, EOS included)."""
    split = [completion_ids(tokenizer, p, c) for p, c in zip(prompts, completions)]
    prompt_ids, ids = [s[0] for s in split], [s[1] for s in split]
    pad = tokenizer.pad_token_id
    return beta * (sequence_logprobs(policy, prompt_ids, ids, pad) - sequence_logprobs(reference, prompt_ids, ids, pad))


def score_pairs(policy: Any, reference: Any, tokenizer: Any, pairs: pd.DataFrame, beta: float) -> pd.DataFrame:
    """The implicit reward of both sides of every pair, in the reward model's score columns: pair_id,
    reward_chosen, reward_rejected (+ true_prob on the synthetic task)."""
    prompts = list(pairs["prompt"])
    out = pd.DataFrame({
        "pair_id": pairs["pair_id"].to_numpy(),
        "reward_chosen": implicit_rewards(policy, reference, tokenizer, prompts, list(pairs["chosen"]), beta),
        "reward_rejected": implicit_rewards(policy, reference, tokenizer, prompts, list(pairs["rejected"]), beta),
    })
    if "true_prob" in pairs.columns:
        out["true_prob"] = pairs["true_prob"].to_numpy(dtype=float)
    return out
