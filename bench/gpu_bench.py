"""Reward-model training and PPO on a GPU at a size that matters, ours beside TRL (run by ``gpu.sh``).

    bash bench/gpu.sh OUTDIR                             # installs, then: --size gpu
    python bench/gpu_bench.py --size tiny --out OUTDIR   # the same code paths at a CPU smoke size

Size ``gpu``: the workload's Llama widened to about 150M parameters (hidden 1024, MLP 2816, 12 layers,
16 heads; random init), every model in bfloat16. Reward model: the reference workload's first 2048
pairs, one epoch, batch 16; TRL's RewardTrainer with its defaults, with length grouping
(``train_sampling_strategy="group_by_length"``), and ours (``core.reward_model.train_reward_model``
with its defaults). PPO: response length 128, batch 32, 4 updates, 1 PPO epoch, ours
(``bench_ppo.py``'s run) beside TRL 1.12's PPO (``trl_ppo_cell.py`` in ``.venv-trl112``, or the interpreter
named by ``$TRL112_PYTHON``; recorded as skipped when absent).

Each side runs in a child forked from this process (imports paid once; the parent never touches
CUDA). Writes ``OUTDIR/gpu_bench.json``: throughput, peak memory (``torch.cuda.max_memory_allocated``
on a GPU, peak RSS on CPU), parameter counts and the ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BASELINES = HERE / "baselines"  # TRL's RewardTrainer and PPO runs, the reference workload
SIZES = {
    "gpu": dict(hidden=1024, intermediate=2816, layers=12, heads=16, dtype="bfloat16", rm_pairs=2048, rm_batch=16,
                ppo_batch=32, response_length=128, ppo_updates=4),
    "tiny": dict(hidden=32, intermediate=64, layers=1, heads=2, dtype="bfloat16", rm_pairs=16, rm_batch=8,
                 ppo_batch=4, response_length=8, ppo_updates=2),
}


WORKLOAD: dict = {}  # the workload and its tokenizer, built once before the sides fork


def peak_memory_mib() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rm_side(side: str, size: dict) -> dict:
    """One reward-model training run: ``trl_default``, ``trl_best`` or ``ours``."""
    import pandas as pd
    import torch
    import workload as W
    from bench_ppo import resize
    from transformers import AutoModelForSequenceClassification

    gpu = torch.cuda.is_available()
    wl, tok = WORKLOAD["wl"], WORKLOAD["tok"]
    rows = wl["train"][: size["rm_pairs"]]
    ids = pd.DataFrame({s: [tok(r["prompt"] + r[s] + tok.eos_token)["input_ids"] for r in rows]
                        for s in ("chosen", "rejected")}).rename(columns=lambda s: f"{s}_ids")
    cfg = resize(W.llama_config(len(tok), tok), size["hidden"], size["layers"], size["heads"], size["intermediate"])
    cfg.num_labels = 1
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=getattr(torch, size["dtype"]))
    n_params = sum(p.numel() for p in model.parameters())
    common = dict(num_train_epochs=1, per_device_train_batch_size=size["rm_batch"], learning_rate=1e-4)
    if side == "ours":
        from calibrated_rlhf.core.reward_model import RewardTrainingParams, train_reward_model

        params = RewardTrainingParams(**common, lr_scheduler_type="linear", warmup_steps=0, logging_steps=10,
                                      bf16=gpu and size["dtype"] == "bfloat16")
        _, history = train_reward_model(model, tok, ids, None, params)
        end = [p for p in history if "train_runtime" in p][-1]
        runtime, loss = end["train_runtime"], end.get("train_loss")
    else:
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer

        data = {"chosen_ids": list(ids["chosen_ids"]), "rejected_ids": list(ids["rejected_ids"])}
        extra = {}
        if side == "trl_best":  # the library's own means; the length column must survive column pruning
            data["length"] = [max(len(c), len(r)) for c, r in zip(data["chosen_ids"], data["rejected_ids"])]
            extra = {"train_sampling_strategy": "group_by_length", "remove_unused_columns": False}
        args = RewardConfig(output_dir=f"/tmp/gpu-bench-rm-{os.getpid()}", center_rewards_coefficient=0.01,
                            bf16=gpu and size["dtype"] == "bfloat16", gradient_checkpointing=False, report_to=[],
                            logging_steps=10, max_length=None, seed=0, disable_tqdm=True, save_strategy="no",
                            **common, **extra)
        out = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data), processing_class=tok).train()
        runtime, loss = out.metrics["train_runtime"], out.metrics.get("train_loss")
    return {"side": side, "n_params": n_params, "n_pairs": len(rows), "train_runtime_s": runtime,
            "pairs_per_s": len(rows) / runtime, "train_loss": loss, "peak_memory_mib": peak_memory_mib()}


def ppo_ours(size: dict) -> dict:
    from bench_ppo import single

    r = single(1, size["ppo_updates"] * size["ppo_batch"], "separate", None, size["ppo_batch"],
               size["response_length"], size["hidden"], size["layers"], size["heads"], size["intermediate"],
               size["dtype"])
    return {"side": "ours", "n_params_policy": r["n_params_policy"], "episodes_per_s": r["steady_state_episodes_per_s"],
            "train_wall_s": r["train_wall_s"], "peak_memory_mib": r["peak_memory_mib"]}


def ppo_trl(size: dict) -> dict:
    trl_py = Path(os.environ.get("TRL112_PYTHON", REPO / ".venv-trl112" / "bin" / "python"))
    if not trl_py.exists():
        return {"side": "trl", "skipped": f"no TRL 1.12 environment at {trl_py} (gpu.sh creates it)"}
    cmd = [str(trl_py), str(HERE / "trl_ppo_cell.py"), "--hidden", str(size["hidden"]), "--layers", str(size["layers"]),
           "--heads", str(size["heads"]), "--intermediate", str(size["intermediate"]), "--dtype", size["dtype"],
           "--batch", str(size["ppo_batch"]), "--response-length", str(size["response_length"]),
           "--updates", str(size["ppo_updates"])]
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", ANCHOR_OUT="/tmp/gpu-bench-anchor")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"side": "trl", "error": proc.stderr[-3000:]}
    r = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT_JSON=")][-1][len("RESULT_JSON="):])
    return {"side": "trl", "episodes_per_s": r["steady_state_episodes_per_s"], "train_wall_s": r["train_wall_s"],
            "peak_memory_mib": r["peak_memory_mib"]}


def _child(conn, fn, args) -> None:
    try:
        conn.send(fn(*args))
    except Exception:  # noqa: BLE001 - reported in the JSON, the other sides still run
        conn.send({"error": traceback.format_exc()[-3000:]})
    finally:
        conn.close()


def forked(fn, *args) -> dict:
    """Run ``fn(*args)`` in a forked child: its own peak memory, no second interpreter start-up."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args))
    proc.start()
    send.close()
    out = recv.recv() if recv.poll(None) else {"error": "no result"}
    proc.join()
    return out


