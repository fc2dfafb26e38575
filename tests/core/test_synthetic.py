from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from calibrated_rlhf.core.synthetic import SyntheticSpec, SyntheticTask, bayes_accuracy, make_pairs, make_task


def test_same_seed_same_pairs_other_seed_other_pairs():
    spec = SyntheticSpec(seed=3, n_pairs=50)
    a = make_pairs(spec, make_task(spec))
    b = make_pairs(spec, make_task(spec))
    assert a.equals(b)
    other = SyntheticSpec(seed=4, n_pairs=50)
    assert not a.equals(make_pairs(other, make_task(other)))


def test_true_prob_matches_gold_rewards_and_labels_are_noisy():
    spec = SyntheticSpec(seed=0, n_pairs=2000, scale=4.0)
    task = make_task(spec)
    df = make_pairs(spec, task)
    expected = task.true_prob(df["gold_chosen"], df["gold_rejected"])
    np.testing.assert_allclose(df["true_prob"], expected, rtol=1e-12)
    # Labels are sampled: some chosen responses have the lower gold reward, about as often as 1 - p says.
    wrong = (df["gold_chosen"] < df["gold_rejected"]).mean()
    assert 0.05 < wrong < 0.5
    assert wrong == pytest.approx(1 - bayes_accuracy(df["true_prob"]), abs=0.03)


def test_gold_reward_is_mean_word_utility_and_defined_on_any_text():
    task = make_task(SyntheticSpec(seed=0, n_words=5))
    w, u = task.words, task.utilities
    assert task.gold_reward(f"{w[0]} {w[1]}") == pytest.approx((u[0] + u[1]) / 2)
    assert task.gold_reward(f"{w[0]} zzz") == pytest.approx(u[0] / 2)  # unknown words count as 0
    assert task.gold_reward("") == 0.0
    assert make_task(SyntheticSpec(seed=0, n_words=5)).to_dict() == task.to_dict()


def test_repeats_past_max_repeats_carry_the_repeat_utility_and_the_pairs_use_that_gold():
    spec = SyntheticSpec(seed=0, n_words=5, n_pairs=400, max_repeats=2, repeat_utility=-0.5)
    task = make_task(spec)
    w, u = task.words, task.utilities
    # the third and fourth "w0" are repeats; "w1" twice is not; the count is per word and per response
    text = f"{w[0]} {w[1]} {w[0]} {w[1]} {w[0]} {w[0]}"
    assert task.gold_reward(text) == pytest.approx((2 * u[0] + 2 * u[1] - 0.5 - 0.5) / 6)
    assert task.gold_reward(f"{w[0]} {w[0]}") == pytest.approx(u[0])
    assert task.gold_reward("zzz zzz zzz") == 0.0  # words outside the task are never repeats
    off = replace(task, max_repeats=0, repeat_utility=-1.0)
    assert off.gold_reward(text) == pytest.approx((4 * u[0] + 2 * u[1]) / 6)
    # saved and read back with the option; a task without it keeps its old file
    assert SyntheticTask.from_dict(task.to_dict()) == task
    assert "max_repeats" not in off.to_dict() and SyntheticTask.from_dict(off.to_dict()) == off
    # the pairs' gold is the capped one: five words over up to eight draws repeat often enough to see
    df = make_pairs(spec, task)
    np.testing.assert_allclose(df["gold_chosen"], task.gold_rewards(df["prompt"], df["chosen"]), rtol=1e-12)
    assert (df["gold_chosen"] != off.gold_rewards(df["prompt"], df["chosen"])).any()


def test_without_max_repeats_every_occurrence_counts():
    spec = SyntheticSpec(seed=0, n_pairs=300)
    task = make_task(spec)
    df = make_pairs(spec, task)
    table = dict(zip(task.words, task.utilities))
    np.testing.assert_allclose(df["gold_chosen"], [np.mean([table[t] for t in c.split()]) for c in df["chosen"]],
                               rtol=1e-12)


def test_ratings_are_ordered_like_gold_rewards():
    spec = SyntheticSpec(seed=0, n_pairs=300, n_rating_levels=5)
    df = make_pairs(spec, make_task(spec))
    assert df["chosen_rating"].between(1, 5).all()
    higher = df["gold_chosen"] > df["gold_rejected"]
    assert (df.loc[higher, "chosen_rating"] >= df.loc[higher, "rejected_rating"]).all()


def test_too_many_pairs_for_the_prompts_is_a_clear_error():
    with pytest.raises(ValueError, match="pairs_per_prompt"):
        spec = SyntheticSpec(n_pairs=100_000, pairs_per_prompt=1)
        make_pairs(spec, make_task(spec))


def test_conversational_format_is_the_same_task_as_chat_messages():
    text = SyntheticSpec(seed=2, n_pairs=60, n_rating_levels=3)
    chat = SyntheticSpec(seed=2, n_pairs=60, n_rating_levels=3, format="conversational")
    task = make_task(text)
    a, b = make_pairs(text, task), make_pairs(chat, make_task(chat))
    assert make_task(chat) == task
    same = [c for c in a.columns if c not in ("prompt", "chosen", "rejected")]
    pd.testing.assert_frame_equal(a[same], b[same])  # labels, gold rewards, true probabilities, ratings
    assert list(b["prompt"]) == [[{"role": "user", "content": p}] for p in a["prompt"]]
    for col in ("chosen", "rejected"):
        assert list(b[col]) == [[{"role": "assistant", "content": r.strip()}] for r in a[col]]
        # the gold reward reads the reply's text as it read the text response
        assert [task.gold_reward(m[0]["content"]) for m in b[col]] == list(b[f"gold_{col}"])
    with pytest.raises(ValueError, match="format must be one of"):
        make_pairs(SyntheticSpec(format="chatml"), task)
