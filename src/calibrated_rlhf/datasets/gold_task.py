"""The hidden gold a preference file was labelled with (``gold_task`` in the catalog): words, utilities and scale,
as ``python -m calibrated_rlhf.runtime.real_task`` writes them (``gold_task.json``).

Its ``filepath`` follows the same setting as ``data_prep.source.gold_task`` (``--params
data_prep.source.gold_task=...``, else ``preference_source.gold_task`` in the environment's ``globals.yml``), so the
parameters logged to MLflow name the file read. The file is checked the way the stages read it, and a bad one
fails the run naming the file and the field before anything is written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from calibrated_rlhf.core.synthetic import SyntheticTask

FIELDS = ("words", "utilities", "scale")


class GoldTaskError(ValueError):
    """A gold-task file that cannot be read as one; the message names the file and the field."""


def _field_problem(task: dict[str, Any]) -> tuple[str, str] | None:
    """The first field at fault and what is wrong with it, or None."""
    for field in FIELDS:
        if field not in task:
            return field, "missing"
    words, utilities, scale = (task[f] for f in FIELDS)
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
        return "words", "expected a non-empty list of words"
    numbers = all(isinstance(u, (int, float)) and not isinstance(u, bool) and math.isfinite(u) for u in utilities) \
        if isinstance(utilities, list) else False
    if not numbers:
        return "utilities", "expected a list of finite numbers"
    if len(utilities) != len(words):
        return "utilities", f"{len(utilities)} utilities for {len(words)} words"
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        return "scale", f"expected a positive number, got {scale!r}"
    return None


def read_gold_task(path: str) -> dict[str, Any]:
    """The file's gold as a dict (what the run's ``synthetic_task`` holds), checked field by field."""
    where = f"data_prep.source.gold_task '{path}'"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise GoldTaskError(f"{where}: cannot be read ({e.strerror or e})") from None
    try:
        task = json.loads(text)
    except json.JSONDecodeError as e:
        raise GoldTaskError(f"{where} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(task, dict):
        raise GoldTaskError(f"{where}: expected a JSON object with {', '.join(FIELDS)}, got {type(task).__name__}")
    problem = _field_problem(task)
    if problem is not None:
        raise GoldTaskError(f"{where}, field '{problem[0]}': {problem[1]}")
    SyntheticTask.from_dict(task)  # the stages' own reading: what passed above must pass here
    return task


class GoldTaskDataset(AbstractDataset[None, "dict[str, Any] | None"]):
    """Read-only: None without a ``filepath``, else ``{"filepath": ..., "task": {words, utilities, scale, ...}}``
    (the path travels with the gold so ``load_pairs`` can refuse a run whose parameters name another file)."""

    def __init__(self, filepath: str | None = None, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = filepath
        self.metadata = metadata

    def _load(self) -> dict[str, Any] | None:
        if not self._filepath:
            return None
        return {"filepath": self._filepath, "task": read_gold_task(self._filepath)}

    def _save(self, data: Any) -> None:
        raise DatasetError("GoldTaskDataset is read-only: the run's gold is synthetic_task")

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath}
