"""What RL optimizes under each normalization method, and the reference statistics, from one tiny reward model."""

import numpy as np
import pytest
import torch

from calibrated_rlhf.core.early_warning import repeated_words
from calibrated_rlhf.core.backbone import BackboneParams, build_reward_backbone
from calibrated_rlhf.core.ensemble import EnsembleSpec, RewardEnsemble
from calibrated_rlhf.core.normalization import RewardTransform
from calibrated_rlhf.core.scoring import RewardScorer, gold_offset, reference_statistics, rl_score_fn
from calibrated_rlhf.core.synthetic import SyntheticTask
from tests.conftest import TINY_BACKBONE

PROMPTS = ["Describe the food in Paris.", "Describe the weather in Oslo.", "Describe a cat.", "Describe rain."]
RESPONSES = [" calm bright", " dull grey wet cold", " warm", " wet wet wet grey calm"]


@pytest.fixture(scope="module")
def reward_model(tiny_tokenizer):
    torch.manual_seed(0)
    return build_reward_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer).eval()


def test_reference_statistics_stream_the_calibrated_rewards_of_every_response(reward_model, tiny_tokenizer):
    scorer = RewardScorer(reward_model, tiny_tokenizer, batch_size=3)
    raw_direct, _ = scorer.raw(PROMPTS, RESPONSES)
    stats, raw, spread = reference_statistics(scorer, PROMPTS, RESPONSES, temperature=0.5)
    np.testing.assert_allclose(raw, raw_direct, rtol=1e-6)
    assert spread is None
    assert stats.count == 4
    assert stats.mean == pytest.approx(np.mean(raw_direct / 0.5), rel=1e-6)
    assert stats.std == pytest.approx(np.std(raw_direct / 0.5), rel=1e-5)


def _ensemble(tiny_tokenizer):
    torch.manual_seed(1)
    members = [build_reward_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer).eval() for _ in range(2)]
    return RewardEnsemble(members, EnsembleSpec("mean", (1.0, 2.0)))


def test_reference_statistics_of_an_ensemble_keep_each_responses_disagreement(tiny_tokenizer):
    ens = _ensemble(tiny_tokenizer)
    scorer = RewardScorer(ens, tiny_tokenizer, batch_size=2, raw_multiplier=3.0)
    raw_direct, spread_direct = scorer.raw(PROMPTS, RESPONSES)
    stats, raw, spread = reference_statistics(scorer, PROMPTS, RESPONSES, temperature=2.0)
    np.testing.assert_allclose(raw, raw_direct, rtol=1e-6)
    np.testing.assert_allclose(spread, spread_direct, rtol=1e-6)
    assert stats.mean == pytest.approx(np.mean(raw_direct / 2.0), rel=1e-6)


def test_iter_raw_yields_every_response_once_scaled_by_the_multiplier(reward_model, tiny_tokenizer):
    base, _ = RewardScorer(reward_model, tiny_tokenizer).raw(PROMPTS, RESPONSES)
    scorer = RewardScorer(reward_model, tiny_tokenizer, batch_size=3, raw_multiplier=-2.0)
    batches = list(scorer.iter_raw(PROMPTS, RESPONSES))
    assert [len(idx) for idx, _, _ in batches] == [3, 1]
    assert sorted(np.concatenate([idx for idx, _, _ in batches]).tolist()) == [0, 1, 2, 3]
    got = np.empty(4)
    for idx, raw, spread in batches:
        got[idx] = raw
        assert spread is None
    np.testing.assert_allclose(got, -2.0 * base, rtol=1e-6)


def test_score_without_a_transform_has_raw_only(reward_model, tiny_tokenizer):
    scored = RewardScorer(reward_model, tiny_tokenizer, raw_multiplier=2.0).score(PROMPTS, RESPONSES)
    base, _ = RewardScorer(reward_model, tiny_tokenizer).raw(PROMPTS, RESPONSES)
    np.testing.assert_allclose(scored.raw, 2.0 * base, rtol=1e-6)
    assert scored.calibrated is None and scored.normalized is None and scored.ensemble_std is None


