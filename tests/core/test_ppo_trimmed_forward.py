"""The last layer run at the read positions only, against the models' full forward, and its fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch

from calibrated_rlhf.core.speed import trimmed_forward
from calibrated_rlhf.core.causal_lm import left_pad, position_ids_from_mask
from calibrated_rlhf.core.ppo.rollout import PolicyAndValue, _response_hidden, response_logprobs

from .test_ppo_fast_decode import EOS, PAD, PROMPTS, _model

RESPONSE = 7


def _batch(seed: int = 0):
    """Left-padded prompts of different lengths followed by a response, as PPO's rollout builds them."""
    q, qm = left_pad(PROMPTS, PAD)
    g = torch.Generator().manual_seed(seed)
    resp = torch.randint(3, 40, (len(PROMPTS), RESPONSE), generator=g)
    resp[0, 3] = EOS  # post-EOS tokens stay attendable, as in a rollout
    ids = torch.cat([q, resp], 1)
    attn = torch.cat([qm, torch.ones_like(resp)], 1)
    return ids, attn, position_ids_from_mask(attn), q.shape[1]


def _value_model(kind: str):
    import transformers as tf

    lm = _model(kind)
    cfg = lm.config
    cfg.num_labels = 1
    torch.manual_seed(1)
    vm = tf.AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():
        for name, p in vm.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return lm, vm


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_trimmed_rows_and_gradients_match_the_full_forward(kind: str) -> None:
    """Grouped-query attention, q/k/v biases, norm gains and left padding: same values, same gradients."""
    policy, value = _value_model(kind)
    ids, attn, pos, start = _batch()
    grads, outs = [], []
    for trim in (False, True):
        wrapper = PolicyAndValue(policy, value_model=value, trim_last_layer=trim)
        wrapper.zero_grad(set_to_none=True)
        logits, values = wrapper(ids, attn, pos, start)
        (logits.logsumexp(-1).mean() + values.square().mean()).backward()
        outs.append((logits.detach(), values.detach()))
        grads.append({n: p.grad.clone() for n, p in wrapper.named_parameters()})
    assert trimmed_forward._checked.get(policy) is True and trimmed_forward._checked.get(value) is True
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_reference_logprobs_are_those_of_the_full_forward() -> None:
    model = _model("qwen2")
    ids, attn, pos, start = _batch(seed=3)
    with torch.inference_mode():
        full = response_logprobs(model, ids, attn, pos, start, 0.7)
        trimmed = response_logprobs(model, ids, attn, pos, start, 0.7, trim=True)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)


def test_unsupported_models_keep_the_full_forward() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=40, n_positions=64,
                                      eos_token_id=EOS, bos_token_id=2)).eval()
    ids, attn, pos, start = _batch()
    assert trimmed_forward.response_hidden(gpt2, gpt2.transformer, ids[:, :-1], attn[:, :-1], pos[:, :-1],
                                           start - 1) is None
    assert torch.equal(_response_hidden(gpt2, ids, attn, pos, start, trim=True),
                       _response_hidden(gpt2, ids, attn, pos, start))
    assert gpt2 not in trimmed_forward._checked  # never tried, never checked


def test_a_disagreeing_model_keeps_the_full_forward(monkeypatch) -> None:
    model = _model("llama")
    ids, attn, pos, start = _batch()
    full = _response_hidden(model, ids, attn, pos, start)
    real = trimmed_forward.last_layer_at
    monkeypatch.setattr(trimmed_forward, "last_layer_at", lambda *a: real(*a) + 0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _response_hidden(model, ids, attn, pos, start, trim=True)
    assert any("trimmed last layer disagrees" in str(w.message) for w in caught)
    assert trimmed_forward._checked.get(model) is False
    assert torch.equal(out, full)
    assert torch.equal(_response_hidden(model, ids, attn, pos, start, trim=True), full)  # remembered
