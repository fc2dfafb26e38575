"""A causal LM as every sampler sees it: its trunk and heads, positions that skip left padding, one
categorical draw per row, the mask of a response up to its first EOS, left padding, and a response
decoded in its prompt's context. Shared by PPO's rollout and anything else that samples token by token."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer trunk of a transformers model (e.g. ``LlamaModel`` inside ``LlamaForCausalLM``)."""
    prefix = getattr(model, "base_model_prefix", None)
    if not prefix or not hasattr(model, prefix):
        raise TypeError(f"{type(model).__name__} has no base_model_prefix backbone")
    return getattr(model, prefix)


def value_head_of(model: nn.Module) -> nn.Module:
    """The scalar head of a sequence-classification value model."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise TypeError(f"{type(model).__name__} has no 'score' head; pass an AutoModelForSequenceClassification")


def hidden_size_of(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a prompt's tokens sit at 0..n-1 whatever its padding."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row [B, V] -> [B, 1] by inverting the CDF.

    Needs one uniform per row instead of one per vocabulary entry (multinomial and Gumbel-max
    draw V), which dominates the cost of a decoding step for small models.
    """
    cdf = probs.cumsum(-1)
    # draw on the generator's device (a CPU generator keeps runs reproducible across devices)
    gen_device = generator.device if generator is not None else probs.device
    u = torch.rand((probs.shape[0], 1), generator=generator, device=gen_device, dtype=cdf.dtype).to(probs.device)
    # scale by the row total so rounding in the cumsum never leaves u above the last bin;
    # clamp_min keeps u = 0 from landing on a leading zero-probability token
    u = (u * cdf[:, -1:]).clamp_min(torch.finfo(cdf.dtype).tiny)
    return torch.searchsorted(cdf, u).clamp_max(probs.shape[-1] - 1)


def response_mask(responses: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of tokens up to and including the first EOS, whether an EOS occurred) per row."""
    is_eos = responses == eos_token_id
    # number of EOS strictly before t is 0 exactly for the prefix up to the first EOS
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    return eos_before == 0, is_eos.any(-1)


def decode_responses(
    tokenizer: Any,
    prompt_ids: list[list[int]],
    prompt_texts: list[str | None],
    responses: torch.Tensor,
    mask: torch.Tensor,
) -> list[str]:
    """Response texts as continuations of their prompts, so ``prompt + response`` reads right.

    Decoding a response on its own loses what some tokenizers fold into its first token (the
    leading space of a Metaspace/SentencePiece word), so each prompt + response is decoded together
    and the decoded prompt is cut off the front; when that prefix does not match (a tokenizer
    that rewrites text across the boundary), the response is decoded alone. A prompt text of None (a
    conversational prompt: the chat template's own tokens separate the turns) has its response decoded
    alone. Special tokens (EOS, end of turn, padding) are dropped.
    """
    rows = [ids + r[m].tolist() for ids, r, m in zip(prompt_ids, responses.cpu(), mask.cpu())]
    full = tokenizer.batch_decode(rows, skip_special_tokens=True)
    out = []
    for text, prefix, ids, r, m in zip(full, prompt_texts, prompt_ids, responses.cpu(), mask.cpu()):
        if prefix is not None and text.startswith(prefix):
            out.append(text[len(prefix):])
        else:
            out.append(tokenizer.decode(r[m].tolist(), skip_special_tokens=True))
    return out


def left_pad(seqs: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (ids, mask) [B, L]."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, L - len(s):] = 1
    return ids.to(device), mask.to(device)
