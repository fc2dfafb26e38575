"""Preference pairs with a known gold over a real model's own text (``core.real_task``), written for data_prep.

``python -m calibrated_rlhf.runtime.real_task MODEL DEST`` samples ``--samples-per-prompt`` responses to each of
``--n-prompts`` instructions from the chat model in the folder ``MODEL`` (through its chat template, plain
ancestral sampling, as the reference policy samples), draws the hidden gold (``--gold hidden_state``: a direction
among the top principal components of the model's last hidden state over those samples; ``words``: utilities
over the words they use), and writes into the new folder ``DEST``:

* ``pairs.jsonl``: conversational pairs with ``gold_chosen``, ``gold_rejected`` and ``true_prob``
  (``data_prep.source.path``);
* ``gold_task.json``: the hidden gold (``data_prep.source.gold_task``): the model folder, direction, offset
  and scale, or the words, utilities and scale;
* ``samples.jsonl``: every prompt with its samples, and ``generation.json``: the settings and timings.

The folder is written to a staging sibling and renamed into place; an existing ``DEST`` is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GenerationSpec(BaseModel):
    """What is sampled from the model, and how the gold is drawn."""

    model_config = ConfigDict(extra="forbid")

    n_prompts: int = Field(240, ge=1, description="Instructions (templates x subjects), in a seeded order.")
    samples_per_prompt: int = Field(4, ge=2, description="Samples per prompt; every two distinct ones make a pair.")
    max_new_tokens: int = Field(48, ge=4, description="Longest response in tokens (a longer one is cut there).")
    batch_size: int = Field(32, ge=1, description="Sequences sampled at once.")
    gold: Literal["hidden_state", "words"] = Field(
        "hidden_state", description="hidden_state: a direction in the model's last hidden state at the reply's last "
        "token (what a reward model's head reads); words: hidden utilities of the samples' frequent words.")
    n_components: int = Field(10, ge=1, description="hidden_state: the direction mixes this many top principal "
                              "components of the samples' states.")
    n_words: int = Field(150, ge=2, description="words: the gold vocabulary, the samples' most frequent words.")
    min_word_length: int = Field(4, ge=1, description="words: shorter words (the, and, is) carry no utility.")
    bayes_accuracy: float = Field(0.75, gt=0.5, lt=1.0, description="The pairs' Bayes accuracy; sets the scale.")
    seed: int = Field(0, description="Prompt order, sampling, utilities and labels.")
    threads: int | None = Field(None, ge=1, description="torch threads; null: torch's default.")


def generate(model_folder: str | os.PathLike[str], dest: str | os.PathLike[str], spec: GenerationSpec) -> Path:
    import torch

    from calibrated_rlhf.core.gold import HiddenStateGold, direction_in_top_components, last_token_states, reference
    from calibrated_rlhf.core.policy import decode_samples, sample_ids
    from calibrated_rlhf.core.real_task import RealTaskSpec, make_prompts, make_real_pairs
    from calibrated_rlhf.core.staging import make_staging_dir
    from calibrated_rlhf.core.synthetic import bayes_accuracy

    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; the pairs are written to a new folder only")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    t0 = time.perf_counter()
    model, tokenizer = reference(str(model_folder))  # the gold's own copy, so make_real_pairs reuses it
    load_s = time.perf_counter() - t0
    prompts = make_prompts(spec.n_prompts, spec.seed)
    messages = [[{"role": "user", "content": p}] for p in prompts]
    t1 = time.perf_counter()
    with torch.no_grad():
        rows = sample_ids(model, tokenizer, messages, spec.samples_per_prompt, spec.max_new_tokens,
                          seed=spec.seed, batch_size=spec.batch_size, desc="sampling the model's responses")
    sample_s = time.perf_counter() - t1
    texts = decode_samples(tokenizer, rows)
    k = spec.samples_per_prompt
    samples = [texts[i * k:(i + 1) * k] for i in range(len(prompts))]
    task_spec = RealTaskSpec(n_words=spec.n_words, min_word_length=spec.min_word_length,
                             bayes_accuracy=spec.bayes_accuracy, seed=spec.seed)
    gold, gold_s = None, 0.0
    if spec.gold == "hidden_state":
        t2 = time.perf_counter()
        with torch.no_grad():
            states = last_token_states(model, tokenizer, [m for m in messages for _ in range(k)], texts)
        direction, offset = direction_in_top_components(states, spec.n_components, spec.seed)
        gold = HiddenStateGold(model=str(model_folder), direction=tuple(direction.tolist()), offset=offset, scale=1.0)
        gold_s = time.perf_counter() - t2
    pairs, task = make_real_pairs(prompts, samples, task_spec, gold)
    n_tokens = sum(len(r[2]) for r in rows)
    staging = make_staging_dir(dest.parent, dest.name)
    try:
        pairs.to_json(staging / "pairs.jsonl", orient="records", lines=True, force_ascii=False)
        (staging / "gold_task.json").write_text(json.dumps({**task.to_dict(), "spec": {
            **task_spec.to_dict(), "gold": spec.gold, "n_components": spec.n_components}}, indent=2))
        with open(staging / "samples.jsonl", "w", encoding="utf-8") as fh:
            for prompt, responses in zip(prompts, samples):
                fh.write(json.dumps({"prompt": prompt, "samples": responses}, ensure_ascii=False) + "\n")
        (staging / "generation.json").write_text(json.dumps({
            "model": str(model_folder), "spec": spec.model_dump(), "n_pairs": len(pairs),
            "n_samples": len(texts), "n_response_tokens": n_tokens, "load_s": round(load_s, 2),
            "sample_s": round(sample_s, 2), "gold_s": round(gold_s, 2), "tokens_per_s": round(n_tokens / sample_s, 1),
            "scale": task.scale, "bayes_accuracy": bayes_accuracy(pairs["true_prob"].to_numpy()),
        }, indent=2))
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibrated_rlhf.runtime.real_task",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("model",
                        help="a chat model folder (e.g. written by python -m calibrated_rlhf.runtime.gguf_model)")
    parser.add_argument("dest", help="the folder to write; must not exist")
    for name, field in GenerationSpec.model_fields.items():
        choices = getattr(field.annotation, "__args__", None) if name == "gold" else None
        kind = str if choices else float if field.annotation is float else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=field.default, choices=choices,
                            help=field.description)
    args = parser.parse_args(argv)
    spec = GenerationSpec(**{name: getattr(args, name) for name in GenerationSpec.model_fields})
    try:
        dest = generate(args.model, args.dest, spec)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}")
        return 1
    print(f"wrote {dest}: {json.loads((dest / 'generation.json').read_text())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
