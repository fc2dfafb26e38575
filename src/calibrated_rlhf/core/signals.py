"""The gold-free signals' names as the score functions log them, and the trailing mean every warning reads them
through. A leaf module: the stop rules inside the trainers and the report share it without importing each other."""

from __future__ import annotations

import numpy as np

REPEATED_WORDS = "repeated_words"  # the score function's entries, logged as <stage>/rewards/<name>
REPETITION_SURPRISAL = "repetition_surprisal"


def trailing_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Mean over the last ``window`` updates (fewer at the start): what a rule can compute online."""
    c = np.concatenate([[0.0], np.cumsum(np.nan_to_num(x))])
    n = np.concatenate([[0], np.cumsum(np.isfinite(x))])
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(0, i - window)
    counts = n[i] - n[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, (c[i] - c[lo]) / np.maximum(counts, 1), np.nan)
