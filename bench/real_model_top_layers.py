"""How far a reward model on the real model gets when only its top layers train: LoRA on the top K layers and a
last-token score head, Bradley-Terry loss with the centering term, several epochs (docs/real_model.md).

The layers below the adapters never change, so their output for each distinct (prompt, response) is computed
once and cached; an epoch then runs only the top K layers, and each response of a batch once however many of
its pairs are in it. Test accuracy after every epoch, on the pairs of a held-out quarter of the prompts, against
their Bayes accuracy.

    python bench/real_model_top_layers.py MODEL_FOLDER TASK_FOLDER [--layers 4] [--epochs 6] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")


def token_ids(tokenizer, pairs: list[dict]) -> tuple[dict[tuple[str, str], int], list[list[int]]]:
    """Each distinct (prompt, response) once, through the chat template, and its index."""
    index: dict[tuple[str, str], int] = {}
    ids = []
    for pair in pairs:
        for side in ("chosen", "rejected"):
            key = (pair["prompt"][0]["content"], pair[side][0]["content"])
            if key not in index:
                index[key] = len(ids)
                messages = [{"role": "user", "content": key[0]}, {"role": "assistant", "content": key[1]}]
                ids.append(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    return index, ids


@torch.no_grad()
def cache_inputs(model, ids: list[list[int]], layer: int, pad: int) -> list[torch.Tensor]:
    """The input of ``layer`` for each sequence (right-padded batches: causal attention never sees the padding)."""
    cache = []
    for start in range(0, len(ids), 16):
        chunk = ids[start:start + 16]
        x = torch.full((len(chunk), max(map(len, chunk))), pad)
        for i, seq in enumerate(chunk):
            x[i, :len(seq)] = torch.tensor(seq)
        hidden = model.model(input_ids=x, output_hidden_states=True).hidden_states[layer]
        cache += [hidden[i, :len(seq)].clone() for i, seq in enumerate(chunk)]
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("task")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-pairs", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    pairs = [json.loads(line) for line in Path(args.task, "pairs.jsonl").open()]
    index, ids = token_ids(tokenizer, pairs)
    first = len(model.model.layers) - args.layers
    t0 = time.perf_counter()
    cache = cache_inputs(model, ids, first, tokenizer.pad_token_id)
    print(f"cached the input of layer {first} for {len(ids)} sequences in {time.perf_counter() - t0:.0f} s")

    targets = [f"layers.{layer}.{name}" for layer in range(first, len(model.model.layers)) for name in LINEAR]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets)).base_model.model
    base = model.model
    head = torch.nn.Linear(base.norm.weight.shape[0], 1, bias=False)
    torch.nn.init.zeros_(head.weight)
    trainable = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)

    def rewards(seqs: list[int]) -> torch.Tensor:
        width = max(len(cache[i]) for i in seqs)
        hidden = torch.zeros(len(seqs), width, cache[0].shape[1])
        for j, i in enumerate(seqs):
            hidden[j, :len(cache[i])] = cache[i]
        positions = torch.arange(width)[None].expand(len(seqs), width)
        rotary = base.rotary_emb(hidden, positions)
        for layer in base.layers[first:]:
            out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out
        last = base.norm(hidden)[torch.arange(len(seqs)), torch.tensor([len(cache[i]) - 1 for i in seqs])]
        return head(last).squeeze(-1)

    def key(pair: dict, side: str) -> int:
        return index[(pair["prompt"][0]["content"], pair[side][0]["content"])]

    prompts = sorted({p["prompt"][0]["content"] for p in pairs})
    held_out = set(np.random.default_rng(0).choice(prompts, size=len(prompts) // 4, replace=False))
    train = [p for p in pairs if p["prompt"][0]["content"] not in held_out]
    test = [p for p in pairs if p["prompt"][0]["content"] in held_out]
    test_seqs = sorted({key(p, s) for p in test for s in ("chosen", "rejected")})
    bayes = np.mean([max(p["true_prob"], 1 - p["true_prob"]) for p in test])
    print(f"{len(train)} train pairs, {len(test)} test pairs, Bayes accuracy on the test pairs {bayes:.3f}")
    rng = np.random.default_rng(0)
    for epoch in range(args.epochs):
        t0, losses = time.perf_counter(), []
        order = rng.permutation(len(train))
        for start in range(0, len(order), args.batch_pairs):
            batch = [train[i] for i in order[start:start + args.batch_pairs]]
            seqs = sorted({key(p, s) for p in batch for s in ("chosen", "rejected")})
            where = {s: j for j, s in enumerate(seqs)}
            r = rewards(seqs)
            chosen = r[[where[key(p, "chosen")] for p in batch]]
            rejected = r[[where[key(p, "rejected")] for p in batch]]
            loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean() + 0.01 * ((chosen + rejected) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        with torch.no_grad():
            scores = {}
            for start in range(0, len(test_seqs), 32):
                scores.update(zip(test_seqs[start:start + 32], rewards(test_seqs[start:start + 32]).tolist()))
        ahead = [scores[key(p, "chosen")] > scores[key(p, "rejected")] for p in test]
        # accuracy in expectation over the label noise (the kept true probability): Bayes's own terms
        expected = np.mean([p["true_prob"] if a else 1 - p["true_prob"] for p, a in zip(test, ahead)])
        gold = {key(p, s): p[f"gold_{s}"] for p in test for s in ("chosen", "rejected")}
        corr = np.corrcoef([scores[k] for k in gold], list(gold.values()))[0, 1]
        print(f"epoch {epoch}: train loss {np.mean(losses):.3f}, test accuracy {np.mean(ahead):.3f}, expected "
              f"accuracy {expected:.3f}, correlation with the gold {corr:.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
