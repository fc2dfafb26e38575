"""Reward-model training: this pipeline against TRL's RewardTrainer, defaults and best settings, per seed.

One run, each side in a fresh process, the sides interleaved seed by seed (2 cores):

    python bench/bench_reward_model.py --repeats 3       # seeds 0, 1, 2
    python bench/bench_reward_model.py --repeats 1 --pairs 1024 --threads 1   # a quick look on a busy host

1. Exports the anchor workload's pairs as JSONL (``bench/baselines/workload.py --export``); ``--pairs N``
   keeps the first N training pairs (every side reads the same file).
2. TRL default: a plain ``RewardTrainer`` with the anchor's settings (``trl_reward_trainer.py``: the anchor's
   tokenizer and 2-layer Llama, 1 epoch, batch 16, lr 1e-3, centering 0.01, max_length 128), seed s.
3. TRL best: the same plus the library's own means against padding: ``train_sampling_strategy=
   "group_by_length"`` with a ``length`` column (the longer side of each pair: the collator pads both
   sides to one width) and ``remove_unused_columns=False`` (otherwise the column is dropped before the
   sampler reads it, and the sampler fails looking for ``input_ids``).
4. Pipeline: ``kedro run --env reference_workload --pipelines data_prep,reward_model`` in-process, with
   ``backbone.seed`` and ``reward_model.training.seed`` = s (its defaults: padding-free
   pair batches, length grouping off, see ``RewardTrainingParams``).
5. Every trained model is scored on the same test pairs (the pipeline's test split of the held-out file).

Train pairs/s is ``n_train / train_runtime`` (the Trainer's own figure) on every side; checkpoints are off
on every side. Prints per-side means over seeds of pairs/s and test accuracy, peak RSS, and the ratios
(of the means, and the median of the per-seed ratios). Writes ``bench/results/reward_model.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from paths import BASELINES
from paths import REPO as ROOT

EXPORT_DIR = ROOT / "data" / "01_raw" / "reference_workload"
RESULTS = ROOT / "bench" / "results"
SIDES = ("trl_default", "trl_best", "pipeline")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_pipeline(scratch: Path, seed: int) -> dict:
    """Run data_prep + reward_model through Kedro in this process; report what the MLflow run holds."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
    os.chdir(ROOT)
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from mlflow import MlflowClient

    bootstrap_project(ROOT)
    t0 = time.perf_counter()
    runtime = {"backbone": {"seed": seed}, "reward_model": {"training": {"seed": seed}}}
    with KedroSession.create(project_path=ROOT, env="reference_workload", runtime_params=runtime) as session:
        session.run(pipeline_names=["data_prep", "reward_model"])
    wall = time.perf_counter() - t0
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("calibrated_rlhf").experiment_id],
                             order_by=["start_time DESC"])[0]
    m = run.data.metrics
    return {
        "side": "pipeline",
        "seed": seed,
        "seed_params_logged": {k: v for k, v in run.data.params.items() if k.endswith("seed")},
        "n_train_pairs": m["data/n_train"],
        "train_runtime_s": m["rm/train/runtime_s"],
        "train_pairs_per_s": m["data/n_train"] / m["rm/train/runtime_s"],
        "kedro_run_wall_s": wall,
        "peak_rss_mib": peak_rss_mib(),
        "test_pairs_version": run.data.tags.get("provenance/loaded/test_pairs"),
        "model_dir": str(ROOT / "data" / "06_models" / "reward_model"
                         / run.data.tags.get("provenance/loaded/reward_model") / "reward_model"),
        "tokenizer_dir": str(ROOT / "data" / "06_models" / "tokenizer"
                             / run.data.tags.get("provenance/loaded/tokenizer") / "tokenizer"),
    }


def child_trl(scratch: Path, seed: int, best: bool) -> dict:
    """TRL's RewardTrainer on the exported pairs, set up as the anchor does; ``best`` adds length grouping."""
    sys.path.insert(0, str(BASELINES))
    import torch
    import workload as W
    from datasets import Dataset, disable_progress_bar
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    disable_progress_bar()
    tok = W.build_tokenizer(W.build_workload())
    rows = [json.loads(line) for line in (EXPORT_DIR / "train.jsonl").read_text().splitlines()]
    cfg = W.llama_config(len(tok), tok)
    cfg.num_labels = 1
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    if best:  # tokenized up front (as TRL does: prompt + completion + eos), so lengths are known
        ids = {side: [tok(r["prompt"] + r[side] + tok.eos_token)["input_ids"] for r in rows]
               for side in ("chosen", "rejected")}
        train = Dataset.from_dict({"chosen_ids": ids["chosen"], "rejected_ids": ids["rejected"],
                                   "length": [max(len(c), len(r)) for c, r in zip(ids["chosen"], ids["rejected"])]})
        extra = {"train_sampling_strategy": "group_by_length", "remove_unused_columns": False}
    else:
        train = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        extra = {}
    out_dir = scratch / f"trl_{'best' if best else 'default'}_{seed}"
    args = RewardConfig(output_dir=str(out_dir), center_rewards_coefficient=0.01, per_device_train_batch_size=16,
                        num_train_epochs=1, learning_rate=1e-3, bf16=False, gradient_checkpointing=False,
                        report_to=[], logging_steps=50, max_length=128, seed=seed, use_cpu=True,
                        disable_tqdm=True, save_strategy="no", **extra)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    n_train = len(trainer.train_dataset)
    out = trainer.train()
    trainer.save_model(str(out_dir / "model"))
    tok.save_pretrained(str(out_dir / "model"))
    return {"side": "trl_best" if best else "trl_default", "seed": seed, "n_train_pairs": n_train,
            "train_runtime_s": out.metrics["train_runtime"],
            "train_pairs_per_s": n_train / out.metrics["train_runtime"], "peak_rss_mib": peak_rss_mib(),
            "model_dir": str(out_dir / "model"), "tokenizer_dir": str(out_dir / "model")}


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"child failed: {' '.join(args)}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT_JSON=")][-1]
    return json.loads(line[len("RESULT_JSON="):])


