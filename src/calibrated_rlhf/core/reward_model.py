"""Bradley-Terry reward model: training with TRL's RewardTrainer, scoring, evaluation.

Training uses the centering loss (``center_rewards_coefficient``), which pins the offset of the
rewards at 0; the scale stays free and is fixed afterwards by temperature calibration.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel

from calibrated_rlhf.core.history import HistoryCallback
from calibrated_rlhf.core.progress import attach_progress
from calibrated_rlhf.core.lora import LoraParams, lora_config, merged
from calibrated_rlhf.core.speed.buckets import TrainingBatches
from calibrated_rlhf.core.speed.config import RewardSpeed
from calibrated_rlhf.core.speed.readout import readout_logits
from calibrated_rlhf.core.staging import staging_dir


class RewardTrainingParams(BaseModel):
    """Training settings of the reward model; mapped onto TRL's ``RewardConfig``."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the run instead of being ignored

    center_rewards_coefficient: float | None = Field(
        0.01, ge=0, description="Weight of mean((r_chosen + r_rejected)^2): fixes the reward offset at 0. null = off."
    )
    use_margin: bool = Field(True, description="Use the margin loss -log sigmoid(r_c - r_r - margin) when margins exist.")
    learning_rate: float = Field(1e-3, gt=0, lt=1)
    num_train_epochs: float = Field(2.0, gt=0)
    per_device_train_batch_size: int = Field(32, ge=1)
    per_device_eval_batch_size: int = Field(64, ge=1)
    lr_scheduler_type: str = Field("cosine", description="Any transformers scheduler name.")
    warmup_steps: float = Field(0.05, ge=0, description="Warm-up: a fraction of training if < 1, else steps.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    logging_steps: int = Field(10, ge=1, description="Steps between training-curve points.")
    seed: int = Field(0)
    bf16: bool = Field(False, description="bf16 mixed precision (GPU); TRL's default is True, wrong on CPU.")
    lora: LoraParams | None = Field(
        None, description="LoRA adapters on the backbone, the score head trained in full; null: full fine-tune. "
        "The saved reward model is merged.")
    group_by_length: bool = Field(
        False,
        description="Batch pairs of similar length (keyed on each pair's longer side), the batches in random "
        "order: far less padding, the same pairs each epoch. Off by default: it changes which pairs share a "
        "batch, and on small data sets that moved the learned margins (see docs/benchmarks.md).",
    )
    speed: RewardSpeed = Field(
        default_factory=RewardSpeed,
        description="The training speed paths (packed pairs, length buckets) behind one switch (speed.enabled; "
        "false trains as TRL does). Same rewards, loss and gradients up to float rounding.",
    )


def _as_dataset(ids: pd.DataFrame, with_margin: bool):
    from datasets import Dataset

    cols = ["chosen_ids", "rejected_ids"] + (["margin"] if with_margin and "margin" in ids.columns else [])
    return Dataset.from_dict({c: [list(map(int, v)) if c != "margin" else float(v) for v in ids[c]] for c in cols})


class PairLengthSampler(torch.utils.data.Sampler):
    """Batches of pairs of similar length, the batches in random order.

    A pair costs its longer side (the collator pads both sides to one width). Pairs are shuffled, cut
    into groups of ``group_batches`` batches, sorted by length inside each group and cut into batches;
    the full batches are then shuffled (transformers' length-grouped sampler keeps them sorted, long to
    short, which orders training by length). A short last batch stays last so no batch straddles two.
    Draws from torch's global generator, which the Trainer seeds.
    """

    def __init__(self, lengths: list[int], batch_size: int, group_batches: int = 50) -> None:
        self.lengths, self.batch_size, self.group = lengths, batch_size, batch_size * group_batches

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        perm = torch.randperm(len(self.lengths)).tolist()
        batches = []
        for start in range(0, len(perm), self.group):
            group = sorted(perm[start:start + self.group], key=self.lengths.__getitem__)
            batches += [group[i:i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        order = torch.randperm(len(batches)).tolist()
        return iter([i for b in [batches[j] for j in order] + tail for i in b])


def _reward_trainer_class(params: RewardTrainingParams):
    """TRL's RewardTrainer with length-aware batching: the sampler and the forward, nothing else."""
    from trl import RewardTrainer

    if not params.group_by_length and not TrainingBatches(params.speed).replaces_forward:
        return RewardTrainer

    class LengthAwareRewardTrainer(RewardTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.batches = TrainingBatches(params.speed)

        def _get_train_sampler(self, train_dataset=None):
            ds = train_dataset if train_dataset is not None else self.train_dataset
            if not params.group_by_length:
                return super()._get_train_sampler(train_dataset)
            lengths = [max(len(c), len(r)) for c, r in zip(ds["chosen_ids"], ds["rejected_ids"])]
            return PairLengthSampler(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(self.batches.forward(model), inputs, return_outputs, num_items_in_batch)
            if model.training:
                self.batches.count(model, inputs["input_ids"].shape[1])
            return out

    return LengthAwareRewardTrainer


def train_reward_model(
    model: PreTrainedModel,
    tokenizer: Any,
    train_ids: pd.DataFrame,
    validation_ids: pd.DataFrame | None,
    params: RewardTrainingParams,
    gradient_checkpointing: bool = False,
) -> tuple[PreTrainedModel, list[dict[str, float]]]:
    """Train on pre-tokenized pairs (``chosen_ids``, ``rejected_ids``, optional ``margin``).

    With ``params.lora`` the backbone trains through adapters and the returned model has them merged.

    Returns the trained model and its history: one dict per logged point with ``step`` and TRL's
    keys (``loss``, ``accuracy``, ``margin``, ``mean_reward``, ..., ``eval_*`` for validation); where
    this project's forward runs the batches (``speed``, or ``group_by_length`` with ``speed`` on), a last
    point with ``TrainingBatches.fractions`` (``trimmed_batch_fraction``, ``packed_batch_fraction``).
    """
    from trl import RewardConfig

    with_margin = params.use_margin and "margin" in train_ids.columns
    history = HistoryCallback()
    with staging_dir(tempfile.gettempdir(), "rm-train") as out:
        args = RewardConfig(
            output_dir=str(out),
            center_rewards_coefficient=params.center_rewards_coefficient,
            learning_rate=params.learning_rate,
            num_train_epochs=params.num_train_epochs,
            per_device_train_batch_size=params.per_device_train_batch_size,
            per_device_eval_batch_size=params.per_device_eval_batch_size,
            lr_scheduler_type=params.lr_scheduler_type,
            warmup_steps=params.warmup_steps,
            weight_decay=params.weight_decay,
            max_grad_norm=params.max_grad_norm,
            logging_steps=params.logging_steps,
            seed=params.seed,
            data_seed=params.seed,
            bf16=params.bf16,
            activation_checkpointing=gradient_checkpointing,
            eval_strategy="epoch" if validation_ids is not None and len(validation_ids) else "no",
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,  # attach_progress sets the project's bar or log lines
            dataloader_pin_memory=torch.cuda.is_available(),
            max_length=None,  # lengths were checked in data_prep; nothing is dropped silently here
        )
        trainer = _reward_trainer_class(params)(
            model=model,
            args=args,
            train_dataset=_as_dataset(train_ids, with_margin),
            eval_dataset=_as_dataset(validation_ids, with_margin) if args.eval_strategy != "no" else None,
            processing_class=tokenizer,
            callbacks=[history],
            # the score head is new on a causal-LM checkpoint: it trains in full beside the adapters
            peft_config=lora_config(params.lora, "SEQ_CLS", ["score"]) if params.lora is not None else None,
        )
        attach_progress(trainer, "reward model")
        trainer.train()
    fractions = trainer.batches.fractions() if hasattr(trainer, "batches") else {}
    if fractions:
        history.points.append({"step": trainer.state.global_step, **fractions})
    model = merged(trainer.model).to("cpu").eval()
    return model, history.points


@torch.inference_mode()
def iter_scores(
    model: PreTrainedModel,
    sequences: list[list[int]],
    pad_token_id: int,
    batch_size: int = 64,
    sort_by_length: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (indices, rewards) batch by batch, so statistics can be streamed without holding all scores.

    Sorting by length first makes each batch pad to nearly its own length, which removes most of
    the wasted compute of padding on data with mixed lengths.
    """
    device = next(model.parameters()).device
    order = np.argsort([len(s) for s in sequences], kind="stable") if sort_by_length else np.arange(len(sequences))
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = sequences[i]
            ids[row, : len(seq)] = torch.as_tensor(seq)
            mask[row, : len(seq)] = 1
        logits = readout_logits(model, ids.to(device), mask.to(device))
        yield idx, logits.squeeze(-1).float().cpu().numpy().astype(np.float64)


def score_sequences(
    model: PreTrainedModel,
    sequences: list[list[int]],
    pad_token_id: int,
    batch_size: int = 64,
    sort_by_length: bool = True,
) -> np.ndarray:
    """Scalar reward of each token sequence, in input order."""
    out = np.empty(len(sequences), dtype=np.float64)
    for idx, rewards in iter_scores(model, sequences, pad_token_id, batch_size, sort_by_length):
        out[idx] = rewards
    return out


def model_fingerprint(model: PreTrainedModel) -> str:
    """SHA-256 of the model's weights: names the exact reward model a transform was computed for."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def score_pairs(model: PreTrainedModel, pair_ids: pd.DataFrame, pad_token_id: int,
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(r_chosen, r_rejected) for pre-tokenized pairs, scored in one length-sorted pass."""
    seqs = list(pair_ids["chosen_ids"]) + list(pair_ids["rejected_ids"])
    r = score_sequences(model, [list(s) for s in seqs], pad_token_id, batch_size)
    n = len(pair_ids)
    return r[:n], r[n:]


def pair_metrics(r_chosen: np.ndarray, r_rejected: np.ndarray, true_prob: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy, reward offset and spread, mean margin; with true probabilities, the Bayes figures too.

    ``expected_accuracy`` is the model's accuracy in expectation over label noise (p where it ranks
    the chosen response first, 1 - p otherwise): the same target as ``accuracy`` with far less variance.
    """
    rewards = np.concatenate([r_chosen, r_rejected])
    margin = r_chosen - r_rejected
    out = {
        "accuracy": float(np.mean(margin > 0)),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "margin_mean": float(margin.mean()),
        "n_pairs": float(len(margin)),
    }
    if true_prob is not None:
        p = np.asarray(true_prob, dtype=np.float64)
        out["bayes_accuracy"] = float(np.mean(np.maximum(p, 1 - p)))
        out["expected_accuracy"] = float(np.mean(np.where(margin > 0, p, np.where(margin < 0, 1 - p, 0.5))))
    return out
