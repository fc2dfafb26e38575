"""Conversational prompts in policy sampling: rendered with the chat template, answered up to its end of turn,
and scored by the reward model on exactly the ids a pair with that reply is tokenized to."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from calibrated_rlhf.core import chat
from calibrated_rlhf.core.backbone import CHAT_TEMPLATE, train_tokenizer
from calibrated_rlhf.core.policy import sample_responses
from calibrated_rlhf.core.ppo import PPOConfig, PPOTrainer
from calibrated_rlhf.core.preferences import tokenize_pairs
from calibrated_rlhf.core.scoring import RewardScorer, rl_score_fn

from .test_ppo_helpers import PROMPTS, build_tokenizer, tiny_models

# ChatML's shape (its turn markers are special tokens; the end of turn is <|im_end|>, not the EOS), with
# spaces where ChatML has newlines so the word-level test tokenizer splits every word
CHATML = ("{% for m in messages %}{{ '<|im_start|> ' + m['role'] + ' ' + m['content'] + ' <|im_end|> ' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|> assistant' }}{% endif %}")
MESSAGES = [[{"role": "user", "content": p}] for p in PROMPTS]


@pytest.fixture(scope="module")
def chatml():
    """A word-level tokenizer with ChatML's turn markers: any reply decodes to words that tokenize back to
    the same ids, so the ids a policy sampled can be compared with the reward model's one for one."""
    from tokenizers import AddedToken

    tok = build_tokenizer()
    tok.add_tokens(["user", "assistant"])
    tok.add_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)],
                   special_tokens=True)
    tok.chat_template = CHATML
    return tok


def test_end_of_turn_is_read_off_the_template(chatml, tiny_tokenizer):
    assert chat.end_of_turn_id(chatml) == chatml.convert_tokens_to_ids("<|im_end|>") != chatml.eos_token_id
    assert chat.stop_token_id(chatml, MESSAGES) == chat.end_of_turn_id(chatml)
    assert chat.stop_token_id(chatml, PROMPTS) == chatml.eos_token_id
    # the tiny tokenizer's template closes every turn with its EOS
    assert tiny_tokenizer.chat_template == CHAT_TEMPLATE
    assert chat.end_of_turn_id(tiny_tokenizer) == tiny_tokenizer.eos_token_id
    # a template that closes turns with plain text has no end-of-turn token: the EOS ends the reply
    plain_turns = build_tokenizer()
    plain_turns.chat_template = "{% for m in messages %}{{ m['content'] + ' ' }}{% endfor %}"
    assert chat.end_of_turn_id(plain_turns) == plain_turns.eos_token_id
    with pytest.raises(ValueError, match="need a chat template.*has none"):
        chat.prompt_ids(build_tokenizer(), MESSAGES[:1])
    with pytest.raises(ValueError, match="mix text and conversational .* prompt 1"):
        chat.prompt_ids(chatml, [PROMPTS[0], MESSAGES[1]])


def test_tiny_template_prompt_is_a_prefix_of_prompt_plus_reply(synthetic_pairs):
    """The generation prompt ends on a whole word, so the reply's tokens follow it unchanged; role markers are
    tokens of the tokenizer trained on the chat rendering."""
    from calibrated_rlhf.core.backbone import chat_corpus_text
    from calibrated_rlhf.core.synthetic import as_conversational

    pairs = as_conversational(synthetic_pairs.head(40))
    corpus = [chat_corpus_text(m) for col in ("prompt", "chosen", "rejected") for v in pairs[col] for m in v]
    tok = train_tokenizer(corpus, vocab_size=128)
    (head,) = chat.prompt_ids(tok, [pairs["prompt"][0]])
    full = tokenize_pairs(pairs.head(1), tok)["chosen_ids"][0]
    assert full[:len(head)] == head and full[-1] == tok.eos_token_id and head[0] == tok.bos_token_id
    assert tok.decode(full[len(head):], skip_special_tokens=True) == pairs["chosen"][0][0]["content"]
    assert "\u2581<assistant>" in tok.get_vocab()


