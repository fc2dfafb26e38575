"""The lean decoding step against the model's own KV-cached forward, and its fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch

from calibrated_rlhf.core.speed import fast_decode
from calibrated_rlhf.core.causal_lm import left_pad
from calibrated_rlhf.core.ppo.rollout import sample_responses
from calibrated_rlhf.core.speed.config import PPOSpeed
from calibrated_rlhf.core.speed.layers import unsupported_reason

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16, 17, 18]]
EOS, PAD = 1, 0


def _model(kind: str, **overrides):
    import transformers as tf

    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[kind]
    # grouped-query attention (4 query heads on 2 key/value heads); Qwen2 adds q/k/v biases
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=40, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2)
    kw.update(overrides)
    torch.manual_seed(0)
    model = cls[1](cls[0](**kw)).eval()
    with torch.no_grad():  # biases are zero and norm gains one at init: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _sample(model, fast: bool, seed: int = 3, length: int = 12, sampling_temperature: float = 0.8):
    q, qm = left_pad(PROMPTS, PAD)
    return sample_responses(model, q, qm, length, sampling_temperature, EOS, PAD, torch.Generator().manual_seed(seed),
                            speed=PPOSpeed(fast_decode=fast))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_lean_steps_match_the_models_own_decoding(kind: str) -> None:
    model = _model(kind)
    assert unsupported_reason(model, 20) is None
    slow = _sample(model, fast=False)
    for seed_run in range(2):  # the first call checks the first step; the second is lean throughout
        fast = _sample(model, fast=True)
        assert fast_decode._checked.get(model) is True
        assert torch.equal(fast.responses, slow.responses)
        torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=1e-5)
        assert torch.equal(fast.mask, slow.mask)


def test_early_eos_and_other_seeds_still_match() -> None:
    model = _model("llama")
    with torch.no_grad():
        model.lm_head.weight[EOS] += 0.6  # EOS likely enough that rows stop at different steps
    stopped_early = False
    for seed in range(4):
        slow = _sample(model, False, seed=seed, sampling_temperature=1.0)
        fast = _sample(model, True, seed=seed, sampling_temperature=1.0)
        assert torch.equal(fast.responses, slow.responses)
        torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=1e-5)
        stopped_early |= bool((slow.mask.sum(1) < slow.mask.shape[1]).any())
    assert stopped_early  # the case this test is for did happen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_decode_lean(dtype: torch.dtype) -> None:
    """In bfloat16 / float16 the lean step passes its check (rounding-sized differences) and samples
    what the model's own forward samples, with logprobs as close as that precision allows."""
    model = _model("qwen2").to(dtype)
    slow = _sample(model, False, sampling_temperature=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed check would warn and fall back
        fast = _sample(model, True, sampling_temperature=1.0)
    assert fast_decode._checked.get(model) is True
    agree = (fast.responses == slow.responses).float().mean()
    assert agree > 0.9  # a rounding-sized difference may flip a near-tie draw, then the row drifts
    same = (fast.responses == slow.responses).all(1)
    torch.testing.assert_close(fast.logprobs[same], slow.logprobs[same], atol=0.05, rtol=0.05)
    # a genuinely different step is still refused at that precision
    model2 = _model("llama").to(dtype)
    h = torch.randn(4, 64, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not fast_decode.agrees_with(model2, h + 0.1 * (1 + h.abs().max()), h)


def test_unsupported_models_fall_back() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    assert "sliding window" in unsupported_reason(_model("mistral", sliding_window=8), 20)
    assert unsupported_reason(_model("mistral", sliding_window=32), 20) is None
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=40, n_positions=64,
                                      eos_token_id=EOS, bos_token_id=2)).eval()
    assert "gpt2" in unsupported_reason(gpt2, 20)
    slow, fast = _sample(gpt2, False), _sample(gpt2, True)
    assert torch.equal(fast.responses, slow.responses) and torch.equal(fast.logprobs, slow.logprobs)
    assert gpt2 not in fast_decode._checked  # never built, never checked


def test_a_disagreeing_model_is_sampled_with_its_own_forward(monkeypatch) -> None:
    model = _model("llama")
    slow = _sample(model, False)
    real_step = fast_decode.LeanDecoder.step
    monkeypatch.setattr(fast_decode.LeanDecoder, "step", lambda self, tokens: real_step(self, tokens) + 0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = _sample(model, True)
    assert any("fast decoding disagrees" in str(w.message) for w in caught)
    assert fast_decode._checked.get(model) is False
    assert torch.equal(fast.responses, slow.responses) and torch.equal(fast.logprobs, slow.logprobs)
    again = _sample(model, True)  # remembered: no decoder is built for this model any more
    assert torch.equal(again.logprobs, slow.logprobs)
