"""LoRA adapters (peft): the ``lora`` blocks of the reward model, the SFT and PPO.

Every published model is merged (:func:`merged`) before it is saved, so downstream stages and the
deployable model load a plain transformers model and never need peft.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

TaskType = Literal["CAUSAL_LM", "SEQ_CLS"]


class LoraParams(BaseModel):
    """Low-rank adapters instead of full fine-tuning; the block set to null trains every weight."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the run instead of being ignored

    r: int = Field(8, ge=1, description="Rank of the adapters.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is (alpha / r) * B @ A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names adapted (e.g. [q_proj, v_proj]), or every linear layer of the "
        "trunk ('all-linear'; never the output head).")


def lora_config(params: LoraParams, task_type: TaskType, modules_to_save: list[str] | None = None) -> Any:
    """peft's ``LoraConfig`` for ``params``; ``modules_to_save`` are trained in full beside the adapters."""
    from peft import LoraConfig

    return LoraConfig(r=params.r, lora_alpha=params.alpha, lora_dropout=params.dropout,
                      target_modules=params.target_modules, task_type=task_type, modules_to_save=modules_to_save,
                      bias="none")


def add_adapters(model: nn.Module, params: LoraParams, task_type: TaskType) -> nn.Module:
    """Inject adapters into ``model`` in place and freeze its other weights.

    The model stays the transformers class it was (no ``PeftModel`` around it), so code that reaches
    into its trunk or output head works unchanged. The random init of the adapters draws on torch's
    global generator: seed it first for a reproducible run.
    """
    from peft import inject_adapter_in_model

    return inject_adapter_in_model(lora_config(params, task_type), model)


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds LoRA layers (their ``.weight`` is the base weight alone)."""
    return any(hasattr(m, "lora_A") for m in model.modules())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` computing with its base weights only (``PeftModel.disable_adapter`` for an injected
    model); a model without adapters is left as it is. Not thread-safe: the switch is the model's."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]  # peft's LoRA layers; no import without them
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merged(model: nn.Module) -> nn.Module:
    """A plain transformers model: a ``PeftModel`` merged and unloaded, adapters injected by
    :func:`add_adapters` folded into their base weights, every weight trainable again (as a model
    loaded from its folder is); a model without adapters is returned as it is."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload().requires_grad_(True)
    layers = [(name, m) for name, m in model.named_modules() if hasattr(m, "lora_A")]
    for name, layer in layers:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    if layers:
        model.requires_grad_(True)
    return model
