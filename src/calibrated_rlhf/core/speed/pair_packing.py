"""Padding-free reward-model batches, each pair's shared prompt computed once.

TRL's collator puts a batch of pairs in 2B rows (chosen rows first, then rejected) padded to the
longest: padding runs through every layer like real tokens, and the prompt, identical at the start of
both sequences of a pair, runs twice. Here each pair becomes one *unit* of a row: the shared prefix
(the longest common prefix of its two token sequences), the chosen tail, then the rejected tail. The
rejected tail attends to the prefix and to itself, never to the chosen tail, and its positions go on
from the prefix as in its own sequence. Under causal attention a token's hidden state depends only on
the tokens it attends to and on their positions, so each read reward is the one the padded batch
gives, and so are the loss and the gradients, up to rounding.

Units are packed into rows, with a block mask between units. The rows are planned by a cost model
(:func:`plan_rows`), because a dense-mask attention kernel computes every (query, key) pair of a row:
wide rows pad less but attend over more. By the same model a batch whose pairs share little packs
every sequence as a unit of its own (narrower rows), and one the padded path prices lower (long,
unshared sequences in a small model) goes padded.

The model runs its own forward (embeddings, rotary tables, layers, kernels) with that 4D mask and
position ids up to its last layer, which runs at the read positions only (``readout``); the
readout is the sequence-classification head's: the score at the last token that is not the pad
token. Models whose attention takes no custom mask, an active sliding window shorter than the batch,
left padding, or a first packed forward that disagrees with the model's own forward (checked once per
model) keep the padded path.
"""

from __future__ import annotations

import heapq
import warnings
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from calibrated_rlhf.core.speed.layers import (classifier_parts, last_layer_at, last_layer_input, read_positions, trims,
                                               within_tolerance)

# attention implementations that read a 4D mask as given (transformers returns a 4D mask unchanged)
MASKED_ATTENTION = ("sdpa", "eager")
# a dense-mask attention kernel runs at about half the rate of the matrix products on CPU (the
# flash-attention CPU kernel at about 40 against 80 GFLOP/s in a profile of the workload's Llama on
# 2 threads): one attended key costs this many of its multiply-adds
ATTENTION_SLOWDOWN = 2.0
CHOSEN_TAIL, REJECTED_TAIL = 1, 2

# model -> whether its first packed forward matched its own forward (checked once per model)
_checked: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
# model -> its attention width (read off its layers once, not every step)
_widths: "weakref.WeakKeyDictionary[nn.Module, float]" = weakref.WeakKeyDictionary()
# models already told why a batch of theirs could not be packed (once each, not every step)
_told: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@dataclass(frozen=True)
class PackedPairs:
    """A pair batch as packed rows: what the backbone reads, and where each reward is read."""

    input_ids: torch.Tensor  # [R, W]
    position_ids: torch.Tensor  # [R, W]
    attention: torch.Tensor  # [R, 1, W, W] bool, True where a query may attend to a key
    read: torch.Tensor  # [2B] flat indices into R * W: chosen sides first, then rejected (TRL's order)
    cost: float  # row_cost of the plan