def ratio(a: dict, b: dict, key: str) -> float | None:
    return a[key] / b[key] if key in a and key in b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="gpu")
    ap.add_argument("--out", required=True, help="folder for gpu_bench.json")
    a = ap.parse_args()
    sys.path[:0] = [str(BASELINES), str(HERE)]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import importlib.metadata as md

    import datasets  # noqa: F401 - imported once here, inherited by every forked side
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import calibrated_rlhf.core.ppo  # noqa: F401
    import calibrated_rlhf.core.reward_model  # noqa: F401

    import workload as W

    WORKLOAD["wl"] = W.build_workload()
    WORKLOAD["tok"] = W.build_tokenizer(WORKLOAD["wl"])
    size = SIZES[a.size]
    t0 = time.perf_counter()
    rm = {side: forked(rm_side, side, size) for side in ("trl_default", "trl_best", "ours")}
    ppo = {"ours": forked(ppo_ours, size), "trl": ppo_trl(size)}
    device = forked(lambda: {"cuda": __import__("torch").cuda.is_available(),
                             "name": (__import__("torch").cuda.get_device_name(0)
                                      if __import__("torch").cuda.is_available() else platform.processor() or "cpu")})
    out = {
        "size": a.size, "config": size, "device": device, "wall_s": time.perf_counter() - t0,
        "versions": {p: md.version(p) for p in ("torch", "transformers", "trl", "accelerate")},
        "reward_model": rm, "ppo": ppo,
        "ratios": {
            "rm_ours_over_trl_default": ratio(rm["ours"], rm["trl_default"], "pairs_per_s"),
            "rm_trl_best_over_trl_default": ratio(rm["trl_best"], rm["trl_default"], "pairs_per_s"),
            "ppo_ours_over_trl": ratio(ppo["ours"], ppo["trl"], "episodes_per_s"),
        },
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    path = Path(a.out) / "gpu_bench.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({"ratios": out["ratios"], "wall_s": round(out["wall_s"], 1)}))
    print(f"wrote {path}")
    failed = [f"{k}/{s}" for k, d in (("reward_model", rm), ("ppo", ppo)) for s, r in d.items() if "error" in r]
    if failed:
        raise SystemExit(f"sides failed: {failed} (tracebacks in {path})")


if __name__ == "__main__":
    main()
