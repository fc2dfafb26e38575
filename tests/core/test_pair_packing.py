"""Padding-free pair batches: the packing, its plan, and the rewards and gradients it must preserve."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from transformers import (LlamaConfig, LlamaForSequenceClassification, MistralConfig, MistralForSequenceClassification,
                          Qwen2Config, Qwen2ForSequenceClassification, Qwen3Config, Qwen3ForSequenceClassification)

from calibrated_rlhf.core.speed.pair_packing import (PackedPairForward, attention_width, pack_pairs, packed_logits, plan_rows,
                                               shared_prefix_lengths, unsupported_reason)

VOCAB, PAD, EOS = 48, 0, 2


def pair_batch(pairs: list[tuple[list[int], list[int]]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's collator layout: chosen rows, then rejected rows, right-padded with ``pad``."""
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    ids = torch.full((len(seqs), max(map(len, seqs)) + 2), pad)  # trailing all-padding columns too
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    return ids, mask


def random_pairs(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Pairs sharing a prompt of 0-12 tokens, tails of 1-15 tokens, each ending in EOS."""
    g = torch.Generator().manual_seed(seed)

    def tokens(k: int) -> list[int]:
        return torch.randint(3, VOCAB, (k,), generator=g).tolist()

    pairs = []
    for _ in range(n):
        prompt = tokens(int(torch.randint(0, 13, (1,), generator=g)))
        pairs.append((prompt + tokens(int(torch.randint(1, 16, (1,), generator=g))) + [EOS],
                      prompt + tokens(int(torch.randint(1, 16, (1,), generator=g))) + [EOS]))
    return pairs


EDGE_PAIRS = [
    ([5, 6, 7, 8, EOS], [5, 6, 7, 8, EOS]),  # identical sides
    ([5, 6, 7, EOS], [5, 6, 7, EOS, 9, 10, EOS]),  # chosen is a prefix of rejected
    ([9, EOS], [10, 11, 12, EOS]),  # nothing shared
    ([7], [7]),  # one token each
]


def small_model(family: str, attn: str = "sdpa", **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, num_labels=1)
    cls = {"llama": (LlamaConfig, LlamaForSequenceClassification),
           "qwen2": (Qwen2Config, Qwen2ForSequenceClassification),
           "mistral": (MistralConfig, MistralForSequenceClassification),
           "qwen3": (Qwen3Config, Qwen3ForSequenceClassification)}[family]  # q/k norms: no trimmed last layer
    if family == "qwen3":
        common["head_dim"] = 8
    model = cls[1](cls[0](**{**common, **extra}))
    model.config._attn_implementation = attn
    return model


def logits_and_grads(model, logits_of):
    """Rewards and every parameter's gradient of a row-weighted sum (the order of the rewards matters)."""
    model.zero_grad()
    logits = logits_of()
    (logits.squeeze(-1) * torch.arange(1.0, len(logits) + 1)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def through(forward, ids, mask):
    """A call as TRL's compute_loss makes it: the whole batch, margin and use_cache included."""
    return lambda: forward(input_ids=ids, attention_mask=mask, use_cache=False,
                           margin=torch.zeros(ids.shape[0] // 2)).logits


def test_shared_prefixes_leave_each_side_a_token_of_its_own():
    ids, mask = pair_batch(EDGE_PAIRS + [([5, 6, 9, EOS], [5, 6, 10, 11, EOS])])
    assert shared_prefix_lengths(ids, mask.sum(dim=1)).tolist() == [4, 3, 0, 0, 2]
    # padding is never shared, even where both rows hold PAD past their ends
    ids, mask = pair_batch([([5, 6], [5, 6, 7, 8])])
    assert shared_prefix_lengths(ids, mask.sum(dim=1)).tolist() == [1]


@pytest.mark.parametrize("lengths", [[7], [5, 5, 5, 5], [30, 3, 14, 9, 22, 8, 1], list(range(1, 17))])
@pytest.mark.parametrize("attention_width", [1.0, 64.0, 1e9])
def test_row_plans_place_every_unit_once_at_no_more_than_the_simple_plans_cost(lengths, attention_width):
    def cost(rows):
        width = max(sum(lengths[u] for u in row) for row in rows)
        return len(rows) * width * (1 + width / attention_width)

    rows = plan_rows(lengths, attention_width)
    assert sorted(itertools.chain(*rows)) == list(range(len(lengths)))
    assert all(rows)
    assert cost(rows) <= min(cost([list(range(len(lengths)))]), cost([[u] for u in range(len(lengths))]))


def test_row_plans_follow_the_price_of_attention():
    lengths = [10, 4, 3, 3]
    cheap = plan_rows(lengths, 1e9)  # attention nearly free: no padding at all ([10] beside [4, 3, 3])
    assert len(cheap) * max(sum(lengths[u] for u in row) for row in cheap) == sum(lengths)
    assert len(plan_rows([10, 10, 10, 10], 1e9)) == 4  # equal units: one row each saves attention, no tokens
    dear = plan_rows([10, 9, 8, 7, 6, 5], 0.01)  # attention dear: no row wider than the longest unit
    assert max(sum([10, 9, 8, 7, 6, 5][u] for u in row) for row in dear) == 10
    assert len(plan_rows([10, 9, 8, 7, 6, 5], 1e9)) < len(dear)
    assert plan_rows([], 10.0) == [] and plan_rows([3], 10.0) == [[0]]


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"),
                                         ("mistral", "sdpa"), ("qwen3", "sdpa")])
def test_packed_pairs_give_the_padded_batchs_rewards_and_gradients(family, attn):
    model = small_model(family, attn)
    ids, mask = pair_batch(random_pairs(9, seed=1) + EDGE_PAIRS)
    packed = pack_pairs(ids, mask, PAD, attention_width(model))  # the plan the forward below makes
    assert packed.input_ids.numel() < mask.sum()  # fewer tokens than the batch's real tokens: prompts run once
    want_logits, want_grads = logits_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask).logits)
    last_mlp_rows = []
    model.model.layers[-1].mlp.register_forward_pre_hook(lambda m, a: last_mlp_rows.append(a[0].shape[:-1].numel()))
    forward = PackedPairForward(model, fallback=lambda **kw: pytest.fail("the packed path fell back"))
    got_logits, got_grads = logits_and_grads(model, through(forward, ids, mask))
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-4)
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, atol=1e-5, rtol=1e-4, msg=name)
    # the last layer's MLP ran at the read positions only (each row's most reads, in every row), or,
    # for q/k-normed Qwen3, whose layers the trimmed layer does not write out, at every position
    rows = packed.read // packed.input_ids.shape[1]
    reads = len(packed.input_ids) * int(torch.bincount(rows).max())
    assert last_mlp_rows[-1] == (packed.input_ids.numel() if family == "qwen3" else reads)
    assert reads < packed.input_ids.numel() / 4


