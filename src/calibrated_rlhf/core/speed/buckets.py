"""Length buckets for padded reward-model batches, and the reward model's one seam to its training speed paths.

:class:`TrainingBatches` is what ``core.reward_model`` calls: the forward each training batch goes through
(packed pairs, ``pair_packing``; length buckets, :class:`BucketedForward`; or, with ``speed.enabled: false``,
the model's own forward, as TRL's trainer runs it) and the tally of how the batches went.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from calibrated_rlhf.core.speed.config import RewardSpeed
from calibrated_rlhf.core.speed.layers import trims
from calibrated_rlhf.core.speed.pair_packing import PackedPairForward
from calibrated_rlhf.core.speed.readout import readout_logits


def length_buckets(lengths: list[int], max_buckets: int, bucket_cost_tokens: float = 0.0) -> list[tuple[int, int]]:
    """Split ascending ``lengths`` into at most ``max_buckets`` runs of least cost; ``(start, end)`` slices.

    A run is one forward (and backward) pass padded to its last, longest, length. Its cost is the
    tokens it computes, padding included, plus ``bucket_cost_tokens`` for every run after the first:
    the part of a pass's time that does not shrink with its tokens (Python dispatch, kernel launches,
    the gather and reorder of the rows), priced in tokens. On short sequences a split saves less padding
    than that price and one run wins, which is what TRL does; on long, spread ones the padding saved
    dwarfs it and the runs are those of price 0, the fewest padded tokens.

    Exact dynamic programme: the fewest tokens with exactly j runs for every j <= ``max_buckets``,
    then the j with the lowest total, fewer runs on a tie. A batch holds tens of sequences, so
    O(k n^2) is nothing beside a forward pass.

    Degenerate cases: no lengths give no runs; ``max_buckets`` below 1 means 1; equal lengths give
    one run at any price (a split saves nothing); a negative price is refused, since it would pay
    for splits that save nothing.
    """
    if bucket_cost_tokens < 0:
        raise ValueError(f"bucket_cost_tokens must be >= 0, got {bucket_cost_tokens}")
    n = len(lengths)
    if n == 0:
        return []
    k = max(1, min(max_buckets, n))
    inf = float("inf")
    # cost[j][i]: fewest padded tokens covering lengths[:i] with j runs; cut[j][i]: start of the last run
    cost = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for s in range(j - 1, i):
                c = cost[j - 1][s] + (i - s) * lengths[i - 1]
                if c < cost[j][i]:
                    cost[j][i], cut[j][i] = c, s
    best = min(range(1, k + 1), key=lambda j: (cost[j][n] + bucket_cost_tokens * (j - 1), j))
    runs, i = [], n
    for j in range(best, 0, -1):
        runs.append((cut[j][i], i))
        i = cut[j][i]
    return runs[::-1]


class BucketedForward:
    """Calls a sequence-classification model once per length bucket of a right-padded batch.

    Rows are sorted by length and cut by :func:`length_buckets`; each bucket is trimmed to its own
    width, and the logits come back in the batch's row order. With causal attention and right
    padding a row's logits do not depend on the padding after it, so the loss is unchanged. When one
    bucket wins, the batch goes through as it came: no gather, no reorder. Each pass goes through
    :func:`~calibrated_rlhf.core.speed.readout.readout_logits` (the last layer at the read positions only).
    TRL hands the model its whole batch (``margin``, ``use_cache``); only the ids and the mask are read.
    """

    def __init__(self, model: torch.nn.Module, max_buckets: int, bucket_cost_tokens: float = 0.0) -> None:
        self.model = model
        self.max_buckets = max_buckets
        self.bucket_cost_tokens = bucket_cost_tokens

    def modeled_cost(self, attention_mask: torch.Tensor, attention_width: float) -> float:
        """This batch's cost in the units of ``pair_packing.row_cost``, plus the price of its extra passes."""
        lengths = sorted(attention_mask.sum(dim=1).tolist())
        runs = length_buckets(lengths, self.max_buckets, self.bucket_cost_tokens)
        return sum((e - s) * lengths[e - 1] * (1 + lengths[e - 1] / attention_width) for s, e in runs) \
            + self.bucket_cost_tokens * (len(runs) - 1)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutputWithPast

        lengths = attention_mask.sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        sorted_lengths = lengths[order].tolist()
        runs = length_buckets(sorted_lengths, self.max_buckets, self.bucket_cost_tokens)
        if len(runs) == 1:
            width = sorted_lengths[-1]
            return SequenceClassifierOutputWithPast(
                logits=readout_logits(self.model, input_ids[:, :width], attention_mask[:, :width]))
        parts = []
        for start, end in runs:
            rows, width = order[start:end], sorted_lengths[end - 1]
            parts.append(readout_logits(self.model, input_ids[rows, :width], attention_mask[rows, :width]))
        logits = torch.cat(parts)[torch.argsort(order)]  # back to the batch's row order
        return SequenceClassifierOutputWithPast(logits=logits)


class TrainingBatches:
    """How a reward model's training batches run under ``speed`` (``RewardTrainingParams.speed``).

    ``replaces_forward``: whether any batch leaves the model's own forward (TRL's trainer runs as it is
    otherwise). :meth:`forward` is the callable a batch goes through; :meth:`count` tallies a training batch
    after its forward (a first-use check may have turned the trimmed layer off); :meth:`fractions` are the
    shares of training batches whose last layer ran at the read positions only (``readout``) and, with
    ``padding_free``, that went packed: empty when no batch went through this package.
    """

    def __init__(self, speed: RewardSpeed) -> None:
        self.speed = speed.active()
        self.tally: Counter = Counter()

    @property
    def replaces_forward(self) -> bool:
        return self.speed.enabled and (self.speed.length_buckets > 1 or self.speed.padding_free)

    def forward(self, model: torch.nn.Module) -> Any:
        """The forward a training batch goes through: packed, length buckets, or the model's own."""
        from torch.nn.parallel import DistributedDataParallel

        # DDP expects its own forward: the batch goes through whole
        if not self.speed.enabled or isinstance(model, DistributedDataParallel):
            return model
        padded = BucketedForward(model, self.speed.length_buckets, self.speed.bucket_cost_tokens)
        return PackedPairForward(model, padded, padded.modeled_cost, self.tally) if self.speed.padding_free else padded

    def count(self, model: torch.nn.Module, width: int) -> None:
        """Tally one training batch of rows ``width`` tokens wide, after its forward."""
        if self.speed.enabled:
            self.tally["batches"] += 1
            self.tally["trimmed"] += trims(model, width)

    def fractions(self) -> dict[str, float]:
        batches = self.tally["batches"]
        if not batches:
            return {}
        return {"trimmed_batch_fraction": self.tally["trimmed"] / batches,
                **({"packed_batch_fraction": self.tally["packed"] / batches} if self.speed.padding_free else {})}
