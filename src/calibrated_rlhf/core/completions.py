"""Rated completions -> preference pairs.

Many preference sets ship one prompt with N responses and a score each (UltraFeedback, HelpSteer),
not pairs. A Bradley-Terry reward model needs pairs, so they are built by one of the usual rules:

- ``all_pairs``: every two completions with different ratings (N(N-1)/2 at most); the most data, but
  the pairs of one prompt are strongly dependent.
- ``best_vs_rest``: the best completion against each lower-rated one.
- ``best_vs_random``: the best against one random lower-rated completion, the usual binarization
  (UltraFeedback-binarized); one pair per prompt.

The higher-rated completion is ``chosen``; both ratings are kept (``chosen_rating``, ``rejected_rating``)
so the margin loss can use their difference. Ties carry no preference and are dropped and counted.
Several best completions with the same rating: the first is the best (deterministic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from calibrated_rlhf.core.preferences import PreferenceDataError, plain

Rule = Literal["all_pairs", "best_vs_rest", "best_vs_random"]


class CompletionParams(BaseModel):
    """How rated completions (``prompt``, ``completions``, ``ratings``) become pairs."""

    model_config = ConfigDict(extra="forbid")

    rule: Rule = Field("best_vs_random", description="all_pairs | best_vs_rest | best_vs_random (one pair per "
                       "prompt: the best against a random lower-rated completion).")
    completions_column: str = Field("completions", description="Column holding each row's list of completions.")
    ratings_column: str | None = Field(
        "ratings", description="Column holding one rating per completion (numbers, or dicts read at score_field); "
        "null: the ratings sit inside the completion dicts, at score_field.")
    text_field: str = Field("response", description="Where a completion given as a dict keeps its text.")
    score_field: str | None = Field(None, description="Where a rating (or completion) given as a dict keeps its "
                                    "score, e.g. overall_score or helpfulness.")
    seed: int = Field(0, description="best_vs_random: which lower-rated completion is drawn.")


def is_rated_completions(raw: pd.DataFrame, params: CompletionParams) -> bool:
    """Whether the rows are rated completions rather than pairs."""
    return params.completions_column in raw.columns and "chosen" not in raw.columns


def _error(source: str, row: int, field: str, what: str) -> PreferenceDataError:
    where = f" in {source}" if source else ""
    return PreferenceDataError(f"invalid rated completions{where}: row {row} (0-based), field '{field}': {what}")


def _text(value: Any, params: CompletionParams, source: str, row: int) -> Any:
    """A completion's text (or message list); dicts give theirs at ``text_field``."""
    if isinstance(value, dict) and "role" not in value:
        if params.text_field not in value:
            raise _error(source, row, params.completions_column,
                         f"a completion is a dict without '{params.text_field}' (keys {sorted(value)})")
        return value[params.text_field]
    return value


def _score(value: Any, params: CompletionParams, field: str, source: str, row: int) -> float:
    if isinstance(value, dict):
        if params.score_field is None or params.score_field not in value:
            raise _error(source, row, field, f"a rating is a dict (keys {sorted(value)}); set "
                         "data_prep.completions.score_field to the key that holds the score")
        value = value[params.score_field]
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise _error(source, row, field, f"rating {value!r} is not a number") from None
    if not math.isfinite(score):
        raise _error(source, row, field, f"rating {value!r} is not finite")
    return score


def read_row(row: pd.Series, index: int, params: CompletionParams, source: str = "") -> tuple[list, list[float]]:
    """One row's completions and ratings, checked: lists of equal length, at least two, numeric ratings."""
    completions = plain(row[params.completions_column])
    if not isinstance(completions, list):
        raise _error(source, index, params.completions_column, f"expected a list, got {type(completions).__name__}")
    if params.ratings_column is None:
        field, ratings = params.completions_column, completions
    else:
        field, ratings = params.ratings_column, plain(row[params.ratings_column])
        if not isinstance(ratings, list) or len(ratings) != len(completions):
            got = f"{len(ratings)} ratings" if isinstance(ratings, list) else type(ratings).__name__
            raise _error(source, index, field, f"expected one rating per completion ({len(completions)}), got {got}")
    if len(completions) < 2:
        raise _error(source, index, params.completions_column, "fewer than two completions: no pair to build")
    return ([_text(c, params, source, index) for c in completions],
            [_score(r, params, field, source, index) for r in ratings])


def pair_indices(ratings: Sequence[float], rule: Rule, rng: np.random.Generator) -> tuple[list[tuple[int, int]], int]:
    """(chosen, rejected) index pairs by ``rule``, and how many candidate pairs were ties."""
    order = sorted(range(len(ratings)), key=lambda i: (-ratings[i], i))
    best = order[0]
    if rule == "all_pairs":
        candidates = [(a, b) for k, a in enumerate(order) for b in order[k + 1:]]
    else:
        candidates = [(best, b) for b in order[1:]]
    pairs = [(a, b) for a, b in candidates if ratings[a] > ratings[b]]
    ties = len(candidates) - len(pairs)
    if rule == "best_vs_random":
        # One pair per prompt; the prompt counts as one tie when every other completion ties the best.
        return ([pairs[rng.integers(len(pairs))]], 0) if pairs else ([], 1)
    return pairs, ties


def completions_to_pairs(raw: pd.DataFrame, params: CompletionParams, source: str = "") -> tuple[pd.DataFrame, int]:
    """Pairs (``prompt``, ``chosen``, ``rejected``, both ratings, ``source_row``) and the number of ties dropped.

    Every other column of a row (an id, a source) is carried to each of its pairs.
    """
    if "prompt" not in raw.columns:
        raise PreferenceDataError(f"rated completions{' in ' + source if source else ''} need a 'prompt' column; "
                                  f"found {list(raw.columns)}")
    rng = np.random.default_rng(params.seed)
    keep = [c for c in raw.columns if c not in (params.completions_column, params.ratings_column)]
    rows, ties = [], 0
    for index, (_, row) in enumerate(raw.iterrows()):
        texts, ratings = read_row(row, index, params, source)
        pairs, n_ties = pair_indices(ratings, params.rule, rng)
        ties += n_ties
        rows += [{**{c: row[c] for c in keep}, "chosen": texts[a], "rejected": texts[b],
                  "chosen_rating": ratings[a], "rejected_rating": ratings[b], "source_row": index}
                 for a, b in pairs]
    if not rows:
        raise PreferenceDataError(f"rated completions{' in ' + source if source else ''}: every row's completions "
                                  "tie, so no preference pair can be built")
    return pd.DataFrame(rows), ties
