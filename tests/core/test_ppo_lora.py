"""PPO with LoRA: the reference is the policy with its adapters off, its weights held once."""

from __future__ import annotations

import copy

import pytest
import torch

from calibrated_rlhf.core.lora import LoraParams, has_adapters, merged
from calibrated_rlhf.core.ppo import PPOConfig, PPOTrainer
from calibrated_rlhf.core.speed.layers import unsupported_reason
from calibrated_rlhf.core.ppo.models import reference_logprobs
from calibrated_rlhf.core.ppo.rollout import response_logprobs

from .test_ppo_helpers import PROMPTS, build_tokenizer, score_fn, tiny_models


@pytest.fixture(scope="module")
def trained():
    """A LoRA PPO run of two updates, and a frozen copy of the policy taken before it started."""
    tok = build_tokenizer()
    policy, _ = tiny_models(tok, seed=0, value=False)
    frozen = copy.deepcopy(policy).eval()
    cfg = PPOConfig(seed=0, num_updates=2, batch_size=16, num_ppo_epochs=2, response_length=6, learning_rate=1e-2,
                    lora=LoraParams(r=4, alpha=8))
    trainer = PPOTrainer(cfg, policy, tok, PROMPTS, score_fn)
    trainer.train()
    return tok, trainer, frozen


def logprobs_of(tok, model, adapters_off: bool = False) -> torch.Tensor:
    ids = torch.tensor([tok("say red cat w1 w2 w7 w3")["input_ids"], tok("say blue owl w9 w0 w4 w4")["input_ids"]])
    attn = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        def call(m):
            return response_logprobs(m, ids, attn, pos, 4)
        return reference_logprobs(model, call) if adapters_off else call(model)


def test_reference_is_the_policy_with_adapters_off_and_equals_a_frozen_copy(trained) -> None:
    tok, trainer, frozen = trained
    assert trainer.ref_policy is trainer.policy  # the base weights are held once
    expected = logprobs_of(tok, frozen)
    assert torch.allclose(logprobs_of(tok, trainer.ref_policy, adapters_off=True), expected, atol=1e-6)
    # the adapters trained: with them on, the policy has moved away from the reference
    assert (logprobs_of(tok, trainer.policy) - expected).abs().max() > 1e-3


def test_only_adapters_and_the_value_head_train_and_merging_keeps_the_function(trained) -> None:
    tok, trainer, frozen = trained
    trainable = {n for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_model.score.") for n in trainable), trainable
    # the value model started from the policy's trunk, not a random one
    assert torch.equal(trainer.value_model.model.embed_tokens.weight, frozen.model.embed_tokens.weight)
    assert "LoRA" in unsupported_reason(trainer.policy, 16)  # fast decoding would sample from base weights
    adapted = logprobs_of(tok, trainer.policy)
    plain = merged(copy.deepcopy(trainer.policy))
    assert not has_adapters(plain) and type(plain) is type(frozen)
    assert torch.allclose(logprobs_of(tok, plain), adapted, atol=1e-5)
