"""The reference policy: a short supervised fine-tune (TRL SFTTrainer) so the tiny backbone writes the
task's language, and sampling from it with prompts' context kept in the decoded text (text prompts) or
rendered with the chat template (conversational prompts).
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel

from calibrated_rlhf.core.chat import prompt_ids, stop_token_id
from calibrated_rlhf.core.history import HistoryCallback
from calibrated_rlhf.core.lora import LoraParams, lora_config, merged
from calibrated_rlhf.core.preferences import is_conversational, plain
from calibrated_rlhf.core.progress import Progress, attach_progress
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
    lora: LoraParams | None = Field(
        None, description="LoRA adapters instead of a full fine-tune; null: every weight trains. The saved "
        "reference policy is merged.")


def sft_policy(
    model: PreTrainedModel, tokenizer: Any, prompts: list[Any], completions: list[Any], params: SFTParams,
    gradient_checkpointing: bool = False,
) -> tuple[PreTrainedModel, list[dict[str, float]]]:
    """Fine-tune ``model`` on prompt -> completion with the loss on completion tokens only (through
    adapters with ``params.lora``, merged into the returned model).

    Text, or conversational (message lists: TRL renders them with the chat template, the completion
    through its end of turn, so the policy learns to close its turn where sampling stops)."""
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
            activation_checkpointing=gradient_checkpointing,
            completion_only_loss=True,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,  # attach_progress sets the project's bar or log lines
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": plain(list(prompts)), "completion": plain(list(completions))}),
            processing_class=tokenizer,
            callbacks=[history],
            peft_config=lora_config(params.lora, "CAUSAL_LM") if params.lora is not None else None,
        )
        attach_progress(trainer, "SFT")
        trainer.train()
    return merged(trainer.model).to("cpu").eval(), history.points


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


def decode_response(tokenizer: Any, prompt: Any, prompt_ids: list[int], response_ids: list[int]) -> str:
    """A sampled response's text: the continuation of a text prompt (:func:`decode_in_context`), or the
    assistant turn after a conversational one (the template's special tokens dropped)."""
    if is_conversational(prompt):
        return tokenizer.decode(response_ids, skip_special_tokens=True)
    return decode_in_context(tokenizer, prompt_ids, response_ids)


@torch.inference_mode()
def sample_ids(
    policy: PreTrainedModel,
    tokenizer: Any,
    prompts: list[Any],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    desc: str | None = None,
) -> list[tuple[Any, list[int], list[int]]]:
    """(prompt, prompt ids, response ids up to and including the stop token) sampled from ``policy`` with a KV
    cache (plain ancestral sampling), ``samples_per_prompt`` per prompt in prompt order.

    Text prompts are continued up to EOS; conversational prompts (message lists) are rendered with the chat
    template's generation prompt and answered up to the template's end of turn (``core.chat``). ``desc``
    names a progress bar (or log lines) over the samples; None shows none (a caller's own bar covers it).
    """
    torch.manual_seed(seed)
    policy.eval()
    device = next(policy.parameters()).device
    stop = stop_token_id(tokenizer, prompts)
    pad = tokenizer.pad_token_id
    rendered = prompt_ids(tokenizer, prompts)
    jobs = [i for i in range(len(prompts)) for _ in range(samples_per_prompt)]
    out: list[tuple[Any, list[int], list[int]]] = []
    bar = Progress(len(jobs), desc) if desc else None
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        ids = [rendered[i] for i in batch]
        width = max(map(len, ids))
        # Left padding: generation continues from the last column for every row.
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        gen = policy.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=temperature,
                              top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=stop,
                              pad_token_id=pad, use_cache=True)
        for i, p_ids, row in zip(batch, ids, gen[:, width:].tolist()):
            out.append((prompts[i], p_ids, row[: row.index(stop) + 1] if stop in row else row))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return out


def decode_samples(tokenizer: Any, rows: list[tuple[Any, list[int], list[int]]]) -> list[str]:
    """The text of each sample of :func:`sample_ids` as the reward model reads it, its stop token dropped."""
    stop = stop_token_id(tokenizer, [prompt for prompt, _, _ in rows])
    return [decode_response(tokenizer, prompt, p_ids, response[:-1] if response[-1:] == [stop] else response)
            for prompt, p_ids, response in rows]


def sample_responses(
    policy: PreTrainedModel,
    tokenizer: Any,
    prompts: list[Any],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    desc: str | None = None,
) -> list[tuple[Any, str]]:
    """(prompt, response) pairs sampled from ``policy`` (:func:`sample_ids`, decoded by :func:`decode_samples`)."""
    rows = sample_ids(policy, tokenizer, prompts, samples_per_prompt, max_new_tokens, temperature, seed, batch_size,
                      desc)
    return list(zip([prompt for prompt, _, _ in rows], decode_samples(tokenizer, rows)))
