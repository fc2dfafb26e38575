"""How closely each KL controller holds its target, per RL method, from the runs of a sweep (scripts/kl_sweep.sh).

One row per run: method, controller, target, seed, learning rate, the KL over the second half of training and
its error against the target (``core.kl_tracking``, what each stage logs), the final beta, and the evaluation
protocol's KL to the reference and gold gain. The summary groups the seeds of one setting and states whether
every seed landed within the tolerance; the figure puts achieved KL against target on log axes with the
tolerance band, one panel per method. Plain pandas: ``main`` reads MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.reporting.table import as_float, comparison_table, with_current_keys

TOLERANCE = 0.10  # issue 29: the second-half KL within 10% of the target
METHODS = ("ppo", "rloo", "grpo")
# where each method logs its seed and step (flattened parameter keys)
SEED_PARAMS = {"ppo": "ppo.trainer.seed", "rloo": "rl.seed", "grpo": "rl.seed"}
LR_PARAMS = {"ppo": "ppo.trainer.learning_rate", "rloo": "rl.learning_rate", "grpo": "rl.learning_rate"}
RUN_COLUMNS = ["run_id", "method", "kl_control", "learning_rate", "kl_target", "seed", "kl_second_half_mean",
               "kl_tracking_error", "final_beta", "kl_reference", "gold_gain"]


def sweep_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per PPO, RLOO or GRPO run that logged its KL tracking (:data:`RUN_COLUMNS`)."""
    runs = with_current_keys(runs)
    table = comparison_table(runs)
    rows = []
    for (_, run), (_, row) in zip(runs.iterrows(), table.iterrows()):
        method = row["method"]
        if method not in METHODS or math.isnan(as_float(row["kl_second_half_mean"])):
            continue
        rows.append({"run_id": row["run_id"], "method": method, "kl_control": row["kl_control"],
                     "learning_rate": as_float(run.get(f"params.{LR_PARAMS[method]}")),
                     "kl_target": as_float(row["kl_target"]), "seed": run.get(f"params.{SEED_PARAMS[method]}"),
                     "kl_second_half_mean": as_float(row["kl_second_half_mean"]),
                     "kl_tracking_error": as_float(row["kl_tracking_error"]),
                     "final_beta": as_float(row["final_beta"]),
                     "kl_reference": as_float(run.get(f"metrics.{keys.EVAL_KL_REFERENCE}")),
                     "gold_gain": as_float(run.get(f"metrics.{keys.EVAL_GOLD_GAIN}"))})
    order = {m: i for i, m in enumerate(METHODS)}
    frame = pd.DataFrame(rows, columns=RUN_COLUMNS)
    return frame.sort_values(["method", "kl_control", "learning_rate", "kl_target", "seed"],
                             key=lambda c: c.map(order) if c.name == "method" else c, kind="stable"
                             ).reset_index(drop=True)


