"""The reference policy: a short supervised fine-tune (TRL SFTTrainer) so the tiny backbone writes the
task's language, and sampling from it with prompts' context kept in the decoded text.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel

from calibrated_rlhf.core.history import HistoryCallback
from calibrated_rlhf.core.staging import staging_dir


class SFTParams(BaseModel):
    """Supervised fine-tuning of the reference policy on the training responses."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the run instead of being ignored

    learning_rate: float = Field(1e-3, gt=0, lt=1)
    num_train_epochs: float = Field(1.0, gt=0)
    per_device_train_batch_size: int = Field(32, ge=1)
    lr_scheduler_type: str = Field("cosine")
    warmup_steps: float = Field(0.05, ge=0, description="A fraction of training if < 1, else steps.")
    max_length: int = Field(128, ge=8)
    logging_steps: int = Field(10, ge=1)
    seed: int = Field(0)
    bf16: bool = Field(False, description="bf16 mixed precision (GPU only).")


def sft_policy(
    model: PreTrainedModel, tokenizer: Any, prompts: list[str], completions: list[str], params: SFTParams
) -> tuple[PreTrainedModel, list[dict[str, float]]]:
    """Fine-tune ``model`` on prompt -> completion with the loss on completion tokens only."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    history = HistoryCallback()
    with staging_dir(tempfile.gettempdir(), "sft") as out:
        args = SFTConfig(
            output_dir=str(out),
            learning_rate=params.learning_rate,
            num_train_epochs=params.num_train_epochs,
            per_device_train_batch_size=params.per_device_train_batch_size,
            lr_scheduler_type=params.lr_scheduler_type,
            warmup_steps=params.warmup_steps,
            max_length=params.max_length,
            logging_steps=params.logging_steps,
            seed=params.seed,
            data_seed=params.seed,
            bf16=params.bf16,
            gradient_checkpointing=False,
            completion_only_loss=True,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts, "completion": completions}),
            processing_class=tokenizer,
            callbacks=[history],
        )
        trainer.train()
    return trainer.model.to("cpu").eval(), history.points


def decode_in_context(tokenizer: Any, prompt_ids: list[int], response_ids: list[int]) -> str:
    """The response's text as it continues the prompt, so ``prompt + response`` round-trips.

    Decoding the response alone loses the separator some tokenizers fold into the first token
    (a leading space under a Metaspace pre-tokenizer), and reward models see prompt + response text.
    """
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(list(prompt_ids) + list(response_ids), skip_special_tokens=True)
    if full.startswith(prompt):
        return full[len(prompt):]
    return tokenizer.decode(response_ids, skip_special_tokens=True)


@torch.inference_mode()
def sample_ids(
    policy: PreTrainedModel,
    tokenizer: Any,
    prompts: list[str],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[tuple[str, list[int], list[int]]]:
    """(prompt, prompt ids, response ids up to and including EOS) sampled from ``policy`` with a KV cache
    (plain ancestral sampling), ``samples_per_prompt`` per prompt in prompt order."""
    torch.manual_seed(seed)
    policy.eval()
    device = next(policy.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    jobs = [p for p in prompts for _ in range(samples_per_prompt)]
    out: list[tuple[str, list[int], list[int]]] = []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        ids = [tokenizer(p)["input_ids"] for p in batch]
        width = max(map(len, ids))
        # Left padding: generation continues from the last column for every row.
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        gen = policy.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=temperature,
                              top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos,
                              pad_token_id=pad, use_cache=True)
        for prompt, prompt_ids, row in zip(batch, ids, gen[:, width:].tolist()):
            out.append((prompt, prompt_ids, row[: row.index(eos) + 1] if eos in row else row))
    return out


def sample_responses(
    policy: PreTrainedModel,
    tokenizer: Any,
    prompts: list[str],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[tuple[str, str]]:
    """(prompt, response) pairs sampled from ``policy`` (:func:`sample_ids`, decoded in the prompt's context)."""
    eos = tokenizer.eos_token_id
    return [(prompt, decode_in_context(tokenizer, prompt_ids, response[:-1] if response[-1:] == [eos] else response))
            for prompt, prompt_ids, response in sample_ids(policy, tokenizer, prompts, samples_per_prompt,
                                                            max_new_tokens, temperature, seed, batch_size)]
