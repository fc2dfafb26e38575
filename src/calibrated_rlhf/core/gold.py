"""The hidden gold reward a task's labels were drawn from, read by every stage that reports a gold figure.

Two kinds, one interface (:class:`Gold`: ``scale``, ``gold_rewards(prompts, responses)``, ``to_dict``):

* :class:`~calibrated_rlhf.core.synthetic.SyntheticTask` (``kind: words``): the mean hidden utility of a
  response's words. It needs no model, but on a pretrained model's text a reward model learns a gold spread
  over many words slowly: on SmolLM2-135M's own samples, 1,440 pairs over 10 hidden words left a LoRA reward
  model 0.07 below Bayes (docs/real_model.md).
* :class:`HiddenStateGold` (``kind: hidden_state``): a hidden direction in a frozen reference model's last
  hidden state at the conversation's last token, where a sequence-classification head reads. This is Gao et
  al.'s (2022) gold reward model in miniature: a fixed network the proxy never sees, with labels drawn from it.
  The direction is a random combination of the top principal components of that state over the task's own
  samples (:func:`direction_in_top_components`), because a reward model learns the directions its samples
  vary along from a few hundred pairs, and a random direction among all 576 from thousands.

:func:`load_gold` reads either from its dict (a ``gold_task.json``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch

from calibrated_rlhf.core.chat import response_text
from calibrated_rlhf.core.preferences import is_conversational, render_many


class Gold(Protocol):
    """What the stages read of a gold: the true Bradley-Terry ``scale`` and the gold of (prompt, response);
    the generator sets the scale (``with_scale``) that gives the pairs their Bayes accuracy."""

    scale: float

    def gold_rewards(self, prompts: Sequence[Any], responses: Sequence[Any]) -> np.ndarray: ...

    def with_scale(self, scale: float) -> Gold: ...

    def to_dict(self) -> dict: ...


def last_token_states(model: Any, tokenizer: Any, prompts: Sequence[Any], responses: Sequence[Any],
                      batch_size: int = 16) -> np.ndarray:
    """The model's last hidden state (after its final norm) at the last token of each rendered (prompt,
    response), rendered as the reward model sees a pair's side (:func:`~calibrated_rlhf.core.preferences.
    render_many`). Right padding under causal attention leaves each row's states its own."""
    completions = [[{"role": "assistant", "content": response_text(r)}] if is_conversational(p) else response_text(r)
                   for p, r in zip(prompts, responses, strict=True)]
    ids = render_many(tokenizer, prompts, completions)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            lengths = torch.tensor([len(s) for s in chunk])
            x = torch.full((len(chunk), int(lengths.max())), pad)
            for i, seq in enumerate(chunk):
                x[i, :len(seq)] = torch.tensor(seq)
            mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
            hidden = model.base_model(input_ids=x, attention_mask=mask).last_hidden_state
            out.append(hidden[torch.arange(len(chunk)), lengths - 1].double().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size))


def direction_in_top_components(states: np.ndarray, n_components: int, seed: int) -> tuple[np.ndarray, float]:
    """A hidden direction ``d`` and offset ``b`` such that ``states @ d - b`` has mean 0 and standard deviation 1
    over ``states``: a standard-normal combination of their top ``n_components`` principal components (fewer
    where the states span fewer directions). Fewer than two states, or states all alike, have no such direction:
    a ValueError says which."""
    if len(states) < 2:
        raise ValueError(f"{len(states)} states; a direction needs at least 2")
    mean = states.mean(axis=0)
    _, singular, components = np.linalg.svd(states - mean, full_matrices=False)
    if singular[0] <= 1e-12 * max(1.0, float(np.abs(mean).max())):
        raise ValueError(f"the {len(states)} states are all the same; no direction separates any two responses")
    k = min(n_components, int(np.sum(singular > 1e-9 * singular[0])))
    direction = components[:k].T @ np.random.default_rng([seed, 6]).standard_normal(k)
    direction /= np.std((states - mean) @ direction)
    return direction, float(mean @ direction)


@functools.lru_cache(maxsize=1)
def reference(folder: str) -> tuple[Any, Any]:
    """The gold's frozen model and tokenizer, loaded once per process (each RL batch asks for the gold)."""
    from calibrated_rlhf.core.backbone import BackboneParams, build_causal_backbone, load_tokenizer

    tokenizer = load_tokenizer(folder)
    return build_causal_backbone(BackboneParams(name_or_path=folder), tokenizer).eval(), tokenizer


@dataclass(frozen=True)
class HiddenStateGold:
    """Gold = ``last_token_states(model) @ direction - offset``; ``model`` a causal-LM folder the run can read."""

    model: str
    direction: tuple[float, ...]
    offset: float
    scale: float

    kind = "hidden_state"

    def gold_rewards(self, prompts: Sequence[Any], responses: Sequence[Any]) -> np.ndarray:
        model, tokenizer = reference(self.model)
        if model.config.hidden_size != len(self.direction):
            raise ValueError(f"the gold's direction has {len(self.direction)} entries but the model "
                             f"'{self.model}' has hidden size {model.config.hidden_size}")
        return last_token_states(model, tokenizer, prompts, responses) @ np.asarray(self.direction) - self.offset

    def with_scale(self, scale: float) -> HiddenStateGold:
        return replace(self, scale=float(scale))

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> HiddenStateGold:
        return cls(model=str(d["model"]), direction=tuple(float(x) for x in d["direction"]),
                   offset=float(d["offset"]), scale=float(d["scale"]))


def load_gold(d: dict) -> Gold:
    """The gold a ``gold_task.json`` (or a run's ``synthetic_task``) holds: ``kind`` ``hidden_state``, else words."""
    from calibrated_rlhf.core.synthetic import SyntheticTask

    return HiddenStateGold.from_dict(d) if d.get("kind") == HiddenStateGold.kind else SyntheticTask.from_dict(d)
