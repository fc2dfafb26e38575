"""Prompts as a policy reads them, and its responses as the reward model reads them.

A text prompt is tokenized as is (the tokenizer's special tokens included) and a response is the text that
continues it, ended by EOS. A conversational prompt (a list of ``{role, content}`` messages) goes through
the tokenizer's chat template with ``add_generation_prompt=True``; the policy writes the assistant's turn
and stops at the template's end of turn (``<|im_end|>`` for ChatML, the EOS for templates that end a turn
with it), and the response is the turn's text, which :mod:`calibrated_rlhf.core.scoring` renders back as an
assistant message through the same template: the reward model scores the ids it was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from calibrated_rlhf.core.preferences import is_conversational, plain

PromptKind = Literal["text", "conversational"]
# A stand-in exchange rendered to find where the template closes an assistant turn.
_PROBE_USER = [{"role": "user", "content": "ping"}]
_PROBE_REPLY = [{"role": "assistant", "content": "pong"}]


def prompt_kind(prompts: Sequence[Any]) -> PromptKind:
    """Whether ``prompts`` are all text or all conversational; one policy run samples from one kind."""
    kinds = {"conversational" if is_conversational(p) else "text" for p in prompts}
    if len(kinds) > 1:
        first = next(i for i, p in enumerate(prompts) if is_conversational(p))
        raise ValueError(f"prompts mix text and conversational (message list) prompts (the first message list is "
                         f"prompt {first}): sample from one kind at a time")
    return kinds.pop() if kinds else "text"


def _check_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"conversational prompts need a chat template, and the tokenizer "
                         f"({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) has none: "
                         "use a chat model's tokenizer, or give it a chat_template")


def prompt_ids(tokenizer: Any, prompts: Sequence[Any]) -> list[list[int]]:
    """Token ids each prompt's response is sampled after: text with the tokenizer's special tokens; messages
    through the chat template with the assistant's generation prompt."""
    if prompt_kind(prompts) == "text":
        return [list(x) for x in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    _check_template(tokenizer)
    return [list(tokenizer.apply_chat_template(plain(list(p)), add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]) for p in prompts]


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn in the tokenizer's chat template: the first special token the
    template puts after a reply (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, or the EOS itself).

    Read off the template rather than guessed from token names, so any template that ends a turn with a
    special token works; a template that ends it with plain text has none, and the EOS is used.
    """
    _check_template(tokenizer)
    head = tokenizer.apply_chat_template(_PROBE_USER, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(_PROBE_USER + _PROBE_REPLY, tokenize=True, return_dict=True)["input_ids"]
    tail = list(full[len(head):]) if list(full[:len(head)]) == list(head) else list(full)
    # the unknown token is special too, and a vocabulary without the probe's word renders it so
    special = special_ids(tokenizer) - {tokenizer.unk_token_id}
    return next((t for t in tail if t in special), tokenizer.eos_token_id)


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens: the named ones (bos, eos, ...) and every added token marked
    special (a chat template's turn markers usually are, and ``all_special_ids`` leaves them out)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {int(i) for i, t in added.items() if getattr(t, "special", False)}


def stop_token_id(tokenizer: Any, prompts: Sequence[Any]) -> int:
    """Where a response to ``prompts`` ends: the end of the assistant's turn for conversational prompts,
    EOS for text."""
    if prompt_kind(prompts) == "conversational":
        return end_of_turn_id(tokenizer)
    return tokenizer.eos_token_id


def response_text(response: Any) -> str:
    """The text of a response: itself, or its messages' contents (a completion given as messages)."""
    if is_conversational(response):
        return "\n".join(str(m["content"]) for m in response)
    return response


def prompt_label(prompt: Any) -> str:
    """A prompt as one cell of a table (sample files): text as is, messages as JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(plain(prompt), ensure_ascii=False)
