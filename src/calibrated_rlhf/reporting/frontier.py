"""The gold-reward-against-KL frontier of every RL method (PPO, RLOO, GRPO, DPO), from recorded runs.

Each run contributes one point from the one evaluation protocol (``core.evaluation``): the final policy's KL to
the reference on its own samples (``eval/kl_reference``) and its gold-reward gain over the reference with a
95% interval (``eval/gold_gain*``). The plot puts gold gain against sqrt(KL), as Gao et al. (2022) plot
over-optimization; the table interpolates each method's gain at matched KL values, and the verdict names the
method with the most gold reward per nat at each, from those numbers. Each RL method's points are also fitted
with Gao et al.'s two forms (``core.overoptimization``): ``d (alpha - beta ln d)``, their RL law, and
``d (alpha - beta d)``, their best-of-n law, with the fitted peak against the observed one. Plain pandas:
``runs`` reads MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core.overoptimization import fit_curve, held_out_r2, law
from calibrated_rlhf.reporting.table import METHOD_KEYS, as_float, method_of, with_current_keys
from calibrated_rlhf.reporting.verdicts import Verdict

METHODS = ("ppo", "rloo", "grpo", "dpo")
# The KL budget each method was run at: the controllers' target (the table's mapping), or DPO's beta.
BUDGET_PARAMS = {m: METHOD_KEYS[m].params["kl_target"] for m in METHODS if "kl_target" in METHOD_KEYS[m].params}
BUDGET_PARAMS["dpo"] = "dpo.trainer.beta"


def frontier_points(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run that has the protocol's figures: method, budget, KL, sqrt(KL), gold gain and interval
    (a run logged before the one ``eval/`` prefix through its older keys)."""
    runs = with_current_keys(runs)
    methods = method_of(runs)
    rows = []
    for i, run in runs.iterrows():
        method = methods[i]
        kl = as_float(run.get(f"metrics.{keys.EVAL_KL_REFERENCE}"))
        gain = as_float(run.get(f"metrics.{keys.EVAL_GOLD_GAIN}"))
        if method is None or math.isnan(kl) or math.isnan(gain):
            continue
        rows.append({"run_id": run["run_id"], "method": method,
                     "budget": as_float(run.get(f"params.{BUDGET_PARAMS.get(method, '')}")),
                     "kl": kl, "sqrt_kl": math.sqrt(max(kl, 0.0)), "gold_gain": gain,
                     "gold_gain_ci_low": as_float(run.get(f"metrics.{keys.EVAL_GOLD_GAIN_CI_LOW}")),
                     "gold_gain_ci_high": as_float(run.get(f"metrics.{keys.EVAL_GOLD_GAIN_CI_HIGH}"))})
    columns = ["run_id", "method", "budget", "kl", "sqrt_kl", "gold_gain", "gold_gain_ci_low", "gold_gain_ci_high"]
    return pd.DataFrame(rows, columns=columns).sort_values(["method", "kl"], kind="stable").reset_index(drop=True)


FIT_COLUMNS = ["method", "form", "points", "alpha", "alpha_ci_low", "alpha_ci_high", "beta", "beta_ci_low",
               "beta_ci_high", "r2", "held_out_r2", "d_peak_fitted", "d_peak_observed", "d_max"]


def overoptimization_fits(points: pd.DataFrame) -> pd.DataFrame:
    """Both of Gao et al.'s forms fitted to each RL method's gold gain against ``d = sqrt(KL)``, one row per
    method and form: coefficients with 95% intervals, R^2 on the points and on held-out ones, the fitted peak
    ``d*`` beside the observed one (the ``d`` of the largest gain) and the largest ``d`` run.

    DPO is left out (its points are not a policy pushed along one proxy). A method with fewer than three
    distinct ``d`` has no row; a held-out R^2 that its points cannot support is NaN."""
    rows = []
    for method, group in points[points["method"] != "dpo"].groupby("method", sort=True):
        d, gain = group["sqrt_kl"].to_numpy(), group["gold_gain"].to_numpy()
        if len(np.unique(d[d > 0])) < 3:
            continue
        for form in ("rl", "bon"):
            fit = fit_curve(d, gain, form)
            try:
                held = held_out_r2(d, gain, form)
            except ValueError:  # too few points left to fit once every third is held out
                held = math.nan
            rows.append({"method": method, "form": form, "points": len(d), "alpha": fit.alpha,
                         "alpha_ci_low": fit.alpha_ci[0], "alpha_ci_high": fit.alpha_ci[1], "beta": fit.beta,
                         "beta_ci_low": fit.beta_ci[0], "beta_ci_high": fit.beta_ci[1], "r2": fit.r2,
                         "held_out_r2": held, "d_peak_fitted": fit.d_peak, "d_peak_observed": float(d[np.argmax(gain)]),
                         "d_max": float(d.max())})
    return pd.DataFrame(rows, columns=FIT_COLUMNS)


