"""Figures for calibration and reward scale (matplotlib, Agg canvas, no pyplot state).

Figures are built with ``matplotlib.figure.Figure`` and an Agg canvas instead of ``pyplot``: nothing
is registered globally, nothing opens a window, and figures are freed when dropped, which matters
inside long-running pipelines. Save them with ``fig.savefig(path)``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from calibrated_rlhf.core.metrics import ReliabilityCurve


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finite(values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def reliability_diagram(curves: Mapping[str, ReliabilityCurve], *, title: str | None = None) -> Figure:
    """Reliability curves (e.g. ``{"before": ..., "after": ...}``) over the diagonal, with bin counts.

    Pass curves from :func:`calibrated_rlhf.core.metrics.preference_reliability` (equal-mass bins,
    both orientations of each pair). Each label gets its ECE appended in the legend.
    """
    if not curves:
        raise ValueError("reliability_diagram needs at least one curve")
    fig = _figure(6.0, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="0.5", linewidth=1.0, label="perfect calibration")
    for label, curve in curves.items():
        filled = curve.counts > 0
        (line,) = top.plot(
            curve.confidence[filled],
            curve.frequency[filled],
            marker="o",
            markersize=4,
            label=f"{label} (ECE {curve.ece:.3f})",
        )
        # Outlined steps rather than bars: several curves' bins overlap and stay readable.
        bottom.stairs(curve.counts, curve.edges, color=line.get_color(), linewidth=1.5)
    top.set_xlim(0.0, 1.0)
    top.set_ylim(0.0, 1.0)
    top.set_ylabel("observed frequency of preference")
    strategies = {curve.strategy.replace("_", "-") for curve in curves.values()}
    binning = strategies.pop() if len(strategies) == 1 else "mixed"
    top.set_title(title or f"Reliability ({binning} bins, both orientations of each pair)")
    top.legend(loc="upper left", fontsize="small")
    top.grid(alpha=0.3)
    bottom.set_xlabel("predicted probability")
    bottom.set_ylabel("pairs per bin")
    bottom.grid(alpha=0.3)
    return fig


def margin_histograms(margins_before: Any, margins_after: Any, *, bins: int = 60) -> Figure:
    """Histograms of held-out margins before (raw) and after calibration (divided by the temperature)."""
    before, after = _finite(margins_before), _finite(margins_after)
    fig = _figure(7.0, 4.0)
    ax = fig.subplots()
    lo = min(before.min(initial=0.0), after.min(initial=0.0))
    hi = max(before.max(initial=0.0), after.max(initial=0.0))
    edges = np.linspace(lo, hi, bins + 1) if hi > lo else bins
    ax.hist(before, bins=edges, alpha=0.55, label=f"raw (std {before.std():.3g})" if before.size else "raw")
    ax.hist(after, bins=edges, alpha=0.55, label=f"calibrated (std {after.std():.3g})" if after.size else "calibrated")
    ax.axvline(0.0, color="0.3", linewidth=0.8)
    ax.set_xlabel("margin r_chosen - r_rejected")
    ax.set_ylabel("pairs")
    ax.set_title("Held-out margins before and after temperature scaling")
    ax.legend(fontsize="small")
    return fig


def reward_distributions(raw: Any, calibrated: Any, normalized: Any, *, bins: int = 60) -> Figure:
    """Side-by-side histograms of raw, calibrated and normalized rewards, each with mean and std."""
    fig = _figure(12.0, 3.8)
    axes = fig.subplots(1, 3)
    for ax, (name, values) in zip(axes, [("raw", raw), ("calibrated", calibrated), ("normalized", normalized)]):
        x = _finite(values)
        ax.hist(x, bins=bins)
        if x.size:
            ax.axvline(float(x.mean()), color="k", linewidth=1.0)
            ax.set_title(f"{name}: mean {x.mean():.3g}, std {x.std():.3g}")
        else:
            ax.set_title(f"{name}: no values")
        ax.set_xlabel("reward")
    axes[0].set_ylabel("responses")
    return fig


def kl_control(steps: Any, kl: Any, beta: Any, kl_target: float, controller: str) -> Figure:
    """KL against its target, and beta, per update: whether the controller held the KL budget."""
    fig = _figure(10.0, 3.6)
    ax_kl, ax_beta = fig.subplots(1, 2)
    ax_kl.plot(steps, kl, label="KL (batch mean of sequence sums)")
    ax_kl.axhline(kl_target, color="k", ls="--", label=f"target {kl_target:g}")
    ax_kl.set_xlabel("update"), ax_kl.set_ylabel("nats"), ax_kl.legend()
    ax_beta.plot(steps, beta, color="tab:orange")
    ax_beta.set_xlabel("update"), ax_beta.set_ylabel("beta (normalized-reward units per nat)")
    ax_kl.set_title(f"KL control: {controller}")
    return fig


def best_of_n(points: Any, fitted: Any | None) -> Figure:
    """Best-of-n: proxy and gold gains against d = sqrt(KL) with the fitted form, and the measured KL against
    the usual formula over n. ``points``: ``core.best_of_n.curve``; ``fitted``: its ``CurveFit`` or None."""
    fig = _figure(10.0, 3.8)
    ax_gain, ax_kl = fig.subplots(1, 2)
    for name, color in (("proxy_gain", "tab:blue"), ("gold_gain", "tab:green")):
        ax_gain.errorbar(points["d"], points[name], yerr=[points[name] - points[f"{name}_ci_low"],
                         points[f"{name}_ci_high"] - points[name]], fmt="o", ms=3, color=color, label=name)
    if fitted is not None:
        d = np.linspace(0.0, float(np.max(points["d"])), 200)
        ax_gain.plot(d, fitted.predict(d), color="tab:green", ls="--",
                     label=f"fit d({fitted.alpha:.3g} - {fitted.beta:.3g} d)")
    ax_gain.set_xlabel("d = sqrt(KL), sqrt(nats)"), ax_gain.set_ylabel("gain over the reference"), ax_gain.legend()
    ax_kl.plot(points["n"], points["kl_bound"], "k--", label="log n - (n - 1) / n")
    ax_kl.plot(points["n"], points["kl"], "o-", label="measured over the pool")
    ax_kl.set_xscale("log", base=2), ax_kl.set_xlabel("n"), ax_kl.set_ylabel("KL, nats"), ax_kl.legend()
    return fig
