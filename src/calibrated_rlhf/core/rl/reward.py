"""The reward TRL's RLOO and GRPO optimize: a callable over the library's one scoring path.

Handing TRL the reward model itself would make it score the raw ``logits[:, 0]`` of text it re-tokenizes,
bypassing the reward transform; this callable scores through :func:`calibrated_rlhf.core.scoring.rl_score_fn`
(the one PPO uses), rebuilding each response's text in the prompt's context from the sampled ids as PPO's
rollout does, and reports every reward (raw, calibrated, normalized, gold) through TRL's ``log_metric``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from calibrated_rlhf.core.policy import decode_in_context, decode_response
from calibrated_rlhf.core.preferences import is_conversational

# The name TRL logs the optimized reward under (``rewards/<name>/mean``).
SCORE_NAME = "score"


def reward_metric(name: str) -> str:
    """TRL's record key of one of the score function's rewards (``raw``, ``gold``, ...)."""
    return f"rewards/{name}"


class ScoreReward:
    """``reward(prompts, completions, completion_ids, **kw) -> list[float]``: the ``score`` entry of
    ``score_fn(prompts, responses)``, each response decoded from its ids after its prompt."""

    __name__ = SCORE_NAME

    def __init__(self, score_fn: Callable[[list, list], dict[str, torch.Tensor]], tokenizer: Any) -> None:
        self.score_fn = score_fn
        self.tokenizer = tokenizer
        self._prompt_ids: dict[str, list[int]] = {}

    def responses(self, prompts: list, completion_ids: list[list[int]]) -> list[str]:
        """Each completion's text as it continues its prompt (what the reward model and gold reward read); a
        conversational prompt's completion is the assistant turn, decoded on its own (``core.policy``)."""
        out = []
        for prompt, ids in zip(prompts, completion_ids):
            if is_conversational(prompt):
                out.append(decode_response(self.tokenizer, prompt, [], list(ids)))
                continue
            if prompt not in self._prompt_ids:
                self._prompt_ids[prompt] = self.tokenizer(prompt)["input_ids"]
            out.append(decode_in_context(self.tokenizer, self._prompt_ids[prompt], list(ids)))
        return out

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
                 log_metric: Callable[[str, float], None] | None = None, **_: Any) -> list[float]:
        if len(prompts) != len(completion_ids):
            raise ValueError(f"{len(prompts)} prompts for {len(completion_ids)} completions")
        scores = self.score_fn(list(prompts), self.responses(list(prompts), completion_ids))
        if log_metric is not None:
            for name, values in scores.items():
                if name != SCORE_NAME:
                    log_metric(reward_metric(name), float(values.float().mean()))
        return [float(v) for v in scores[SCORE_NAME]]

    def state_dict(self) -> dict[str, Any]:
        """The score function's state (``RLScoreFn``: running_zscore's moments); empty when it keeps none."""
        return self.score_fn.state_dict() if hasattr(self.score_fn, "state_dict") else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.score_fn, "load_state_dict"):
            self.score_fn.load_state_dict(state)
        elif state:
            raise ValueError(f"the score function keeps no state, but the checkpoint holds {sorted(state)}")
