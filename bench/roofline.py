"""A roofline for this host: each workload's achieved float32 FLOP/s against the measured matrix-product peak.

    python bench/roofline.py                 # tiny workload and SmolLM2-135M's shape, 2 threads
    python bench/roofline.py --quick         # tiny only, few repeats: a smoke run (well under a minute)
    python bench/roofline.py --threads 1 --repeats 5

1. The float32 matrix-product peak: best of N timed ``torch.mm`` at every GEMM shape a workload runs (its
   linear layers' forward ``X @ W``, input gradient ``dY @ W^T`` and weight gradient ``X^T @ dY``) and at one
   large square size, the host's reference peak.
2. Memory bandwidth: sum and copy of a 256 MiB float32 tensor (far beyond the 32 MiB L3).
3. For the tiny default backbone (conf/base/parameters.yml) and SmolLM2-135M's architecture (random weights:
   FLOPs and timings do not depend on the weights), the best of ``--repeats`` timed runs of
   a. a reward-model training step (forward, backward, AdamW step) on a batch of pairs;
   b. a PPO update step: policy (causal LM) and value model forward and backward, both AdamW steps;
   c. the rollout: KV-cached token-by-token sampling, the plain transformers loop and the project's lean
      decoding step (``core.speed.fast_decode``).
   FLOPs are counted from the shapes (never a profiler's count); see ``flops_forward``.
4. Prints one table and writes ``bench/results/roofline.{json,md}``.

Every workload runs at fixed sequence lengths without padding, through the models' plain transformers forward
(the project's padding-free batches and trimmed last layer do less work for the same result; they are not
what this measures).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from paths import REPO

RESULTS = REPO / "bench" / "results"

# The tiny default of conf/base/parameters.yml (backbone); its tokenizer has 512 entries (vocab_size).
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
# SmolLM2-135M's published config; random weights.
SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


@dataclass
class Shapes:
    """One model's workloads. ``rm_*``: reward-model training (sequences = 2 x pairs); ``ppo_*``: PPO's batch,
    prompt and response lengths, shared by the update and the rollout."""
    name: str
    config: dict
    rm_sequences: int
    rm_tokens: int
    ppo_batch: int
    ppo_prompt: int
    ppo_response: int
    repeat_factor: int = 1  # the tiny model's runs take well under a second: more of them, for a steadier best


WORKLOADS = {
    # 32 pairs (reward_model per_device_train_batch_size) of ~40 tokens (the synthetic task's pairs run
    # 23-110 tokens, most near 40); PPO: batch_size 32, response_length 24, prompts ~16 tokens.
    "tiny": Shapes("tiny (h128, 2 layers)", TINY, rm_sequences=64, rm_tokens=40, ppo_batch=32, ppo_prompt=16,
                   ppo_response=24, repeat_factor=5),
    # bench/real_model_steps.py's 16 x 64 reward step; PPO 16 x (40 + 32).
    "smollm2-135m": Shapes("SmolLM2-135M shape", SMOL, rm_sequences=16, rm_tokens=64, ppo_batch=16,
                           ppo_prompt=40, ppo_response=32),
}


def llama_config(shape: Shapes, num_labels: int = 1) -> LlamaConfig:
    # sdpa is transformers' default kernel on CPU, as in the pipeline (backbone.attn_implementation: null)
    return LlamaConfig(**shape.config, num_labels=num_labels, pad_token_id=0, attn_implementation="sdpa")


def linear_dims(cfg: dict) -> list[tuple[str, int, int]]:
    """(name, in, out) of one decoder layer's linear maps."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return [("q", h, h), ("k", h, kv), ("v", h, kv), ("o", h, h), ("gate", h, i), ("up", h, i), ("down", i, h)]


