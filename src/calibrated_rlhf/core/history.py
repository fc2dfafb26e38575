"""What a transformers ``Trainer`` logs, kept in memory: TRL's reward and SFT trainers report through it."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class HistoryCallback(TrainerCallback):
    """Collects every logged point (training and evaluation) with its step."""

    def __init__(self) -> None:
        self.points: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs:
            self.points.append({"step": int(state.global_step), **{k: float(v) for k, v in logs.items()
                                                                   if isinstance(v, (int, float))}})
