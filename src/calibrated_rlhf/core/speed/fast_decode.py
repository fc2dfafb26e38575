"""A lean KV-cached decoding step for Llama-style decoders (Llama, Mistral, Qwen2).

Sampling a response costs ``response_length`` forward passes of one token each. For a small model
each pass is dominated by per-operation overhead, and a transformers decoder spends most of it
outside the matrix products: building the attention mask, growing the KV cache by concatenation,
recomputing the rotary tables, three q/k/v products instead of one. :class:`LeanDecoder` runs the
same math on a preallocated cache, with fused q/k/v and gate/up weights (norm gains folded in),
rotary tables computed once per batch and attention written out for a single query. The prompt's
prefill stays with transformers, whose cache it starts from.

:func:`lean_decoder` returns None for an architecture it does not recognise, and the caller keeps
the model's own forward. The first step for each model is also checked against that forward
(:func:`agrees_with`): a model whose layers differ in ways the checks cannot see falls back too.

:class:`Decoding` is the KV-cached state of one sampling call, PPO's seam to all of this: the prompt's
prefill through the model's own forward, each later step through the lean step where it applies, else
through the model's forward with its cache.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from calibrated_rlhf.core.causal_lm import backbone_of, position_ids_from_mask
from calibrated_rlhf.core.speed.config import PPOSpeed
from calibrated_rlhf.core.speed.layers import rotate, unsupported_reason, within_tolerance

# model -> whether its first lean step matched the transformers step (checked once per model)
_checked: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


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
        self.layers = []
        for i, layer in enumerate(backbone.layers):
            self.layers.append(_LeanLayer(layer, *_cached_kv(cache, i), Lq + max_new_tokens))
        # additive mask over every key slot: prompt padding stays masked, generated slots are real;
        # one row per (row, key/value head) pair, the layout the attention's batched products take
        generated = torch.ones((B, max_new_tokens), dtype=torch.bool, device=key_mask.device)
        keep = torch.cat([key_mask.bool(), generated], 1)
        mask = torch.zeros(keep.shape, dtype=prompt_keys.dtype, device=keep.device).masked_fill(~keep, float("-inf"))
        self.mask = mask[:, None, None, :].expand(B, self.kv_heads, 1, -1).reshape(B * self.kv_heads, 1, -1)
        positions = next_positions + torch.arange(max_new_tokens, device=next_positions.device)[None]
        cos, sin = backbone.rotary_emb(prompt_keys, positions)  # [B, T, D], for every step at once
        self.cos, self.sin = cos[:, :, None], sin[:, :, None]  # [B, T, 1, D]: one table for q and k heads

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B, 1]; return the final-norm hidden state of that position [B, H]."""
        B = tokens.shape[0]
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        t, L = self.step_index, self.length + 1
        cos, sin = self.cos[:, t], self.sin[:, t]  # [B, 1, D]
        mask = self.mask[..., :L]
        x = F.embedding(tokens.reshape(B), self.backbone.embed_tokens.weight)
        for lean in self.layers:
            qkv = F.linear(F.rms_norm(x, (x.shape[-1],), lean.gain_in, lean.eps_in), lean.w_qkv, lean.b_qkv)
            # rotate q and k heads together: one set of ops instead of two
            qk = qkv[:, : (H + Hkv) * D].view(B, H + Hkv, D)
            qk = rotate(qk, cos, sin)
            lean.keys[:, :, L - 1] = qk[:, H:]
            lean.values[:, :, L - 1] = qkv[:, (H + Hkv) * D :].view(B, Hkv, D)
            # one query per row: grouped heads share their key/value head without copying it; the
            # scaling and the padding mask go into the product itself
            q = qk[:, :H].reshape(B * Hkv, H // Hkv, D)
            keys = lean.keys.view(B * Hkv, -1, D)[:, :L]
            scores = torch.baddbmm(mask, q, keys.transpose(1, 2), alpha=lean.scaling)
            out = torch.bmm(torch.softmax(scores, dim=-1), lean.values.view(B * Hkv, -1, D)[:, :L])
            x = _add_linear(x, out.reshape(B, H * D), lean.w_o_t, lean.b_o)
            gu = F.linear(F.rms_norm(x, (x.shape[-1],), lean.gain_post, lean.eps_post), lean.w_gu, lean.b_gu)
            x = _add_linear(x, lean.act(gu[:, : lean.inter]) * gu[:, lean.inter :], lean.w_down_t, lean.b_down)
        self.length = L
        self.step_index += 1
        return _rms_norm(self.backbone.norm, x)


class _LeanLayer:
    """One decoder layer's weights as the lean step reads them, and its preallocated cache.

    In float32 the RMSNorm gains are folded into the projections that follow them
    (``(x * g) W^T = x (W g)^T``), so a step multiplies fewer tensors; the products are the same up to
    float rounding. In lower precision that rounding would be the size of the first-step check's
    tolerance, so there the gains stay where the model applies them.
    """

    def __init__(self, layer: nn.Module, k0: torch.Tensor, v0: torch.Tensor, capacity: int) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        B, Hkv, Lq, D = k0.shape
        self.keys = k0.new_empty((B, Hkv, capacity, D))
        self.values = torch.empty_like(self.keys)
        self.keys[:, :, :Lq] = k0
        self.values[:, :, :Lq] = v0
        norm_in, norm_post = layer.input_layernorm, layer.post_attention_layernorm
        self.eps_in, self.eps_post = norm_in.variance_epsilon, norm_post.variance_epsilon
        w_qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        w_gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        fold = w_qkv.dtype == torch.float32
        self.gain_in, self.gain_post = (None, None) if fold else (norm_in.weight, norm_post.weight)
        self.w_qkv = w_qkv * norm_in.weight if fold else w_qkv
        self.w_gu = w_gu * norm_post.weight if fold else w_gu
        biases = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        self.b_qkv = torch.cat(biases) if all(b is not None for b in biases) else None
        self.b_gu = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]) if mlp.gate_proj.bias is not None else None
        self.scaling = attn.scaling
        self.inter = mlp.gate_proj.out_features
        self.act = mlp.act_fn
        self.w_o_t, self.b_o = attn.o_proj.weight.t(), attn.o_proj.bias
        self.w_down_t, self.b_down = mlp.down_proj.weight.t(), mlp.down_proj.bias


