"""What RL optimizes under each normalization method, and the reference statistics, from one tiny reward model."""

import numpy as np
import pytest
import torch

from calibrated_rlhf.core.backbone import BackboneParams, build_reward_backbone
from calibrated_rlhf.core.normalization import RewardTransform
from calibrated_rlhf.core.scoring import RewardScorer, reference_statistics, rl_score_fn
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