class RecordingScorer(RewardScorer):
    """The one scoring path, keeping every id sequence it hands the reward model."""

    seen: list

    def raw_of_ids(self, ids):
        self.seen = [*getattr(self, "seen", []), *ids]
        return super().raw_of_ids(ids)


def turn_taking_policy(tok, end_of_turn_logit: float = 1.0):
    """A tiny policy whose next token ignores the context: a word, or the end of turn with about 1 chance
    in 5 (its logit beside the words' 0); never another special token."""
    policy, value = tiny_models(tok, seed=3, hidden=16)
    head = torch.nn.Linear(16, len(tok), bias=True)
    torch.nn.init.zeros_(head.weight)
    bias = torch.zeros(len(tok))
    bias[sorted(chat.special_ids(tok))] = -30.0
    bias[chat.end_of_turn_id(tok)] = end_of_turn_logit
    head.bias.data = bias
    policy.lm_head = head
    return policy, value


def pair_ids(tok, prompts, replies) -> list[list[int]]:
    """The ids training pairs with these prompts and replies are tokenized to (the reward model's view)."""
    pairs = pd.DataFrame({"prompt": prompts, "chosen": [[{"role": "assistant", "content": r}] for r in replies],
                          "rejected": [[{"role": "assistant", "content": "w0"}]] * len(prompts)})
    return list(tokenize_pairs(pairs, tok)["chosen_ids"])


def test_reward_model_scores_a_ppo_reply_as_the_same_reply_given_as_a_pair(chatml):
    policy, value = turn_taking_policy(chatml)
    scorer = RecordingScorer(tiny_models(chatml, seed=4, hidden=16)[1].eval(), chatml)
    config = PPOConfig(num_updates=1, batch_size=16, response_length=12, seed=1, score_key="score")
    trainer = PPOTrainer(config, policy, chatml, MESSAGES, rl_score_fn(scorer, "raw"), value_model=value)
    stop = chatml.convert_tokens_to_ids("<|im_end|>")
    assert trainer.eos_token_id == stop
    roll = trainer._rollout()
    prompts = [trainer.prompts[i] for i in roll.idx]
    assert prompts == [MESSAGES[i] for i in roll.idx]
    scored = scorer.seen
    assert scored == pair_ids(chatml, prompts, roll.texts)
    scorer.seen = []
    expected = scorer.raw_of_ids(scored)[0]
    torch.testing.assert_close(roll.scores["raw"], torch.as_tensor(expected, dtype=torch.float32))
    # one for one: the prompt as the policy read it, the reply as it sampled it, through its end of turn
    ended = 0
    for i, reply, mask, ids in zip(roll.idx, roll.responses, roll.mask, scored):
        reply = reply[mask.bool()].tolist()
        assert reply[-1] == stop or len(reply) == config.response_length
        if reply[-1] == stop:
            assert ids == trainer.data.ids[i] + reply
            ended += 1
    assert trainer.data.ids[roll.idx[0]][-2:] == chatml.convert_tokens_to_ids(["<|im_start|>", "assistant"])
    assert ended >= len(roll.idx) // 2


def test_reference_samples_stop_at_the_end_of_turn_and_score_as_pairs(chatml):
    policy, _ = turn_taking_policy(chatml, end_of_turn_logit=3.0)
    rows = sample_responses(policy, chatml, MESSAGES, 2, 40, seed=2)
    assert [p for p, _ in rows] == [m for m in MESSAGES for _ in range(2)]
    # the end of turn comes with p ~ 0.37 a token: replies average under 2 words when sampling stops there,
    # some 25 when it runs on to max_new_tokens
    words = [len(r.split()) for _, r in rows]
    assert sum(words) / len(words) < 4 and all(w < 40 for w in words)
    scorer = RecordingScorer(tiny_models(chatml, seed=4, hidden=16)[1].eval(), chatml)
    scorer.score([p for p, _ in rows], [r for _, r in rows])
    assert scorer.seen == pair_ids(chatml, [p for p, _ in rows], [r for _, r in rows])
    head = chat.prompt_ids(chatml, MESSAGES)
    assert all(ids[:len(head[k // 2])] == head[k // 2] for k, ids in enumerate(scorer.seen))
