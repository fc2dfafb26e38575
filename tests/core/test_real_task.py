"""The known-gold task over a real model's text: the gold vocabulary is the samples' own words, the scale
gives the asked Bayes accuracy, and labels follow the kept true probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from calibrated_rlhf.core.real_task import (
    RealTaskSpec,
    make_gold,
    make_prompts,
    make_real_pairs,
    scale_for_bayes_accuracy,
)
from calibrated_rlhf.core.synthetic import SyntheticTask, bayes_accuracy

WORDS = ("water", "sleep", "garden", "morning", "simple", "careful", "budget", "friend", "practice", "patience",
         "energy", "quiet", "music", "river", "daily", "habit")


def fake_samples(n_prompts: int, k: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    rng = np.random.default_rng(seed)
    prompts = make_prompts(n_prompts, seed)
    samples = [[" ".join(["the", "a"] + list(rng.choice(WORDS, size=rng.integers(3, 9)))) for _ in range(k)]
               for _ in prompts]
    return prompts, samples


def test_the_gold_words_are_the_samples_most_frequent_long_words():
    words, utilities = make_gold(["Water water sleep the the the a", "water sleep garden"],
                                 RealTaskSpec(n_words=2, min_word_length=4))
    assert words == ("water", "sleep") and len(utilities) == 2 and all(-1 <= u <= 1 for u in utilities)
    assert make_gold(["water sleep"], RealTaskSpec(n_words=2, seed=1))[1] != utilities  # the seed hides them


def test_pairs_have_the_asked_bayes_accuracy_and_labels_drawn_from_the_kept_probability():
    prompts, samples = fake_samples(300, 4)
    pairs, task = make_real_pairs(prompts, samples, RealTaskSpec(n_words=12, bayes_accuracy=0.75))
    assert len(pairs) > 1500 and bayes_accuracy(pairs["true_prob"].to_numpy()) == pytest.approx(0.75, abs=1e-6)
    # the kept probability is the Bradley-Terry one of the gold rewards, the gold the task's own function
    row = pairs.iloc[7]
    assert row["gold_chosen"] == SyntheticTask.from_dict(task.to_dict()).gold_reward(row["chosen"][0]["content"])
    expected = 1 / (1 + np.exp(-task.scale * (pairs["gold_chosen"] - pairs["gold_rejected"])))
    np.testing.assert_allclose(pairs["true_prob"], expected, rtol=1e-12)
    # labels sampled, not thresholded: the gold-better side is chosen about Bayes-accuracy of the time
    better_chosen = np.mean(pairs["gold_chosen"] > pairs["gold_rejected"])
    assert better_chosen == pytest.approx(0.75, abs=0.03)
    assert pairs["prompt"].iloc[0][0]["role"] == "user" and pairs["chosen"].iloc[0][0]["role"] == "assistant"


def test_identical_samples_make_no_pair_and_a_prompt_without_two_distinct_fails_clearly():
    pairs, _ = make_real_pairs(["p"], [["water sleep", "water sleep ", "garden music"]], RealTaskSpec(n_words=4,
                                                                                                   bayes_accuracy=0.6))
    assert len(pairs) == 1
    with pytest.raises(ValueError, match="no prompt has two distinct"):
        make_real_pairs(["p"], [["water sleep", "water sleep"]], RealTaskSpec())


def test_an_unreachable_bayes_accuracy_is_named():
    assert scale_for_bayes_accuracy(np.array([0.5, -0.5]), 0.8) == pytest.approx(np.log(4) / 0.5, rel=1e-6)
    with pytest.raises(ValueError, match="out of reach: 90% of the pairs have equal gold"):
        scale_for_bayes_accuracy(np.array([0.0] * 9 + [1.0]), 0.7)
