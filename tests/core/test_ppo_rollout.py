"""Rollout sampling: EOS truncation, cached logprobs vs a full forward, padding invariance."""

from __future__ import annotations

import pytest
import torch

from calibrated_rlhf.core.causal_lm import left_pad, position_ids_from_mask, response_mask, sample_categorical
from calibrated_rlhf.core.ppo.rollout import PolicyAndValue, response_logprobs, sample_responses
from calibrated_rlhf.core.speed.config import PPOSpeed

from .test_ppo_helpers import PROMPTS, build_tokenizer, tiny_models


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    tok = build_tokenizer()
    policy, vm = tiny_models(tok, seed=0)
    return tok, policy.eval(), vm.eval()


def test_response_mask_truncates_after_first_eos() -> None:
    eos = 2
    r = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    mask, has_eos = response_mask(r, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_left_pad() -> None:
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_sample_categorical_matches_probabilities() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.0, 0.1, 0.6, 0.0, 0.3])
    draws = sample_categorical(probs.expand(100_000, 5).contiguous(), g).squeeze(1)
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert freq[0] == 0 and freq[3] == 0  # zero-probability tokens are never drawn
    torch.testing.assert_close(freq, probs.double(), atol=6e-3, rtol=0)


@pytest.mark.parametrize("sampling_temperature", [1.0, 0.7])
@pytest.mark.parametrize("speed", [None, PPOSpeed(fast_decode=False), PPOSpeed()], ids=["plain", "slow", "fast"])
def test_cached_logprobs_match_full_forward(setup, sampling_temperature: float, speed: PPOSpeed | None) -> None:
    tok, policy, _ = setup
    ids = tok(PROMPTS[:6])["input_ids"]
    ids[1] = ids[1][:2]  # uneven prompt lengths -> real left padding
    q, qm = left_pad(ids, tok.pad_token_id)
    g = torch.Generator().manual_seed(1)
    s = sample_responses(policy, q, qm, 10, sampling_temperature, tok.eos_token_id, tok.pad_token_id, g,
                         speed=speed)
    assert s.responses.shape == (6, 10)
    assert bool((s.responses[~s.mask] == tok.pad_token_id).all())
    inp = torch.cat([q, s.responses], 1)
    attn = torch.cat([qm, torch.ones_like(s.responses)], 1)
    with torch.inference_mode():
        full = response_logprobs(policy, inp, attn, position_ids_from_mask(attn), q.shape[1], sampling_temperature)
    torch.testing.assert_close(s.logprobs, full * s.mask, atol=1e-5, rtol=1e-5)


def test_left_padding_does_not_change_logprobs(setup) -> None:
    tok, policy, _ = setup
    prompt = tok(PROMPTS[3])["input_ids"]
    resp = [tok.convert_tokens_to_ids(w) for w in ["w1", "w2", "w3", "<eos>"]]
    outs = []
    for extra in (0, 5):
        q, qm = left_pad([prompt, [1] * (len(prompt) + extra)], tok.pad_token_id)
        r = torch.tensor([resp, resp])
        inp = torch.cat([q, r], 1)
        attn = torch.cat([qm, torch.ones_like(r)], 1)
        with torch.inference_mode():
            outs.append(response_logprobs(policy, inp, attn, position_ids_from_mask(attn), q.shape[1])[0])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("speed", [None, PPOSpeed(fast_decode=False), PPOSpeed()], ids=["plain", "slow", "fast"])
def test_shared_value_head_values_match_wrapper_forward(setup, speed: PPOSpeed | None) -> None:
    tok, policy, _ = setup
    head = torch.nn.Linear(policy.config.hidden_size, 1)
    pv = PolicyAndValue(policy, value_head=head).eval()
    q, qm = left_pad(tok(PROMPTS[:4])["input_ids"], tok.pad_token_id)
    s = sample_responses(policy, q, qm, 6, 1.0, tok.eos_token_id, tok.pad_token_id,
                         torch.Generator().manual_seed(2), value_head=head, speed=speed)
    inp = torch.cat([q, s.responses], 1)
    attn = torch.cat([qm, torch.ones_like(s.responses)], 1)
    with torch.no_grad():
        logits, values = pv(inp, attn, position_ids_from_mask(attn), q.shape[1])
    torch.testing.assert_close(s.values, values * s.mask, atol=1e-5, rtol=1e-5)
    assert logits.shape == (4, 6, policy.config.vocab_size)


def test_wrapper_needs_exactly_one_value_function(setup) -> None:
    _, policy, vm = setup
    with pytest.raises(ValueError):
        PolicyAndValue(policy)
    with pytest.raises(ValueError):
        PolicyAndValue(policy, value_model=vm, value_head=torch.nn.Linear(4, 1))


def test_responses_decode_as_continuations_of_their_prompts() -> None:
    # Metaspace folds the space before a word into its token: decoded alone, a response loses it
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "\u2581say", "\u2581red", "\u2581w1", "\u2581w2", "w3"]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    from calibrated_rlhf.core.causal_lm import decode_responses

    prompt = [2, 3]  # "say red"
    responses = torch.tensor([[4, 5, 1, 0], [4, 6, 6, 6]])  # "▁w1 ▁w2 <eos>", "▁w1 w3 w3 w3"
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    assert tok.decode([4, 5]) == "w1 w2"  # alone: the leading space is gone
    texts = decode_responses(tok, [prompt, prompt], ["say red", "say red"], responses, mask)
    assert texts == [" w1 w2", " w1w3w3w3"]
    assert "say red" + texts[0] == tok.decode(prompt + [4, 5])
