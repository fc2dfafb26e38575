"""Reward-model training: this pipeline against a plain TRL RewardTrainer script, on the reference workload.

One run, each side in a fresh process, one after the other (2 cores):

    python bench/bench_reward_model.py [--repeats 3]

1. Exports the anchor workload's pairs as JSONL (``../shared/anchors/workload.py --export``).
2. Pipeline: ``kedro run --env reference_workload --pipelines data_prep,reward_model`` in-process (a
   KedroSession) with MLflow in a scratch sqlite store; TRL's train runtime read from the run.
3. Plain TRL: the anchor script ``trl_reward_trainer.py --single`` (same model, tokenizer recipe and
   settings: 1 epoch, batch 16, lr 1e-3, centering 0.01, max_length 128).
4. Both trained models are scored on the same test pairs (the pipeline's test split of the held-out file).

Prints train pairs/s of each, their ratio (pipeline / TRL), test accuracy of each and peak RSS.
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

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = ROOT.parent / "shared" / "anchors"
EXPORT_DIR = ROOT / "data" / "01_raw" / "reference_workload"
RESULTS = ROOT / "bench" / "results"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_pipeline(scratch: Path) -> dict:
    """Run data_prep + reward_model through Kedro in this process; report what the MLflow run holds."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
    os.chdir(ROOT)
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from mlflow import MlflowClient

    bootstrap_project(ROOT)
    t0 = time.perf_counter()
    with KedroSession.create(project_path=ROOT, env="reference_workload") as session:
        session.run(pipeline_names=["data_prep", "reward_model"])
    wall = time.perf_counter() - t0
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("calibrated_rlhf").experiment_id],
                             order_by=["start_time DESC"])[0]
    m = run.data.metrics
    n_train = m["data/n_train"]
    return {
        "side": "pipeline",
        "n_train_pairs": n_train,
        "train_wall_s": m["rm/train/runtime_s"],
        "train_pairs_per_s": n_train / m["rm/train/runtime_s"],
        "kedro_run_wall_s": wall,
        "test_accuracy": m["rm/test_accuracy"],
        "test_bayes_accuracy": m["rm/test_bayes_accuracy"],
        "peak_rss_mib": peak_rss_mib(),
        "test_pairs_version": run.data.tags.get("provenance/loaded/test_pairs"),
        "reward_model_version": run.data.tags.get("provenance/loaded/reward_model"),
        "tokenizer_version": run.data.tags.get("provenance/loaded/tokenizer"),
    }


def run_child(args: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"child failed: {' '.join(args)}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT_JSON=")][-1]
    return json.loads(line[len("RESULT_JSON="):])


def score_on_test(model_dir: Path, tokenizer_dir: Path, test_version: str) -> float:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="fresh-process runs of each side (medians reported)")
    ap.add_argument("--child", choices=["pipeline"], help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT_JSON=" + json.dumps(child_pipeline(Path(a.scratch))))
        return

    if not ANCHORS.is_dir():
        raise SystemExit(f"the anchors are not at {ANCHORS}")
    subprocess.run([sys.executable, str(ANCHORS / "workload.py"), "--export", str(EXPORT_DIR)], check=True)
    pipeline_runs, trl_runs = [], []
    with tempfile.TemporaryDirectory(prefix="bench-rm-") as scratch:
        for i in range(a.repeats):
            print(f"[{i + 1}/{a.repeats}] pipeline ...", flush=True)
            pipeline_runs.append(run_child([__file__, "--child", "pipeline", "--scratch", scratch]))
            print(f"[{i + 1}/{a.repeats}] plain TRL RewardTrainer ...", flush=True)
            trl_runs.append(run_child([str(ANCHORS / "trl_reward_trainer.py"), "--single"],
                                      env={"ANCHOR_OUT": scratch}))
        last = pipeline_runs[-1]
        models = ROOT / "data" / "06_models"
        ours_test = score_on_test(models / "reward_model" / last["reward_model_version"] / "reward_model",
                                  models / "tokenizer" / last["tokenizer_version"] / "tokenizer",
                                  last["test_pairs_version"])
        theirs = Path(scratch) / "artifacts" / "rm_trl116"  # the anchor saves its tokenizer beside the model
        trl_test = score_on_test(theirs, theirs, last["test_pairs_version"])

    med = statistics.median
    ours_pps = med(r["train_pairs_per_s"] for r in pipeline_runs)
    trl_pps = med(r["train_pairs_per_s"] for r in trl_runs)
    summary = {
        "repeats": a.repeats,
        "pipeline": {"train_pairs_per_s": ours_pps, "test_accuracy": ours_test,
                     "peak_rss_mib": med(r["peak_rss_mib"] for r in pipeline_runs),
                     "kedro_run_wall_s": med(r["kedro_run_wall_s"] for r in pipeline_runs),
                     "n_train_pairs": last["n_train_pairs"]},
        "trl": {"train_pairs_per_s": trl_pps, "test_accuracy": trl_test,
                "heldout_accuracy_all_1024": med(r["heldout_accuracy"] for r in trl_runs),
                "peak_rss_mib": med(r["peak_rss_mib"] for r in trl_runs),
                "n_train_pairs": trl_runs[-1]["n_train_pairs_after_max_length_filter"]},
        "throughput_ratio_pipeline_over_trl": ours_pps / trl_pps,
        "test_bayes_accuracy": last["test_bayes_accuracy"],
        "runs": {"pipeline": pipeline_runs, "trl": [{k: v for k, v in r.items() if k not in ("log_history",
                                                                                              "step_s_all")}
                                                    for r in trl_runs]},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reward_model.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'':28}{'pipeline':>12}{'plain TRL':>12}")
    print(f"{'train pairs/s (median)':28}{ours_pps:12.1f}{trl_pps:12.1f}")
    print(f"{'test accuracy (same pairs)':28}{ours_test:12.4f}{trl_test:12.4f}   Bayes {last['test_bayes_accuracy']:.4f}")
    print(f"{'peak RSS MiB (median)':28}{summary['pipeline']['peak_rss_mib']:12.0f}{summary['trl']['peak_rss_mib']:12.0f}")
    print(f"throughput ratio pipeline / TRL: {summary['throughput_ratio_pipeline_over_trl']:.3f}")
    print(f"wrote {RESULTS / 'reward_model.json'}")


if __name__ == "__main__":
    main()
