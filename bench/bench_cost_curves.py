"""Cost curves: how throughput and peak memory grow with the work, ours beside TRL in every cell.

    python bench/bench_cost_curves.py            # full sweep (about 10 min on an idle 2-core host)
    python bench/bench_cost_curves.py --quick    # two points per axis, short runs (about 3 min)
    python bench/bench_cost_curves.py --only rm --rm-seq-len 32 64 128 --no-write   # reward-model cells only
    python bench/bench_cost_curves.py --only rm --no-write --rm-repeats 3 --rm-params '{}' \
        --rm-params '{"speed": {"bucket_cost_tokens": 0}}'   # two settings of ours beside TRL, interleaved, median of 3

PPO (``bench_ppo.py --single`` against TRL 1.12's PPO through the anchor, ``trl_ppo_cell.py``, in
``.venv-trl112``; cells without that venv show ours only), one axis at a time around the anchor's point
(hidden 128, response length 24, batch 16, 1 PPO epoch): model width 128/256/512, response length
24/48/96, batch 8/16/32. Throughput is steady-state episodes/s (episodes over updates x median update).

Reward model (``core.reward_model.train_reward_model`` with its defaults against a plain TRL
``RewardTrainer``, both on the workload's Llama): sequence length, with each sequence's length drawn
uniformly from [L/4, L], random tokens, batch 16, one epoch. Throughput is pairs/s of the Trainer's runtime.

Every point is a fresh process; peak memory is its peak RSS on CPU, ``torch.cuda.max_memory_allocated``
on a GPU. Writes ``bench/results/cost_curves.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from paths import BASELINES, HERE, TRL_PY

RESULTS = HERE / "results"
BASE = {"hidden": 128, "response_length": 24, "batch": 16}
FULL = {"hidden": [128, 256, 512], "response_length": [24, 48, 96], "batch": [8, 16, 32], "rm_seq_len": [32, 64, 128, 256]}
QUICK = {"hidden": [128, 256], "response_length": [24, 48], "batch": [8, 16], "rm_seq_len": [32, 96]}


def peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rm_child(side: str, seq_len: int, n_pairs: int, overrides: dict) -> dict:
    """One reward-model training run on random pairs of lengths in [seq_len/4, seq_len]."""
    sys.path.insert(0, str(BASELINES))
    import numpy as np
    import pandas as pd
    import torch
    import workload as W
    from transformers import AutoModelForSequenceClassification

    tok = W.build_tokenizer(W.build_workload())
    rng = np.random.default_rng(0)

    def seq() -> list[int]:
        return [tok.bos_token_id, *rng.integers(4, len(tok), int(rng.integers(seq_len // 4, seq_len)) - 1).tolist()]

    pairs = pd.DataFrame({"chosen_ids": [seq() for _ in range(n_pairs)], "rejected_ids": [seq() for _ in range(n_pairs)]})
    cfg = W.llama_config(len(tok), tok)
    cfg.num_labels, cfg.max_position_embeddings = 1, max(256, seq_len)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32).to(device)
    if side == "ours":
        from calibrated_rlhf.core.reward_model import RewardTrainingParams, train_reward_model

        params = RewardTrainingParams(num_train_epochs=1, per_device_train_batch_size=16, lr_scheduler_type="linear",
                                      warmup_steps=0, logging_steps=50, **overrides)
        _, history = train_reward_model(model, tok, pairs, None, params)
        runtime = [p for p in history if "train_runtime" in p][-1]["train_runtime"]
    else:
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(output_dir=os.path.join("/tmp", f"cost-rm-{os.getpid()}"), center_rewards_coefficient=0.01,
                            per_device_train_batch_size=16, num_train_epochs=1, learning_rate=1e-3, bf16=False,
                            gradient_checkpointing=False, report_to=[], logging_steps=50, max_length=None, seed=0,
                            disable_tqdm=True, save_strategy="no")
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_pandas(pairs), processing_class=tok)
        runtime = trainer.train().metrics["train_runtime"]
    return {"kind": "rm", "side": side, "seq_len": seq_len, "n_pairs": n_pairs, "train_runtime_s": runtime,
            "pairs_per_s": n_pairs / runtime, "peak_mib": peak_memory_mib()}


def run(cmd: list[str]) -> dict:
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false",
               ANCHOR_OUT=os.path.join("/tmp", "cost-curves-anchor"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"child failed: {' '.join(cmd)}")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT_JSON=")][-1][len("RESULT_JSON="):])


def ppo_cells(grid: dict) -> list[dict]:
    """One axis at a time around BASE; the base point once."""
    cells = [dict(BASE)]
    for axis in ("hidden", "response_length", "batch"):
        cells += [{**BASE, axis: v} for v in grid[axis] if v != BASE[axis]]
    return cells


def ppo_point(cell: dict, updates: int, have_trl: bool) -> list[dict]:
    out = []
    ours = run([sys.executable, str(HERE / "bench_ppo.py"), "--single", "--ppo-epochs", "1", "--total-episodes",
                str(updates * cell["batch"]), "--batch", str(cell["batch"]), "--response-length",
                str(cell["response_length"]), "--hidden", str(cell["hidden"])])
    out.append({"kind": "ppo", "side": "ours", **cell, "episodes_per_s": ours["steady_state_episodes_per_s"],
                "peak_mib": ours["peak_rss_mib"]})
    if have_trl:
        trl = run([str(TRL_PY), str(HERE / "trl_ppo_cell.py"), "--hidden", str(cell["hidden"]), "--batch",
                   str(cell["batch"]), "--response-length", str(cell["response_length"]), "--updates", str(updates)])
        out.append({"kind": "ppo", "side": "trl", **cell, "episodes_per_s": trl["steady_state_episodes_per_s"],
                    "peak_mib": trl["peak_rss_mib"]})
    return out


def table(points: list[dict]) -> str:
    rows = ["| workload | cell | ours /s | TRL /s | ours / TRL | ours peak MiB | TRL peak MiB |", "|---|---|---|---|---|---|---|"]

    def pair(match):
        got = {p["side"]: p for p in points if match(p)}
        return got.get("ours"), got.get("trl")

    seen = set()
    for p in points:
        key = (p["kind"], p.get("hidden"), p.get("response_length"), p.get("batch"), p.get("seq_len"))
        if p["side"] == "trl" or (key, p.get("variant", 0)) in seen:
            continue
        seen.add((key, p.get("variant", 0)))
        o, t = p, pair(lambda q: (q["kind"], q.get("hidden"), q.get("response_length"), q.get("batch"), q.get("seq_len")) == key)[1]
        rate = "episodes_per_s" if p["kind"] == "ppo" else "pairs_per_s"
        cell = (f"hidden {p['hidden']}, response {p['response_length']}, batch {p['batch']}" if p["kind"] == "ppo"
                else f"max length {p['seq_len']}, {p['n_pairs']} pairs" + (f", {json.dumps(p['params'])}" if p.get("params") else ""))
        name = "PPO episodes" if p["kind"] == "ppo" else "reward-model pairs"
        tr = f"{t[rate]:.1f}" if t else "-"
        ratio = f"{o[rate] / t[rate]:.2f}" if t else "-"
        tm = f"{t['peak_mib']:.0f}" if t else "-"
        rows.append(f"| {name} | {cell} | {o[rate]:.1f} | {tr} | {ratio} | {o['peak_mib']:.0f} | {tm} |")
    return "\n".join(rows) + "\n"


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = [("hidden", "PPO: model width (hidden)"), ("response_length", "PPO: response length (tokens)"),
                 ("batch", "PPO: batch (episodes/update)"), ("seq_len", "reward model: max sequence length")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for col, (axis, label) in enumerate(axes_spec):
        for side, style in (("ours", "o-"), ("trl", "s--")):
            if axis == "seq_len":
                pts = sorted((p for p in points if p["kind"] == "rm" and p["side"] == side and not p.get("variant")),
                             key=lambda p: p["seq_len"])
                rate = "pairs_per_s"
            else:
                others = [a for a in BASE if a != axis]
                pts = sorted((p for p in points if p["kind"] == "ppo" and p["side"] == side
                              and all(p[a] == BASE[a] for a in others)), key=lambda p: p[axis])
                rate = "episodes_per_s"
            if not pts:
                continue
            xs = [p[axis] for p in pts]
            axes[0, col].plot(xs, [p[rate] for p in pts], style, label="ours" if side == "ours" else "TRL")
            axes[1, col].plot(xs, [p["peak_mib"] for p in pts], style, label="ours" if side == "ours" else "TRL")
        axes[0, col].set_title(label, fontsize=10)
        axes[0, col].set_ylabel("pairs/s" if axis == "seq_len" else "episodes/s")
        axes[1, col].set_ylabel("peak memory (MiB)")
        axes[1, col].set_xlabel(label.split(": ")[1])
        ticks = sorted({x for line in axes[0, col].get_lines() for x in line.get_xdata()})
        for r in (0, 1):
            axes[r, col].set_xscale("log", base=2)
            axes[r, col].set_xticks(ticks, [str(int(t)) for t in ticks])
            axes[r, col].minorticks_off()
            axes[r, col].grid(alpha=0.3)
            axes[r, col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two points per axis, short runs")
    ap.add_argument("--no-trl", action="store_true", help="ours only")
    ap.add_argument("--replot", action="store_true", help="redraw the PNG and table from cost_curves.json")
    ap.add_argument("--only", choices=("ppo", "rm"), help="run one workload's cells only")
    ap.add_argument("--rm-seq-len", type=int, nargs="+", help="reward-model maximum lengths (default: the grid's)")
    ap.add_argument("--no-write", action="store_true",
                    help="print the table only, leaving bench/results as it is (for partial runs)")
    ap.add_argument("--rm-repeats", type=int, default=1,
                    help="reward-model runs per side and cell, interleaved; each cell reports the median pairs/s")
    ap.add_argument("--rm-params", action="append",
                    help='JSON overrides of our RewardTrainingParams, e.g. \'{"speed": {"length_buckets": 1}}\'; '
                    "given several times, each is one more side of ours, interleaved with the others (the plot shows the first)")
    ap.add_argument("--rm-pairs", type=int, default=None, help="pairs per reward-model run (default 256, quick 64)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every child (OMP_NUM_THREADS); on a crowded host 1 avoids spin-waits")
    ap.add_argument("--rm-child", nargs=4, metavar=("SIDE", "SEQ_LEN", "N_PAIRS", "PARAMS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rm_child:
        side, seq_len, n, overrides = a.rm_child
        print("RESULT_JSON=" + json.dumps(rm_child(side, int(seq_len), int(n), json.loads(overrides))))
        return
    if a.replot:
        points = json.loads((RESULTS / "cost_curves.json").read_text())["points"]
        (RESULTS / "cost_curves.md").write_text(table(points))
        plot(points, RESULTS / "cost_curves.png")
        return
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    grid, updates, n_pairs = (QUICK, 3, 64) if a.quick else (FULL, 4, 256)
    n_pairs = a.rm_pairs or n_pairs
    variants = [json.loads(v) for v in a.rm_params or ["{}"]]
    have_trl = TRL_PY.exists() and not a.no_trl
    if not have_trl:
        print(f"no TRL 1.12 venv at {TRL_PY} (bash bench/baselines/setup_trl112.sh makes it): PPO cells show ours only", flush=True)
    t0 = time.perf_counter()
    points: list[dict] = []
    for cell in ppo_cells(grid) if a.only != "rm" else []:
        points += ppo_point(cell, updates, have_trl)
        print(json.dumps(points[-2:] if have_trl else points[-1:]), flush=True)
    for seq_len in (a.rm_seq_len or grid["rm_seq_len"]) if a.only != "ppo" else []:
        sides = [("ours", v) for v in variants] + [("trl", {})]
        runs: list[list[dict]] = [[] for _ in sides]
        for _ in range(a.rm_repeats):  # interleaved: a drift of the shared host hits every side alike
            for (side, params), got in zip(sides, runs):
                got.append(run([sys.executable, __file__, "--rm-child", side, str(seq_len), str(n_pairs),
                                json.dumps(params)]))
                print(json.dumps({**got[-1], "params": params}), flush=True)
        for i, ((side, params), got) in enumerate(zip(sides, runs)):
            mid = sorted(got, key=lambda p: p["pairs_per_s"])[len(got) // 2]
            points.append({**mid, "params": params, "variant": i if side == "ours" else 0,
                           "pairs_per_s_runs": [p["pairs_per_s"] for p in got]})
    summary = {"quick": a.quick, "ppo_updates": updates, "rm_pairs": n_pairs, "rm_params": variants,
               "threads": a.threads,
               "sweep_wall_s": time.perf_counter() - t0, "points": points}
    if a.no_write:
        print(table(points))
        print(f"took {summary['sweep_wall_s']:.0f} s")
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cost_curves.json").write_text(json.dumps(summary, indent=1))
    (RESULTS / "cost_curves.md").write_text(table(points))
    plot(points, RESULTS / "cost_curves.png")
    print(table(points))
    print(f"sweep took {summary['sweep_wall_s']:.0f} s; wrote {RESULTS}/cost_curves.{{json,md,png}}")


if __name__ == "__main__":
    main()
