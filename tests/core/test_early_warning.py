"""The over-optimization warning: its rules, the gold-based judgement, and the stop rule inside TRL's RLOO."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from calibrated_rlhf.core.early_warning import (RepetitionProfile, Rule, best_threshold, gold_path, judge,
                                                repeated_words, score, smooth, warning_reason)


def test_repeated_words_is_each_responses_share_of_words_said_before_in_it():
    chat = [{"role": "assistant", "content": "hi  hi\nthere"}]
    responses = ["calm calm calm", "Calm quiet CALM", "a b c d", "", chat]
    np.testing.assert_allclose(repeated_words(responses), [2 / 3, 1 / 3, 0.0, 0.0, 1 / 3])
    assert warning_reason("repetition_surprisal", 2.0, 1.5) == ("repetition surprisal 2.000 exceeds "
                                                                "repetition_surprisal_stop = 1.500")


def test_repetition_surprisal_is_how_rarely_the_training_responses_repeat_a_word_as_often():
    training = ["a b c", "a a b", "c d", "x y x", "p"]  # most frequent word: 1, 2, 1, 2, 1
    profile = RepetitionProfile.of(training)
    np.testing.assert_allclose(profile.probabilities, [1 / 9, 4 / 9, 3 / 9, 1 / 9])  # add-one: 0, 1, 2, beyond
    responses = ["calm quiet", "calm calm", "calm calm calm", "calm " * 7, ""]
    np.testing.assert_allclose(profile.surprisal(responses), -np.log([4 / 9, 3 / 9, 1 / 9, 1 / 9, 1 / 9]))
    # a word said twice is what the training responses show; three times they never did
    assert profile.surprisal(["b b"])[0] < 1.1 < profile.surprisal(["b b b"])[0]
    with pytest.raises(ValueError, match="at least one training response"):
        RepetitionProfile.of([])


def test_rules_fire_at_the_first_crossing_above_below_and_relative():
    kl = [0.5, 1.0, 3.0, 2.0, 9.0]
    assert Rule("kl", 2.5).fires_at(kl) == 2
    assert Rule("kl", 10.0).fires_at(kl) is None
    entropy = [2.0, 1.9, 1.5, 0.9, 0.4]
    assert Rule("entropy", 0.5, relative=True, below=True).fires_at(entropy) == 3  # 0.9 / 2.0 < 0.5
    assert Rule("ensemble_std", 2.0, relative=True).fires_at([0.1, 0.15, 0.21, 0.3]) == 2
    # a missing measurement is no evidence; without a usable first value a relative rule cannot fire
    assert Rule("kl", 1.0).fires_at([0.5, math.nan, 2.0]) == 2
    assert Rule("ensemble_std", 2.0, relative=True).fires_at([math.nan, 1.0, 5.0]) is None
    assert Rule("ensemble_std", 2.0, relative=True).fires_at([]) is None
    assert Rule("entropy", 0.5, relative=True, below=True).describe() == "entropy / its first value < 0.5"
    # against a later base: the base's own value, and nothing before it, can fire
    steady = Rule("repeated_words", 2.0, relative=True, base=2)
    assert steady.fires_at([0.01, 0.5, 0.1, 0.15, 0.21, 0.3]) == 4 and steady.fires_at([0.1, 0.5]) is None
    assert steady.describe() == "repeated_words / its value at update 3 > 2"


def test_a_drawdown_rule_fires_on_a_fall_from_the_maximum_so_far_not_on_a_level():
    fall = Rule("gold", 0.2, drawdown=True)
    # a fall of 0.15 from the first peak does not fire; one of 0.25 from the second does
    assert fall.fires_at([0.0, 0.3, 0.15, 0.6, 0.5, 0.35]) == 5
    # the level is no evidence: a series that only rises never fires, however low it starts
    assert fall.fires_at([-3.0, -2.5, -2.0]) is None and fall.fires_at([]) is None
    # a missing measurement is neither a fall nor a maximum
    assert fall.fires_at([0.5, math.nan, 0.2]) == 2 and fall.fires_at([math.nan, 0.5, 0.2]) == 2
    assert fall.fires_at([0.5, -math.inf, 0.4]) is None
    # before its base nothing is read, neither a fall nor a maximum (the first batches' noise)
    late = Rule("gold", 0.2, drawdown=True, base=3)
    assert late.fires_at([1.0, 0.5, 0.5, 0.7, 0.9]) is None and late.fires_at([1.0, 0.5, 0.9]) is None
    assert late.fires_at([0.0, 0.0, 0.0, 0.7, 0.9, 0.6]) == 5
    assert late.describe() == "gold more than 0.2 below its maximum since update 4"
    assert fall.describe() == "gold more than 0.2 below its maximum so far"
    with pytest.raises(ValueError, match="neither relative nor below"):
        Rule("gold", 0.2, drawdown=True, relative=True)


def test_gold_path_finds_a_smoothed_peak_and_ignores_one_noisy_batch():
    rising = np.linspace(0.0, 1.0, 40)
    spike = rising.copy()
    spike[10] = 1.5  # one batch above the end: smoothed, it stays below the end
    assert not gold_path(rising).over_optimized and gold_path(rising).peak == 39
    assert gold_path(spike, window=5).drop < 0.1 and not gold_path(spike, window=5).over_optimized
    hump = np.concatenate([np.linspace(0.0, 1.0, 20), np.linspace(1.0, 0.3, 20)])
    path = gold_path(hump, window=5, min_drop=0.1)
    assert path.over_optimized and 17 <= path.peak <= 20 and path.drop == pytest.approx(0.7 - 0.7 / 19 / 1.5, abs=0.05)
    assert path.n_updates == 40
    np.testing.assert_allclose(smooth([1.0, 2.0, 3.0], 3), [1.5, 2.0, 2.5])
    with pytest.raises(ValueError, match="at least one update"):
        gold_path([])


def test_judge_and_score_count_catches_by_the_deadline_and_false_alarms():
    hump = np.concatenate([np.linspace(0.0, 1.0, 20), np.linspace(1.0, 0.0, 20)])
    over, safe = gold_path(hump), gold_path(np.linspace(0.0, 1.0, 40))
    rule = Rule("kl", 5.0)
    deadline = over.peak + 4  # 10% of 40 updates
    on_time = np.where(np.arange(40) >= deadline, 10.0, 0.0)
    late = np.where(np.arange(40) >= deadline + 1, 10.0, 0.0)
    assert judge(rule, on_time, over).caught and not judge(rule, late, over).caught
    assert judge(rule, on_time, safe).false_alarm and not judge(rule, np.zeros(40), safe).false_alarm
    verdicts = [judge(rule, on_time, over), judge(rule, late, over), judge(rule, on_time, safe),
                judge(rule, np.zeros(40), safe), judge(rule, np.zeros(40), safe)]
    s = score(rule, verdicts)
    assert (s.n_over, s.n_safe, s.caught, s.false_alarms) == (2, 3, 0.5, pytest.approx(1 / 3))
    quiet, loud = score(Rule("kl", 9.0), verdicts[:2] + verdicts[3:]), s
    assert best_threshold([loud, quiet], max_false_alarms=0.1) is quiet
    assert best_threshold([loud], max_false_alarms=0.1) is None
    assert math.isnan(score(rule, []).caught)


def test_rloo_stops_after_the_update_whose_disagreement_crosses_and_keeps_its_checkpoint(tiny_tokenizer,
                                                                                          synthetic_pairs, tmp_path):
    from calibrated_rlhf.core.backbone import BackboneParams, build_causal_backbone
    from calibrated_rlhf.core.rl.config import RLConfig
    from calibrated_rlhf.core.rl.reward import ScoreReward
    from calibrated_rlhf.core.rl.trainers import StopOnWarning, build_trainer
    from tests.conftest import TINY_BACKBONE

    policy_dir = tmp_path / "policy"
    build_causal_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer).save_pretrained(policy_dir)
    prompts = list(dict.fromkeys(synthetic_pairs["prompt"]))[:16]
    calls = []

    def score_fn(prompts, responses):  # a disagreement that grows by 0.1 per update: 0.1, 0.2, 0.3, ...
        calls.append(len(responses))
        n = len(responses)
        return {"score": torch.tensor([len(r.split()) / 5.0 for r in responses]),
                "ensemble_std": torch.full((n,), 0.1 * len(calls))}

    config = RLConfig(algorithm="rloo", num_updates=8, batch_size=4, num_generations=2, response_length=6,
                      learning_rate=5e-3, beta=0.2, kl_target=1.0)
    trainer, history = build_trainer(config, policy_dir, tiny_tokenizer, prompts, ScoreReward(score_fn, tiny_tokenizer),
                                     tmp_path / "out", save_steps=100, warning_stops={"ensemble_std": 0.25})
    trainer.train()
    stop = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StopOnWarning))
    assert trainer.state.global_step == 3 and "at update 3" in stop.reason
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-3"]  # the one it fired on