def _add_linear(residual: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``residual + x W^T (+ bias)`` with the residual add inside the matrix product."""
    out = torch.addmm(residual, x, w_t)
    return out + bias if bias is not None else out


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
    ok, _ = within_tolerance(lean_hidden, reference_hidden)
    _checked[model] = ok
    if not ok:
        warnings.warn(
            f"fast decoding disagrees with {type(model).__name__}'s own forward; sampling with the model's "
            "forward instead", RuntimeWarning, stacklevel=3,
        )
    return ok


class Decoding:
    """``h`` is the last hidden state [B, H], ``step`` feeds a token and returns the next one.

    ``speed``: the knobs that apply (:meth:`PPOSpeed.active`); None is the plain path, the model's own
    forward with the usual 2D attention mask at every step.
    """

    def __init__(self, policy: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, response_length: int,
                 speed: PPOSpeed | None = None) -> None:
        self.policy = policy
        self.backbone = backbone_of(policy)
        B = query_ids.shape[0]
        device = query_ids.device
        self.attn = query_mask.long()
        pos = position_ids_from_mask(self.attn)
        out = self.backbone(input_ids=query_ids, attention_mask=self.attn, position_ids=pos, use_cache=True)
        self.cache = out.past_key_values
        self.h = out.last_hidden_state[:, -1]
        self.next_pos = pos[:, -1:] + 1
        self.ones = torch.ones((B, 1), dtype=self.attn.dtype, device=device)
        fast = speed is not None and speed.enabled
        # For SDPA, a decoding step's mask is just "which keys are not padding" ([B, 1, 1, keys], True =
        # attend); slicing one prepared mask skips rebuilding it on every step, a sizeable share of a
        # small model's step. Other attention kernels, and the plain path, get the usual 2D mask.
        self.step_masks = None
        if fast and getattr(policy.config, "_attn_implementation", None) == "sdpa":
            self.step_masks = torch.cat(
                [query_mask.bool(), torch.ones((B, response_length), dtype=torch.bool, device=device)], dim=1
            )[:, None, None, :]
        self.Lq = query_ids.shape[1]
        self.decoder = (lean_decoder(policy, self.cache, query_mask, self.next_pos, response_length)
                        if fast and speed.fast_decode else None)

    def step(self, tok: torch.Tensor, t: int) -> torch.Tensor:
        """The hidden state after feeding ``tok``, the response's token ``t``."""
        if self.decoder is not None and not needs_check(self.policy):
            return self.decoder.step(tok)
        if self.step_masks is not None:
            step_mask = self.step_masks[..., : self.Lq + t + 1]
        else:
            self.attn = torch.cat([self.attn, self.ones], dim=1)
            step_mask = self.attn
        out = self.backbone(input_ids=tok, attention_mask=step_mask, position_ids=self.next_pos,
                            past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        h = out.last_hidden_state[:, -1]
        self.next_pos = self.next_pos + 1
        if self.decoder is not None:
            # first lean step for this model, checked against its own: a run's samples never depend
            # on which update happened to run the check (a resumed run checks again)
            lean_h = self.decoder.step(tok)
            if agrees_with(self.policy, lean_h, h):
                return lean_h
            self.decoder = None  # the model's own cache is still current: carry on with it
        return h