def test_score_of_an_ensemble_carries_its_disagreement(tiny_tokenizer):
    ens = _ensemble(tiny_tokenizer)
    t = _transform()
    scorer = RewardScorer(ens, tiny_tokenizer, transform=t)
    scored = scorer.score(PROMPTS, RESPONSES)
    raw, spread = scorer.raw(PROMPTS, RESPONSES)
    np.testing.assert_array_equal(scored.ensemble_std, spread)
    np.testing.assert_allclose(scored.calibrated, raw / t.temperature)
    out = rl_score_fn(scorer, "zscore")(PROMPTS, RESPONSES)
    np.testing.assert_allclose(out["ensemble_std"].numpy(), spread.astype(np.float32))
    plain = RewardScorer(ens, tiny_tokenizer).score(PROMPTS, RESPONSES)  # no transform: raw and disagreement
    np.testing.assert_array_equal(plain.ensemble_std, spread)
    np.testing.assert_array_equal(plain.raw, raw)


TASK = {"words": ["calm", "bright", "dull", "wet"], "utilities": [0.5, 1.0, -1.0, -0.5], "scale": 4.0}


def _transform(clip=0.5):
    return RewardTransform(temperature=0.5, mean=0.2, std=3.0, clip=clip, computed_on="x",
                           reward_model_version=None, n=2)


def test_gold_offset_is_the_mean_gap_between_calibrated_proxy_and_true_logit(reward_model, tiny_tokenizer):
    task = SyntheticTask.from_dict(TASK)
    scorer = RewardScorer(reward_model, tiny_tokenizer, transform=_transform())
    calibrated = scorer.score(PROMPTS, RESPONSES).calibrated
    gold = np.array([task.gold_reward(r) for r in RESPONSES])
    offset = gold_offset(scorer, task, PROMPTS, RESPONSES)
    assert isinstance(offset, float)
    assert offset == pytest.approx(float(np.mean(calibrated - 4.0 * gold)), rel=1e-12)
    assert gold_offset(scorer, task, [], []) is None


@pytest.mark.parametrize("method", ["zscore", "none", "raw", "minmax_batch", "whiten_batch", "running_zscore",
                                    "calibrated_clip"])
def test_score_is_what_the_method_optimizes_and_every_reward_is_returned(reward_model, tiny_tokenizer, method):
    task = SyntheticTask.from_dict(TASK)
    t = _transform(clip=0.5)
    scorer = RewardScorer(reward_model, tiny_tokenizer, transform=t)
    scored = scorer.score(PROMPTS, RESPONSES)
    fn = rl_score_fn(scorer, method, task, offset=0.25)
    out = fn(PROMPTS, RESPONSES)
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    expected_score = {
        "zscore": scored.normalized, "none": scored.calibrated, "raw": scored.raw,
        "minmax_batch": (scored.raw - scored.raw.min()) / (scored.raw.max() - scored.raw.min()),
        "whiten_batch": (scored.calibrated - scored.calibrated.mean()) / (scored.calibrated.std() + 1e-8),
        "running_zscore": np.clip((scored.calibrated - scored.calibrated.mean()) / scored.calibrated.std(), -0.5, 0.5),
        "calibrated_clip": np.clip(scored.calibrated, -0.5, 0.5),
    }[method]
    np.testing.assert_allclose(out["score"].numpy(), f32(expected_score), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["raw"].numpy(), f32(scored.raw), rtol=1e-6)
    np.testing.assert_allclose(out["calibrated"].numpy(), f32(scored.calibrated), rtol=1e-6)
    np.testing.assert_allclose(out["normalized"].numpy(), f32(scored.normalized), rtol=1e-6)
    gold = np.array([task.gold_reward(r) for r in RESPONSES])
    np.testing.assert_allclose(out["gold"].numpy(), f32(gold), rtol=1e-6)
    np.testing.assert_allclose(out["gold_gap"].numpy(), f32(scored.calibrated - 4.0 * gold - 0.25), rtol=1e-5,
                               atol=1e-6)
    named = {"minmax_batch", "whiten_batch", "running_zscore", "calibrated_clip"}
    base = {"raw", "calibrated", "normalized", "score", "gold", "gold_gap", "repeated_words"}
    np.testing.assert_allclose(out["repeated_words"].numpy(), f32(repeated_words(RESPONSES)))
    assert set(out) == base | ({method} if method in named else set())
    if method in named:
        torch.testing.assert_close(out[method], out["score"])
    assert all(v.dtype == torch.float32 for v in out.values())


