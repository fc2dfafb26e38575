"""Benchmarks for calibration: this project's exact temperature fit against the common LBFGS recipe.

Section ``calibration``: at each N, the median wall time (``--repeats`` runs) and the fitted
temperature of

* ``fit_temperature`` (float64 safeguarded Newton on 1/T; the timing includes input validation), and
* the LBFGS recipe as usually written (float32 torch, timed around the single ``opt.step`` call)::

      T = nn.Parameter(torch.ones(1)); opt = LBFGS([T], lr=0.1, max_iter=100)
      closure: loss = BCELoss()(sigmoid(m / T.clamp(min=1e-3)), y); loss.backward()

with the time ratio, the relative difference of the two temperatures, and how much higher the
float64 NLL is at the LBFGS temperature. ``T err`` is the relative error of ``fit_temperature``
against an independent, untimed float64 Newton solve on all data (tolerance 1e-14). The data match ``bench/baselines/calibration_anchor.py``
(seed 0 per N): ``z ~ N(0, 1.5^2)``, ``y ~ Bernoulli(sigmoid(z))``, ``margins = 2.5 z`` as float32.

Usage::

    python bench/bench_calibration.py                              # both sections, --ns 1e4,1e5,1e6,1e7 --repeats 3
    python bench/bench_calibration.py --ns 1e4,1e5 --repeats 5

Section ``scoring``: reward-model scoring throughput (pairs/s) with length-sorted batches against
batches in input order, on the reference workload's held-out pairs (its tokenizer and 2-layer Llama,
``bench/baselines/workload.py``), batch 64, median of ``--repeats``; the scores of both must agree.

Results go to ``bench/results/<section>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from calibrated_rlhf.core.calibration import fit_temperature, preference_nll

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"

TRUE_TEMPERATURE = 2.5
Z_STD = 1.5


# --------------------------------------------------------------------------------------------------
# Shared helpers


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def parse_ns(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part.strip()]


def write_json(section: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{section}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


# --------------------------------------------------------------------------------------------------
# Section: calibration


def make_calibration_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 margins and labels exactly as the reference anchor draws them."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, Z_STD, size=n)
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    margins = (TRUE_TEMPERATURE * z).astype(np.float32)
    return margins, labels


def time_fit_temperature(margins: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    start = time.perf_counter()
    fit = fit_temperature(margins, labels)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "temperature": fit.temperature, "n_iter": fit.n_iter,
            "n_subsample_iter": fit.n_subsample_iter}


def time_lbfgs_recipe(margins: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    temperature = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.LBFGS([temperature], lr=0.1, max_iter=100)
    bce = torch.nn.BCELoss()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = bce(torch.sigmoid(margins / torch.clamp(temperature, min=1e-3)), labels)
        loss.backward()
        return loss

    start = time.perf_counter()
    opt.step(closure)
    seconds = time.perf_counter() - start
    state = opt.state[temperature]
    return {"seconds": seconds, "temperature": float(temperature.detach()),
            "n_iter": int(state["n_iter"]), "func_evals": int(state["func_evals"])}


def reference_temperature(margins: np.ndarray, labels: np.ndarray, tol: float = 1e-14) -> float:
    """Independent check (untimed): plain float64 Newton on inv_temperature from 0, full data every step."""
    m = margins.astype(np.float64)
    y = labels.astype(np.float64)
    inv_temperature = 0.0
    for _ in range(100):
        p = 0.5 * (1.0 + np.tanh(0.5 * inv_temperature * m))
        step = np.mean((p - y) * m) / np.mean(p * (1.0 - p) * m * m)
        inv_temperature -= step
        if abs(step) < tol * inv_temperature:
            return 1.0 / inv_temperature
    raise RuntimeError("reference Newton did not converge")


def run_calibration(ns: list[int], repeats: int) -> dict[str, Any]:
    per_n = {}
    for n in ns:
        margins, labels = make_calibration_data(n)
        margins_t, labels_t = torch.from_numpy(margins), torch.from_numpy(labels)
        ours, lbfgs = [], []
        for _ in range(repeats):
            lbfgs.append(time_lbfgs_recipe(margins_t, labels_t))
            ours.append(time_fit_temperature(margins, labels))
        t_ours = statistics.median(r["seconds"] for r in ours)
        t_lbfgs = statistics.median(r["seconds"] for r in lbfgs)
        temp_ours, temp_lbfgs = ours[0]["temperature"], lbfgs[0]["temperature"]
        temp_reference = reference_temperature(margins, labels)
        per_n[str(n)] = {
            "fit_temperature": {"seconds_median": t_ours, "seconds_all": [r["seconds"] for r in ours], **{
                k: v for k, v in ours[0].items() if k != "seconds"}},
            "lbfgs_recipe_f32": {"seconds_median": t_lbfgs, "seconds_all": [r["seconds"] for r in lbfgs], **{
                k: v for k, v in lbfgs[0].items() if k != "seconds"}},
            "reference_temperature": temp_reference,
            "temperature_rel_err_vs_reference": (temp_ours - temp_reference) / temp_reference,
            "speedup": t_lbfgs / t_ours,
            "temperature_rel_diff": (temp_lbfgs - temp_ours) / temp_ours,
            # >= 0 when ours is the maximum-likelihood temperature: what stopping early costs.
            "nll_excess_at_lbfgs_temperature": preference_nll(margins, temp_lbfgs, labels)
            - preference_nll(margins, temp_ours, labels),
        }
        print_calibration_row(n, per_n[str(n)])
    return {
        "section": "calibration",
        "true_temperature": TRUE_TEMPERATURE,
        "z_std": Z_STD,
        "repeats": repeats,
        "per_n": per_n,
    }


def print_calibration_header() -> None:
    print(f"{'N':>10} | {'fit_temperature':>15} {'T':>10} {'T err':>9} | {'LBFGS f32':>10} {'T':>10} | "
          f"{'speedup':>8} {'T rel diff':>11} {'NLL excess':>11}", flush=True)


def print_calibration_row(n: int, row: dict[str, Any]) -> None:
    ours, lbfgs = row["fit_temperature"], row["lbfgs_recipe_f32"]
    print(f"{n:>10} | {ours['seconds_median'] * 1e3:>12.1f} ms {ours['temperature']:>10.6f} "
          f"{row['temperature_rel_err_vs_reference']:>9.1e} | "
          f"{lbfgs['seconds_median']:>8.2f} s {lbfgs['temperature']:>10.6f} | "
          f"{row['speedup']:>7.0f}x {row['temperature_rel_diff']:>11.2e} "
          f"{row['nll_excess_at_lbfgs_temperature']:>11.2e}", flush=True)


# --------------------------------------------------------------------------------------------------
# Scoring throughput: length-sorted vs unsorted batches


def run_scoring(ns: list[int], repeats: int, batch_size: int = 64) -> dict[str, Any]:
    """Pairs/s of ``score_pairs``-style scoring with and without sorting by length (ns is unused)."""
    from transformers import AutoModelForSequenceClassification

    from calibrated_rlhf.core.preferences import MarginParams, standardize, tokenize_pairs
    from calibrated_rlhf.core.reward_model import score_sequences

    sys.path.insert(0, str(HERE / "baselines"))
    import workload as W  # the baselines' reference workload

    wl = W.build_workload()
    tok = W.build_tokenizer(wl)
    cfg = W.llama_config(len(tok), tok)
    cfg.num_labels = 1
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    import pandas as pd

    pairs = standardize(pd.DataFrame(wl["heldout"]), MarginParams(enabled=False))
    ids = tokenize_pairs(pairs, tok)
    seqs = [list(x) for x in ids["chosen_ids"]] + [list(x) for x in ids["rejected_ids"]]
    lengths = np.array([len(x) for x in seqs])
    out: dict[str, Any] = {"n_pairs": len(pairs), "batch_size": batch_size,
                           "length_min_mean_max": [int(lengths.min()), float(lengths.mean()), int(lengths.max())]}
    scores = {}
    for name, sort in (("sorted", True), ("unsorted", False)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            scores[name] = score_sequences(model, seqs, tok.pad_token_id, batch_size, sort_by_length=sort)
            times.append(time.perf_counter() - t0)
        out[name] = {"seconds_median": float(np.median(times)), "pairs_per_s": len(pairs) / float(np.median(times))}
    out["max_abs_score_diff"] = float(np.max(np.abs(scores["sorted"] - scores["unsorted"])))
    out["speedup_sorted_over_unsorted"] = out["sorted"]["pairs_per_s"] / out["unsorted"]["pairs_per_s"]
    print(f"{'sorted':>10} {out['sorted']['pairs_per_s']:10.0f} pairs/s | {'unsorted':>10} "
          f"{out['unsorted']['pairs_per_s']:10.0f} pairs/s | ratio {out['speedup_sorted_over_unsorted']:.2f}x | "
          f"max |score diff| {out['max_abs_score_diff']:.1e}", flush=True)
    return out


def print_scoring_header() -> None:
    print("reward-model scoring on the reference workload's held-out pairs, batch 64")


# --------------------------------------------------------------------------------------------------
# Driver


SECTIONS: dict[str, tuple[Callable[[], None], Callable[..., dict[str, Any]]]] = {
    "calibration": (print_calibration_header, run_calibration),
    "scoring": (print_scoring_header, run_scoring),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="calibration,scoring", help=f"comma-separated, of {sorted(SECTIONS)}")
    parser.add_argument("--ns", default="1e4,1e5,1e6,1e7", help="comma-separated problem sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per size and method (median)")
    args = parser.parse_args(argv)

    for section in args.sections.split(","):
        if section not in SECTIONS:
            sys.exit(f"unknown section {section!r}; choose from {sorted(SECTIONS)}")
        header, run = SECTIONS[section]
        print(f"== {section} (median of {args.repeats})")
        header()
        # Other work on a 2-core machine skews timings; record how busy it was around the run.
        load_before = os.getloadavg()
        result = run(parse_ns(args.ns), args.repeats)
        result |= {
            "command": " ".join([sys.executable, *sys.argv]),
            "environment": environment(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "peak_rss_mib": peak_rss_mib(),
        }
        print(f"load average (1 min) before/after: {load_before[0]:.2f} / {result['loadavg_after'][0]:.2f}")
        print("wrote", write_json(section, result))


if __name__ == "__main__":
    main()