@pytest.mark.parametrize("attention_width,together", [(1e9, True), (1.0, False)])
def test_both_plans_give_the_padded_batchs_rewards_and_gradients(attention_width, together):
    model = small_model("llama")
    pairs = random_pairs(9, seed=7) + EDGE_PAIRS
    ids, mask = pair_batch(pairs)
    packed = pack_pairs(ids, mask, PAD, attention_width)
    shared = shared_prefix_lengths(ids, mask.sum(dim=1))
    # attention nearly free: pairs packed together, prompts once; attention dear: every sequence apart,
    # in rows no wider than the longest sequence
    assert int((packed.input_ids != PAD).sum()) == int(mask.sum()) - (int(shared.sum()) if together else 0)
    if not together:
        assert packed.input_ids.shape[1] == max(len(s) for pair in pairs for s in pair)
    want_logits, want_grads = logits_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask).logits)
    got_logits, got_grads = logits_and_grads(model, lambda: packed_logits(model, packed))
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-4)
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, atol=1e-5, rtol=1e-4, msg=name)


def test_a_pad_token_that_ends_sequences_moves_the_readout_in_both_paths():
    model = small_model("llama")
    model.config.pad_token_id = EOS  # a common setting for checkpoints without a pad token
    ids, mask = pair_batch(random_pairs(6, seed=2) + EDGE_PAIRS[:3], pad=EOS)
    want, _ = logits_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask).logits)
    got, _ = logits_and_grads(model, through(PackedPairForward(model, lambda **kw: pytest.fail("fell back")), ids, mask))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_batches_it_cannot_pack_take_the_padded_path():
    ids, mask = pair_batch(random_pairs(4, seed=3))
    windowed = small_model("mistral", sliding_window=4)  # a window shorter than the batch: the mask would drop it
    assert "sliding window" in unsupported_reason(windowed, ids, mask)
    left = (torch.flip(ids, dims=[1]), torch.flip(mask, dims=[1]))
    assert "right-padded" in unsupported_reason(small_model("llama"), *left)
    assert "takes no custom mask" in unsupported_reason(small_model("llama", "flash_attention_2"), ids, mask)
    assert "pad token" in unsupported_reason(small_model("llama", pad_token_id=None), ids, mask)
    assert "odd" in unsupported_reason(small_model("llama"), ids[:-1], mask[:-1])
    # padded with another token than the model's pad id: its head reads inside the padding
    assert "reads past" in unsupported_reason(small_model("llama", pad_token_id=EOS), ids, mask)

    calls = []

    def padded(margin, **kw):
        calls.append(kw["input_ids"].shape)
        return windowed(**kw)

    forward = PackedPairForward(windowed, padded)
    with pytest.warns(UserWarning, match="sliding window"):
        got = forward(input_ids=ids, attention_mask=mask, use_cache=False, margin=torch.zeros(4)).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per model
        forward(input_ids=ids, attention_mask=mask, use_cache=False, margin=torch.zeros(4))
    assert calls == [ids.shape] * 2
    torch.testing.assert_close(got, windowed(input_ids=ids, attention_mask=mask).logits)


