"""What one more forward pass costs in tokens: the default of ``RewardSpeed.bucket_cost_tokens``.

    python bench/bench_forward_cost.py --repeats 20     # the workload's Llama, 32 rows (16 pairs)
    python bench/bench_forward_cost.py --hidden 512 --layers 4

Times the forward and backward of the reward model (the workload's Llama, random init) through
``BucketedForward`` on batches of ``--rows`` right-padded rows, lengths drawn uniformly from [L/4, L],
for several maximum lengths L and 1 to 3 buckets (price 0, so each count gets its fewest padded
tokens). Then fits ``time = base + per_pass x (passes - 1) + per_token x tokens`` by least squares
and prints ``per_pass / per_token``: the padded tokens one more bucket must save to pay for its own
forward and backward, gather and reorder included. A token is dearer in a wide pass than a narrow one
(attention grows with the width), so it also lists, for every extra pass, the tokens it saved and
whether it made the batch faster: the price belongs between the savings that did not pay and those
that did. The cells take turns, in random order, ``--repeats``
times, and each keeps its fastest time: other work on a shared host only ever adds time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from paths import BASELINES

from calibrated_rlhf.core.reward_model import RewardTrainingParams
from calibrated_rlhf.core.speed.buckets import BucketedForward, length_buckets


def batch(rows: int, max_len: int, vocab: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = rng.integers(max(1, max_len // 4), max_len + 1, rows)
    ids = torch.zeros((rows, int(lengths.max())), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.as_tensor(rng.integers(4, vocab, n))
        mask[row, :n] = 1
    return ids, mask


def time_pass(forward: BucketedForward, ids: torch.Tensor, mask: torch.Tensor) -> float:
    t0 = time.perf_counter()
    forward(input_ids=ids, attention_mask=mask, use_cache=False).logits.sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32, help="sequences per batch (two per pair)")
    ap.add_argument("--max-lengths", type=int, nargs="+", default=[16, 24, 32, 48, 64, 96, 128])
    ap.add_argument("--hidden", type=int, default=None, help="override the workload's width (128)")
    ap.add_argument("--layers", type=int, default=None, help="override the workload's depth (2)")
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--price", type=float, default=None, help="mark the passes this price picks (default: the default)")
    a = ap.parse_args()
    sys.path.insert(0, str(BASELINES))
    import workload as W
    from transformers import AutoModelForSequenceClassification

    tok = W.build_tokenizer(W.build_workload())
    cfg = W.llama_config(len(tok), tok)
    cfg.num_labels = 1
    if a.hidden:
        cfg.hidden_size, cfg.intermediate_size = a.hidden, 2 * a.hidden
    if a.layers:
        cfg.num_hidden_layers = a.layers
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32).train()
    rng = np.random.default_rng(0)
    price = RewardTrainingParams().speed.bucket_cost_tokens if a.price is None else a.price
    cells = []
    for max_len in a.max_lengths:
        ids, mask = batch(a.rows, max_len, len(tok), rng)
        lengths = sorted(mask.sum(dim=1).tolist())
        chosen = len(length_buckets(lengths, 3, price))
        for k in (1, 2, 3):
            runs = length_buckets(lengths, k)
            cells.append({"max_len": max_len, "buckets": k, "passes": len(runs), "chosen": len(runs) == chosen,
                          "tokens": sum((e - s) * lengths[e - 1] for s, e in runs), "ids": ids, "mask": mask})
    for c in cells:
        c["forward"] = BucketedForward(model, c["buckets"])
        time_pass(c["forward"], c["ids"], c["mask"])  # warms the allocator for these shapes
        c["times"] = []
    for _ in range(a.repeats):  # round robin in random order: every cell gets its share of the quiet moments
        for i in rng.permutation(len(cells)):
            cells[i]["times"].append(time_pass(cells[i]["forward"], cells[i]["ids"], cells[i]["mask"]))
    for c in cells:
        del c["forward"], c["ids"], c["mask"]
        c["seconds"] = min(c["times"])  # other work on a shared host only ever adds time
    x = np.array([[1.0, c["passes"] - 1, c["tokens"]] for c in cells])
    (base, per_pass, per_token), *_ = np.linalg.lstsq(x, np.array([c["seconds"] for c in cells]), rcond=None)
    paid, unpaid = [], []  # tokens saved by one more pass, when that made the batch faster / not
    for c in cells:
        fit = base + per_pass * (c["passes"] - 1) + per_token * c["tokens"]
        prev = next((p for p in cells if p["max_len"] == c["max_len"] and p["buckets"] == c["buckets"] - 1), None)
        step = ""
        if prev is not None and c["passes"] > prev["passes"]:
            saved, dt = prev["tokens"] - c["tokens"], c["seconds"] - prev["seconds"]
            (paid if dt < 0 else unpaid).append(saved)
            step = f"   one more pass: {saved:4d} tokens fewer, {dt * 1e3:+6.2f} ms"
        mark = "*" if c["chosen"] else " "
        print(f"{mark} max length {c['max_len']:4d}, {c['passes']} pass(es), {c['tokens']:5d} tokens: "
              f"{c['seconds'] * 1e3:7.2f} ms (fit {fit * 1e3:7.2f}){step}")
    print(f"linear fit: base {base * 1e3:.2f} ms, {per_pass * 1e3:.2f} ms per extra pass, {per_token * 1e6:.3f} us "
          f"per token: one more pass costs {per_pass / per_token:.0f} tokens (threads {torch.get_num_threads()})")
    print(f"* = the passes price {price:g} picks (price 0 picks 3 on every batch here)")
    print(f"one more pass did not pay when it saved {sorted(unpaid)} tokens, paid when it saved {sorted(paid)}")
    print("RESULT_JSON=" + json.dumps({"rows": a.rows, "price": price, "cells": cells, "paid": paid, "unpaid": unpaid, "base_s": base, "per_pass_s": per_pass,
                                       "per_token_s": per_token, "bucket_cost_tokens": per_pass / per_token,
                                       "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                                       "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
