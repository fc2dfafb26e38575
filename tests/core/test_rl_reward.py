"""The reward RLOO and GRPO optimize: TRL's callable over the library's scorer equals the scorer itself on the
same responses, for each normalization method, and logs every reward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibrated_rlhf.core.backbone import BackboneParams, build_reward_backbone
from calibrated_rlhf.core.normalization import RewardTransform
from calibrated_rlhf.core.rl.reward import ScoreReward
from calibrated_rlhf.core.scoring import RewardScorer, rl_score_fn
from calibrated_rlhf.core.synthetic import SyntheticTask
from tests.conftest import TINY_BACKBONE

PROMPTS = ["Describe the food in Paris.", "Describe the weather in Oslo.", "Describe the food in Paris."]
RESPONSES = [" calm bright", " dull grey wet cold", " bright"]


@pytest.mark.parametrize(("method", "entry"), [("zscore", "normalized"), ("none", "calibrated"), ("raw", "raw")])
def test_reward_callable_equals_the_scorer_on_the_same_responses(tiny_tokenizer, method, entry):
    torch.manual_seed(0)
    model = build_reward_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer).eval()
    transform = RewardTransform(temperature=0.5, mean=0.2, std=3.0, clip=None, computed_on="x",
                                reward_model_version=None, n=2)
    task = SyntheticTask.from_dict({"words": ["calm", "bright", "dull"], "utilities": [0.5, 1.0, -1.0], "scale": 4.0})
    scorer = RewardScorer(model, tiny_tokenizer, transform, raw_multiplier=2.0)
    reward = ScoreReward(rl_score_fn(scorer, method, task, offset=0.1), tiny_tokenizer)
    # what TRL hands over: the sampled ids after each prompt (EOS included) and their standalone decoding
    ids = [tiny_tokenizer(p + r)["input_ids"][len(tiny_tokenizer(p)["input_ids"]):] + [tiny_tokenizer.eos_token_id]
           for p, r in zip(PROMPTS, RESPONSES)]
    assert reward.responses(PROMPTS, ids) == RESPONSES  # the text in the prompt's context, as PPO decodes it
    logged: dict[str, float] = {}
    rewards = reward(prompts=PROMPTS, completions=tiny_tokenizer.batch_decode(ids, skip_special_tokens=True),
                     completion_ids=ids, log_metric=logged.__setitem__, trainer_state=None)
    scored = scorer.score(PROMPTS, RESPONSES)
    np.testing.assert_allclose(rewards, getattr(scored, entry), rtol=1e-6)
    assert logged["rewards/raw"] == pytest.approx(scored.raw.mean(), rel=1e-6)
    assert logged["rewards/normalized"] == pytest.approx(scored.normalized.mean(), rel=1e-6)
    gold = [task.gold_reward(r) for r in RESPONSES]
    assert logged["rewards/gold"] == pytest.approx(np.mean(gold), rel=1e-6)
    assert logged["rewards/gold_gap"] == pytest.approx(np.mean(scored.calibrated - 4.0 * np.array(gold) - 0.1), rel=1e-5)


def test_a_chat_completion_is_scored_as_the_assistant_turn(tiny_tokenizer):
    """TRL hands conversational prompts over as message lists: the reply is the turn's text, its end of turn
    dropped, scored as an assistant message by the same scorer."""
    torch.manual_seed(0)
    model = build_reward_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer).eval()
    transform = RewardTransform(temperature=0.5, mean=0.2, std=3.0, clip=None, computed_on="x",
                                reward_model_version=None, n=2)
    scorer = RewardScorer(model, tiny_tokenizer, transform)
    reward = ScoreReward(rl_score_fn(scorer, "zscore"), tiny_tokenizer)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    ids = [tiny_tokenizer(r, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id] for r in RESPONSES]
    replies = reward.responses(prompts, ids)
    assert replies == [tiny_tokenizer.decode(i[:-1], skip_special_tokens=True) for i in ids]
    rewards = reward(prompts=prompts, completions=None, completion_ids=ids)
    np.testing.assert_allclose(rewards, scorer.score(prompts, replies).normalized, rtol=1e-6)
