"""The hidden gold a preference file was labelled with (``gold_task`` in the catalog), as ``python -m
calibrated_rlhf.runtime.real_task`` writes it (``gold_task.json``): words, utilities and scale, or (``kind:
hidden_state``) a model folder, a direction in its hidden state, an offset and scale (``core.gold``).

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

from calibrated_rlhf.core.gold import HiddenStateGold, load_gold

FIELDS = ("words", "utilities", "scale")
HIDDEN_STATE_FIELDS = ("model", "direction", "offset", "scale")


class GoldTaskError(ValueError):
    """A gold-task file that cannot be read as one; the message names the file and the field."""


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _hidden_state_problem(task: dict[str, Any]) -> tuple[str, str] | None:
    for field in HIDDEN_STATE_FIELDS:
        if field not in task:
            return field, "missing"
    if not isinstance(task["model"], str) or not Path(task["model"]).is_dir():
        return "model", f"expected the folder of the gold's model, got {task['model']!r} (not a folder here)"
    direction = task["direction"]
    if not isinstance(direction, list) or not direction or not all(_finite(x) for x in direction):
        return "direction", "expected a non-empty list of finite numbers"
    config = Path(task["model"], "config.json")
    hidden = json.loads(config.read_text()).get("hidden_size") if config.is_file() else None
    if hidden is not None and hidden != len(direction):
        return "direction", f"{len(direction)} entries for the model's hidden size {hidden}"
    if not _finite(task["offset"]):
        return "offset", f"expected a finite number, got {task['offset']!r}"
    if not _finite(task["scale"]) or task["scale"] <= 0:
        return "scale", f"expected a positive number, got {task['scale']!r}"
    return None


def _field_problem(task: dict[str, Any]) -> tuple[str, str] | None:
    """The first field at fault and what is wrong with it, or None."""
    if task.get("kind") == HiddenStateGold.kind:
        return _hidden_state_problem(task)
    for field in FIELDS:
        if field not in task:
            return field, "missing"
    words, utilities, scale = (task[f] for f in FIELDS)
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
        return "words", "expected a non-empty list of words"
    if not isinstance(utilities, list) or not all(_finite(u) for u in utilities):
        return "utilities", "expected a list of finite numbers"
    if len(utilities) != len(words):
        return "utilities", f"{len(utilities)} utilities for {len(words)} words"
    if not _finite(scale) or scale <= 0:
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
    load_gold(task)  # the stages' own reading: what passed above must pass here
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
