"""The frozen trunk run once per batch: the layers below the first trained one, shared by every later forward.

With adapters on the top layers only (``conf/real_model`` adapts layers 26-29 of SmolLM2's 30), everything
below the first adapted layer is frozen, and it is the same weights in the policy, in the reference (the policy
with its adapters off) and in a value model whose trunk was copied from the policy's. PPO runs each batch through
those models again and again: the reference logprobs, the old values, then the policy and the value model once per
PPO epoch. Every one of them recomputes the frozen layers to the same numbers; on the real model that is 26 of 30
layers of every forward. Here the trunk runs once after sampling, its output (the states entering the first
trained layer, [B, T, H], outside any graph: nothing below them trains) is kept with the batch, and every later
forward starts there, through the model's own layers, masks and rotary tables: the backbone's own forward, fed
the states as ``inputs_embeds``, with its layer list cut to the layers from the first trained one on.

A model reads the shared states only after a check, once per model: Llama-style layers
(``layers.architecture_reason``); embeddings and every parameter below the trunk's layer frozen, free of
adapters, and equal to the policy's (the same tensors, or copies); and its first forward from the states within
the speed paths' tolerance of its full forward. Any other model runs its full forward. Full fine-tuning trains
layer 0, so there is no trunk and nothing changes.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from calibrated_rlhf.core.causal_lm import backbone_of
from calibrated_rlhf.core.speed.layers import architecture_reason, layer_input, within_tolerance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trunk:
    """The policy's frozen layers run over a batch: ``hidden`` [B, T, H] enters decoder layer ``layer``."""

    layer: int
    hidden: torch.Tensor
    source: nn.Module  # the policy's backbone, whose frozen weights the states come from

    def select(self, rows: torch.Tensor) -> "Trunk":
        return Trunk(self.layer, self.hidden[rows], self.source)


# model -> {(id of the trunk's source, layer): (the source, whether the model may start from that trunk)}; the source
# is held weakly and compared, so a verdict never passes to a later policy that happens to reuse a dead one's id
_verdicts: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int], tuple[weakref.ref, bool]]]" = \
    weakref.WeakKeyDictionary()


def first_trained_layer(backbone: nn.Module) -> int:
    """The lowest decoder layer with a trainable parameter or an adapter (0 if the embeddings train; the layer
    count if nothing trains): the layers below it compute the same whatever the training does."""
    if any(p.requires_grad for p in backbone.embed_tokens.parameters()):
        return 0
    for i, layer in enumerate(backbone.layers):
        if any(p.requires_grad for p in layer.parameters()) or any(hasattr(m, "lora_A") for m in layer.modules()):
            return i
    return len(backbone.layers)


def run_trunk(policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              position_ids: torch.Tensor) -> Trunk | None:
    """The policy's frozen layers over a batch, or None where there is nothing to share (its first layer trains,
    or its layers are not Llama-style)."""
    if architecture_reason(policy, input_ids.shape[1]) is not None:
        return None
    backbone = backbone_of(policy)
    layer = first_trained_layer(backbone)
    if layer == 0 or layer == len(backbone.layers):  # nothing frozen, or nothing trains (no PPO to speed up)
        return None
    with torch.no_grad():
        hidden, _ = layer_input(backbone, layer, input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids)
    return Trunk(layer, hidden, backbone)


@contextlib.contextmanager
def layers_from(backbone: nn.Module, layer: int) -> Iterator[None]:
    """The backbone's forward runs its layers from ``layer`` on only (its masks and rotary tables unchanged)."""
    full = backbone.layers
    backbone._modules["layers"] = full[layer:]
    try:
        yield
    finally:
        backbone._modules["layers"] = full


def starts_from(model: nn.Module, trunk: Trunk | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> bool:
    """Whether ``model``'s forward over this batch may start from ``trunk`` (checked once per model, module
    docstring). The first check runs the model's full forward beside the shortcut."""
    if trunk is None:
        return False
    verdicts = _verdicts.setdefault(model, {})
    key = (id(trunk.source), trunk.layer)
    if key not in verdicts or verdicts[key][0]() is not trunk.source:
        ok = _same_trunk(model, trunk) and _agrees(model, trunk, input_ids, attention_mask, position_ids)
        verdicts[key] = (weakref.ref(trunk.source), ok)
        log.info("%s %s", type(model).__name__, f"starts its forwards at layer {trunk.layer}, above the frozen trunk"
                 if ok else "does not share the policy's frozen trunk: it runs its full forward")
    return verdicts[key][1]


def verdicts(model: nn.Module) -> list[bool]:
    """Whether ``model`` may start from each trunk it was checked against (empty: never checked)."""
    return [ok for _, ok in _verdicts.get(model, {}).values()]


def _same_trunk(model: nn.Module, trunk: Trunk) -> bool:
    if architecture_reason(model, trunk.hidden.shape[1]) is not None:
        return False
    ours, theirs = backbone_of(model), trunk.source
    if len(ours.layers) <= trunk.layer or first_trained_layer(ours) < trunk.layer:
        return False
    pairs = [(ours.embed_tokens, theirs.embed_tokens)] + [(ours.layers[i], theirs.layers[i])
                                                          for i in range(trunk.layer)]
    for a, b in pairs:
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        if pa.keys() != pb.keys() or any(x is not pb[n] and not torch.equal(x, pb[n]) for n, x in pa.items()):
            return False
    return True


def _agrees(model: nn.Module, trunk: Trunk, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            position_ids: torch.Tensor) -> bool:
    backbone = backbone_of(model)
    with torch.no_grad():
        full = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False).last_hidden_state
        with layers_from(backbone, trunk.layer):
            ours = backbone(inputs_embeds=trunk.hidden, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state
    ok, error = within_tolerance(ours, full)
    if not ok:
        warnings.warn(f"starting {type(model).__name__}'s forward from the frozen trunk disagrees with its full "
                      f"forward (max error {error:.3g}); running the full forward instead", RuntimeWarning,
                      stacklevel=3)
    return ok