def score_on_test(model_dir: str, tokenizer_dir: str, test_version: str) -> float:
    """Accuracy of a saved model on the pipeline's test split, scored the pipeline's way."""
    import pandas as pd
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from calibrated_rlhf.core.preferences import tokenize_pairs
    from calibrated_rlhf.core.reward_model import pair_metrics, score_pairs

    test = pd.read_parquet(ROOT / "data" / "03_primary" / "test_pairs.parquet" / test_version / "test_pairs.parquet")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    r_c, r_r = score_pairs(model, tokenize_pairs(test, tok), tok.pad_token_id)
    return pair_metrics(r_c, r_r)["accuracy"]


def export(pairs: int | None) -> None:
    subprocess.run([sys.executable, str(BASELINES / "workload.py"), "--export", str(EXPORT_DIR)], check=True)
    if pairs:
        path = EXPORT_DIR / "train.jsonl"
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:pairs]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="seeds 0..N-1, each side once per seed")
    ap.add_argument("--pairs", type=int, default=None, help="train on the first N pairs only (quick looks)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every child (OMP_NUM_THREADS); on a crowded host 1 avoids spin-waits")
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child == "pipeline":
        print("RESULT_JSON=" + json.dumps(child_pipeline(Path(a.scratch), a.seed)))
        return
    if a.child:
        print("RESULT_JSON=" + json.dumps(child_trl(Path(a.scratch), a.seed, best=a.child == "trl_best")))
        return

    if not BASELINES.is_dir():
        raise SystemExit(f"the anchors are not at {BASELINES}")
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    export(a.pairs)
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    with tempfile.TemporaryDirectory(prefix="bench-rm-") as scratch:
        for seed in range(a.repeats):
            for side in SIDES:  # interleaved: a drift of the shared host hits every side alike
                print(f"[seed {seed}] {side} ...", flush=True)
                runs[side].append(run_child([__file__, "--child", side, "--seed", str(seed), "--scratch", scratch]))
        test_version = runs["pipeline"][-1]["test_pairs_version"]
        for side in SIDES:
            for r in runs[side]:
                r["test_accuracy"] = score_on_test(r["model_dir"], r["tokenizer_dir"], test_version)
                print(f"[seed {r['seed']}] {side}: {r['train_pairs_per_s']:.1f} pairs/s, "
                      f"test accuracy {r['test_accuracy']:.4f}", flush=True)

    mean = statistics.fmean
    summary: dict = {"repeats": a.repeats, "pairs": a.pairs, "threads": a.threads, "sides": {}, "ratios": {}}
    for side in SIDES:
        summary["sides"][side] = {
            "train_pairs_per_s_mean": mean(r["train_pairs_per_s"] for r in runs[side]),
            "test_accuracy_mean": mean(r["test_accuracy"] for r in runs[side]),
            "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in runs[side]),
            "n_train_pairs": runs[side][-1]["n_train_pairs"],
        }
    for num, den in (("pipeline", "trl_default"), ("trl_best", "trl_default"), ("pipeline", "trl_best")):
        summary["ratios"][f"{num}/{den}"] = {
            "of_means": summary["sides"][num]["train_pairs_per_s_mean"] / summary["sides"][den]["train_pairs_per_s_mean"],
            "median_per_seed": statistics.median(n["train_pairs_per_s"] / d["train_pairs_per_s"]
                                                 for n, d in zip(runs[num], runs[den])),
        }
    summary["runs"] = runs
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reward_model.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'':30}{'TRL default':>13}{'TRL best':>13}{'pipeline':>13}")
    s = summary["sides"]
    print(f"{'train pairs/s (mean of seeds)':30}" + "".join(f"{s[k]['train_pairs_per_s_mean']:13.1f}" for k in SIDES))
    print(f"{'test accuracy (mean of seeds)':30}" + "".join(f"{s[k]['test_accuracy_mean']:13.4f}" for k in SIDES))
    print(f"{'peak RSS MiB (median)':30}" + "".join(f"{s[k]['peak_rss_mib_median']:13.0f}" for k in SIDES))
    for name, r in summary["ratios"].items():
        print(f"throughput ratio {name}: {r['of_means']:.3f} (median of per-seed ratios {r['median_per_seed']:.3f})")
    print(f"wrote {RESULTS / 'reward_model.json'}")


if __name__ == "__main__":
    main()
