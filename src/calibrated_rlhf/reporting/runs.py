"""Which runs to compare, read from MLflow: the only module of the report that talks to MLflow.

Everything it returns is plain pandas (the ``search_runs`` shape, and curves in long form), which
``table``, ``verdicts`` and ``render`` take from here without knowing where it came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import mlflow
import pandas as pd

from calibrated_rlhf.core.metric_keys import TRAINING_PREFIXES
from calibrated_rlhf.reporting.table import HISTORY_COLUMNS, HISTORY_KEYS, run_labels, tag_values


@dataclass(frozen=True)
class RunSelection:
    """Which runs to compare: explicit ids, or an experiment narrowed by filter, scenarios and recency."""

    experiment: str = "calibrated_rlhf"
    run_ids: tuple[str, ...] = ()
    last: int | None = None
    filter_string: str = ""
    scenarios: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.run_ids:
            return f"runs {', '.join(self.run_ids)}"
        parts = [f"experiment `{self.experiment}`"]
        if self.filter_string:
            parts.append(f"filter `{self.filter_string}`")
        if self.scenarios:
            parts.append(f"scenarios {', '.join(self.scenarios)}")
        if self.last:
            parts.append(f"the {self.last} most recent")
        return ", ".join(parts)


def is_pipeline_run(runs: pd.DataFrame) -> pd.Series:
    """True for runs that logged at least one metric of a training pipeline."""
    cols = [c for c in runs.columns if c.startswith("metrics.") and c[len("metrics."):].startswith(TRAINING_PREFIXES)]
    if not cols:
        return pd.Series(False, index=runs.index)
    return runs[cols].notna().any(axis=1)


def select_runs(runs: pd.DataFrame, selection: RunSelection,
                exclude_run_ids: Iterable[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    """Newest first: drop excluded and non-pipeline runs, keep the chosen scenarios, then the ``last`` N.

    Returns the runs and notes on what was left out, for the report.
    """
    notes: list[str] = []
    if runs.empty:
        return runs, notes
    exclude = set(exclude_run_ids)
    if exclude & set(runs["run_id"]):
        notes.append("Left out the run this report is logged to.")
        runs = runs[~runs["run_id"].isin(exclude)]
    keep = is_pipeline_run(runs)
    if (~keep).any():
        names = ", ".join(run_labels(runs[~keep]))
        prefixes = ", ".join(p for p in TRAINING_PREFIXES[:-1]) + f" or {TRAINING_PREFIXES[-1]}"
        notes.append(f"Left out {int((~keep).sum())} run(s) with no {prefixes} metrics (reporting or empty "
                     f"runs): {names}.")
        runs = runs[keep]
    if selection.scenarios and not selection.run_ids:
        runs = runs[tag_values(runs, "scenario").isin(selection.scenarios)]
    if "start_time" in runs.columns:
        runs = runs.sort_values("start_time", ascending=False, kind="stable")
    if selection.last and not selection.run_ids:
        runs = runs.head(selection.last)
    return runs.reset_index(drop=True), notes


def load_runs(selection: RunSelection, exclude_run_ids: Iterable[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    """The selected runs from the current MLflow tracking URI (``mlflow.set_tracking_uri`` to change it)."""
    notes: list[str] = []
    if selection.run_ids:
        quoted = ", ".join(f"'{i}'" for i in selection.run_ids)
        runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"attributes.run_id IN ({quoted})")
        absent = sorted(set(selection.run_ids) - set(runs.get("run_id", [])))
        if absent:
            notes.append(f"Runs not found: {', '.join(absent)}.")
    elif mlflow.get_experiment_by_name(selection.experiment) is None:
        return pd.DataFrame(columns=["run_id", "start_time"]), [f"Experiment `{selection.experiment}` not found."]
    else:
        runs = mlflow.search_runs(experiment_names=[selection.experiment], filter_string=selection.filter_string,
                                  order_by=["attributes.start_time DESC"])
    runs, selected_notes = select_runs(runs, selection, exclude_run_ids)
    return runs, notes + selected_notes


def load_histories(run_ids: Iterable[str], keys: Sequence[str] = HISTORY_KEYS) -> pd.DataFrame:
    """Per-step values of ``keys`` for each run, in long form (``run_id``, ``key``, ``step``, ``value``)."""
    client = mlflow.MlflowClient()
    rows = [(run_id, key, m.step, m.value) for run_id in run_ids for key in keys
            for m in client.get_metric_history(run_id, key)]
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


@contextmanager
def tracking_store(uri: str | None) -> Iterator[None]:
    """Read from the MLflow store at ``uri`` inside the block (None or "": the current one), then put it back."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri or previous)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def load_artifact_table(run_id: str, path: str) -> pd.DataFrame | None:
    """A CSV a run logged as an artifact (``best_of_n/best_of_n_rankings.csv``), or None where it logged none."""
    import tempfile

    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
        except (MlflowException, OSError):
            return None
        return pd.read_csv(local)
