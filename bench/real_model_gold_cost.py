"""What the hidden-state gold costs on RL's hot path, against the reward model's scoring of the same batch.

PPO and RLOO log ``rewards/gold`` for every batch, so on the real task each batch runs the 135M gold model once
beside the reward model. This times both over one batch of the task's own samples (the reward model untrained:
its cost does not depend on its weights), so the gold's share of a PPO update (``ppo/perf/update_s``) can be read.

    python bench/real_model_gold_cost.py [MODEL_FOLDER] [TASK_FOLDER] [--batch 16] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from calibrated_rlhf.core.backbone import BackboneParams, build_reward_backbone, load_tokenizer
from calibrated_rlhf.core.gold import load_gold
from calibrated_rlhf.core.scoring import RewardScorer


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default="data/01_raw/smollm2-135m-instruct")
    parser.add_argument("task", nargs="?", default="data/01_raw/real_task")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in open(Path(args.task) / "samples.jsonl", encoding="utf-8")]
    pairs = [(r["prompt"], s) for r in rows for s in r["samples"]][: args.batch]
    prompts = [[{"role": "user", "content": p}] for p, _ in pairs]
    responses = [s for _, s in pairs]
    gold = load_gold(json.loads((Path(args.task) / "gold_task.json").read_text()))
    tokenizer = load_tokenizer(args.model)
    scorer = RewardScorer(build_reward_backbone(BackboneParams(name_or_path=args.model), tokenizer).eval(),
                          tokenizer)
    gold.gold_rewards(prompts[:1], responses[:1])  # loads the gold's model once, as the first batch of a run does
    reward_s = best_of(args.repeats, lambda: scorer.score(prompts, responses))
    gold_s = best_of(args.repeats, lambda: gold.gold_rewards(prompts, responses))
    print(f"batch of {len(pairs)}: reward model {reward_s:.2f} s, gold {gold_s:.2f} s "
          f"(gold / reward model {gold_s / reward_s:.2f}x)")


if __name__ == "__main__":
    main()