def shared_prefix_lengths(input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Tokens each pair shares before its sides differ, leaving each side at least one token of its own.

    Rows 0..B-1 are the chosen sides, B..2B-1 the rejected ones. The cap keeps both tails non-empty,
    so identical sides, or one side a prefix of the other, still make a unit of three segments (the
    shorter side's tail is then its last token).
    """
    B = input_ids.shape[0] // 2
    shortest = torch.minimum(lengths[:B], lengths[B:])
    inside = torch.arange(input_ids.shape[1], device=input_ids.device) < shortest[:, None]
    common = ((input_ids[:B] == input_ids[B:]) & inside).cumprod(dim=1).sum(dim=1)
    return torch.minimum(common, shortest - 1)


def plan_rows(unit_lengths: list[int], attention_width: float) -> list[list[int]]:
    """Units (by index) packed into rows of least modelled cost.

    Every row is padded to the fullest, so R rows of width W compute R * W tokens, and each token
    attends over W keys. With ``attention_width`` the width at which a token's attention costs as
    much as its linear layers, the cost is ``R * W * (1 + W / attention_width)``. For each row count
    R = 1..n the units go longest first onto the least-filled row (LPT scheduling: rows come out
    nearly even, which is what padding to the fullest rewards; first-fit packing up to a capacity
    computed 8.5% more tokens on the reference workload's first 30 batches), and the R of least cost
    wins. n is a batch's pair
    count (tens), so n packings cost nothing beside a forward pass.

    Degenerate cases: no units give no rows; one unit gives one row.
    """
    order = sorted(range(len(unit_lengths)), key=lambda u: (-unit_lengths[u], u))
    best: list[list[int]] = []
    best_cost = float("inf")
    for n_rows in range(1, len(unit_lengths) + 1):
        heap = [(0, r) for r in range(n_rows)]
        rows: list[list[int]] = [[] for _ in range(n_rows)]
        for u in order:
            fill, r = heapq.heappop(heap)
            rows[r].append(u)
            heapq.heappush(heap, (fill + unit_lengths[u], r))
        cost = row_cost(rows, unit_lengths, attention_width)
        if cost < best_cost:
            best, best_cost = rows, cost
    return best


def row_cost(rows: list[list[int]], unit_lengths: list[int], attention_width: float) -> float:
    """The modelled cost of a plan (see :func:`plan_rows`), in token-equivalents; 0 for no rows."""
    if not rows:
        return 0.0
    width = max(sum(unit_lengths[u] for u in row) for row in rows)
    return len(rows) * width * (1 + width / attention_width)


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int,
               attention_width: float) -> PackedPairs:
    """Pack a right-padded TRL pair batch (rows 0..B-1 chosen, B..2B-1 rejected) into rows.

    Two plans are priced by :func:`row_cost` and the cheaper is taken. Joint: each pair is one unit,
    its chosen sequence whole, then its rejected tail after the shared prefix. Apart: every sequence is
    a unit of its own, nothing shared; rows can then be as narrow as the longest sequence, which wins
    when pairs share little (a unit twice a sequence's length makes every token attend over twice the
    width). Each token's destination is computed at once, so Python does not loop over tokens.
    """
    device, (two_b, width) = input_ids.device, input_ids.shape
    B = two_b // 2
    lengths = attention_mask.sum(dim=1)
    chosen_len, rejected_len = lengths[:B], lengths[B:]
    shared = shared_prefix_lengths(input_ids, lengths)
    joint, apart = (chosen_len + rejected_len - shared).tolist(), lengths.tolist()
    joint_rows, apart_rows = plan_rows(joint, attention_width), plan_rows(apart, attention_width)
    joint_cost, apart_cost = row_cost(joint_rows, joint, attention_width), row_cost(apart_rows, apart, attention_width)
    together = joint_cost <= apart_cost
    rows, unit_len = (joint_rows, joint) if together else (apart_rows, apart)
    R, W = len(rows), max(sum(unit_len[u] for u in row) for row in rows)
    starts = _unit_starts(rows, unit_len, W).to(device)
    pairs = torch.arange(B, device=device)
    if together:
        start_chosen, start_rejected, unit_rejected = starts, starts + chosen_len, pairs
    else:
        start_chosen, start_rejected, unit_rejected = starts[:B], starts[B:], pairs + B
        shared = torch.zeros_like(shared)
    j = torch.arange(width, device=device)[None, :]  # a token's position in its own sequence
    take_chosen = j < chosen_len[:, None]
    take_rejected = (j >= shared[:, None]) & (j < rejected_len[:, None])
    to_chosen = start_chosen[:, None] + j
    to_rejected = start_rejected[:, None] + j - shared[:, None]
    dest = torch.cat([to_chosen[take_chosen], to_rejected[take_rejected]])
    ids = torch.full((R * W,), pad_token_id, dtype=input_ids.dtype, device=device)
    pos = torch.zeros(R * W, dtype=torch.long, device=device)
    unit = torch.full((R * W,), -1, dtype=torch.long, device=device)  # padding: its own unit, attended by nobody
    segment = torch.zeros(R * W, dtype=torch.long, device=device)
    ids[dest] = torch.cat([input_ids[:B][take_chosen], input_ids[B:][take_rejected]])
    pos[dest] = torch.cat([j.expand(B, width)[take_chosen], j.expand(B, width)[take_rejected]])
    unit[dest] = torch.cat([pairs[:, None].expand(B, width)[take_chosen],
                            unit_rejected[:, None].expand(B, width)[take_rejected]])
    segment[to_chosen[take_chosen & (j >= shared[:, None])]] = CHOSEN_TAIL
    segment[to_rejected[take_rejected]] = REJECTED_TAIL
    reads = read_positions(input_ids, pad_token_id)
    read_rejected = torch.where(reads[B:] < shared, start_chosen + reads[B:], start_rejected + reads[B:] - shared)
    return PackedPairs(ids.view(R, W), pos.view(R, W), _block_mask(unit.view(R, W), segment.view(R, W)),
                       torch.cat([start_chosen + reads[:B], read_rejected]), min(joint_cost, apart_cost))


def _unit_starts(rows: list[list[int]], unit_len: list[int], width: int) -> torch.Tensor:
    """Flat offset of each unit: its row's start plus the units placed before it in that row."""
    start = [0] * len(unit_len)
    for r, members in enumerate(rows):
        offset = r * width
        for u in members:
            start[u], offset = offset, offset + unit_len[u]
    return torch.tensor(start)


def _block_mask(unit: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """[R, 1, W, W]: causal within a unit, nothing across units, no rejected query on a chosen key."""
    k = torch.arange(unit.shape[1], device=unit.device)
    return ((unit[:, :, None] == unit[:, None, :]) & (k[:, None] >= k[None, :])
            & ~((segment[:, :, None] == REJECTED_TAIL) & (segment[:, None, :] == CHOSEN_TAIL)))[:, None]


def attention_width(model: nn.Module) -> float:
    """The row width at which a token's attention costs as much as its linear layers (see plan_rows)."""
    if model not in _widths:
        _widths[model] = _attention_width(model)
    return _widths[model]


def _attention_width(model: nn.Module) -> float:
    inner, backbone, _ = classifier_parts(model)
    layers = getattr(backbone, "layers", None) or getattr(backbone, "h", None) or []
    cfg = inner.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    linear = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, nn.Linear))
    per_key = 2 * cfg.num_attention_heads * head_dim * ATTENTION_SLOWDOWN  # q.k and p.v, every head
    return max(1.0, linear / max(1, len(layers)) / per_key)


def unsupported_reason(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str | None:
    """Why this batch cannot be packed for ``model`` (None: it can)."""
    inner, backbone, head = classifier_parts(model)
    cfg = getattr(inner, "config", None)
    if cfg is None or backbone is None or head is None:
        return "not a sequence-classification model with a backbone and a score head"
    text = cfg.get_text_config()
    if getattr(cfg, "_attn_implementation", None) not in MASKED_ATTENTION:
        return f"attention implementation {getattr(cfg, '_attn_implementation', None)!r} takes no custom mask"
    if text.pad_token_id is None:
        return "no pad token id: the head's readout is undefined"
    window = getattr(text, "sliding_window", None)
    if window is not None and getattr(text, "use_sliding_window", True) and window < input_ids.shape[1]:
        return f"sliding window {window} < batch width {input_ids.shape[1]}"
    if input_ids.shape[0] % 2:
        return "an odd number of rows is not a pair batch"
    lengths = attention_mask.sum(dim=1, keepdim=True)
    if not torch.equal(attention_mask.bool(), torch.arange(attention_mask.shape[1], device=lengths.device) < lengths):
        return "the batch is not right-padded"
    if bool((read_positions(input_ids, text.pad_token_id) >= lengths[:, 0]).any()):
        return "the head reads past a sequence's end (the batch is padded with another token than the pad id)"
    return None


def packed_logits(model: nn.Module, packed: PackedPairs) -> torch.Tensor:
    """Rewards [2B, 1] of a packed batch, through ``model``'s backbone and score head.

    Only the read positions go through the last layer where its layers allow it
    (:mod:`~calibrated_rlhf.core.speed.trimmed_forward`): 2B queries of R * W, the rest of the last layer
    computes nothing that is read. Otherwise the backbone runs whole.
    """
    inner, backbone, head = classifier_parts(model)
    mask = packed.attention
    if inner.config._attn_implementation == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=inner.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(inner.dtype).min)
    forward = {"input_ids": packed.input_ids, "position_ids": packed.position_ids, "attention_mask": mask}
    if not trims(model, packed.input_ids.shape[1]):
        hidden = backbone(use_cache=False, **forward).last_hidden_state
        return head(hidden.reshape(-1, hidden.shape[-1])[packed.read])
    h, rope = last_layer_input(backbone, **forward)
    row, slot, queries = _read_slots(packed.read, packed.input_ids.shape)
    key_mask = packed.attention[:, 0].gather(1, queries[..., None].expand(-1, -1, packed.attention.shape[-1]))
    out = last_layer_at(backbone.layers[-1], h, rope, queries, key_mask)
    return head(backbone.norm(out[row, slot]))


def _read_slots(read: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each read's row and slot, and the columns [R, Q] each row reads (Q: the most reads in a row).

    A row with fewer reads repeats column 0, the first token of the row's first unit: it attends to
    itself, so the spare query is finite, and it is never read.
    """
    R, W = shape
    row, col = read // W, read % W
    counts = torch.bincount(row, minlength=R)
    order = torch.argsort(row, stable=True)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(row)
    slot[order] = torch.arange(len(row), device=read.device) - first[row[order]]
    queries = torch.zeros((R, int(counts.max())), dtype=torch.long, device=read.device)
    queries[row, slot] = col
    return row, slot, queries


class PackedPairForward:
    """Calls a sequence-classification model on a TRL pair batch, packed; padded where it cannot be.

    ``fallback`` is the padded forward (the model, or length buckets over it); with ``fallback_cost``
    (its modelled cost of a batch, given the attention mask and the attention width) a batch the
    padded path prices lower goes that way: long, unshared sequences in a small model, whose packed
    rows would make short sequences attend over the longest one's width. The first packed batch of
    each model is compared with the model's own forward, in eval mode so dropout cannot differ; a
    model that disagrees keeps the fallback, with a warning.
    """

    def __init__(self, model: nn.Module, fallback: Callable[..., Any],
                 fallback_cost: Callable[[torch.Tensor, float], float] | None = None,
                 tally: Counter | None = None) -> None:
        self.model, self.fallback, self.fallback_cost, self.tally = model, fallback, fallback_cost, tally

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
        logits = self._packed(input_ids, attention_mask)
        if self.tally is not None and self.model.training:  # training batches that went packed
            self.tally["packed"] += logits is not None
        if logits is None:
            return self.fallback(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        from transformers.modeling_outputs import SequenceClassifierOutputWithPast

        return SequenceClassifierOutputWithPast(logits=logits)

    def _packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The packed batch's rewards, or None where the batch goes the padded way."""
        if _checked.get(self.model) is False:
            return None
        reason = unsupported_reason(self.model, input_ids, attention_mask)
        if reason is not None:
            if self.model not in _told:
                _told.add(self.model)
                warnings.warn(f"padding-free pair batches are off for a batch of {type(self.model).__name__}: "
                              f"{reason}; it trains padded (said once per model)", stacklevel=3)
            return None
        pad_id, width = classifier_parts(self.model)[0].config.get_text_config().pad_token_id, attention_width(self.model)
        packed = pack_pairs(input_ids, attention_mask, pad_id, width)
        cheaper_padded = self.fallback_cost is not None and self.fallback_cost(attention_mask, width) < packed.cost
        if cheaper_padded or (self.model not in _checked and not self._agrees(packed, input_ids, attention_mask)):
            return None
        return packed_logits(self.model, packed)

    def _agrees(self, packed: PackedPairs, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                ours = packed_logits(self.model, packed)
                theirs = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        finally:
            self.model.train(training)
        ok, error = within_tolerance(ours, theirs)
        _checked[self.model] = ok
        if not ok:
            warnings.warn(f"padding-free pair batches disagree with {type(self.model).__name__}'s own forward "
                          f"(max error {error:.3g}); training with padded batches", stacklevel=4)
        return ok
