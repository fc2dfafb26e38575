"""RLOO and GRPO on TRL's trainers: the price of the project's calibrated, normalized reward path.

    python bench/rl_reward_path.py                          # the real model, RLOO and GRPO, 4 updates a side
    python bench/rl_reward_path.py --updates 2 --algorithms rloo --repeats 1

Both sides run TRL's trainer on the real model (``--model``, as ``scripts/real_model.sh`` writes it) with
``conf/real_model``'s ``rl`` settings (LoRA on the top 4 layers, 16 completions of up to 32 tokens per update,
4 per prompt), the same seed and the real task's prompts:

- ``calibrated``: the trainer as the ``rl`` pipeline builds it (``core.rl.trainers.build_trainer``): the reward
  is ``ScoreReward`` over ``rl_score_fn`` (each completion decoded in its prompt's context, rendered, scored,
  put through the reward transform's z-score), with the project's KL controller setting beta after each update;
- ``plain``: TRL's own trainer fed the reward model itself, ``reward_funcs=[reward_model]`` (TRL renders prompt
  and completion and reads ``logits[:, 0]``), beta fixed at the same start.

The reward model is the policy's folder with a fresh score head unless ``--reward-model`` names one; the
transform's figures are arbitrary. Neither changes what a step costs. Each side runs in a fresh process,
sides interleaved per repeat. Reported: seconds per update (``train()``'s wall over the updates) and seconds
per completion token (over TRL's ``completions/mean_length``: once the sides' policies part, they may sample
different lengths). Writes ``bench/results/rl_reward_path.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench_reward_model import peak_rss_mib, run_child
from paths import REPO as ROOT

RESULTS = ROOT / "bench" / "results"
SIDES = ("calibrated", "plain")
MODEL = ROOT / "data" / "01_raw" / "smollm2-135m-instruct"
TASK = ROOT / "data" / "01_raw" / "real_task"


def _setup(model_dir: Path, reward_dir: Path | None, task: Path, algorithm: str, updates: int):
    import torch
    import yaml
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from calibrated_rlhf.core.rl.config import RLConfig

    params = {**yaml.safe_load((ROOT / "conf" / "base" / "parameters_rl.yml").read_text())["rl"],
              **yaml.safe_load((ROOT / "conf" / "real_model" / "parameters.yml").read_text())["rl"]}
    fields = {k: v for k, v in params.items() if k in RLConfig.model_fields}
    config = RLConfig(**{**fields, "algorithm": algorithm, "num_updates": updates, "beta": None})
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(reward_dir or model_dir, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tok.pad_token_id
    rows = [json.loads(line) for line in (task / "pairs.jsonl").read_text().splitlines()]
    prompts = list({json.dumps(r["prompt"]): r["prompt"] for r in rows}.values())
    return config, tok, rm.eval(), prompts


def child(side: str, algorithm: str, updates: int, model_dir: Path, reward_dir: Path | None, task: Path,
          scratch: Path) -> dict:
    from calibrated_rlhf.core.normalization import RewardTransform
    from calibrated_rlhf.core.rl.reward import ScoreReward
    from calibrated_rlhf.core.rl.trainers import build_trainer, trl_config
    from calibrated_rlhf.core.scoring import RewardScorer, rl_score_fn

    config, tok, rm, prompts = _setup(model_dir, reward_dir, task, algorithm, updates)
    out = scratch / f"{side}-{algorithm}"
    if side == "calibrated":
        transform = RewardTransform(temperature=1.3, mean=0.2, std=0.9, clip=5.0, computed_on="bench",
                                    reward_model_version=None, n=1)
        reward = ScoreReward(rl_score_fn(RewardScorer(rm, tok, transform), "zscore"), tok)
        trainer, _ = build_trainer(config, model_dir, tok, prompts, reward, out)
    else:
        from datasets import Dataset
        from trl import GRPOTrainer, RLOOTrainer

        from calibrated_rlhf.core.lora import lora_config

        cls = GRPOTrainer if algorithm == "grpo" else RLOOTrainer
        trainer = cls(model=str(model_dir), reward_funcs=[rm], reward_processing_classes=[tok],
                      args=trl_config(config, out), train_dataset=Dataset.from_dict({"prompt": prompts}),
                      processing_class=tok, peft_config=lora_config(config.lora, "CAUSAL_LM"))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    tokens = sum(lengths) * config.batch_size
    return {"side": side, "algorithm": algorithm, "updates": updates, "train_s": wall, "s_per_update": wall / updates,
            "mean_length": statistics.fmean(lengths), "s_per_token": wall / tokens, "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=MODEL, help="the policy's transformers folder (the real model)")
    ap.add_argument("--reward-model", type=Path, default=None, help="a trained reward model's folder (optional)")
    ap.add_argument("--task", type=Path, default=TASK, help="the real task's folder (its prompts)")
    ap.add_argument("--algorithms", nargs="+", default=["rloo", "grpo"], choices=["rloo", "grpo"])
    ap.add_argument("--updates", type=int, default=4, help="updates per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side and algorithm, interleaved")
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--algorithm", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT_JSON=" + json.dumps(child(a.child, a.algorithm, a.updates, a.model, a.reward_model, a.task,
                                                Path(a.scratch))))
        return
    for path in (a.model, a.task / "pairs.jsonl"):
        if not path.exists():
            raise SystemExit(f"{path} is missing: bash scripts/real_model.sh writes the model folder and the task")

    runs: list[dict] = []
    common = ["--model", str(a.model), "--task", str(a.task), "--updates", str(a.updates)]
    common += ["--reward-model", str(a.reward_model)] if a.reward_model else []
    for repeat in range(a.repeats):
        for algorithm in a.algorithms:
            for side in SIDES:
                with tempfile.TemporaryDirectory(prefix="bench-rl-") as scratch:
                    r = run_child([__file__, "--child", side, "--algorithm", algorithm, "--scratch", scratch, *common])
                print(f"[{repeat}] {algorithm} {side}: {r['s_per_update']:.2f} s/update, {r['mean_length']:.1f} "
                      f"tokens/completion, {1e3 * r['s_per_token']:.2f} ms/token, peak RSS {r['peak_rss_mib']:.0f} MiB",
                      flush=True)
                runs.append(r)

    summary: dict = {"model": str(a.model), "updates": a.updates, "repeats": a.repeats, "algorithms": {}}
    for algorithm in a.algorithms:
        per = {s: [r for r in runs if r["algorithm"] == algorithm and r["side"] == s] for s in SIDES}
        med = {s: {k: statistics.median(r[k] for r in per[s]) for k in ("s_per_update", "s_per_token", "mean_length")}
               for s in SIDES}
        summary["algorithms"][algorithm] = {
            **med, "cost_ratio_per_update": med["calibrated"]["s_per_update"] / med["plain"]["s_per_update"],
            "cost_ratio_per_token": med["calibrated"]["s_per_token"] / med["plain"]["s_per_token"]}
        s = summary["algorithms"][algorithm]
        print(f"{algorithm}: calibrated / plain cost {s['cost_ratio_per_update']:.3f} per update, "
              f"{s['cost_ratio_per_token']:.3f} per completion token (medians of {a.repeats})")
    summary["runs"] = runs
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rl_reward_path.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {RESULTS / 'rl_reward_path.json'}")


if __name__ == "__main__":
    main()
