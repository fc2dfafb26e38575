"""What every speed path shares: which decoder layers they can recompute, that layer run at chosen
positions, the tolerance a first use is checked to against the model's own forward, and where a
sequence-classification head reads (``readout`` and ``pair_packing`` read rewards the same way).

The paths (``fast_decode``, ``trimmed_forward``, ``readout``, ``pair_packing``) recompute Llama-style layers
(Llama, Mistral, Qwen2) from the layers' own modules; anything else keeps the model's forward.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# relative tolerance of the first-step check: well above float32 rounding, far below any real mismatch
CHECK_RTOL = 1e-4
# in bfloat16 and float16 the two ways of computing one step differ by about one rounding unit
# (measured: 0.5-0.7 eps in bfloat16, 1-1.5 eps in float16, over Llama, Qwen2 and Mistral layers);
# four units still sits far below what a different layer computes
CHECK_EPS_UNITS = 4


def unsupported_reason(model: nn.Module, total_length: int) -> str | None:
    """Why ``fast_decode.LeanDecoder`` (or the trimmed last layer) cannot run ``model`` for sequences of ``total_length`` (None: it can)."""
    reason = architecture_reason(model, total_length)
    if reason is None and any(hasattr(m, "lora_A") for m in model.modules()):
        # the lean step reads the base weights: it would sample from the reference, not the policy
        return "LoRA adapters (the lean step reads base weights only)"
    return reason


def architecture_reason(model: nn.Module, total_length: int) -> str | None:
    """Why ``model``'s layers are not the Llama-style layers the speed paths recompute (None: they are).

    What a path that recomputes a layer from its modules needs: RMSNorm, q/k/v/o projections with
    rotary positions and no q/k norm, a gated MLP, no sliding window inside ``total_length``.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not one of {SUPPORTED_MODEL_TYPES}"
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < total_length:
        return f"sliding window {window} < sequence length {total_length}"
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if backbone is None or not all(hasattr(backbone, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "backbone lacks embed_tokens / layers / norm / rotary_emb"
    for layer in backbone.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return "a layer lacks self_attn or mlp"
        if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
            return "attention lacks q/k/v/o projections or scaling"
        if any(hasattr(attn, a) for a in ("q_norm", "k_norm")):
            return "attention normalizes q/k"
        if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return "mlp is not a gated (gate/up/down) MLP"
        for norm in (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)):
            if not _is_rms_norm(norm):
                return "layer norms are not RMSNorm"
    if not _is_rms_norm(backbone.norm):
        return "final norm is not RMSNorm"
    return None


def _is_rms_norm(norm: Any) -> bool:
    return isinstance(norm, nn.Module) and hasattr(norm, "weight") and hasattr(norm, "variance_epsilon")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` [..., D] (Llama's rotate-half layout)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def check_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the first-step check for hidden states of ``dtype``."""
    return max(CHECK_RTOL, CHECK_EPS_UNITS * torch.finfo(dtype).eps)


def within_tolerance(ours: torch.Tensor, reference: torch.Tensor) -> tuple[bool, float]:
    """(whether ``ours`` is finite and matches ``reference`` within the check's tolerance, the max error).

    The error is relative to ``1 + max |reference|``, so values near 0 are held to an absolute bound.
    Shared by every first-use check that compares a faster path with the model's own forward.
    """
    scale = 1.0 + float(reference.abs().max())
    error = float((ours.detach().float() - reference.float()).abs().max())
    return bool(torch.isfinite(ours).all()) and error <= check_tolerance(reference.dtype) * scale, error


class _LayerReached(Exception):
    """Raised by the pre-hook to end the model's forward once a layer's input is known."""


def layer_input(backbone: nn.Module, index: int, **forward_kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The hidden states entering layer ``index`` [B, T, H] and the rotary tables, from the model's own forward
    (which stops there: the layers from ``index`` on do not run)."""
    captured: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        captured["rope"] = kwargs["position_embeddings"]
        raise _LayerReached

    handle = backbone.layers[index].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        backbone(use_cache=False, **forward_kwargs)
    except _LayerReached:
        pass
    finally:
        handle.remove()
    return captured["h"], captured["rope"]


def last_layer_input(backbone: nn.Module, **forward_kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The hidden states entering the last layer [B, T, H] and the rotary tables, from the model's own forward."""
    return layer_input(backbone, -1, **forward_kwargs)


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


# --- where a sequence-classification head reads: shared by readout and pair_packing ---------------------------
# model -> whether its first trimmed readout matched its own forward (``readout`` checks it once per model;
# ``pair_packing``'s packed rows are read the same way and follow the verdict)
readout_checked: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def classifier_parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None, nn.Module | None]:
    """(classification model, its backbone, its score head), through a PEFT wrapper if there is one."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    return inner, backbone, getattr(inner, "score", None)


def read_positions(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Where a sequence-classification head reads each row: its last token that is not the pad token.

    transformers' own rule (the rightmost non-pad token; position 0 if there is none), so a pad
    token that is also the end-of-sequence token moves the readout the same way in every path.
    """
    non_pad = (input_ids != pad_token_id).to(torch.int64)
    return (torch.arange(input_ids.shape[1], device=input_ids.device) * non_pad).argmax(-1)


def trims(model: nn.Module, width: int) -> bool:
    """Whether ``model``'s rewards over rows of ``width`` tokens go through the trimmed last layer.

    Its layers must allow it, and its first use, once made, must have agreed with its own forward.
    """
    inner, backbone, head = classifier_parts(model)
    return (backbone is not None and head is not None and getattr(inner, "config", None) is not None
            and architecture_reason(inner, width) is None and readout_checked.get(model) is not False)
