"""The reward model's raw scores of a set of pairs: a node that two stages run, ``reward_model`` on the test
pairs and ``calibration`` on the held-out pairs, kept here so that neither imports the other's nodes."""

from __future__ import annotations

from typing import Any

import pandas as pd

from calibrated_rlhf.core import reward_model as rm
from calibrated_rlhf.core.preferences import tokenize_pairs


def score_pairs(reward_model: Any, tokenizer: Any, pairs: pd.DataFrame) -> pd.DataFrame:
    """Raw rewards of both sides of every pair: pair_id, reward_chosen, reward_rejected (+ true_prob)."""
    r_c, r_r = rm.score_pairs(reward_model, tokenize_pairs(pairs, tokenizer), tokenizer.pad_token_id)
    out = pd.DataFrame({"pair_id": pairs["pair_id"].to_numpy(), "reward_chosen": r_c, "reward_rejected": r_r})
    if "true_prob" in pairs.columns:
        out["true_prob"] = pairs["true_prob"].to_numpy(dtype=float)
    return out