def with_earlier_runs(runs: pd.DataFrame, earlier: Sequence[str | Path]) -> pd.DataFrame:
    """``runs`` and the rows of earlier sweeps' ``runs.csv`` files (runs logged to a store no longer at hand, whose
    settings the code still reproduces), in :func:`sweep_runs`' order. A run id in both is taken from ``runs``; a
    file without :data:`RUN_COLUMNS` is refused, naming the file and the columns it lacks."""
    frames = [runs]
    for path in earlier:
        frame = pd.read_csv(path, dtype={"run_id": str, "seed": str})
        missing = [c for c in RUN_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{path}: not a KL-sweep runs.csv, it lacks {missing}")
        frames.append(frame[RUN_COLUMNS])
    merged = pd.concat(frames, ignore_index=True).drop_duplicates("run_id", keep="first")
    order = {m: i for i, m in enumerate(METHODS)}
    return merged.sort_values(["method", "kl_control", "learning_rate", "kl_target", "seed"],
                              key=lambda c: c.map(order) if c.name == "method" else c, kind="stable"
                              ).reset_index(drop=True)


def summary(runs: pd.DataFrame, tolerance: float = TOLERANCE) -> pd.DataFrame:
    """Per (method, controller, learning rate, target): seeds, mean achieved KL, the largest |error| over the
    seeds, and whether every seed is within ``tolerance``."""
    groups = runs.groupby(["method", "kl_control", "learning_rate", "kl_target"], sort=False)
    out = groups.agg(seeds=("seed", "size"), kl_second_half_mean=("kl_second_half_mean", "mean"),
                     worst_abs_error=("kl_tracking_error", lambda e: float(np.abs(e).max())),
                     gold_gain=("gold_gain", "mean")).reset_index()
    out["within_tolerance"] = out["worst_abs_error"] <= tolerance
    return out


def achieved_figure(runs: pd.DataFrame, tolerance: float = TOLERANCE) -> Figure:
    """Second-half KL against target on log axes, one panel per method, one marker per controller and run,
    with the line achieved = target and its +-tolerance band."""
    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, len(METHODS), sharey=True)
    targets = np.array(sorted(runs["kl_target"].dropna().unique())) if len(runs) else np.array([1.0])
    lo, hi = targets.min() / 1.5, targets.max() * 1.5
    grid = np.geomspace(lo, hi, 50)
    styles = {"pi": ("o", "C0"), "adaptive": ("x", "C3"), "fixed": ("s", "C7")}
    for ax, method in zip(axes, METHODS):
        ax.fill_between(grid, grid * (1 - tolerance), grid * (1 + tolerance), color="0.85",
                        label=f"target +-{tolerance:.0%}")
        ax.plot(grid, grid, color="0.4", lw=0.8)
        mine = runs[runs["method"] == method]
        default_lr = mine["learning_rate"].mode()
        for ctl, group in mine.groupby("kl_control", sort=True):
            marker, color = styles.get(str(ctl), ("^", "C2"))
            same_lr = group[group["learning_rate"].isin(default_lr)]
            ax.scatter(same_lr["kl_target"], same_lr["kl_second_half_mean"], marker=marker, color=color,
                       label={"pi": "pi (PI on log beta)", "adaptive": "adaptive (Ziegler)"}.get(str(ctl), str(ctl)))
            other = group[~group["learning_rate"].isin(default_lr)]
            for _, r in other.iterrows():
                ax.scatter([r["kl_target"]], [r["kl_second_half_mean"]], marker=marker, facecolors="none",
                           edgecolors=color)
                ax.annotate(f"lr {r['learning_rate']:g}", (r["kl_target"], r["kl_second_half_mean"]), fontsize=7,
                            xytext=(4, -3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_xticks(targets)  # plain numbers at the targets, not powers of ten
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.set_title(method.upper())
        ax.set_xlabel("KL target, nats per sequence")
    axes[0].set_ylabel("second-half KL, nats per sequence")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def _cell(group: pd.DataFrame) -> str:
    return ", ".join(f"{k:.2f} ({e:+.0%})" for k, e in zip(group["kl_second_half_mean"], group["kl_tracking_error"]))


def markdown(runs: pd.DataFrame, summ: pd.DataFrame, tolerance: float = TOLERANCE) -> str:
    """The achieved-KL table (targets x method and controller, each seed's KL and error) and the verdict."""
    from calibrated_rlhf.reporting.render import markdown_table

    lines = ["# KL control: second-half KL against target", ""]
    default_lr = runs.groupby("method")["learning_rate"].agg(lambda s: s.mode().iloc[0]) if len(runs) else {}
    cols = [(m, c) for m in METHODS for c in ("pi", "adaptive")
            if ((runs["method"] == m) & (runs["kl_control"] == c)).any()]
    rows = []
    for target in sorted(runs["kl_target"].unique()):
        row = {"target": f"{target:g}"}
        for m, c in cols:
            sel = runs[(runs["method"] == m) & (runs["kl_control"] == c) & (runs["kl_target"] == target)
                       & (runs["learning_rate"] == default_lr[m])]
            row[f"{m} {c}"] = _cell(sel)
        rows.append(row)
    lines += [f"Each cell: every seed's second-half KL (its error against the target), at the learning rate most of "
              f"the method's runs used "
              f"({', '.join(f'{m} {default_lr[m]:g}' for m, _ in dict.fromkeys((m, 0) for m, _ in cols))}).", "",
              markdown_table(pd.DataFrame(rows)), ""]
    others = runs.merge(pd.Series(default_lr, name="default_lr"), left_on="method", right_index=True)
    others = others[others["learning_rate"] != others["default_lr"]]
    if len(others):
        lines += ["Other learning rates:", "", markdown_table(others[[
            "method", "kl_control", "learning_rate", "kl_target", "seed", "kl_second_half_mean",
            "kl_tracking_error", "final_beta"]].round(4)), ""]
    for ctl in ("pi", "adaptive"):
        mine = summ[(summ["kl_control"] == ctl)]
        if len(mine):
            held = int(mine["within_tolerance"].sum())
            lines.append(f"**{ctl}: {held} of {len(mine)} settings held within {tolerance:.0%} on every seed** "
                         f"(largest error {mine['worst_abs_error'].max():.0%}).")
    lines += ["", "## Every run", "", markdown_table(runs.round(4)), ""]
    return "\n".join(lines)


def write_report(runs: pd.DataFrame, out_dir: str | Path, tolerance: float = TOLERANCE) -> dict[str, str]:
    """``runs.csv``, ``summary.csv``, ``kl_control.md`` and ``kl_control.png`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summ = summary(runs, tolerance)
    runs.to_csv(out / "runs.csv", index=False)
    summ.to_csv(out / "summary.csv", index=False)
    achieved_figure(runs, tolerance).savefig(out / "kl_control.png", dpi=100)
    (out / "kl_control.md").write_text(markdown(runs, summ, tolerance), encoding="utf-8")
    return {"markdown": str(out / "kl_control.md"), "figure": str(out / "kl_control.png")}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m calibrated_rlhf.reporting.kl_sweep [--scenario kl_control] [--out docs/results/kl_control]``, from
    the tracking URI in ``MLFLOW_TRACKING_URI`` (``scripts/kl_sweep.sh`` sets the project's)."""
    import argparse

    from calibrated_rlhf.reporting.runs import RunSelection, load_runs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="calibrated_rlhf")
    parser.add_argument("--scenario", default="kl_control", help="the scenario tag of the runs ('': every run)")
    parser.add_argument("--out", default="docs/results/kl_control")
    parser.add_argument("--include", action="append", default=[], metavar="RUNS_CSV",
                        help="an earlier sweep's runs.csv whose runs join these (repeatable)")
    args = parser.parse_args(argv)
    runs, notes = load_runs(RunSelection(experiment=args.experiment, scenarios=(args.scenario,) if args.scenario else ()))
    paths = write_report(with_earlier_runs(sweep_runs(runs), args.include), args.out)
    for note in notes:
        print(note)
    print(f"kl control report: {paths['markdown']}, {paths['figure']}")


if __name__ == "__main__":
    main()