class OffsetHead(LlamaForSequenceClassification):
    """A model whose own forward adds to the score: what the packed readout cannot know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits + 1.0
        return out


def test_a_model_that_disagrees_with_its_packed_forward_keeps_the_padded_path_and_says_so():
    torch.manual_seed(0)
    model = OffsetHead(small_model("llama").config)
    ids, mask = pair_batch(random_pairs(5, seed=4))
    forward = PackedPairForward(model, lambda margin, **kw: model(**kw))
    with pytest.warns(UserWarning, match="disagree"):
        first = forward(input_ids=ids, attention_mask=mask, use_cache=False, margin=torch.zeros(5)).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second check, no second warning
        second = forward(input_ids=ids, attention_mask=mask, use_cache=False, margin=torch.zeros(5)).logits
    want = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(first, want)
    torch.testing.assert_close(second, want)


@pytest.mark.parametrize("lora", [False, True])
def test_training_with_packed_pairs_follows_the_padded_training(lora, synthetic_pairs, tiny_tokenizer):
    from calibrated_rlhf.core.lora import LoraParams
    from calibrated_rlhf.core.preferences import tokenize_pairs
    from calibrated_rlhf.core.reward_model import RewardTrainingParams, train_reward_model

    data = tokenize_pairs(synthetic_pairs.head(64), tiny_tokenizer)
    data["margin"] = [0.1 * (i % 3) for i in range(len(data))]  # the margin loss rides along
    histories, weights = [], []
    for padding_free in (False, True):
        params = RewardTrainingParams(num_train_epochs=2, per_device_train_batch_size=8, logging_steps=2,
                                      speed={"padding_free": padding_free, "length_buckets": 1},
                                      lora=LoraParams(r=4, target_modules=["q_proj", "v_proj"]) if lora else None)
        model = small_model("llama", vocab_size=len(tiny_tokenizer), pad_token_id=tiny_tokenizer.pad_token_id)
        rows_seen = []  # rows of every backbone call: 16 per padded batch of 8 pairs, at most 8 packed
        model.model.register_forward_pre_hook(lambda m, a, kw: rows_seen.append((a or [kw["input_ids"]])[0].shape[0]),
                                              with_kwargs=True)
        model, history = train_reward_model(model, tiny_tokenizer, data, None, params)
        histories.append([(h["step"], h["loss"]) for h in history if "loss" in h])
        weights.append(model.state_dict())
        packed_calls = sum(rows <= 8 for rows in rows_seen)
        assert packed_calls == (16 + 1 if padding_free else 0)  # 2 epochs of 8 batches, and the first one's check
        fractions = [h["packed_batch_fraction"] for h in history if "packed_batch_fraction" in h]
        assert fractions == ([1.0] if padding_free else [])
        trimmed = [h["trimmed_batch_fraction"] for h in history if "trimmed_batch_fraction" in h]
        assert trimmed == ([1.0] if padding_free else [])  # padded with one bucket: TRL's own trainer
    assert len(histories[0]) == len(histories[1]) >= 5
    for (step_a, loss_a), (step_b, loss_b) in zip(*histories):
        assert step_a == step_b and loss_a == pytest.approx(loss_b, abs=1e-4)
    for name, want in weights[0].items():
        torch.testing.assert_close(weights[1][name], want, atol=1e-4, rtol=1e-3, msg=name)


def test_the_speed_switch_off_trains_as_trl_and_as_the_fast_path(synthetic_pairs, tiny_tokenizer):
    # speed.enabled: false, whatever the knobs say (their defaults: packed pairs, three length buckets), is
    # TRL's RewardTrainer on the model's own forward: every backbone call a whole padded batch, no tally
    from trl import RewardTrainer

    from calibrated_rlhf.core.preferences import tokenize_pairs
    from calibrated_rlhf.core.reward_model import RewardTrainingParams, _reward_trainer_class, train_reward_model
    from calibrated_rlhf.core.speed.buckets import TrainingBatches

    data = tokenize_pairs(synthetic_pairs.head(64), tiny_tokenizer)
    histories, weights = [], []
    for enabled in (True, False):
        params = RewardTrainingParams(num_train_epochs=2, per_device_train_batch_size=8, logging_steps=2,
                                      speed={"enabled": enabled})
        assert (_reward_trainer_class(params) is RewardTrainer) == (not enabled)
        model = small_model("llama", vocab_size=len(tiny_tokenizer), pad_token_id=tiny_tokenizer.pad_token_id)
        rows_seen = []
        model.model.register_forward_pre_hook(lambda m, a, kw: rows_seen.append((a or [kw["input_ids"]])[0].shape[0]),
                                              with_kwargs=True)
        model, history = train_reward_model(model, tiny_tokenizer, data, None, params)
        histories.append([(h["step"], h["loss"]) for h in history if "loss" in h])
        weights.append(model.state_dict())
        fractions = [h for h in history if "packed_batch_fraction" in h or "trimmed_batch_fraction" in h]
        if enabled:
            assert min(rows_seen) <= 8 and fractions  # packed rows went through
        else:
            assert set(rows_seen) == {16} and not fractions  # 8 pairs, both sides padded in one batch
    grouped = RewardTrainingParams(group_by_length=True, speed={"enabled": False})
    assert TrainingBatches(grouped.speed).forward(model) is model  # TRL's forward under our sampler too
    assert len(histories[0]) == len(histories[1]) >= 5
    for (step_a, loss_a), (step_b, loss_b) in zip(*histories):
        assert step_a == step_b and loss_a == pytest.approx(loss_b, abs=1e-4)
    for name, want in weights[0].items():
        torch.testing.assert_close(weights[1][name], want, atol=1e-4, rtol=1e-3, msg=name)


def test_a_batch_the_padded_path_prices_lower_goes_padded():
    from calibrated_rlhf.core.speed.buckets import BucketedForward

    model = small_model("llama")
    widths = []
    model.model.register_forward_pre_hook(lambda m, a, kw: widths.append(tuple((a or [kw["input_ids"]])[0].shape)),
                                          with_kwargs=True)
    padded = BucketedForward(model, max_buckets=3, bucket_cost_tokens=0.0)
    forward = PackedPairForward(model, padded, padded.modeled_cost)
    g = torch.Generator().manual_seed(8)

    def seq(n, first):
        return [first] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist()

    # nothing shared, short and long sequences: packed rows would be as wide as the longest for all
    unshared = [(seq(4, 3), seq(4, 4)), (seq(4, 5), seq(4, 6)), (seq(30, 7), seq(30, 8)), (seq(30, 9), seq(30, 10))]
    ids, mask = pair_batch(unshared)
    through(forward, ids, mask)()
    widths.clear()  # after the readout's first-use check
    logits = through(forward, ids, mask)()
    assert sorted(widths) == [(4, 4), (4, 30)]  # two length buckets, not packed rows
    torch.testing.assert_close(logits, model(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-4)
    # long shared prompts: packing runs each once and wins
    widths.clear()
    prompt = seq(25, 3)
    ids, mask = pair_batch([(prompt + seq(3, 11), prompt + seq(3, 12)), (prompt + seq(4, 13), prompt + seq(2, 14))])
    through(forward, ids, mask)()
    assert widths[-1][0] < ids.shape[0]  # packed rows: fewer than the batch's 4 (after the first-use check)
