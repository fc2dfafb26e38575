"""Length-aware batching of reward-model training: the buckets are optimal and change no gradient."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from calibrated_rlhf.core.reward_model import BucketedForward, length_buckets


def padded_tokens(lengths, runs):
    return sum((end - start) * lengths[end - 1] for start, end in runs)


@pytest.mark.parametrize("lengths,k", [([3, 3, 5, 9, 9, 10], 2), ([1, 2, 4, 8, 16, 32, 33], 3),
                                        ([7, 7, 7, 7], 3), ([2, 50], 1)])
def test_buckets_cover_the_batch_with_the_fewest_padded_tokens(lengths, k):
    runs = length_buckets(lengths, k)
    assert runs[0][0] == 0 and runs[-1][1] == len(lengths) and len(runs) <= k
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))  # contiguous, no row twice
    brute = min(
        padded_tokens(lengths, list(zip((0, *cuts), (*cuts, len(lengths)))))
        for j in range(k)
        for cuts in itertools.combinations(range(1, len(lengths)), j)
    )
    assert padded_tokens(lengths, runs) == brute


def test_bucketed_forward_gives_the_padded_batchs_logits_and_gradients():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=1)
    model = LlamaForSequenceClassification(cfg)
    lengths = [5, 17, 3, 30, 9, 22]
    ids = torch.zeros((len(lengths), max(lengths)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, 40, (n,))
        mask[row, :n] = 1

    def run(forward):
        model.zero_grad()
        logits = forward(input_ids=ids, attention_mask=mask, use_cache=False, margin=torch.ones(3)).logits
        (logits.squeeze(-1) * torch.arange(1.0, 7.0)).sum().backward()  # row-specific weights: order matters
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    whole_logits, whole_grads = run(lambda margin, **kw: model(**kw))
    bucketed_logits, bucketed_grads = run(BucketedForward(model, max_buckets=3))
    torch.testing.assert_close(bucketed_logits, whole_logits, atol=1e-5, rtol=1e-4)
    for got, want in zip(bucketed_grads, whole_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_pair_length_sampler_groups_lengths_and_keeps_every_pair_once():
    from calibrated_rlhf.core.reward_model import PairLengthSampler

    torch.manual_seed(0)
    lengths = torch.randint(5, 200, (101,)).tolist()
    order = list(PairLengthSampler(lengths, batch_size=8, group_batches=50))
    assert sorted(order) == list(range(101))
    batches = [order[i:i + 8] for i in range(0, 101, 8)]
    assert len(batches[-1]) == 5  # the short batch comes last, so no batch straddles two groups
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches[:-1]]
    assert max(spreads) < 60  # sorted within the group: neighbours in length, not random draws (~170)
    first = [min(lengths[i] for i in b) for b in batches[:-1]]
    assert first != sorted(first) and first != sorted(first, reverse=True)  # batches in random order
