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
layers only (``fast_decode.architecture_reason``); each caller checks its first call for each model
against the model's full forward, and an unsupported or disagreeing model keeps the full forward.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from calibrated_rlhf.core.ppo.fast_decode import rotate, unsupported_reason, within_tolerance

# model -> whether its first trimmed forward matched its full forward (checked once per model)
_checked: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


class _LastLayerReached(Exception):
    """Raised by the pre-hook to end the model's forward once the last layer's input is known."""


def response_hidden(backbone_owner: nn.Module, backbone: nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, position_ids: torch.Tensor, first: int) -> torch.Tensor | None:
    """Final-norm hidden states at rows ``first:`` [B, T - first, H], or None where the full forward must run.

    ``backbone_owner`` is the model whose config and layers are checked (the causal LM or the
    sequence-classification model); ``backbone`` its trunk. Rows ``first:`` must all be real tokens
    (PPO reads the last prompt token and the response, after any left padding).
    """
    if _checked.get(backbone_owner) is False or unsupported_reason(backbone_owner, input_ids.shape[1]) is not None:
        return None
    h, rope = last_layer_input(backbone, input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids)
    T = input_ids.shape[1]
    queries = torch.arange(first, T, device=h.device).expand(h.shape[0], -1)
    # row first + i attends to the real keys at or before it
    causal = torch.ones((T - first, T), dtype=torch.bool, device=h.device).tril(diagonal=first)
    out = backbone.norm(last_layer_at(backbone.layers[-1], h, rope, queries,
                                      causal & attention_mask[:, None, :].bool()))
    if backbone_owner not in _checked and not _agrees(backbone_owner, backbone, out, input_ids, attention_mask,
                                                      position_ids, first):
        return None
    return out


def last_layer_input(backbone: nn.Module, **forward_kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The hidden states entering the last layer [B, T, H] and the rotary tables, from the model's own forward."""
    captured: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        captured["rope"] = kwargs["position_embeddings"]
        raise _LastLayerReached

    handle = backbone.layers[-1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        backbone(use_cache=False, **forward_kwargs)
    except _LastLayerReached:
        pass
    finally:
        handle.remove()
    return captured["h"], captured["rope"]


def last_layer_at(layer: nn.Module, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                  queries: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """The decoder layer's output [B, Q, H] at positions ``queries`` [B, Q]; keys and values from every position.

    ``key_mask`` [B, Q, T] is True where a query may attend to a key. Every query must attend to at
    least one key (itself): a fully masked row makes the attention NaN, and NaN survives a zero gradient.
    """
    attn = layer.self_attn
    (B, T, _), Q, D = h.shape, queries.shape[1], attn.head_dim

    def at_queries(t: torch.Tensor) -> torch.Tensor:  # [B, T, X] -> [B, Q, X]
        return t.gather(1, queries[..., None].expand(-1, -1, t.shape[-1]))

    x = layer.input_layernorm(h)
    q = attn.q_proj(at_queries(x)).view(B, Q, -1, D).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, -1, D).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, -1, D).transpose(1, 2)
    cos, sin = (t.expand(B, -1, -1) for t in rope)  # [B or 1, T, D]: 1 when the model made the position ids
    q = rotate(q, at_queries(cos).unsqueeze(1), at_queries(sin).unsqueeze(1))
    k = rotate(k, cos.unsqueeze(1), sin.unsqueeze(1))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None], scale=attn.scaling, enable_gqa=True,
                                         dropout_p=attn.attention_dropout if attn.training else 0.0)
    hr = at_queries(h) + attn.o_proj(out.transpose(1, 2).reshape(B, Q, -1))
    return hr + layer.mlp(layer.post_attention_layernorm(hr))


def _agrees(model: nn.Module, backbone: nn.Module, trimmed: torch.Tensor, input_ids: torch.Tensor,
            attention_mask: torch.Tensor, position_ids: torch.Tensor, first: int) -> bool:
    """Record (and return) whether the trimmed rows match the full forward's; warn once if not."""
    with torch.no_grad():
        full = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False).last_hidden_state[:, first:]
    ok, error = within_tolerance(trimmed, full)
    _checked[model] = ok
    if not ok:
        warnings.warn(f"the trimmed last layer disagrees with {type(model).__name__}'s full forward "
                      f"(max error {error:.3g}); running the full forward instead", RuntimeWarning, stacklevel=3)
    return ok