def flops_forward(cfg: dict, tokens: int, seq: int, head_out: int, head_tokens: int | None = None) -> dict:
    """Forward FLOPs of ``tokens`` tokens in sequences of ``seq``, 2 per multiply-add:

    - linear: 2 x (every decoder layer's q, k, v, o, gate, up, down weights) per token;
    - attention: Q K^T and A V, 2 x seq x head_dim per head per token each, over the full seq x seq square
      (what the dense kernel computes; the causal half would be half of it), i.e. 4 x layers x seq x hidden
      per token;
    - head: 2 x hidden x ``head_out`` per token it reads (lm_head: the vocabulary; a reward or value head: 1),
      over ``head_tokens`` tokens (default all).
    Not counted: embeddings (a gather), norms, rotary, softmax, activations, residuals, losses, the optimizer:
    elementwise work, timed but not counted.
    """
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    linear_params = layers * sum(i * o for _, i, o in linear_dims(cfg))
    return {
        "linear": 2 * linear_params * tokens,
        "attention": 4 * layers * seq * h * tokens,
        "head": 2 * h * head_out * (tokens if head_tokens is None else head_tokens),
    }


def best_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)  # the host is shared: the best run is the one least disturbed


def where_time_goes(fn) -> dict:
    """One profiled call of ``fn``: the share of its operators' self time in matrix products, the attention
    kernel and everything else (elementwise work, norms, softmax, copies, framework overhead), and the
    top other operators. The profiler only splits the time; FLOPs are never taken from it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    groups: dict[str, float] = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    others: dict[str, float] = {}
    for ev in prof.key_averages():
        name, us = ev.key, ev.self_cpu_time_total
        if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
            groups["matmul"] += us
        elif "scaled_dot_product" in name or "flash_attention" in name:
            groups["attention"] += us
        else:
            groups["other"] += us
            others[name] = us
    total = sum(groups.values()) or 1.0
    top = sorted(others.items(), key=lambda kv: -kv[1])[:6]
    return {"shares": {k: v / total for k, v in groups.items()},
            "top_other": {k: v / total for k, v in top}, "profiled_s": total / 1e6}


def time_training(forward_backward, optimizers: list, repeats: int) -> dict:
    """Best-of timings of a training step, split in its forward+backward and its optimizer steps (one loop,
    so the split costs no extra steps; a 135M step takes many seconds), then one profiled step."""
    def step(times: dict | None = None):
        t0 = time.perf_counter()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        forward_backward()
        t1 = time.perf_counter()
        for opt in optimizers:
            opt.step()
        if times is not None:
            times["fb"].append(t1 - t0)
            times["opt"].append(time.perf_counter() - t1)

    step()  # warm-up: allocates the optimizer state
    times = {"fb": [], "opt": []}
    for _ in range(repeats):
        step(times)
    total = [a + b for a, b in zip(times["fb"], times["opt"])]
    return {"seconds": min(total), "forward_backward_s": min(times["fb"]), "optimizer_s": min(times["opt"]),
            # the optimizer is timed above; the profile splits the forward and backward
            "profile": where_time_goes(lambda: ([o.zero_grad(set_to_none=True) for o in optimizers], forward_backward()))}


# --- 1. matrix-product peak --------------------------------------------------------------------------------

_mm_cache: dict[tuple[int, int, int], float] = {}


def mm_gflops(m: int, k: int, n: int, repeats: int) -> float:
    """Best-of GFLOP/s of ``[m, k] @ [k, n]``, repeated until each timing spans ~20 ms (small GEMMs are
    microseconds; one call would measure the timer)."""
    key = (m, k, n)
    if key not in _mm_cache:
        a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)
        torch.mm(a, b, out=out)
        start, inner = time.perf_counter(), 0
        while time.perf_counter() - start < 0.02:
            torch.mm(a, b, out=out)
            inner += 1
        t = best_time(lambda: [torch.mm(a, b, out=out) for _ in range(inner)], repeats, warmup=0) / inner
        _mm_cache[key] = 2 * m * k * n / t / 1e9
    return _mm_cache[key]


def gemm_bound(cfg: dict, tokens: int, heads: list[int], backward: bool, repeats: int) -> dict:
    """The workload's linear products (layers and head of each model in ``heads``, by its head's outputs)
    timed alone at their measured rates: their FLOPs, the seconds they need, and so the rate ("peak at its
    shapes") they run at in isolation."""
    dims = []
    for head_out in heads:
        dims += [(i, o, cfg["num_hidden_layers"]) for _, i, o in linear_dims(cfg)] + [(cfg["hidden_size"], head_out, 1)]
    flops = seconds = 0.0
    for k, n, count in dims:
        gemms = [(tokens, k, n)]  # forward X @ W
        if backward:
            gemms += [(tokens, n, k), (k, tokens, n)]  # dX = dY @ W^T, dW = X^T @ dY
        for m, kk, nn in gemms:
            f = 2 * m * kk * nn * count
            flops += f
            seconds += f / (mm_gflops(m, kk, nn, repeats) * 1e9)
    return {"flops": flops, "seconds": seconds, "gflops": flops / seconds / 1e9}


# --- 2. memory bandwidth -----------------------------------------------------------------------------------

def bandwidth(repeats: int) -> dict:
    x = torch.randn(64 * 2**20)  # 256 MiB
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    t_sum = best_time(lambda: x.sum(), repeats)
    t_copy = best_time(lambda: y.copy_(x), repeats)
    # copy: bytes read + bytes written (the write-allocate read of y is not counted, so this is a floor)
    return {"sum_GBps": nbytes / t_sum / 1e9, "copy_GBps": 2 * nbytes / t_copy / 1e9}


# --- 3. workloads ------------------------------------------------------------------------------------------

def reward_step(shape: Shapes, repeats: int) -> dict:
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(llama_config(shape))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    n, s = shape.rm_sequences, shape.rm_tokens
    ids = torch.randint(1, shape.config["vocab_size"], (n, s))
    chosen, rejected = slice(0, n // 2), slice(n // 2, n)

    def forward_backward():
        r = model(input_ids=ids).logits.squeeze(-1)
        loss = -torch.nn.functional.logsigmoid(r[chosen] - r[rejected]).mean()  # Bradley-Terry
        loss.backward()

    fwd = flops_forward(shape.config, n * s, s, head_out=1)
    return {"tokens": n * s, "flops": 3 * sum(fwd.values()), "flops_parts": {k: 3 * v for k, v in fwd.items()},
            **time_training(forward_backward, [opt], repeats)}


def ppo_step(shape: Shapes, repeats: int) -> dict:
    torch.manual_seed(0)
    policy = LlamaForCausalLM(llama_config(shape))
    value = LlamaForSequenceClassification(llama_config(shape))
    opt_p = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    opt_v = torch.optim.AdamW(value.parameters(), lr=1e-5)
    b, p, r = shape.ppo_batch, shape.ppo_prompt, shape.ppo_response
    ids = torch.randint(1, shape.config["vocab_size"], (b, p + r))
    adv, ret = torch.randn(b, r), torch.randn(b, r)

    def forward_backward():
        # the plain path: logits at every position (transformers' forward), read at the response's
        logits = policy(input_ids=ids).logits[:, p - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, p:, None]).squeeze(-1)
        (-(torch.exp(logp - logp.detach()) * adv).mean()).backward()  # PPO's ratio term at ratio 1
        v = value.score(value.model(input_ids=ids).last_hidden_state)[:, p - 1:-1, 0]  # a value per position
        ((v - ret) ** 2).mean().backward()

    tokens = b * (p + r)
    pol = flops_forward(shape.config, tokens, p + r, head_out=shape.config["vocab_size"])
    val = flops_forward(shape.config, tokens, p + r, head_out=1)
    parts = {"policy_" + k: 3 * v for k, v in pol.items()} | {"value_" + k: 3 * v for k, v in val.items()}
    return {"tokens": tokens, "flops": sum(parts.values()), "flops_parts": parts,
            **time_training(forward_backward, [opt_p, opt_v], repeats)}


def rollout(shape: Shapes, repeats: int, lean: bool) -> dict:
    """Sample ``ppo_response`` tokens for ``ppo_batch`` prompts; the timed part is the token steps, the prompt's
    prefill is timed apart (it is a batched forward, compute-bound like training)."""
    from calibrated_rlhf.core.speed.config import PPOSpeed
    from calibrated_rlhf.core.speed.fast_decode import Decoding

    torch.manual_seed(0)
    policy = LlamaForCausalLM(llama_config(shape)).eval()
    b, p, r = shape.ppo_batch, shape.ppo_prompt, shape.ppo_response
    ids = torch.randint(1, shape.config["vocab_size"], (b, p))
    mask = torch.ones_like(ids)
    timing = {}

    @torch.no_grad()
    def run():
        t0 = time.perf_counter()
        dec = Decoding(policy, ids, mask, r, speed=PPOSpeed() if lean else None)
        h = dec.h
        t1 = time.perf_counter()
        for t in range(r):
            probs = torch.softmax(policy.lm_head(h).float(), -1)
            tok = torch.multinomial(probs, 1)
            if t < r - 1:
                h = dec.step(tok, t)
        timing["prefill"], timing["decode"] = t1 - t0, time.perf_counter() - t1

    best = None
    for i in range(repeats + 1):
        run()
        if i and (best is None or timing["decode"] < best["decode"]):
            best = dict(timing)
    cfg = shape.config
    h, layers, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv_dim = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    linear_params = layers * sum(i * o for _, i, o in linear_dims(cfg)) + h * v  # layers + lm_head
    # r lm_head reads and r - 1 layer steps; the mean context of a step is p + t
    flops = bytes_ = 0
    for t in range(r):
        ctx = p + t
        flops += 2 * h * v * b + (0 if t == r - 1 else
                                  2 * (linear_params - h * v) * b + 4 * layers * (ctx + 1) * h * b)
        # every weight read once per step (fp32), and the cache's keys and values of every sequence
        bytes_ += 4 * h * v + (0 if t == r - 1 else 4 * (linear_params - h * v) + 4 * 2 * layers * b * (ctx + 1) * kv_dim)
    return {"tokens": b * r, "flops": flops, "bytes": bytes_, "seconds": best["decode"],
            "profile": where_time_goes(run),
            "prefill_s": best["prefill"], "weights_MB": 4 * linear_params / 1e6}


# --- 4. report ---------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs per workload (best kept), after a warm-up; x5 for the tiny model")
    parser.add_argument("--mm-repeats", type=int, default=10, help="timed rounds per GEMM shape (best kept)")
    parser.add_argument("--square", type=int, default=2048, help="size of the square GEMM, the reference peak")
    parser.add_argument("--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="tiny only, 1 repeat, square 1024: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.models, args.repeats, args.mm_repeats, args.square = ["tiny"], 1, 2, 1024
    torch.set_num_threads(args.threads)

    n = args.square
    square = mm_gflops(n, n, n, args.mm_repeats)
    bw = bandwidth(args.repeats + 2)
    print(f"{args.threads} threads; fp32 mm {n}^3: {square:.1f} GFLOP/s; memory: sum {bw['sum_GBps']:.1f} GB/s, "
          f"copy {bw['copy_GBps']:.1f} GB/s", flush=True)

    rows = []
    for key in args.models:
        shape = WORKLOADS[key]
        cfg = shape.config
        vocab, reps = cfg["vocab_size"], args.repeats * shape.repeat_factor
        runs = [("reward-model step", reward_step(shape, reps), [1], True),
                ("PPO update step", ppo_step(shape, reps), [vocab, 1], True),  # policy and value model
                ("rollout, plain", rollout(shape, reps, lean=False), [vocab], False),
                ("rollout, lean step", rollout(shape, reps, lean=True), [vocab], False)]
        for workload, res, heads, backward in runs:
            gemm_tokens = res["tokens"] if backward else shape.ppo_batch  # a decoding step's products have M = batch
            res["gemm"] = gemm_bound(cfg, gemm_tokens, heads, backward, args.mm_repeats)
            if not backward:  # one decoding step's products, run once per response token
                res["gemm"] |= {k: v * shape.ppo_response for k, v in res["gemm"].items() if k != "gflops"}
            achieved = res["flops"] / res["seconds"] / 1e9
            row = {"workload": workload, "model": shape.name, "tokens": res["tokens"], "gflop": res["flops"] / 1e9,
                   "seconds": res["seconds"], "gflops": achieved,
                   "pct_shape_peak": 100 * achieved / res["gemm"]["gflops"], "pct_square_peak": 100 * achieved / square,
                   "detail": res}
            if "bytes" in res:
                row["GBps"] = res["bytes"] / res["seconds"] / 1e9
                row["pct_bandwidth"] = 100 * row["GBps"] / bw["copy_GBps"]
            rows.append(row)
            print(format_row(row), flush=True)

    header = ("| workload | model | tokens | GFLOP counted | s | GFLOP/s | % peak at its shapes | % square peak "
              "| GB/s | % bandwidth |\n|---|---|---|---|---|---|---|---|---|---|")
    table = "\n".join([header] + [format_row(r) for r in rows])
    breakdown = "\n".join([
        "| workload | model | s | its GEMMs alone, s | forward+backward s | optimizer s | profile of forward+backward "
        "or sampling: matmul / attention / other | largest other operators |", "|---|---|---|---|---|---|---|---|"]
        + [format_breakdown(r) for r in rows])
    print("\n" + table + "\n\n" + breakdown)
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {"threads": args.threads, "host": platform.processor() or platform.machine(),
               "torch": torch.__version__, "square_n": n, "square_gflops": square, "bandwidth": bw,
               "mm_gflops": {f"{m}x{k}@{k}x{nn}": g for (m, k, nn), g in sorted(_mm_cache.items())},
               "workloads": {k: asdict(WORKLOADS[k]) for k in args.models}, "rows": rows}
    (RESULTS / "roofline.json").write_text(json.dumps(summary, indent=1))
    (RESULTS / "roofline.md").write_text(
        f"{args.threads} threads; fp32 mm {n}^3: {square:.1f} GFLOP/s; memory: sum {bw['sum_GBps']:.1f} GB/s, "
        f"copy {bw['copy_GBps']:.1f} GB/s\n\n{table}\n\n{breakdown}\n")
    print(f"wrote {RESULTS / 'roofline.json'} and roofline.md")


def format_row(r: dict) -> str:
    bw = f"{r['GBps']:.1f} | {r['pct_bandwidth']:.0f}%" if "GBps" in r else "|"
    return (f"| {r['workload']} | {r['model']} | {r['tokens']} | {r['gflop']:.2f} | {r['seconds']:.3f} | "
            f"{r['gflops']:.1f} | {r['pct_shape_peak']:.0f}% | {r['pct_square_peak']:.0f}% | {bw} |")


def format_breakdown(r: dict) -> str:
    d, sh = r["detail"], r["detail"]["profile"]["shares"]
    fb = f"{d['forward_backward_s']:.3f}" if "forward_backward_s" in d else ""
    opt = f"{d['optimizer_s']:.3f}" if "optimizer_s" in d else ""
    top = ", ".join(f"{k.removeprefix('aten::')} {100 * v:.0f}%" for k, v in list(d["profile"]["top_other"].items())[:4])
    return (f"| {r['workload']} | {r['model']} | {r['seconds']:.3f} | {d['gemm']['seconds']:.3f} | {fb} | {opt} | "
            f"{100 * sh['matmul']:.0f} / {100 * sh['attention']:.0f} / {100 * sh['other']:.0f}% | {top} |")


if __name__ == "__main__":
    main()
