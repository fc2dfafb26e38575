"""A sequence-classification model's rewards, its last layer run only where its head reads.

A reward model's head reads one position per sequence: the last token that is not the pad token.
Every layer but the last must run over the whole sequence, but the last layer's queries, attention
output, MLP and final norm matter at that position only; only its keys and values are needed
everywhere. For the workload's two-layer Llama that is about 40% of the matrix products of a training
step, and half of its attention (:mod:`~calibrated_rlhf.core.speed.trimmed_forward` does the same for
PPO's response positions).

:func:`readout_logits` is a drop-in for ``model(input_ids, attention_mask).logits`` on padded rows
(training batches that are not packed, and scoring); ``pair_packing`` reads packed rows the same
way. Llama-style layers only; anything else, and a first call whose rewards disagree with the
model's own forward (checked once per model), runs the model's own forward.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from calibrated_rlhf.core.speed.layers import (classifier_parts, last_layer_at, last_layer_input, read_positions,
                                               readout_checked, trims, within_tolerance)

__all__ = ["classifier_parts", "read_positions", "readout_logits", "trims"]


def readout_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``model(input_ids, attention_mask).logits`` [B, labels], the last layer computed at each read position only."""
    if model not in readout_checked:
        _check(model, input_ids, attention_mask)
    logits = _trimmed(model, input_ids, attention_mask) if readout_checked.get(model) else None
    if logits is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits


def _trimmed(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The trimmed logits, or None where this batch or model needs the full forward."""
    if not trims(model, input_ids.shape[1]):
        return None
    inner, backbone, head = classifier_parts(model)
    pad_id = inner.config.get_text_config().pad_token_id
    if pad_id is None:  # transformers then reads the last column, of a batch of one only
        return None
    read = read_positions(input_ids, pad_id)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    if not bool(attention_mask[rows, read].all()):  # a read on a masked token: leave it to the model
        return None
    h, rope = last_layer_input(backbone, input_ids=input_ids, attention_mask=attention_mask)
    keys = torch.arange(input_ids.shape[1], device=input_ids.device)
    key_mask = ((keys[None, :] <= read[:, None]) & attention_mask.bool())[:, None, :]  # causal at the read
    out = last_layer_at(backbone.layers[-1], h, rope, read[:, None], key_mask)
    return head(backbone.norm(out[:, 0]))


def _check(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Record whether the trimmed logits match the model's own, without dropout; warn once if not.

    A batch the trimmed path does not take (a read on a masked token) records nothing: the next one is checked.
    """
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours = _trimmed(model, input_ids, attention_mask)
            if ours is None:
                return
            theirs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        model.train(training)
    ok, error = within_tolerance(ours, theirs)
    readout_checked[model] = ok
    if not ok:
        warnings.warn(f"the trimmed readout disagrees with {type(model).__name__}'s own forward "
                      f"(max error {error:.3g}); running the full forward instead", RuntimeWarning, stacklevel=3)
