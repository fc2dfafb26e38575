"""The reward normalizations beside the frozen z-score: running mean and std updated during RL, per-batch
whitening, and a score clip, as values of ``normalization.method`` through the one scoring path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibrated_rlhf.core.backbone import BackboneParams, build_reward_backbone
from calibrated_rlhf.core.normalization import RewardTransform, RunningNormalizer, whiten_batch
from calibrated_rlhf.core.scoring import RewardScorer, rl_score_fn
from tests.conftest import TINY_BACKBONE

PROMPTS = ["Describe the food in Paris.", "Describe the weather in Oslo.", "Describe a day.", "Describe a cat."]
RESPONSES = [" calm bright", " dull grey wet cold", " bright", " wet calm dull"]


def test_running_normalizer_is_the_z_score_against_every_batch_so_far():
    norm = RunningNormalizer(clip=1.5)
    first, second = np.array([1.0, 2.0, 3.0]), np.array([10.0, 0.0])
    np.testing.assert_allclose(norm(first), np.clip((first - 2.0) / first.std(), -1.5, 1.5))
    seen = np.concatenate([first, second])
    np.testing.assert_allclose(norm(second), np.clip((second - seen.mean()) / seen.std(), -1.5, 1.5))
    resumed = RunningNormalizer(clip=1.5)
    resumed.load_state_dict(norm.state_dict())
    assert resumed(np.array([4.0]))[0] == pytest.approx(norm(np.array([4.0]))[0])
    np.testing.assert_allclose(whiten_batch(np.array([1.0, 3.0])), [-1.0, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(whiten_batch(np.array([2.0, 2.0])), [0.0, 0.0])


def _running_reference(calibrated: np.ndarray) -> np.ndarray:
    """The first two responses' z-scores against all four, the other two scored first."""
    seen = np.r_[calibrated[2:], calibrated[:2]]
    return np.clip((calibrated[:2] - seen.mean()) / seen.std(), -3.0, 3.0)


@pytest.mark.parametrize("a", [0.25, 4.0])
def test_new_methods_through_the_score_function(tiny_tokenizer, a):
    torch.manual_seed(0)
    model = build_reward_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer).eval()
    t = RewardTransform(temperature=0.5, mean=0.2, std=2.0, clip=3.0, computed_on="x", reward_model_version=None, n=2)

    def fn(method, multiplier=1.0, clip=3.0):
        applied = RewardTransform.from_dict({**t.rescaled(multiplier).to_dict(), "clip": clip})
        return rl_score_fn(RewardScorer(model, tiny_tokenizer, applied, raw_multiplier=multiplier), method)

    whiten = fn("whiten_batch")(PROMPTS, RESPONSES)
    calibrated = whiten["calibrated"].double().numpy()
    np.testing.assert_allclose(whiten["score"].numpy(), whiten_batch(calibrated), rtol=1e-4, atol=1e-5)
    clipped = fn("calibrated_clip", clip=0.05)(PROMPTS, RESPONSES)["score"].double().numpy()
    np.testing.assert_allclose(clipped, np.clip(calibrated, -0.05, 0.05), rtol=1e-5)
    running = fn("running_zscore")
    running(PROMPTS[2:], RESPONSES[2:])
    after = running(PROMPTS[:2], RESPONSES[:2])["score"]
    np.testing.assert_allclose(after.numpy(), _running_reference(calibrated), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(after, fn("running_zscore")(PROMPTS[:2], RESPONSES[:2])["score"])
    assert running.normalizer.moments.count == 4
    # per-batch and running statistics cancel the scale of the raw outputs, as the frozen z-score does
    for method in ("whiten_batch", "running_zscore"):
        torch.testing.assert_close(fn(method, a)(PROMPTS, RESPONSES)["score"], fn(method)(PROMPTS, RESPONSES)["score"],
                                   rtol=1e-4, atol=1e-4)
