"""The server's request bodies -> token ids, rendered exactly as the reward model saw its training inputs.

Two shapes (JSON objects):

- OpenRLHF's (``POST /get_reward``): ``{"query": [text, ...], "prompts": [...], "labels": [...]}``. Each query is
  the whole sequence the policy produced, prompt and response, decoded with its special tokens (chat template
  applied where the engine applies one); ``prompts`` and ``labels`` are accepted and not used. As OpenRLHF's
  own server does, padding is stripped from both ends and EOS from the end. Then a query holding the chat
  template's assistant header is a rendered conversation: its last turn is closed with the template's
  end-of-turn text and tokenized as is, which gives the ids ``apply_chat_template`` gives for the same
  messages. Any other query is text, scored as a text response with an empty prompt (EOS appended).
- The plain one (``POST /score``): ``{"inputs": [{"prompt": ..., "response": ...} | {"messages": [...]}, ...]}``:
  prompt and response as text or ``{role, content}`` message lists, as ``mlflow models serve`` takes them, or
  a whole conversation whose last message is the assistant's reply.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from calibrated_rlhf.core.preferences import render_many, text_problem
from calibrated_rlhf.core.scoring import as_completion
from calibrated_rlhf.serving.model import RequestError, fit_lengths

_PROBE = "\u2063probe\u2063"  # content no template alters, to find what the template puts around a turn


def conversation_markers(tokenizer: Any) -> tuple[str, str] | None:
    """(assistant header, end of turn) of the tokenizer's chat template; None without a usable template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        user = [{"role": "user", "content": _PROBE}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        plain = tokenizer.apply_chat_template(user, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": _PROBE}], tokenize=False)
    except Exception:  # a template that needs more than a user and an assistant turn: queries are then text
        return None
    header = prompt[len(plain):] if prompt.startswith(plain) else ""
    end = full[full.rindex(_PROBE) + len(_PROBE):]
    return (header, end) if header.strip() and end.strip() else None


def _strip_token(text: str, token: str | None, left: bool, right: bool) -> str:
    """``text`` without repeats of the whole string ``token`` at the chosen ends (str.strip takes characters)."""
    if not token:
        return text
    while left and text.startswith(token):
        text = text[len(token):]
    while right and text.endswith(token):
        text = text[:-len(token)]
    return text


@dataclass
class Renderer:
    """Token ids of requests for one served model, length-checked (``overlength``: reject or truncate)."""

    tokenizer: Any
    max_length: int | None
    overlength: str = "reject"
    # requests render on the server's worker threads; a fast tokenizer is not safe to share between threads
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.markers = conversation_markers(self.tokenizer)

    def _fit(self, column: str, ids: list[list[int]]) -> list[list[int]]:
        side = getattr(self.tokenizer, "truncation_side", "right")
        return fit_lengths({column: ids}, self.max_length, self.overlength, side)[column]

    def query_ids(self, queries: list[str]) -> list[list[int]]:
        with self._lock:
            return self._query_ids(queries)

    def _query_ids(self, queries: list[str]) -> list[list[int]]:
        tok = self.tokenizer
        rendered, texts = {}, {}  # row -> a rendered conversation (tokenized as is) / a text response
        for i, q in enumerate(queries):
            text = _strip_token(q, tok.pad_token, left=True, right=True)
            text = _strip_token(_strip_token(text, tok.eos_token, False, True), tok.pad_token, False, True)
            if self.markers is not None and self.markers[0] in text:
                end = self.markers[1]
                closed = end.rstrip()
                rendered[i] = text + end[len(closed):] if text.endswith(closed) else text + end
            else:
                texts[i] = text
        out: list[list[int]] = [[] for _ in queries]
        if rendered:  # as the chat template's own tokenize=True does: no special tokens added
            for i, ids in zip(rendered, tok(list(rendered.values()), add_special_tokens=False)["input_ids"]):
                out[i] = list(ids)
        if texts:
            for i, ids in zip(texts, render_many(tok, [""] * len(texts), list(texts.values()))):
                out[i] = ids
        return self._fit("query", out)

    def row_ids(self, prompts: list[Any], responses: list[Any]) -> list[list[int]]:
        """``RewardScorer.render`` of the rows, length-checked."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        completions = [as_completion(p, r) for p, r in zip(prompts, responses)]
        with self._lock:
            return self._fit("inputs", render_many(self.tokenizer, prompts, completions))


def _rows(body: Any, key: str, max_rows: int) -> list:
    if not isinstance(body, dict):
        raise RequestError(f"expected a JSON object with '{key}', got {type(body).__name__}")
    rows = body.get(key)
    if not isinstance(rows, list):
        raise RequestError(f"'{key}' must be a list, got {'nothing' if rows is None else type(rows).__name__}")
    if len(rows) > max_rows:
        raise RequestError(f"'{key}' holds {len(rows)} rows; this server takes at most {max_rows} per request "
                           "(split the request)")
    return rows


def parse_queries(body: Any, max_rows: int) -> list[str]:
    """OpenRLHF's ``query`` list, each a non-empty text; a :class:`RequestError` naming the first bad row."""
    queries = _rows(body, "query", max_rows)
    for i, q in enumerate(queries):
        if not isinstance(q, str) or not q.strip():
            raise RequestError(f"query[{i}] must be non-empty text, got {q!r:.80}")
    for key in ("prompts", "labels"):
        extra = body.get(key)
        if extra is not None and (not isinstance(extra, list) or len(extra) != len(queries)):
            raise RequestError(f"'{key}' must be a list of {len(queries)} (one per query) or absent")
    return queries


def parse_inputs(body: Any, max_rows: int) -> tuple[list[Any], list[Any]]:
    """(prompts, responses) of ``inputs``; a :class:`RequestError` naming the row and field."""
    prompts, responses = [], []
    for i, row in enumerate(_rows(body, "inputs", max_rows)):
        if not isinstance(row, dict):
            raise RequestError(f"inputs[{i}] must be an object with prompt/response or messages, "
                               f"got {type(row).__name__}")
        if "messages" in row:
            messages = row["messages"]
            if (not isinstance(messages, list) or len(messages) < 2 or not isinstance(messages[-1], dict)
                    or messages[-1].get("role") != "assistant"):
                raise RequestError(f"inputs[{i}].messages must be a list of {{role, content}} messages ending "
                                   "with the assistant's reply")
            prompts.append(messages[:-1])
            responses.append(messages[-1:])
        elif "response" in row:
            prompt = row.get("prompt", "")
            if isinstance(row["response"], list) and isinstance(prompt, str) and prompt:
                raise RequestError(f"inputs[{i}]: a response given as messages needs the prompt as messages too "
                                   "(or none), got a text prompt")
            prompts.append(prompt)
            responses.append(row["response"])
        else:
            raise RequestError(f"inputs[{i}] needs 'response' (and 'prompt') or 'messages', got {sorted(row)}")
    # the pyfunc's checks (core.preferences.text_problem), row by row: a DataFrame per request costs more than
    # scoring a small one
    for field, values in (("prompt", prompts), ("response", responses)):
        for i, v in enumerate(values):
            why = text_problem("" if v is None and field == "prompt" else v, field)
            if why:
                raise RequestError(f"inputs[{i}].{field} needs {'text' if field == 'prompt' else 'non-empty text'} "
                                   f"or a list of {{role, content}} messages: {why}")
    return prompts, responses
