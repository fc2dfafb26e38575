"""Reward-model training on the real model: this pipeline against TRL's RewardTrainer, on one data split.

    python bench/real_model_vs_trl.py                     # the real model folder and task of scripts/real_model.sh
    python bench/real_model_vs_trl.py --pairs 96 --repeats 1   # a quick look

The model is SmolLM2-135M-Instruct as ``scripts/real_model.sh`` writes it (``--model``), the pairs its real task
(``--task``: the model's own samples with a hidden gold). Every side trains what ``conf/real_model`` trains:
LoRA (r 16, alpha 32) on the top 4 layers' linear layers with the score head in full, batch 16, learning
rate 1e-3, centering 0.01, one epoch, the validation split evaluated at the epoch's end. One run, each side in
a fresh process, interleaved seed by seed:

1. Pipeline: ``kedro run --env real_model --pipelines data_prep,reward_model`` in-process, seed s (its speed
   paths on: padding-free pair batches and the trimmed last layer, ``reward_model.training.speed``).
2. TRL default: ``RewardTrainer`` on that run's train and validation splits as conversations (TRL applies
   the chat template and tokenizes), the same LoRA through its ``peft_config``.
   TRL's defaults include activation checkpointing (``RewardConfig``'s default is on): with LoRA, TRL then
   makes the embeddings' output require gradients, so the backward pass runs through every layer, recomputing each.
3. TRL best: the same, pre-tokenized, with ``train_sampling_strategy="group_by_length"`` and a ``length`` column,
   and activation checkpointing off (the pipeline's setting: on 2 cores memory is not what binds).

Every trained model is merged and scored on the pipeline's test split. Train pairs/s is ``n_train /
train_runtime`` (the Trainer's own figure, the end-of-epoch evaluation included on every side); peak RSS is
each child's. Writes ``bench/results/real_model_vs_trl.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench_reward_model import peak_rss_mib, run_child, score_on_test
from paths import REPO as ROOT

RESULTS = ROOT / "bench" / "results"
SIDES = ("pipeline", "trl_default", "trl_best")
MODEL = ROOT / "data" / "01_raw" / "smollm2-135m-instruct"
TASK = ROOT / "data" / "01_raw" / "real_task"


def child_pipeline(scratch: Path, seed: int, pairs_file: Path) -> dict:
    """data_prep + reward_model of the real_model environment in this process; what its MLflow run holds."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
    os.chdir(ROOT)
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from mlflow import MlflowClient

    bootstrap_project(ROOT)
    runtime = {"backbone": {"seed": seed}, "reward_model": {"training": {"seed": seed}},
               "data_prep": {"source": {"path": str(pairs_file)}}}
    t0 = time.perf_counter()
    with KedroSession.create(project_path=ROOT, env="real_model", runtime_params=runtime) as session:
        session.run(pipeline_names=["data_prep", "reward_model"])
    wall = time.perf_counter() - t0
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("calibrated_rlhf").experiment_id],
                             order_by=["start_time DESC"])[0]
    m, tags = run.data.metrics, run.data.tags
    models = ROOT / "data" / "06_models"
    return {"side": "pipeline", "seed": seed, "n_train_pairs": m["data/n_train"],
            "train_runtime_s": m["rm/train/runtime_s"],
            "train_pairs_per_s": m["data/n_train"] / m["rm/train/runtime_s"],
            "kedro_run_wall_s": wall, "peak_rss_mib": peak_rss_mib(),
            "splits": {s: tags.get(f"provenance/loaded/{s}_pairs") for s in ("train", "validation", "test")},
            "model_dir": str(models / "reward_model" / tags["provenance/loaded/reward_model"] / "reward_model"),
            "tokenizer_dir": str(models / "tokenizer" / tags["provenance/loaded/tokenizer"] / "tokenizer")}


def _conversations(split: str, version: str) -> list[dict]:
    """The pipeline's ``split`` at ``version`` as TRL's conversational rows (Parquet's arrays made lists)."""
    import pandas as pd

    from calibrated_rlhf.core.preferences import plain

    name = f"{split}_pairs.parquet"
    df = pd.read_parquet(ROOT / "data" / "03_primary" / name / version / name)
    return [{k: plain(row[k]) for k in ("prompt", "chosen", "rejected")} for _, row in df.iterrows()]


