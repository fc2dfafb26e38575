"""The last decoder layer run only at the positions that are read.

PPO reads a model's last hidden states at the response's positions only (the policy's logits, the
value model's values, the reference's logprobs); a reward model reads one position per sequence (its
last real token). Every layer but the last must run over the whole sequence, since later positions
attend to all earlier ones; the last layer's queries, attention output, MLP and final norm matter
only where they are read. For PPO, with a prompt about as long as the response, that is half of the
last layer: a sixth of a two-layer model's forward and backward; for a reward model it is nearly the
whole last layer (only its keys and values run over every token).

The earlier layers run as the model runs them (its masks, rotary tables and attention kernel): a
forward pre-hook on the last layer takes their output and ends the model's forward there. The last
layer then runs from its own modules on the read positions (:func:`last_layer_at`). Llama-style
layers only (``layers.architecture_reason``); each caller checks its first call for each model
against the model's full forward, and an unsupported or disagreeing model keeps the full forward.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from calibrated_rlhf.core.speed.layers import last_layer_at, last_layer_input, unsupported_reason, within_tolerance

# model -> whether its first trimmed forward matched its full forward (checked once per model)
_checked: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def response_hidden(backbone_owner: nn.Module, backbone: nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, position_ids: torch.Tensor, first: int,
                    inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | None:
    """Final-norm hidden states at rows ``first:`` [B, T - first, H], or None where the full forward must run.

    ``backbone_owner`` is the model whose config and layers are checked (the causal LM or the
    sequence-classification model); ``backbone`` its trunk. Rows ``first:`` must all be real tokens
    (PPO reads the last prompt token and the response, after any left padding). ``inputs_embeds``, when given,
    enter the backbone in place of ``input_ids``' embeddings (``frozen_trunk``: the states entering its top layers).
    """
    if _checked.get(backbone_owner) is False or unsupported_reason(backbone_owner, input_ids.shape[1]) is not None:
        return None
    inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    h, rope = last_layer_input(backbone, **inputs, attention_mask=attention_mask, position_ids=position_ids)
    T = input_ids.shape[1]
    queries = torch.arange(first, T, device=h.device).expand(h.shape[0], -1)
    # row first + i attends to the real keys at or before it
    causal = torch.ones((T - first, T), dtype=torch.bool, device=h.device).tril(diagonal=first)
    out = backbone.norm(last_layer_at(backbone.layers[-1], h, rope, queries,
                                      causal & attention_mask[:, None, :].bool()))
    if backbone_owner not in _checked and not _agrees(backbone_owner, backbone, out, inputs, attention_mask,
                                                      position_ids, first):
        return None
    return out


def _agrees(model: nn.Module, backbone: nn.Module, trimmed: torch.Tensor, inputs: dict[str, torch.Tensor],
            attention_mask: torch.Tensor, position_ids: torch.Tensor, first: int) -> bool:
    """Record (and return) whether the trimmed rows match the full forward's; warn once if not."""
    with torch.no_grad():
        full = backbone(**inputs, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False).last_hidden_state[:, first:]
    ok, error = within_tolerance(trimmed, full)
    _checked[model] = ok
    if not ok:
        warnings.warn(f"the trimmed last layer disagrees with {type(model).__name__}'s full forward "
                      f"(max error {error:.3g}); running the full forward instead", RuntimeWarning, stacklevel=3)
    return ok
