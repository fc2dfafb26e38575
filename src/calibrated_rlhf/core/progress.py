"""Progress of long loops: a tqdm bar on stderr at a terminal, else a terse log line every N steps.

A log file or CI console gets a handful of lines per stage instead of a bar redrawn thousands of times.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger("calibrated_rlhf.progress")

LOG_LINES = 10  # log lines per loop when stderr is not a terminal


def progress_to_terminal() -> bool:
    """Whether stderr is an interactive terminal (a bar can be redrawn in place)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class Progress:
    """``total`` steps named ``desc``: ``update(**figures)`` after each step shows the figures beside it.

    At a terminal a tqdm bar on stderr; elsewhere one log line every ``every`` steps (by default about
    ``LOG_LINES`` per loop) and after the last. ``close()`` ends it (also as a context manager).
    """

    def __init__(self, total: int, desc: str, every: int | None = None, terminal: bool | None = None) -> None:
        self.total, self.desc, self.n = int(total), desc, 0
        self.every = every or max(1, math.ceil(self.total / LOG_LINES))
        self._t0 = time.perf_counter()
        self._bar = None
        if progress_to_terminal() if terminal is None else terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **figures: float) -> None:
        self.n += n
        shown = {k: f"{v:.4g}" for k, v in figures.items() if v is not None}
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(n)
        elif self.n % self.every == 0 or self.n == self.total:
            rate = self.n / max(time.perf_counter() - self._t0, 1e-9)
            logger.info("%s %d/%d (%.3g/s) %s", self.desc, self.n, self.total, rate,
                        " ".join(f"{k}={v}" for k, v in shown.items()))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TrainerProgress(TrainerCallback):
    """A transformers ``Trainer``'s steps through :class:`Progress`, with the last logged value of each of
    ``figures`` (shown name -> log key; by default the loss)."""

    def __init__(self, desc: str, figures: dict[str, str] | None = None) -> None:
        self.desc = desc
        self.figures = figures or {"loss": "loss"}
        self.progress: Progress | None = None
        self.last: dict[str, float] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_local_process_zero:
            self.progress = Progress(state.max_steps, self.desc)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        for name, key in self.figures.items():
            if logs and isinstance(logs.get(key), (int, float)):
                self.last[name] = float(logs[key])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(1, **self.last)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None


def attach_progress(trainer: Any, desc: str, figures: dict[str, str] | None = None) -> None:
    """Replace a ``Trainer``'s own console output (a bar that also prints every logged dict, or with
    ``disable_tqdm`` the dicts alone on stdout) by :class:`TrainerProgress`; the logged figures go to
    the history and MLflow, not the console. Attach it last: it shows what earlier callbacks add to a log."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(TrainerProgress(desc, figures))
