"""The hidden-state gold (``core.gold``): read where a reward model's head reads, whatever the batch's padding;
a direction among the samples' top principal components, standardized on them; one interface with the words gold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibrated_rlhf.core.gold import (HiddenStateGold, direction_in_top_components, last_token_states, load_gold,
                                       reference)
from calibrated_rlhf.core.preferences import render_ids
from calibrated_rlhf.core.synthetic import SyntheticTask

PROMPTS = [[{"role": "user", "content": "Give me one tip for baking bread."}],
           [{"role": "user", "content": "What should a beginner know about chess?"}]]
REPLIES = ["Use warm water.", "Knead it for ten long minutes, then let the dough rest overnight in the fridge.",
           "Learn how each piece moves.", ""]


def test_states_are_read_at_each_conversations_last_token_whatever_the_padding(chat_checkpoint):
    model, tokenizer = reference(str(chat_checkpoint))
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    batched = last_token_states(model, tokenizer, prompts, REPLIES, batch_size=4)
    for i, (prompt, reply) in enumerate(zip(prompts, REPLIES)):
        ids = render_ids(tokenizer, prompt, [{"role": "assistant", "content": reply}])
        with torch.no_grad():
            alone = model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].double().numpy()
        np.testing.assert_allclose(batched[i], alone, atol=1e-5)
    assert not np.allclose(batched[0], batched[1])  # the reply counts, not only the prompt


def test_the_direction_lies_in_the_top_components_and_standardizes_the_samples():
    rng = np.random.default_rng(0)
    states = rng.standard_normal((200, 3)) @ rng.standard_normal((3, 16)) * 5 + rng.standard_normal((200, 16)) * 0.1
    states += 7.0  # an offset the gold must remove
    direction, offset = direction_in_top_components(states, 3, seed=1)
    gold = states @ direction - offset
    assert abs(gold.mean()) < 1e-9 and gold.std() == pytest.approx(1.0)
    _, _, components = np.linalg.svd(states - states.mean(0), full_matrices=False)
    outside = direction - components[:3].T @ (components[:3] @ direction)
    assert np.linalg.norm(outside) < 1e-9 * np.linalg.norm(direction)
    assert not np.allclose(direction_in_top_components(states, 3, seed=2)[0], direction)  # the seed hides it
    # fewer distinct directions than asked: the rank bounds it, no division by a zero component
    flat = np.outer(np.arange(5.0), np.ones(4))
    assert np.isfinite(direction_in_top_components(flat, 3, seed=0)[0]).all()
    with pytest.raises(ValueError, match="1 states; a direction needs at least 2"):
        direction_in_top_components(states[:1], 3, seed=0)
    with pytest.raises(ValueError, match="the 4 states are all the same"):
        direction_in_top_components(np.full((4, 16), 3.0), 3, seed=0)


def test_the_gold_round_trips_and_refuses_a_model_of_another_width(chat_checkpoint):
    model, tokenizer = reference(str(chat_checkpoint))
    states = last_token_states(model, tokenizer, [PROMPTS[0]] * 3, REPLIES[:3])
    direction, offset = direction_in_top_components(states, 2, seed=0)
    gold = HiddenStateGold(model=str(chat_checkpoint), direction=tuple(direction), offset=offset, scale=2.5)
    again = load_gold(gold.to_dict())
    assert again == gold and isinstance(load_gold(SyntheticTask(("a",), (1.0,), 1.0).to_dict()), SyntheticTask)
    np.testing.assert_allclose(again.gold_rewards([PROMPTS[0]] * 3, REPLIES[:3]), states @ direction - offset,
                               atol=1e-9)
    # a response given as messages is the same response
    np.testing.assert_allclose(gold.gold_rewards([PROMPTS[0]], [[{"role": "assistant", "content": REPLIES[0]}]]),
                               gold.gold_rewards([PROMPTS[0]], [REPLIES[0]]))
    narrow = HiddenStateGold(model=str(chat_checkpoint), direction=(1.0, 2.0), offset=0.0, scale=1.0)
    with pytest.raises(ValueError, match=f"direction has 2 entries but the model '{chat_checkpoint}' has hidden size"):
        narrow.gold_rewards([PROMPTS[0]], [REPLIES[0]])
