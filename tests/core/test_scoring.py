"""The one scoring path: the ids a reward model sees, the transform applied, lengths enforced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibrated_rlhf.core.backbone import BackboneParams, build_reward_backbone
from calibrated_rlhf.core.scoring import score_rewards
from calibrated_rlhf.core.normalization import RewardTransform
from calibrated_rlhf.core.preferences import render_ids
from calibrated_rlhf.core.scoring import RewardScorer
from tests.conftest import TINY_BACKBONE


@pytest.fixture(scope="module")
def reward_model(tiny_tokenizer):
    torch.manual_seed(0)
    return build_reward_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer).eval()


PROMPTS = ["Describe the food in Paris.", "Describe the weather in Oslo."]
RESPONSES = [" calm bright", " dull grey wet cold"]


def test_text_scores_are_the_reward_models_own_on_prompt_response_eos(reward_model, tiny_tokenizer):
    scorer = RewardScorer(reward_model, tiny_tokenizer)
    ids = [render_ids(tiny_tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    assert all(x[-1] == tiny_tokenizer.eos_token_id for x in ids)
    expected, _ = score_rewards(reward_model, ids, tiny_tokenizer.pad_token_id)
    raw, spread = scorer.raw(PROMPTS, RESPONSES)
    np.testing.assert_array_equal(raw, expected)
    assert spread is None


def test_a_sampled_response_to_a_chat_prompt_scores_as_the_same_response_in_a_pair(reward_model, tiny_tokenizer):
    """PPO samples text; pairs hold assistant messages: the reward model must see the same ids for both."""
    prompt = [{"role": "user", "content": "Describe the food in Paris."}]
    as_pair = render_ids(tiny_tokenizer, prompt, [{"role": "assistant", "content": " calm bright"}])
    scorer = RewardScorer(reward_model, tiny_tokenizer)
    assert scorer.render([prompt], [" calm bright"]) == [as_pair]
    assert scorer.raw([prompt], [" calm bright"])[0][0] == scorer.raw([prompt], [
        [{"role": "assistant", "content": " calm bright"}]])[0][0]


def test_score_applies_the_transform_and_the_multiplier(reward_model, tiny_tokenizer):
    t = RewardTransform(temperature=0.5, mean=0.1, std=2.0, clip=None, computed_on="x", reward_model_version=None, n=2)
    base, _ = RewardScorer(reward_model, tiny_tokenizer).raw(PROMPTS, RESPONSES)
    scored = RewardScorer(reward_model, tiny_tokenizer, transform=t.rescaled(4.0), raw_multiplier=4.0).score(
        PROMPTS, RESPONSES)
    np.testing.assert_allclose(scored.raw, 4.0 * base)
    np.testing.assert_allclose(scored.normalized, t.normalize(base), rtol=1e-12)  # scale-free
    np.testing.assert_allclose(scored.calibrated, t.calibrate(base), rtol=1e-12)


def test_mismatched_lengths_are_refused(reward_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="2 prompts for 1 responses"):
        RewardScorer(reward_model, tiny_tokenizer).render(PROMPTS, RESPONSES[:1])
