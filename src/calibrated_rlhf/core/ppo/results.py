"""What a PPO run is given and gives back: the score function, callbacks, result and early stop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import pandas as pd
import torch

ScoreFn = Callable[[list[str], list[str]], Mapping[str, torch.Tensor]]
# Called on the main process after every update: (update number, metrics, sample rows or None).
UpdateCallback = Callable[[int, dict[str, float], "list[dict[str, Any]] | None"], None]


class PPOEarlyStop(RuntimeError):
    """Training stopped for safety (KL blow-up or non-finite numbers); ``reason`` says which."""

    def __init__(self, reason: str, metrics: dict[str, float] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.metrics = metrics or {}


@dataclass
class PPOResult:
    """What ``PPOTrainer.train()`` returns."""

    history: list[dict[str, float]]
    samples: list[dict[str, Any]]
    updates: int
    episodes: int
    beta: float
    stopped_early: bool = False
    stop_reason: str | None = None
    last_checkpoint: str | None = None
    controller_state: dict[str, Any] = field(default_factory=dict)


# The columns every sample row has; the score function's own entries follow them.
SAMPLE_COLUMNS = ("update", "prompt", "response", "score")


def sample_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The sample rows as a table; with none (fewer updates than ``sample_every``) still the
    :data:`SAMPLE_COLUMNS` header, so the saved CSV reads back as an empty table, not a 1-byte file."""
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=list(SAMPLE_COLUMNS))


def sample_rows(update: int, prompts: list[str], responses: list[str], score: torch.Tensor,
                scores: Mapping[str, torch.Tensor], n: int) -> list[dict[str, Any]]:
    """The first ``n`` episodes as table rows: prompt, response, the optimized score (after any
    penalty) and every ``score_fn`` entry."""
    return [{"update": update, "prompt": prompts[j], "response": responses[j], "score": float(score[j]),
             **{k: float(t[j]) for k, t in scores.items()}}
            for j in range(min(n, len(prompts)))]