def child_trl(scratch: Path, seed: int, best: bool, model_dir: Path, splits: dict) -> dict:
    """TRL's RewardTrainer on the pipeline's splits, with the environment's LoRA; ``best`` adds length grouping."""
    import torch
    from datasets import Dataset, disable_progress_bar
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    import yaml

    from calibrated_rlhf.core.preferences import render_many

    disable_progress_bar()
    conf = yaml.safe_load((ROOT / "conf" / "real_model" / "parameters.yml").read_text())
    lora = conf["reward_model"]["training"]["lora"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    data = {s: _conversations(s, splits[s]) for s in ("train", "validation")}
    if best:  # TRL's tokenization (render_many is tested equal to it), done up front so lengths are known
        def tokenized(rows: list[dict]) -> Dataset:
            ids = {side: render_many(tok, [r["prompt"] for r in rows], [r[side] for r in rows])
                   for side in ("chosen", "rejected")}
            return Dataset.from_dict({"chosen_ids": ids["chosen"], "rejected_ids": ids["rejected"],
                                      "length": [max(len(c), len(r)) for c, r in zip(ids["chosen"], ids["rejected"])]})
        train, validation = tokenized(data["train"]), tokenized(data["validation"])
        extra = {"train_sampling_strategy": "group_by_length", "remove_unused_columns": False,
                 "activation_checkpointing": False}
    else:
        train, validation = Dataset.from_list(data["train"]), Dataset.from_list(data["validation"])
        extra = {}
    out_dir = scratch / f"trl_{'best' if best else 'default'}_{seed}"
    args = RewardConfig(output_dir=str(out_dir), center_rewards_coefficient=0.01, per_device_train_batch_size=16,
                        per_device_eval_batch_size=32, num_train_epochs=1, learning_rate=1e-3, bf16=False,
                        report_to=[], logging_steps=4, max_length=None, seed=seed, data_seed=seed, use_cpu=True,
                        disable_tqdm=True, save_strategy="no", eval_strategy="epoch", **extra)
    peft = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0, target_modules=lora["target_modules"],
                      task_type="SEQ_CLS", modules_to_save=["score"], bias="none")
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                            processing_class=tok, peft_config=peft)
    n_train = len(trainer.train_dataset)
    out = trainer.train()
    trainer.model.merge_and_unload().save_pretrained(str(out_dir / "model"))
    tok.save_pretrained(str(out_dir / "model"))
    return {"side": "trl_best" if best else "trl_default", "seed": seed, "n_train_pairs": n_train,
            "train_runtime_s": out.metrics["train_runtime"],
            "train_pairs_per_s": n_train / out.metrics["train_runtime"], "peak_rss_mib": peak_rss_mib(),
            "model_dir": str(out_dir / "model"), "tokenizer_dir": str(out_dir / "model")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=MODEL, help="the transformers folder of the real model")
    ap.add_argument("--task", type=Path, default=TASK, help="the real task's folder (pairs.jsonl, gold_task.json)")
    ap.add_argument("--repeats", type=int, default=1, help="seeds 0..N-1, each side once per seed")
    ap.add_argument("--pairs", type=int, default=None, help="the task's first N pairs only (quick looks)")
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    ap.add_argument("--splits", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child == "pipeline":
        print("RESULT_JSON=" + json.dumps(child_pipeline(Path(a.scratch), a.seed, Path(a.scratch) / "pairs.jsonl")))
        return
    if a.child:
        result = child_trl(Path(a.scratch), a.seed, a.child == "trl_best", a.model, json.loads(a.splits))
        print("RESULT_JSON=" + json.dumps(result))
        return
    for path in (a.model, a.task / "pairs.jsonl"):
        if not path.exists():
            raise SystemExit(f"{path} is missing: bash scripts/real_model.sh writes the model folder and the task")

    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    with tempfile.TemporaryDirectory(prefix="bench-real-rm-") as scratch:
        lines = (a.task / "pairs.jsonl").read_text().splitlines(keepends=True)
        (Path(scratch) / "pairs.jsonl").write_text("".join(lines[: a.pairs] if a.pairs else lines))
        for seed in range(a.repeats):
            common = ["--seed", str(seed), "--scratch", scratch, "--model", str(a.model)]
            print(f"[seed {seed}] pipeline ...", flush=True)
            runs["pipeline"].append(run_child([__file__, "--child", "pipeline", *common]))
            splits = json.dumps(runs["pipeline"][-1]["splits"])
            for side in SIDES[1:]:  # the pipeline's own split, so every side trains on the same pairs
                print(f"[seed {seed}] {side} ...", flush=True)
                runs[side].append(run_child([__file__, "--child", side, *common, "--splits", splits]))
            for side in SIDES:
                r = runs[side][-1]
                test_version = runs["pipeline"][-1]["splits"]["test"]
                r["test_accuracy"] = score_on_test(r["model_dir"], r["tokenizer_dir"], test_version)
                print(f"[seed {seed}] {side}: {r['train_pairs_per_s']:.2f} pairs/s, test accuracy "
                      f"{r['test_accuracy']:.4f}, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)

    summary: dict = {"model": str(a.model), "pairs": a.pairs, "repeats": a.repeats, "sides": {}, "ratios": {}}
    for side in SIDES:
        summary["sides"][side] = {k: statistics.fmean(r[k] for r in runs[side])
                                  for k in ("train_pairs_per_s", "test_accuracy", "peak_rss_mib", "n_train_pairs")}
    for den in ("trl_default", "trl_best"):
        summary["ratios"][f"pipeline/{den}"] = (summary["sides"]["pipeline"]["train_pairs_per_s"]
                                                / summary["sides"][den]["train_pairs_per_s"])
    summary["runs"] = runs
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "real_model_vs_trl.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'':24}" + "".join(f"{s:>14}" for s in SIDES))
    for key in ("train_pairs_per_s", "test_accuracy", "peak_rss_mib"):
        print(f"{key:24}" + "".join(f"{summary['sides'][s][key]:14.3f}" for s in SIDES))
    for name, ratio in summary["ratios"].items():
        print(f"throughput ratio {name}: {ratio:.3f}")
    print(f"wrote {RESULTS / 'real_model_vs_trl.json'}")


if __name__ == "__main__":
    main()
