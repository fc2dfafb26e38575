"""How learnable a real-model task's pairs are: a logistic regression on the gold's own features (each response's
frequencies of the gold words, differenced per pair), trained on 3/4 of the prompts and tested on the rest, against
the accuracy of the gold ordering on the same test pairs (docs/real_model.md).

    python bench/real_task_ideal_learner.py [TASK_FOLDER] [--n-words 150 40 20]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize


def features(words: list[str]):
    index = {w: i for i, w in enumerate(words)}

    def of(text: str) -> np.ndarray:
        tokens = re.findall(r"[A-Za-z]+", text.lower())
        v = np.zeros(len(words))
        for t in tokens:
            if t in index:
                v[index[t]] += 1
        return v / max(len(tokens), 1)
    return of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", nargs="?", default="data/01_raw/real_task")
    parser.add_argument("--n-words", type=int, nargs="+", default=[150, 40, 20])
    args = parser.parse_args()
    pairs = pd.read_json(Path(args.task) / "pairs.jsonl", lines=True)
    gold = json.loads((Path(args.task) / "gold_task.json").read_text())
    prompts = pairs["prompt"].map(lambda m: m[0]["content"])
    unique = np.array(sorted(prompts.unique()))
    np.random.default_rng(0).shuffle(unique)
    test = prompts.isin(set(unique[: len(unique) // 4])).to_numpy()
    bayes_order = np.mean(pairs["gold_chosen"][test] > pairs["gold_rejected"][test])
    for n_words in args.n_words:
        of = features(gold["words"][:n_words])
        x = np.array([of(c[0]["content"]) - of(r[0]["content"]) for c, r in zip(pairs["chosen"], pairs["rejected"])])
        train = x[~test]
        w = minimize(lambda w: np.mean(np.logaddexp(0, -(train @ w))) + 1e-4 * w @ w, np.zeros(n_words),
                     method="L-BFGS-B").x
        print(f"{n_words} gold words: test accuracy {np.mean(x[test] @ w > 0):.3f} ({(~test).sum()} train pairs); "
              f"gold ordering on the same test pairs {bayes_order:.3f}")


if __name__ == "__main__":
    main()