def overoptimization_verdict(fits: pd.DataFrame) -> Verdict:
    """Does RL's gold turn over within the KL measured: for each method, the RL law's fitted peak, with its
    beta's interval above zero (a peak at all), inside the range of ``d`` run, and the runs themselves past
    their best (a run at larger ``d`` with less gold). A curve that only flattens puts the fitted peak inside
    the range while every run still gains: that is not a turnover."""
    rl = fits[fits["form"] == "rl"]
    claim = "RL's gold reward peaks and turns down within the KL measured"
    if rl.empty:
        return Verdict("overoptimization", claim, None, "no method with three or more distinct KL points", ())
    found = [f"{r.method}: fitted peak d* {r.d_peak_fitted:.2f} (KL {r.d_peak_fitted ** 2:.1f}), observed "
             f"{r.d_peak_observed:.2f}, largest d run {r.d_max:.2f}, beta {r.beta:.3f} "
             f"[{r.beta_ci_low:.3f}, {r.beta_ci_high:.3f}]" for r in rl.itertuples()]
    turned = [r.beta_ci_low > 0 and r.d_peak_fitted < r.d_max and r.d_peak_observed < r.d_max
              for r in rl.itertuples()]
    return Verdict("overoptimization", claim, all(turned), "; ".join(found), ())


def frontier_figure(points: pd.DataFrame, fits: pd.DataFrame | None = None) -> Figure:
    """Gold gain (95% interval) against sqrt(KL to the reference), one line per method; with ``fits``, each
    method's RL-law curve dashed over the range it was fitted on."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    rl_fits = {} if fits is None else {r.method: r for r in fits[fits["form"] == "rl"].itertuples()}
    for method, group in points.groupby("method", sort=True):
        err = np.vstack([group["gold_gain"] - group["gold_gain_ci_low"], group["gold_gain_ci_high"] - group["gold_gain"]])
        line = ax.errorbar(group["sqrt_kl"], group["gold_gain"], yerr=np.nan_to_num(err), marker="o", capsize=3,
                           label=method)
        if method in rl_fits:
            fit = rl_fits[method]
            d = np.linspace(1e-3, fit.d_max, 100)
            ax.plot(d, law(d, fit.alpha, fit.beta, "rl"), linestyle="--", linewidth=0.9,
                    color=line.lines[0].get_color())
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("sqrt(KL to the reference policy), sqrt(nats per sequence)")
    ax.set_ylabel("gold reward gain over the reference")
    ax.set_title("Gold reward against KL, per method")
    if len(points):
        ax.legend()
    fig.tight_layout()
    return fig


def matched_kl_table(points: pd.DataFrame, kl_levels: Sequence[float]) -> pd.DataFrame:
    """Each method's gold gain at each KL level, linear in sqrt(KL) between its runs; NaN outside their range
    (no extrapolation: a method not run that far has no figure there)."""
    table = {}
    for method, group in points.groupby("method", sort=True):
        x, y = group["sqrt_kl"].to_numpy(), group["gold_gain"].to_numpy()
        table[method] = [float(np.interp(math.sqrt(k), x, y)) if x.min() <= math.sqrt(k) <= x.max() else math.nan
                         for k in kl_levels]
    return pd.DataFrame(table, index=pd.Index(list(kl_levels), name="kl"))


def frontier_verdict(table: pd.DataFrame) -> Verdict:
    """Which method buys the most gold reward at each matched KL where at least two methods were measured."""
    found = []
    for kl, row in table.iterrows():
        measured = row.dropna()
        if len(measured) >= 2:
            found.append(f"at KL {kl:g}: {measured.idxmax()} ({measured.max():.3f}; "
                         + ", ".join(f"{m} {v:.3f}" for m, v in measured.drop(measured.idxmax()).items()) + ")")
    missing = tuple(m for m in METHODS if m not in table.columns)
    if not found:
        return Verdict("frontier", "one method buys the most gold reward per nat of KL", None,
                       "fewer than two methods measured at a common KL", missing)
    leaders = {s.split(": ")[1].split(" ")[0] for s in found}
    holds = len(leaders) == 1
    claim = (f"{leaders.pop()} buys the most gold reward at every matched KL" if holds
             else "one method buys the most gold reward per nat of KL")
    return Verdict("frontier", claim, holds, "; ".join(found), missing)


# DPO's implicit reward as a Bradley-Terry reward: the calibration pipeline's figures under dpo/ (column -> key)
DPO_CALIBRATION = {"temperature": keys.DPO_CALIBRATION_TEMPERATURE,
                   "ece_before": keys.dpo_key(keys.CALIBRATION_TEST_ECE_BEFORE),
                   "ece_after": keys.DPO_CALIBRATION_TEST_ECE_AFTER,
                   "oracle_ece": keys.dpo_key(keys.CALIBRATION_TEST_ORACLE_ECE),
                   "nll_before": keys.dpo_key(keys.CALIBRATION_TEST_NLL_BEFORE),
                   "nll_after": keys.DPO_CALIBRATION_TEST_NLL_AFTER,
                   "bayes_nll": keys.dpo_key(keys.CALIBRATION_TEST_BAYES_NLL)}


def dpo_calibration_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per DPO run: its beta and its implicit reward's temperature, test ECE and NLL before and after,
    beside the oracle ECE and Bayes NLL (NaN off the synthetic task)."""
    dpo = runs[method_of(runs) == "dpo"]
    columns = ["run_id", "beta", *DPO_CALIBRATION]
    rows = [{"run_id": run["run_id"], "beta": as_float(run.get(f"params.{BUDGET_PARAMS['dpo']}")),
             **{col: as_float(run.get(f"metrics.{key}")) for col, key in DPO_CALIBRATION.items()}}
            for _, run in dpo.iterrows()]
    return pd.DataFrame(rows, columns=columns).sort_values("beta", kind="stable").reset_index(drop=True)


