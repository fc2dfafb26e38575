"""Real-text evidence from a project's newest runs: what the trained policies write, how far their text is from
the reference's, and where each run lands on gold against KL.

``python -m calibrated_rlhf.runtime.real_evidence [--out FILE]`` reads, from the project folder it runs in, the
newest completed ``reference_policy``, ``policy`` (PPO) and ``rl_policy`` (RLOO or GRPO), the test prompts
and the run's gold (``synthetic_task``), and writes one Markdown file:

* ``--n-show`` test prompts with the reference's and each policy's response, sampled with one seed;
* the reference's per-token NLL of each policy's samples beside the NLL of its own samples on the same
  prompts (how far from the reference's text a policy moved), with the gold of both;
* every run in the MLflow store with an evaluation: its method, KL target, second-half KL, evaluation KL and
  gold gain with its 95% interval (the gold-against-KL points).

Nothing is trained; the file is written to a staging name and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd


def newest(project: Path, filepath: str) -> Path | None:
    """The newest completed version of a versioned catalog entry, or None when no run saved one."""
    root = project / filepath
    done = sorted(p for p in root.iterdir() if (p / "_complete.json").exists()) if root.is_dir() else []
    return done[-1] / root.name if done else None


def sample_with(model, tokenizer, prompts: list, n: int, max_new_tokens: int, seed: int):
    from calibrated_rlhf.core.policy import decode_samples, sample_ids

    rows = sample_ids(model, tokenizer, prompts, n, max_new_tokens, seed=seed)
    return rows, decode_samples(tokenizer, rows)


def per_token_nll(reference, rows, pad_token_id: int) -> np.ndarray:
    from calibrated_rlhf.core.evaluation import sequence_logprobs

    logp = sequence_logprobs(reference, [r[1] for r in rows], [r[2] for r in rows], pad_token_id)
    return -logp / np.array([max(len(r[2]), 1) for r in rows])


def gold_against_kl(project: Path) -> pd.DataFrame:
    import mlflow

    from calibrated_rlhf.reporting.table import comparison_table

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["calibrated_rlhf"], order_by=["attributes.start_time ASC"])
    table = comparison_table(runs)
    cols = ["run_id", "method", "kl_target", "kl_second_half_mean", "kl_reference", "gold_gain", "gold_gain_ci_low",
            "gold_gain_ci_high", "rm_accuracy", "rm_bayes_accuracy"]
    return table.loc[table["gold_gain"].notna(), cols]


def markdown(table: pd.DataFrame) -> list[str]:
    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    return (["| " + " | ".join(table.columns) + " |", "|" + " --- |" * len(table.columns)]
            + ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)])


def main(argv: list[str] | None = None) -> int:
    import torch

    from calibrated_rlhf.core.backbone import BackboneParams, build_causal_backbone, load_tokenizer
    from calibrated_rlhf.core.gold import load_gold
    from calibrated_rlhf.core.preferences import distinct_prompts

    parser = argparse.ArgumentParser(prog="python -m calibrated_rlhf.runtime.real_evidence",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/08_reporting/real_evidence.md")
    parser.add_argument("--n-show", type=int, default=5)
    parser.add_argument("--n-prompts", type=int, default=32, help="test prompts for the NLL and gold figures")
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    project = Path.cwd()
    folders = {"reference": newest(project, "data/06_models/reference_policy"),
               "PPO": newest(project, "data/06_models/policy"), "RL": newest(project, "data/06_models/rl_policy")}
    if folders["reference"] is None or (folders["PPO"] is None and folders["RL"] is None):
        print("error: no completed run saved a reference policy and a trained policy here")
        return 1
    tokenizer = load_tokenizer(str(newest(project, "data/06_models/tokenizer")))
    test = pd.read_parquet(newest(project, "data/03_primary/test_pairs.parquet"))
    prompts = distinct_prompts(test)[: args.n_prompts]
    gold = load_gold(json.loads(newest(project, "data/01_raw/synthetic_task.json").read_text()))
    models = {name: build_causal_backbone(BackboneParams(name_or_path=str(f)), tokenizer).eval()
              for name, f in folders.items() if f is not None}
    torch.manual_seed(args.seed)
    samples = {name: sample_with(m, tokenizer, prompts, args.samples_per_prompt, args.max_new_tokens, args.seed)
               for name, m in models.items()}
    lines = ["# Real-text evidence", "", f"Policies: {', '.join(f'{k} `{v.parent.name}`' for k, v in folders.items() if v)}."
             f" {len(prompts)} test prompts x {args.samples_per_prompt} samples, seed {args.seed}.", "",
             "## Responses side by side", ""]
    names = list(samples)
    lines += ["| prompt | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    step = args.samples_per_prompt
    for i in range(min(args.n_show, len(prompts))):
        cells = [samples[n][1][i * step].replace("\n", " ").replace("|", "/") for n in names]
        lines.append(f"| {prompts[i][-1]['content'] if isinstance(prompts[i], list) else prompts[i]} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## The reference's per-token NLL of each policy's samples, and their gold", "",
              "| samples of | per-token NLL under the reference | gold (mean) |", "| --- | --- | --- |"]
    for name in names:
        rows, texts = samples[name]
        nll = per_token_nll(models["reference"], rows, tokenizer.pad_token_id)
        g = gold.gold_rewards([r[0] for r in rows], texts)
        lines.append(f"| {name} | {nll.mean():.3f} ± {1.96 * nll.std(ddof=1) / np.sqrt(len(nll)):.3f} "
                     f"| {g.mean():+.3f} |")
    lines += ["", "## Gold against KL: every evaluated run in the store", "", *markdown(gold_against_kl(project)), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial")
    staging.write_text("\n".join(lines), encoding="utf-8")
    os.replace(staging, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
