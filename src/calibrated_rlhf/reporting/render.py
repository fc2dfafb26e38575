"""The report's outputs: the overlaid curves of every RL method, Markdown and HTML renderings, and the four files.

Pure functions of the comparison table, the verdicts and the runs' curves (no MLflow here).
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from calibrated_rlhf.reporting.table import (METHOD_KEYS, NAMING_COLUMNS, SECTIONS, comparison_table, curve,
                                             empty_columns, empty_histories)
from calibrated_rlhf.reporting.verdicts import ScenarioRoles, Verdict, all_verdicts

FIGURE_FILE = "comparison_curves.png"
REPORT_FILES = {"markdown": "comparison_report.md", "html": "comparison_report.html",
                "table": "comparison_table.csv", "figure": FIGURE_FILE}


# ---- figure ---------------------------------------------------------------------------------------------------

PANELS = (("kl", "KL per update (nats)"), ("beta", "beta"), ("gold", "gold reward (batch mean)"),
          ("gold_gap", "proxy - gold gap (calibrated logits)"))


def curves_figure(histories: pd.DataFrame, labels: Mapping[str, str],
                  methods: Mapping[str, str | None] | None = None,
                  kl_targets: Mapping[str, float] | None = None) -> Figure:
    """KL per update (dashed: each run's target), beta, gold reward and proxy-gold gap, one line per run
    (``labels``: id -> label). Each run's curves are its method's keys (``methods``: id -> method, PPO's when
    absent); a run without a target curve (RLOO, GRPO) gets its ``kl_targets`` value as a dashed line."""
    methods, kl_targets = methods or {}, kl_targets or {}
    fig = Figure(figsize=(19.0, 4.4), layout="constrained")
    FigureCanvasAgg(fig)  # an Agg canvas of its own: no pyplot state, nothing opens a window
    axes = fig.subplots(1, 4)
    # One colour per run across the panels; tab20 keeps up to 20 runs apart.
    palette = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    for ax, (panel, title) in zip(axes, PANELS):
        drawn = False
        for i, (run_id, label) in enumerate(labels.items()):
            color = palette(i % palette.N)
            run_curves = METHOD_KEYS.get(methods.get(run_id), METHOD_KEYS["ppo"]).curves
            line = curve(histories, run_id, run_curves[panel]) if panel in run_curves else histories.iloc[:0]
            if line.empty:
                continue
            ax.plot(line["step"], line["value"], color=color, linewidth=1.2, label=label)
            drawn = True
            if panel != "kl":
                continue
            target = curve(histories, run_id, run_curves["kl_target"]) if "kl_target" in run_curves else line.iloc[:0]
            if not target.empty:
                ax.plot(target["step"], target["value"], color=color, linestyle="--", linewidth=0.9)
            elif np.isfinite(kl_targets.get(run_id, np.nan)):
                ends = [line["step"].min(), line["step"].max()]
                ax.plot(ends, [kl_targets[run_id]] * 2, color=color, linestyle="--", linewidth=0.9)
        ax.set_title(title + (" (dashed: target)" if panel == "kl" else ""))
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged by the selected runs", ha="center", va="center", transform=ax.transAxes)
    if any(ax.get_lines() for ax in axes):
        fig.legend(*next(ax for ax in axes if ax.get_lines()).get_legend_handles_labels(), loc="outside right upper",
                   fontsize="small")
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# ---- rendering ------------------------------------------------------------------------------------------------

def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)) or value is pd.NaT:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d %H:%M")
    return str(value)


def _section_frame(table: pd.DataFrame, title: str) -> pd.DataFrame | None:
    """A section's columns as display strings for the runs that logged any of its values (every run in
    "Runs"), or None when there are none; columns none of those runs filled are left out."""
    columns = SECTIONS[title]
    values = [c for c in columns if c not in NAMING_COLUMNS]
    logged = table[values].notna().any(axis=1) | (title == "Runs")
    if not logged.any():
        return None
    shown = table.loc[logged, list(columns)].copy()
    # a column no shown run filled says nothing about these runs (one reward model has no aggregation)
    shown = shown.drop(columns=[c for c in empty_columns(shown) if c not in ("label", "run_id")])
    if "run_id" in shown:
        shown["run_id"] = shown["run_id"].str[:8]
    return shown.map(_cell)


def markdown_table(frame: pd.DataFrame) -> str:
    def row(cells: Iterable[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [row(frame.columns), row(["---"] * len(frame.columns))]
    return "\n".join(lines + [row(r) for r in frame.itertuples(index=False)])


@dataclass(frozen=True)
class Report:
    """Everything one comparison produces; ``markdown`` links the figure as :data:`FIGURE_FILE`."""

    table: pd.DataFrame
    verdicts: list[Verdict]
    figure: Figure
    markdown: str
    html: str


def _header_lines(table: pd.DataFrame, experiment: str, source: str, selection: str) -> list[str]:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"{len(table)} run(s) of experiment `{experiment}`" + (f" from `{source}`" if source else "")
             + f", generated {when}."]
    if selection:
        lines.append(f"Selection: {selection}.")
    if not table.empty:
        lines.append("Where a scenario has several runs of a method, the verdicts use its most recent one; the "
                     "reward scale and normalization verdicts are computed once per method (PPO, RLOO, GRPO per "
                     "`scale_rewards`).")
    return lines


def render_markdown(table: pd.DataFrame, verdicts: Sequence[Verdict], *, experiment: str, source: str = "",
                    selection: str = "", notes: Sequence[str] = ()) -> str:
    """The report as Markdown; the figure is referenced as :data:`FIGURE_FILE` beside it."""
    out = [f"# Run comparison: {experiment}", "", *_header_lines(table, experiment, source, selection), ""]
    out += [f"- {n}" for n in notes] + ([""] if notes else [])
    if table.empty:
        out += ["**No matching runs**: nothing to compare. Run some pipelines (or scenarios) first, or widen "
                "the selection.", ""]
        return "\n".join(out)
    out += ["## Verdicts", ""]
    out += [f"- **{v.topic}: {v.status}.** {v.claim} {v.evidence}" for v in verdicts] + [""]
    for title in SECTIONS:
        frame = _section_frame(table, title)
        shown = markdown_table(frame) if frame is not None else "Not logged by the selected runs."
        out += [f"## {title}", "", shown, ""]
    out += ["## Curves", "", f"![KL per update with its target, beta and gold reward, per run]({FIGURE_FILE})", ""]
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}.supported{color:#1a7f37}.not-supported{color:#c62828}
.undecided{color:#8a6d00}img{max-width:100%}"""


