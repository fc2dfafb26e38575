"""The reward read with the last layer at the head's read position only: the same rewards and gradients."""

from __future__ import annotations

import warnings

import pytest
import torch

from calibrated_rlhf.core.speed import readout
from calibrated_rlhf.core.speed.pair_packing import PackedPairForward
from calibrated_rlhf.core.speed.readout import read_positions, readout_logits
from calibrated_rlhf.core.reward_model import score_sequences
from tests.core.test_pair_packing import EOS, PAD, VOCAB, logits_and_grads, pair_batch, random_pairs, small_model


def padded(seqs: list[list[int]], pad: int = PAD, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs)) + 2  # trailing (or leading) all-padding columns too
    ids, mask = torch.full((len(seqs), width), pad), torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols], mask[row, cols] = torch.tensor(seq), 1
    return ids, mask


def sequences(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist() + [EOS]
            for _ in range(n)]


def last_mlp_rows(model: torch.nn.Module) -> list[int]:
    """Positions the last layer's MLP runs at, call by call."""
    rows: list[int] = []
    backbone = readout.classifier_parts(model)[1]
    backbone.layers[-1].mlp.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[:-1].numel()))
    return rows


def test_read_positions_follow_transformers_rule_when_the_pad_token_ends_a_sequence():
    # EOS doubles as PAD here: the head reads the last token before it, and so must we
    ids = torch.tensor([[5, 6, 7, PAD, PAD], [5, PAD, 8, 9, PAD], [PAD, PAD, PAD, PAD, PAD]])
    assert read_positions(ids, PAD).tolist() == [2, 3, 0]


@pytest.mark.parametrize("family,attn,left", [("llama", "sdpa", False), ("llama", "eager", False),
                                              ("llama", "sdpa", True), ("qwen2", "sdpa", False),
                                              ("mistral", "sdpa", True), ("qwen3", "sdpa", False)])
def test_the_readout_gives_the_models_rewards_and_gradients(family, attn, left):
    model = small_model(family, attn)
    ids, mask = padded(sequences(7, seed=1), left=left)
    want_logits, want_grads = logits_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask).logits)
    rows = last_mlp_rows(model)
    got_logits, got_grads = logits_and_grads(model, lambda: readout_logits(model, ids, mask))
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-4)
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, atol=1e-5, rtol=1e-4, msg=name)
    # one position per sequence; Qwen3's q/k-normed layers are not written out: its own forward runs
    assert rows[-1] == (ids.numel() if family == "qwen3" else len(ids))
    assert readout.trims(model, ids.shape[1]) == (family != "qwen3")


def test_the_readout_trains_lora_adapters_as_the_model_does():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(small_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                            task_type="SEQ_CLS", init_lora_weights=False))
    ids, mask = padded(sequences(6, seed=2))
    want_logits, want_grads = lora_grads(model, lambda: model(input_ids=ids, attention_mask=mask).logits)
    rows = last_mlp_rows(model)
    got_logits, got_grads = lora_grads(model, lambda: readout_logits(model, ids, mask))
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-4)
    assert any("lora" in name for name in want_grads)
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, atol=1e-5, rtol=1e-4, msg=name)
    assert rows[-1] == len(ids)


def lora_grads(model, logits_of):
    """Rewards and the trained parameters' gradients (the base weights are frozen)."""
    model.zero_grad()
    logits = logits_of()
    (logits.squeeze(-1) * torch.arange(1.0, len(logits) + 1)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_pad_token_that_ends_sequences_moves_the_readout_too():
    model = small_model("llama", pad_token_id=EOS)  # a common setting for checkpoints without a pad token
    ids, mask = padded(sequences(5, seed=3), pad=EOS)
    torch.testing.assert_close(readout_logits(model, ids, mask), model(input_ids=ids, attention_mask=mask).logits,
                               atol=1e-5, rtol=1e-4)


def test_without_a_pad_id_the_model_reads_its_own_way():
    model = small_model("llama", pad_token_id=None)
    ids = torch.tensor([sequences(1, seed=4)[0]])
    rows = last_mlp_rows(model)
    torch.testing.assert_close(readout_logits(model, ids, torch.ones_like(ids)), model(input_ids=ids).logits)
    assert rows[0] == ids.numel()  # the full forward


def test_a_disagreeing_model_keeps_its_own_forward_and_says_so_once(monkeypatch):
    model = small_model("llama")
    ids, mask = padded(sequences(5, seed=5))
    real = readout.last_layer_at
    monkeypatch.setattr(readout, "last_layer_at", lambda *a: real(*a) + 0.1)
    with pytest.warns(RuntimeWarning, match="trimmed readout disagrees"):
        first = readout_logits(model, ids, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second check, no second warning
        second = readout_logits(model, ids, mask)
    want = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(first, want) and torch.equal(second, want)
    assert not readout.trims(model, ids.shape[1])  # what rm/train/trimmed_batch_fraction counts


@pytest.mark.parametrize("path", ["padded", "packed"])
def test_each_first_use_check_runs_without_dropout_and_restores_training_mode(path):
    model = small_model("llama", attention_dropout=0.5)
    model.train()
    ids, mask = pair_batch(random_pairs(4, seed=5))
    forward = (PackedPairForward(model, lambda **kw: pytest.fail("fell back")) if path == "packed"
               else lambda input_ids, attention_mask: readout_logits(model, input_ids, attention_mask))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dropout would make the two forwards differ: the check must not see it
        forward(input_ids=ids, attention_mask=mask)
    assert model.training


def test_scoring_reads_one_position_per_sequence():
    model = small_model("llama")
    seqs = sequences(9, seed=7)
    rows = last_mlp_rows(model)
    scores = score_sequences(model, seqs, PAD, batch_size=4)
    assert rows[-3:] == [4, 4, 1]  # three length-sorted batches of 9 sequences, after the first-use check
    one_by_one = [float(model(input_ids=torch.tensor([s])).logits.detach()) for s in seqs]
    assert scores == pytest.approx(one_by_one, abs=1e-5)
