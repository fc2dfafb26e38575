"""Length-aware batching of reward-model training: the buckets are optimal and change no gradient."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from calibrated_rlhf.core.speed.readout import readout_logits
from calibrated_rlhf.core.reward_model import RewardTrainingParams
from calibrated_rlhf.core.speed.buckets import BucketedForward, length_buckets


def padded_tokens(lengths, runs):
    return sum((end - start) * lengths[end - 1] for start, end in runs)


@pytest.mark.parametrize("lengths,k", [([3, 3, 5, 9, 9, 10], 2), ([1, 2, 4, 8, 16, 32, 33], 3),
                                        ([7, 7, 7, 7], 3), ([2, 50], 1)])
@pytest.mark.parametrize("price", [0, 6, 40])
def test_buckets_cover_the_batch_at_the_least_cost(lengths, k, price):
    runs = length_buckets(lengths, k, price)
    assert runs[0][0] == 0 and runs[-1][1] == len(lengths) and len(runs) <= k
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))  # contiguous, no row twice
    brute = min(
        (padded_tokens(lengths, list(zip((0, *cuts), (*cuts, len(lengths))))) + price * j, j)
        for j in range(k)
        for cuts in itertools.combinations(range(1, len(lengths)), j)
    )
    assert (padded_tokens(lengths, runs) + price * (len(runs) - 1), len(runs) - 1) == brute  # fewer runs on a tie


def test_the_price_of_a_pass_keeps_short_batches_whole_and_splits_long_spread_ones():
    price = RewardTrainingParams().speed.bucket_cost_tokens
    rng = np.random.default_rng(0)
    short = sorted(rng.integers(8, 33, 32).tolist())  # a batch of 16 pairs, lengths as in the cost curves at 32
    assert len(length_buckets(short, 1)) < len(length_buckets(short, 3, 0))  # splitting would save padding...
    assert length_buckets(short, 3, price) == [(0, 32)]  # ...but less than a pass costs
    near_equal = [60] * 10 + [61] * 12 + [64] * 10
    assert len(length_buckets(near_equal, 3, 0)) == 3 and length_buckets(near_equal, 3, price) == [(0, 32)]
    long_spread = sorted(rng.integers(64, 257, 32).tolist())
    assert len(length_buckets(long_spread, 3, price)) == 3
    assert length_buckets(long_spread, 3, price) == length_buckets(long_spread, 3, 0)  # today's choice


def test_degenerate_bucket_inputs():
    assert length_buckets([], 3, 10.0) == []
    assert length_buckets([4, 9], 0) == [(0, 2)]  # fewer than one bucket means one
    assert length_buckets([5, 5, 5], 3, 0) == [(0, 3)]  # equal lengths: a split saves nothing
    assert length_buckets([1, 100], 2, 98) == [(0, 1), (1, 2)]  # saves 99 tokens for a price of 98
    assert length_buckets([1, 100], 2, 99) == [(0, 2)]  # a tie: the fewer passes
    with pytest.raises(ValueError, match="bucket_cost_tokens must be >= 0"):
        length_buckets([1, 2], 2, -1)


@pytest.mark.parametrize("price,passes", [(0, 3), (1e6, 1)])
def test_bucketed_forward_gives_the_padded_batchs_logits_and_gradients(price, passes):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=1)
    model = LlamaForSequenceClassification(cfg)
    lengths = [5, 17, 3, 30, 9, 22]
    ids = torch.zeros((len(lengths), max(lengths) + 2), dtype=torch.long)  # trailing all-padding columns too
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, 40, (n,))
        mask[row, :n] = 1
    readout_logits(model, ids, mask)  # its first-use check, before the passes are counted
    calls = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args or [kwargs.get("input_ids")])[0].shape), with_kwargs=True)

    def run(forward):
        model.zero_grad()
        calls.clear()
        logits = forward(input_ids=ids, attention_mask=mask, use_cache=False, margin=torch.ones(3)).logits
        (logits.squeeze(-1) * torch.arange(1.0, 7.0)).sum().backward()  # row-specific weights: order matters
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    whole_logits, whole_grads = run(lambda margin, **kw: model(**kw))
    bucketed_logits, bucketed_grads = run(BucketedForward(model, max_buckets=3, bucket_cost_tokens=price))
    assert len(calls) == passes and max(shape[1] for shape in calls) == max(lengths)
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


@pytest.mark.parametrize("key", ["padding_free", "length_buckets", "bucket_cost_tokens"])
def test_a_speed_knob_at_its_old_flat_place_is_refused(key):
    from pydantic import ValidationError

    from calibrated_rlhf.core.speed.config import RewardSpeed

    value = RewardSpeed.model_fields[key].default
    with pytest.raises(ValidationError, match=f"{key}\n.*Extra inputs are not permitted"):
        RewardTrainingParams(**{key: value})
    assert getattr(RewardTrainingParams(speed={key: value}).speed, key) == value
