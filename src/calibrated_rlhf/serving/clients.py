"""Clients of the reward server (``serving.server``), standard library only.

- :class:`RewardClient`: ``/score`` and ``/info`` over HTTP, requests split to the server's row cap, a busy
  server (503) retried after its ``Retry-After``;
- :class:`RemoteScorer`: the in-process ``RewardScorer``'s ``score`` and ``transform``, answered by a server, so
  the project's RL (``rl.reward_url``) optimizes the served reward through the same ``RLScoreFn``;
- :class:`TRLReward` / :class:`AsyncTRLReward`: a TRL ``reward_funcs`` entry (GRPO, RLOO), sync or async.

The token comes from the argument or ``CALIBRATED_RLHF_REWARD_TOKEN``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

import numpy as np

TOKEN_ENV = "CALIBRATED_RLHF_REWARD_TOKEN"


class RewardServerError(RuntimeError):
    """The server refused a request (the message is its own) or could not be reached."""


class RewardClient:
    """``url``: the server's root, e.g. ``http://127.0.0.1:5000``."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 120.0, rows_per_request: int = 256,
                 busy_retries: int = 30) -> None:
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.timeout_s, self.rows_per_request, self.busy_retries = timeout_s, rows_per_request, busy_retries

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in range(self.busy_retries + 1):
            request = urllib.request.Request(self.url + path, data=data, headers=headers,
                                             method="GET" if data is None else "POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                message = e.read().decode(errors="replace")
                if e.code == 503 and attempt < self.busy_retries:
                    time.sleep(float(e.headers.get("Retry-After", 1)))
                    continue
                try:
                    message = json.loads(message)["error"]
                except (ValueError, KeyError, TypeError):
                    pass
                raise RewardServerError(f"{self.url}{path} answered {e.code}: {message}") from None
            except (urllib.error.URLError, OSError) as e:
                raise RewardServerError(f"{self.url}{path} unreachable: {e}") from None
        raise AssertionError("unreachable")

    def info(self) -> dict[str, Any]:
        return self._call("/info")

    def score(self, prompts: Sequence[Any], responses: Sequence[Any]) -> dict[str, np.ndarray]:
        """``normalized``, ``calibrated``, ``raw`` (and ``ensemble_std``) of each (prompt, response), in order."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        parts: list[dict[str, list[float]]] = []
        for start in range(0, len(prompts), self.rows_per_request):
            rows = [{"prompt": p, "response": r} for p, r in
                    zip(prompts[start:start + self.rows_per_request], responses[start:start + self.rows_per_request])]
            parts.append(self._call("/score", {"inputs": rows}))
        keys = parts[0].keys() if parts else ("normalized", "calibrated", "raw")
        return {k: np.array([v for part in parts for v in part[k]], dtype=np.float64) for k in keys}


class RemoteScorer:
    """``score(prompts, responses) -> ScoredRewards`` and ``transform``, as ``core.scoring.RewardScorer``, from a
    server: ``core.scoring.rl_score_fn`` and ``gold_offset`` take it in place of the in-process scorer."""

    def __init__(self, client: RewardClient) -> None:
        from calibrated_rlhf.core.normalization import RewardTransform

        self.client = client
        self.info = client.info()
        self.transform = RewardTransform.from_dict(self.info["reward_transform"])

    def score(self, prompts: Sequence[Any], responses: Sequence[Any]) -> Any:
        from calibrated_rlhf.core.scoring import ScoredRewards

        out = self.client.score(list(prompts), list(responses))
        return ScoredRewards(raw=out["raw"], calibrated=out["calibrated"], normalized=out["normalized"],
                             ensemble_std=out.get("ensemble_std"))


def _completion_rows(prompts: list, completions: list) -> tuple[list, list]:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    return list(prompts), list(completions)


class TRLReward:
    """A TRL reward function: ``reward(prompts, completions, **kwargs) -> list[float]``, the served ``field``
    (``normalized`` by default: the frozen z-score, the units TRL's ``beta`` is then in). Completions are text
    or, for conversational datasets, the assistant's message list, as TRL passes them."""

    __name__ = "calibrated_reward"

    def __init__(self, url: str, token: str | None = None, field: str = "normalized", **client_kw: Any) -> None:
        self.client, self.field = RewardClient(url, token, **client_kw), field

    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        return [float(v) for v in self.client.score(*_completion_rows(prompts, completions))[self.field]]


class AsyncTRLReward(TRLReward):
    """:class:`TRLReward` as a coroutine function (TRL awaits async reward functions concurrently); the HTTP call
    runs on a worker thread."""

    async def __call__(self, prompts: list, completions: list, **kw: Any) -> list[float]:
        return await asyncio.to_thread(TRLReward.__call__, self, prompts, completions, **kw)