def _inline(text: str) -> str:
    """Escaped text with Markdown's `code` spans as <code>, so both renderings share their sentences."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def render_html(table: pd.DataFrame, verdicts: Sequence[Verdict], figure: Figure, *, experiment: str,
                source: str = "", selection: str = "", notes: Sequence[str] = ()) -> str:
    """The report as one self-contained HTML page: the figure is embedded as a base64 PNG."""
    esc = html.escape
    body = [f"<h1>Run comparison: {esc(experiment)}</h1>"]
    body += [f"<p>{_inline(line)}</p>" for line in _header_lines(table, experiment, source, selection)]
    if notes:
        body.append("<ul>" + "".join(f"<li>{_inline(n)}</li>" for n in notes) + "</ul>")
    if table.empty:
        body.append("<p><strong>No matching runs</strong>: nothing to compare. Run some pipelines (or scenarios) "
                    "first, or widen the selection.</p>")
    else:
        body.append("<h2>Verdicts</h2><ul>")
        body += [f'<li><strong class="{v.status.replace(" ", "-")}">{esc(v.topic)}: {v.status}.</strong> '
                 f"{_inline(v.claim)} {_inline(v.evidence)}</li>" for v in verdicts]
        body.append("</ul>")
        for title in SECTIONS:
            frame = _section_frame(table, title)
            body.append(f"<h2>{esc(title)}</h2>")
            body.append(frame.to_html(index=False, border=0) if frame is not None
                        else "<p>Not logged by the selected runs.</p>")
        png = base64.b64encode(figure_png(figure)).decode("ascii")
        body.append("<h2>Curves</h2>")
        body.append(f'<img alt="KL per update with its target, beta and gold reward, per run" '
                    f'src="data:image/png;base64,{png}">')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Run comparison: {esc(experiment)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def build_report(runs: pd.DataFrame, histories: pd.DataFrame | None = None, *, roles: ScenarioRoles,
                 experiment: str, source: str = "", selection: str = "", notes: Sequence[str] = (),
                 tolerance: float = 0.10, ece_margin: float = 0.01) -> Report:
    """Table, verdicts, figure and both renderings from runs (``search_runs`` shape) and their histories."""
    histories = histories if histories is not None else empty_histories()
    table = comparison_table(runs, histories)
    verdicts = all_verdicts(table, roles, tolerance, ece_margin) if not table.empty else []
    figure = curves_figure(histories, dict(zip(table["run_id"], table["label"])),
                           {r: m if isinstance(m, str) else None for r, m in zip(table["run_id"], table["method"])},
                           dict(zip(table["run_id"], table["kl_target"])))
    context = dict(experiment=experiment, source=source, selection=selection, notes=notes)
    return Report(table, verdicts, figure, render_markdown(table, verdicts, **context),
                  render_html(table, verdicts, figure, **context))


def save_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write the four files of :data:`REPORT_FILES` into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, name in REPORT_FILES.items()}
    paths["markdown"].write_text(report.markdown, encoding="utf-8")
    paths["html"].write_text(report.html, encoding="utf-8")
    report.table.to_csv(paths["table"], index=False)
    paths["figure"].write_bytes(figure_png(report.figure))
    return paths
