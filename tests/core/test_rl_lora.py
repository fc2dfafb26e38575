"""RLOO with LoRA adapters (``rl.lora``): only the adapted layers move, and the trained policy comes back merged,
a plain transformers model the next stages save and load without peft."""

from __future__ import annotations

import torch


def test_rloo_with_lora_trains_the_adapted_layers_only_and_returns_a_merged_policy(tiny_tokenizer, synthetic_pairs,
                                                                                 tmp_path):
    from calibrated_rlhf.core.backbone import BackboneParams, build_causal_backbone, build_reward_backbone
    from calibrated_rlhf.core.lora import LoraParams, has_adapters
    from calibrated_rlhf.core.normalization import RewardTransform
    from calibrated_rlhf.core.rl.config import RLConfig
    from calibrated_rlhf.core.rl.reward import ScoreReward
    from calibrated_rlhf.core.rl.trainers import train
    from calibrated_rlhf.core.scoring import RewardScorer, rl_score_fn
    from tests.conftest import TINY_BACKBONE

    torch.manual_seed(0)
    policy = build_causal_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    reward_model = build_reward_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer).eval()
    transform = RewardTransform(temperature=0.5, mean=0.0, std=1.0, clip=3.0, computed_on="x",
                                reward_model_version=None, n=2)
    reward = ScoreReward(rl_score_fn(RewardScorer(reward_model, tiny_tokenizer, transform), "zscore"), tiny_tokenizer)
    prompts = list(dict.fromkeys(synthetic_pairs["prompt"]))[:8]
    config = RLConfig(algorithm="rloo", num_updates=2, batch_size=4, num_generations=2, response_length=6,
                      learning_rate=5e-2, lora=LoraParams(r=4, alpha=8, target_modules=["v_proj"]))
    result = train(config, policy, tiny_tokenizer, prompts, reward, workdir=tmp_path)

    assert not has_adapters(result.policy) and type(result.policy) is type(policy)
    after = result.policy.state_dict()
    assert set(after) == set(before)  # merged: the same weights by name, no lora_A / lora_B
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("v_proj" in k for k in moved), moved