def write_report(points: pd.DataFrame, kl_levels: Sequence[float], out_dir: str,
                 dpo_calibration: pd.DataFrame | None = None) -> dict[str, str]:
    """``frontier.png`` and ``frontier.md`` (points, matched-KL table, verdict) under ``out_dir``."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fits = overoptimization_fits(points)
    frontier_figure(points, fits).savefig(out / "frontier.png", dpi=100)
    table = matched_kl_table(points, kl_levels)
    verdict = frontier_verdict(table)
    from calibrated_rlhf.reporting.render import markdown_table

    shown = table.reset_index().round(4).astype(object).where(table.reset_index().notna(), "")
    lines = ["# Gold reward against KL, per method", "", markdown_table(points.round(4)), "",
             "## Gold gain at matched KL (linear in sqrt(KL) between runs; blank: not measured there)", "",
             markdown_table(shown), "", f"**{verdict.claim}: {verdict.status}.** {verdict.evidence}"]
    if verdict.missing:
        lines.append(f"Missing methods: {', '.join(verdict.missing)}.")
    if len(fits):
        turned = overoptimization_verdict(fits)
        lines += ["", "## Gao et al.'s forms fitted to each method's gold gain against d = sqrt(KL)", "",
                  "`rl`: d (alpha - beta ln d), their law for RL; `bon`: d (alpha - beta d), their law for best-of-n. "
                  "Intervals 95%; held-out R^2 on every third point by d, fitted without it; the RL curves dashed "
                  "in the figure.", "", markdown_table(fits.round(4)), "",
                  f"**{turned.claim}: {turned.status}.** {turned.evidence}"]
    if dpo_calibration is not None and len(dpo_calibration):
        lines += ["", "## DPO's implicit reward beta * log(pi / pi_ref), calibrated as a reward model's", "",
                  markdown_table(dpo_calibration.round(4))]
    (out / "frontier.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"figure": str(out / "frontier.png"), "markdown": str(out / "frontier.md")}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m calibrated_rlhf.reporting.frontier [--scenario frontier] [--out reports/frontier]``."""
    import argparse

    from calibrated_rlhf.reporting.runs import RunSelection, load_runs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="calibrated_rlhf")
    parser.add_argument("--scenario", default="frontier", help="the scenario tag of the runs to plot ('': every run)")
    parser.add_argument("--kl", default="1,2,4,8", help="matched KL levels, nats per sequence, comma separated")
    parser.add_argument("--out", default="reports/frontier")
    args = parser.parse_args(argv)
    runs, notes = load_runs(RunSelection(experiment=args.experiment, scenarios=(args.scenario,) if args.scenario else ()))
    paths = write_report(frontier_points(runs), [float(k) for k in args.kl.split(",")], args.out,
                         dpo_calibration_table(runs))
    for note in notes:
        print(note)
    print(f"frontier report: {paths['markdown']}, {paths['figure']}")


if __name__ == "__main__":
    main()
