"""A lean KV-cached decoding step for Llama-style decoders (Llama, Mistral, Qwen2).

Sampling a response costs ``response_length`` forward passes of one token each. For a small model
each pass is dominated by per-operation overhead, and a transformers decoder spends most of it
outside the matrix products: building the attention mask, growing the KV cache by concatenation,
recomputing the rotary tables, three q/k/v products instead of one. :class:`LeanDecoder` runs the
same math on a preallocated cache, with fused q/k/v and gate/up weights, rotary tables computed
once per batch and attention written out for a single query. The prompt's prefill stays with
transformers, whose cache it starts from.

:func:`lean_decoder` returns None for an architecture it does not recognise, and the caller keeps
the model's own forward. The first step for each model is also checked against that forward
(:func:`agrees_with`): a model whose layers differ in ways the checks cannot see falls back too.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# relative tolerance of the first-step check: well above float32 rounding, far below any real mismatch
CHECK_RTOL = 1e-4

# model -> whether its first lean step matched the transformers step (checked once per model)
_checked: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def unsupported_reason(model: nn.Module, total_length: int) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``model`` for sequences of ``total_length`` (None: it can)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not one of {SUPPORTED_MODEL_TYPES}"
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < total_length:
        return f"sliding window {window} < sequence length {total_length}"
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if backbone is None or not all(hasattr(backbone, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "backbone lacks embed_tokens / layers / norm / rotary_emb"
    if any(hasattr(m, "lora_A") for m in backbone.modules()):
        # the lean step reads the base weights: it would sample from the reference, not the policy
        return "LoRA adapters (the lean step reads base weights only)"
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


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _cached_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's keys and values [B, H_kv, L, D] from a transformers DynamicCache (4.x or 5.x layout)."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


class LeanDecoder:
    """Decoding steps for one batch, continuing from the prompt's transformers KV cache.

    Args:
        model: the causal LM (its weights are read now: build a new decoder after an optimizer step).
        cache: the ``past_key_values`` of the prompt's forward.
        key_mask: [B, Lq] bool, True for real (not padding) prompt tokens.
        next_positions: [B, 1] position id of the first generated token.
        max_new_tokens: room in the preallocated cache.
    """

    def __init__(
        self, model: nn.Module, cache: Any, key_mask: torch.Tensor, next_positions: torch.Tensor,
        max_new_tokens: int,
    ) -> None:
        backbone = getattr(model, model.base_model_prefix)
        self.backbone = backbone
        B, Lq = key_mask.shape
        self.length = Lq  # keys filled so far
        self.step_index = 0
        prompt_keys = _cached_kv(cache, 0)[0]  # [B, H_kv, Lq, D]
        self.kv_heads, self.head_dim = prompt_keys.shape[1], prompt_keys.shape[3]
        self.heads = backbone.layers[0].self_attn.q_proj.out_features // self.head_dim
        self.intermediate = backbone.layers[0].mlp.gate_proj.out_features
        self.layers = []
        for i, layer in enumerate(backbone.layers):
            attn, mlp = layer.self_attn, layer.mlp
            k0, v0 = _cached_kv(cache, i)
            keys = k0.new_empty((B, self.kv_heads, Lq + max_new_tokens, self.head_dim))
            values = torch.empty_like(keys)
            keys[:, :, :Lq] = k0
            values[:, :, :Lq] = v0
            biases = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
            self.layers.append((
                layer,
                torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                torch.cat(biases) if all(b is not None for b in biases) else None,
                torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]) if mlp.gate_proj.bias is not None else None,
                keys, values,
            ))
        # additive mask over every key slot: prompt padding stays masked, generated slots are real
        generated = torch.ones((B, max_new_tokens), dtype=torch.bool, device=key_mask.device)
        keep = torch.cat([key_mask.bool(), generated], 1)
        mask = torch.zeros(keep.shape, dtype=prompt_keys.dtype, device=keep.device).masked_fill(~keep, float("-inf"))
        self.mask = mask[:, None, None, :]
        positions = next_positions + torch.arange(max_new_tokens, device=next_positions.device)[None]
        cos, sin = backbone.rotary_emb(prompt_keys, positions)  # [B, T, D], for every step at once
        self.cos, self.sin = cos[:, None], sin[:, None]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B, 1]; return the final-norm hidden state of that position [B, H]."""
        B = tokens.shape[0]
        H, Hkv, D, inter = self.heads, self.kv_heads, self.head_dim, self.intermediate
        t, L = self.step_index, self.length + 1
        cos, sin = self.cos[:, :, t : t + 1], self.sin[:, :, t : t + 1]
        mask = self.mask[..., :L]
        half = D // 2
        x = self.backbone.embed_tokens(tokens.reshape(B))
        for layer, w_qkv, b_qkv, w_gu, b_gu, keys, values in self.layers:
            attn = layer.self_attn
            qkv = F.linear(_rms_norm(layer.input_layernorm, x), w_qkv, b_qkv)
            q = qkv[:, : H * D].view(B, H, 1, D)
            k = qkv[:, H * D : (H + Hkv) * D].view(B, Hkv, 1, D)
            v = qkv[:, (H + Hkv) * D :].view(B, Hkv, 1, D)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin
            keys[:, :, L - 1 : L] = k
            values[:, :, L - 1 : L] = v
            # one query per row: grouped heads share their key/value head without copying it
            scores = torch.matmul(q.view(B, Hkv, H // Hkv, D), keys[:, :, :L].transpose(2, 3)) * attn.scaling
            out = torch.matmul(torch.softmax(scores + mask, dim=-1), values[:, :, :L])
            x = x + attn.o_proj(out.reshape(B, H * D))
            gu = F.linear(_rms_norm(layer.post_attention_layernorm, x), w_gu, b_gu)
            x = x + layer.mlp.down_proj(layer.mlp.act_fn(gu[:, :inter]) * gu[:, inter:])
        self.length = L
        self.step_index += 1
        return _rms_norm(self.backbone.norm, x)


def lean_decoder(
    model: nn.Module, cache: Any, key_mask: torch.Tensor, next_positions: torch.Tensor, max_new_tokens: int
) -> LeanDecoder | None:
    """A :class:`LeanDecoder` for this batch, or None when the model is unsupported or failed its check."""
    if _checked.get(model) is False:
        return None
    if unsupported_reason(model, key_mask.shape[1] + max_new_tokens) is not None:
        return None
    try:
        _cached_kv(cache, 0)
    except (AttributeError, IndexError, TypeError):
        return None
    return LeanDecoder(model, cache, key_mask, next_positions, max_new_tokens)


def needs_check(model: nn.Module) -> bool:
    """Whether ``model``'s first lean step has not been compared with its own forward yet."""
    return model not in _checked


def agrees_with(model: nn.Module, lean_hidden: torch.Tensor, reference_hidden: torch.Tensor) -> bool:
    """Record (and return) whether a lean step matched the transformers step; warn once if not."""
    scale = 1.0 + float(reference_hidden.abs().max())
    error = float((lean_hidden - reference_hidden).abs().max())
    ok = bool(torch.isfinite(lean_hidden).all()) and error <= CHECK_RTOL * scale
    _checked[model] = ok
    if not ok:
        warnings.warn(
            f"fast decoding disagrees with {type(model).__name__}'s own forward; sampling with the model's "
            "forward instead", RuntimeWarning, stacklevel=3,
        )
    return ok
