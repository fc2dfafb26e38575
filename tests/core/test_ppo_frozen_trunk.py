"""The frozen trunk run once per batch (``speed.frozen_trunk``): every forward that starts above it gives the full
forward's values and gradients, the frozen layers do not run again, and a model that does not share them keeps
its full forward."""

from __future__ import annotations

import copy

import pytest
import torch

from calibrated_rlhf.core.lora import LoraParams, add_adapters
from calibrated_rlhf.core.ppo import PPOConfig, PPOTrainer
from calibrated_rlhf.core.ppo.models import reference_logprobs
from calibrated_rlhf.core.ppo.rollout import PolicyAndValue, batch_inputs, response_logprobs
from calibrated_rlhf.core.speed import frozen_trunk
from calibrated_rlhf.core.speed.config import PPOSpeed

from .test_ppo_fast_decode import _model
from .test_ppo_helpers import PROMPTS, build_tokenizer, score_fn, tiny_models
from .test_ppo_trimmed_forward import _batch

LAYERS = 4
TOP = [f"layers.{i}.{m}" for i in (2, 3) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]


def _adapted(kind: str):
    """A policy adapted on its top two layers, and a value model with the policy's trunk and its own adapters,
    the adapters away from zero so that they change what the top layers compute."""
    import transformers as tf

    policy = _model(kind, num_hidden_layers=LAYERS)
    cfg = copy.deepcopy(policy.config)
    cfg.num_labels = 1
    torch.manual_seed(1)
    value = tf.AutoModelForSequenceClassification.from_config(cfg)
    value.model.load_state_dict(policy.model.state_dict())
    policy.requires_grad_(False)
    value.requires_grad_(False)
    lora = LoraParams(r=4, alpha=8, target_modules=TOP)
    policy, value = add_adapters(policy, lora, "CAUSAL_LM"), add_adapters(value, lora, "SEQ_CLS")
    value.score.requires_grad_(True)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in [*policy.named_parameters(), *value.named_parameters()]:
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return policy, value


def _calls(layer: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    layer.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_forwards_above_the_trunk_match_the_full_forward_and_skip_the_frozen_layers(kind: str) -> None:
    policy, value = _adapted(kind)
    ids, attn, _, start = _batch()
    x = batch_inputs(ids, attn, start, 0.8, policy, PPOSpeed(frozen_trunk=True))
    assert x.trunk is not None and x.trunk.layer == 2
    assert batch_inputs(ids, attn, start, 0.8, policy, PPOSpeed(frozen_trunk=False)).trunk is None
    bottom = [_calls(policy.model.layers[0]), _calls(value.model.layers[1])]
    wrapper = PolicyAndValue(policy, value_model=value)
    outs, grads = [], []
    for trunk in (None, x.trunk):
        if trunk is not None:
            for calls in bottom:
                calls.clear()
        wrapper.zero_grad(set_to_none=True)
        logits, values = wrapper(x.ids, x.attn, x.pos, x.start, 0.8, trunk)
        (logits.logsumexp(-1).mean() + values.square().mean()).backward()
        with torch.no_grad():
            ref = reference_logprobs(policy, lambda m: response_logprobs(m, x.ids, x.attn, x.pos, x.start, 0.8,
                                                                          trunk=trunk))
        outs.append((logits.detach(), values.detach(), ref))
        grads.append({n: p.grad.clone() for n, p in wrapper.named_parameters() if p.grad is not None})
    # from the trunk, layers 0-1 ran only in each model's one first-use check (its full forward)
    assert [len(calls) for calls in bottom] == [1, 1]
    assert frozen_trunk.verdicts(policy) == [True] and frozen_trunk.verdicts(value) == [True]
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)
    # a minibatch's rows select the trunk's rows with them
    rows = torch.tensor([2, 0])
    part = x.select(rows)
    torch.testing.assert_close(wrapper(part.ids, part.attn, part.pos, part.start, 0.8, part.trunk)[0],
                               outs[0][0][rows], atol=1e-5, rtol=1e-5)


def test_a_model_whose_frozen_layers_differ_keeps_its_full_forward() -> None:
    policy, _ = _adapted("llama")
    ids, attn, _, start = _batch(seed=1)
    x = batch_inputs(ids, attn, start, 1.0, policy, PPOSpeed())
    other = copy.deepcopy(policy)
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight.add_(0.01)
    with torch.no_grad():
        shortcut = response_logprobs(other, x.ids, x.attn, x.pos, x.start, trunk=x.trunk)
        full = response_logprobs(other, x.ids, x.attn, x.pos, x.start)
    assert frozen_trunk.verdicts(other) == [False]
    torch.testing.assert_close(shortcut, full, atol=0, rtol=0)


def test_there_is_no_trunk_when_the_first_layer_trains_or_nothing_does() -> None:
    ids, attn, _, start = _batch()
    full = _model("llama", num_hidden_layers=LAYERS)  # full fine-tuning: every parameter trains
    assert batch_inputs(ids, attn, start, 1.0, full, PPOSpeed()).trunk is None
    low = add_adapters(_model("llama", num_hidden_layers=LAYERS).requires_grad_(False),
                       LoraParams(r=4, alpha=8, target_modules=["layers.0.self_attn.q_proj"]), "CAUSAL_LM")
    assert batch_inputs(ids, attn, start, 1.0, low, PPOSpeed()).trunk is None
    frozen = _model("llama", num_hidden_layers=LAYERS).requires_grad_(False)
    assert batch_inputs(ids, attn, start, 1.0, frozen, PPOSpeed()).trunk is None


def test_ppo_with_top_layer_adapters_trains_the_same_with_and_without_the_trunk() -> None:
    tok = build_tokenizer()
    runs = []
    for on in (True, False):
        policy, _ = tiny_models(tok, seed=0, layers=3, value=False)
        cfg = PPOConfig(seed=0, num_updates=3, batch_size=16, num_ppo_epochs=2, response_length=6,
                        learning_rate=1e-2, speed={"frozen_trunk": on},
                        lora=LoraParams(r=4, alpha=8, target_modules=["layers.2.self_attn.q_proj",
                                                                      "layers.2.mlp.down_proj"]))
        trainer = PPOTrainer(cfg, policy, tok, PROMPTS, score_fn)
        runs.append((trainer, trainer.train().history))
    (fast, h_fast), (plain, h_plain) = runs
    assert frozen_trunk.verdicts(fast.policy) == [True] and frozen_trunk.verdicts(plain.policy) == []
    assert len(h_fast) == len(h_plain) == 3
    for a, b in zip(h_fast, h_plain):
        for k, v in a.items():
            # a clip fraction counts comparisons that float rounding decides while nothing is clipped
            if not k.startswith("ppo/perf/") and not k.endswith("clipfrac"):
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
