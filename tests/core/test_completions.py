"""Rated completions -> pairs: each rule, ties, dict-shaped data, and errors that name the row and field."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from calibrated_rlhf.core.completions import CompletionParams, completions_to_pairs, pair_indices
from calibrated_rlhf.core.preferences import PreferenceDataError


def _rows(*ratings: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [f"Q{i}?" for i in range(len(ratings))],
                         "completions": [[f"a{i}-{j}" for j in range(len(r))] for i, r in enumerate(ratings)],
                         "ratings": list(ratings)})


@pytest.mark.parametrize("ratings", [[3, 1, 2], [5, 5, 1, 2], [1, 2, 3, 4, 5], [2, 2, 2]])
def test_all_pairs_is_every_untied_pair_higher_first(ratings):
    pairs, ties = pair_indices(ratings, "all_pairs", np.random.default_rng(0))
    expected = {(a, b) for a, b in itertools.permutations(range(len(ratings)), 2) if ratings[a] > ratings[b]}
    assert set(pairs) == expected and len(pairs) == len(expected)
    n_tied = sum(ratings[a] == ratings[b] for a, b in itertools.combinations(range(len(ratings)), 2))
    assert ties == n_tied


def test_best_vs_rest_pairs_the_first_best_with_every_lower_one():
    pairs, ties = pair_indices([2, 5, 5, 1], "best_vs_rest", np.random.default_rng(0))
    assert pairs == [(1, 0), (1, 3)]
    assert ties == 1  # the second 5


def test_best_vs_random_draws_each_lower_completion_and_never_a_tie():
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(200):
        pairs, ties = pair_indices([4, 1, 4, 2, 3], "best_vs_random", rng)
        assert len(pairs) == 1 and ties == 0 and pairs[0][0] == 0
        seen.add(pairs[0][1])
    assert seen == {1, 3, 4}  # every strictly lower completion, never the tied best (index 2)


def test_a_prompt_whose_completions_all_tie_is_one_counted_tie():
    data = _rows([3, 1], [2, 2, 2])
    pairs, ties = completions_to_pairs(data, CompletionParams(rule="best_vs_random"))
    assert len(pairs) == 1 and ties == 1
    row = pairs.iloc[0]
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("Q0?", "a0-0", "a0-1")
    assert (row["chosen_rating"], row["rejected_rating"], row["source_row"]) == (3.0, 1.0, 0)


def test_dict_completions_with_embedded_scores_and_extra_columns_carried():
    data = pd.DataFrame({"prompt": ["Q?"], "id": ["x7"],
                         "completions": [[{"response": "good", "overall_score": 8.5},
                                          {"response": "bad", "overall_score": 3}]]})
    params = CompletionParams(rule="all_pairs", ratings_column=None, score_field="overall_score")
    pairs, ties = completions_to_pairs(data, params)
    assert pairs[["id", "chosen", "rejected", "chosen_rating", "rejected_rating"]].values.tolist() == [
        ["x7", "good", "bad", 8.5, 3.0]]


def test_ratings_as_dicts_read_at_the_score_field_and_messages_kept():
    msg = [{"role": "assistant", "content": "hi"}]
    other = [{"role": "assistant", "content": "go away"}]
    data = pd.DataFrame({"prompt": [[{"role": "user", "content": "Hello"}]], "completions": [[msg, other]],
                         "ratings": [[{"helpfulness": 4}, {"helpfulness": 1}]]})
    pairs, _ = completions_to_pairs(data, CompletionParams(rule="best_vs_rest", score_field="helpfulness"))
    assert pairs.iloc[0]["chosen"] == msg and pairs.iloc[0]["rejected"] == other


@pytest.mark.parametrize("completions, ratings, field, what", [
    (["a", "b"], [1], "ratings", "expected one rating per completion (2), got 1 ratings"),
    (["a", "b"], [1, "high"], "ratings", "rating 'high' is not a number"),
    (["a", "b"], [1, float("nan")], "ratings", "is not finite"),
    (["a"], [1], "completions", "fewer than two completions"),
    ("a b", [1, 2], "completions", "expected a list, got str"),
    ([{"text": "a"}, {"text": "b"}], [1, 2], "completions", "a dict without 'response'"),
    (["a", "b"], [{"score": 1}, {"score": 2}], "ratings", "set data_prep.completions.score_field"),
])
def test_bad_rows_name_the_source_row_and_field(completions, ratings, field, what):
    data = pd.DataFrame({"prompt": ["ok", "bad"], "completions": [["x", "y"], completions],
                         "ratings": [[2, 1], ratings]})
    with pytest.raises(PreferenceDataError) as err:
        completions_to_pairs(data, CompletionParams(rule="all_pairs"), source="'rated.jsonl'")
    message = str(err.value)
    assert "in 'rated.jsonl'" in message and "row 1 (0-based)" in message and f"field '{field}'" in message
    assert what in message


def test_all_ties_everywhere_is_an_error():
    with pytest.raises(PreferenceDataError, match="every row's completions tie"):
        completions_to_pairs(_rows([1, 1], [2, 2]), CompletionParams())


def test_unknown_parameter_is_refused():
    with pytest.raises(ValueError, match="rulez"):
        CompletionParams(rulez="all_pairs")