def test_a_repetition_profile_adds_each_responses_surprisal(reward_model, tiny_tokenizer):
    from calibrated_rlhf.core.early_warning import RepetitionProfile

    profile = RepetitionProfile.of(list(RESPONSES))
    out = rl_score_fn(RewardScorer(reward_model, tiny_tokenizer, transform=_transform()), "zscore",
                      profile=profile)(PROMPTS, RESPONSES)
    np.testing.assert_allclose(out["repetition_surprisal"].numpy(),
                               np.asarray(profile.surprisal(RESPONSES), dtype=np.float32))


def test_without_a_task_or_offset_there_is_no_gold(reward_model, tiny_tokenizer):
    scorer = RewardScorer(reward_model, tiny_tokenizer, transform=_transform())
    assert set(rl_score_fn(scorer, "zscore")(PROMPTS, RESPONSES)) == {"raw", "calibrated", "normalized", "score",
                                                                          "repeated_words"}
    task = SyntheticTask.from_dict(TASK)
    assert "gold_gap" not in rl_score_fn(scorer, "zscore", task)(PROMPTS, RESPONSES)


def test_calibrated_clip_without_a_clip_is_the_calibrated_reward(reward_model, tiny_tokenizer):
    scorer = RewardScorer(reward_model, tiny_tokenizer, transform=_transform(clip=None))
    fn = rl_score_fn(scorer, "calibrated_clip")
    assert fn.clip is None
    out = fn(PROMPTS, RESPONSES)
    torch.testing.assert_close(out["score"], out["calibrated"])


@pytest.mark.parametrize("multiplier", [1.0, -1.0])
def test_calibrated_clip_bounds_both_tails(reward_model, tiny_tokenizer, multiplier):
    t = RewardTransform(temperature=1e-3, mean=0.0, std=1.0, clip=0.5, computed_on="x", reward_model_version=None,
                        n=2)
    scorer = RewardScorer(reward_model, tiny_tokenizer, transform=t, raw_multiplier=multiplier)
    out = rl_score_fn(scorer, "calibrated_clip")(PROMPTS, RESPONSES)
    calibrated = out["calibrated"].numpy()
    np.testing.assert_array_equal(out["score"].numpy(), np.clip(calibrated, -0.5, 0.5))
    assert np.all(np.abs(out["score"].numpy()) <= 0.5)


def test_running_zscore_state_resumes_the_same_rewards(reward_model, tiny_tokenizer):
    scorer = RewardScorer(reward_model, tiny_tokenizer, transform=_transform(clip=2.0))
    a = rl_score_fn(scorer, "running_zscore")
    assert a.normalizer is not None and a.normalizer.clip == 2.0
    a(PROMPTS[:2], RESPONSES[:2])
    state = a.state_dict()
    assert set(state) == {"normalizer"} and state["normalizer"]["count"] == 2
    b = rl_score_fn(scorer, "running_zscore")
    b.load_state_dict(state)
    torch.testing.assert_close(a(PROMPTS[2:], RESPONSES[2:])["score"], b(PROMPTS[2:], RESPONSES[2:])["score"])
    assert b.normalizer.moments.count == 4


def test_state_of_one_method_does_not_load_into_another(reward_model, tiny_tokenizer):
    scorer = RewardScorer(reward_model, tiny_tokenizer, transform=_transform())
    plain = rl_score_fn(scorer, "zscore")
    assert plain.state_dict() == {} and plain.normalizer is None
    plain.load_state_dict({})
    running = rl_score_fn(scorer, "running_zscore")
    with pytest.raises(ValueError, match=r"^score function state \[\] does not fit normalization method "
                                         r"'running_zscore'$"):
        running.load_state_dict({})
    with pytest.raises(ValueError, match=r"^score function state \['normalizer'\] does not fit normalization "
                                         r"method 'zscore'$"):
        plain.load_state_dict({"normalizer": {"count": 1, "mean": 0.0, "m2": 0.0}})


def test_a_scorer_without_a_transform_gives_no_clip(reward_model, tiny_tokenizer):
    fn = rl_score_fn(RewardScorer(reward_model, tiny_tokenizer), "raw", offset=1.0)
    assert fn.clip is None and fn.offset == 1.0 and fn.method == "raw" and fn.task is None
