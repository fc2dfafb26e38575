"""Building what PPO trains: the policy with its value function, and their optimizer."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from calibrated_rlhf.core.lora import add_adapters, adapters_disabled
from calibrated_rlhf.core.ppo.config import PPOConfig
from calibrated_rlhf.core.causal_lm import backbone_of, hidden_size_of, value_head_of
from calibrated_rlhf.core.ppo.rollout import PolicyAndValue


def with_lora(policy: nn.Module, value_model: nn.Module | None, config: PPOConfig
              ) -> tuple[nn.Module, nn.Module | None]:
    """With ``config.lora``: adapters in the policy and the value model, their other weights frozen.

    The value model, unless given, starts from the policy's trunk (adapting a random trunk would learn
    nothing) with a fresh score head, which trains in full. Without LoRA both are returned as given.
    """
    if config.lora is None:
        return policy, value_model
    if value_model is None and config.value_model == "separate":
        value_model = default_value_model(policy, config.seed)
        backbone_of(value_model).load_state_dict(backbone_of(policy).state_dict())
    policy = add_adapters(policy, config.lora, "CAUSAL_LM")
    if value_model is not None:
        value_model = add_adapters(value_model, config.lora, "SEQ_CLS")
        value_head_of(value_model).requires_grad_(True)
    return policy, value_model


def frozen_reference(policy: nn.Module, ref_policy: nn.Module | None, config: PPOConfig) -> nn.Module:
    """The reference, frozen and in eval mode: ``ref_policy``, or a deep copy of ``policy`` taken now.

    With LoRA and no ``ref_policy`` it is the policy itself, read with its adapters off
    (:func:`reference_logprobs`): the base weights are held once.
    """
    if ref_policy is None and config.lora is not None:
        return policy
    if ref_policy is None:
        ref_policy = copy.deepcopy(policy)
    if config.disable_dropout:
        disable_dropout(ref_policy)
    ref_policy.requires_grad_(False)
    return ref_policy.eval()


def reference_logprobs(reference: nn.Module, logprobs: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
    """``logprobs(reference)`` with any adapters of ``reference`` switched off for the call."""
    with adapters_disabled(reference):
        return logprobs(reference)


def policy_and_value(config: PPOConfig, policy: nn.Module, value_model: nn.Module | None) -> PolicyAndValue:
    """The policy joined to a value model ("separate") or to a fresh linear value head ("shared")."""
    if config.value_model == "shared":
        if value_model is not None:
            raise ValueError("value_model given but config.value_model == 'shared'")
        hidden = hidden_size_of(policy)
        head = nn.Linear(hidden, 1)
        g = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            # small init: the value head starts near zero, as is usual for RLHF value heads
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) / (hidden + 1))
            head.bias.zero_()
        wrapper = PolicyAndValue(policy, value_head=head.to(next(policy.parameters()).dtype),
                                 trim_last_layer=config.speed.active().trim_last_layer)
    else:
        if value_model is None:
            value_model = default_value_model(policy, config.seed)
        wrapper = PolicyAndValue(policy, value_model=value_model, trim_last_layer=config.speed.active().trim_last_layer)
    if config.disable_dropout:
        disable_dropout(wrapper)
    return wrapper


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's rate, from the next step on; it is saved with the optimizer's state, so a resumed run keeps it."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def adamw(params: list[nn.Parameter], config: PPOConfig) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it for these parameters (one kernel instead of a
    per-tensor loop: the step of a small model is otherwise dominated by dispatch overhead)."""
    kw = dict(lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps,
              weight_decay=config.weight_decay)
    if all(p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
           and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(params, **kw)


def default_value_model(policy: nn.Module, seed: int) -> nn.Module:
    """A fresh sequence-classification model (num_labels=1) with the policy's architecture."""
    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(policy.config)
    cfg.num_labels = 1
    state = torch.get_rng_state()
    torch.manual_seed(seed + 1)
    try:
        model = AutoModelForSequenceClassification.from_config(cfg, dtype=next(policy.parameters()).dtype)
    finally:
        torch.set_rng_state(state)
    if getattr(policy, "is_activation_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(next(policy.parameters()).device)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability in ``model`` to zero (modules and float attributes alike)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "hidden_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
