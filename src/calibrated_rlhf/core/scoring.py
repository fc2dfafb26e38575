"""The one path from (prompt, response) to rewards: render -> length-sorted batches -> raw -> calibrated ->
normalized, plus an ensemble's disagreement.

Normalization's reference set, PPO's rollouts, the proxy-gold offset and the deployable MLflow model all
score through :class:`RewardScorer`, so the reward model sees exactly the ids it was trained on wherever
it is used: a text response is appended to a text prompt with EOS; a response to a conversational prompt
becomes an assistant message and goes through the tokenizer's chat template, as a pair's would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from calibrated_rlhf.core.early_warning import (REPEATED_WORDS, REPETITION_SURPRISAL, RepetitionProfile,
                                                repeated_words)
from calibrated_rlhf.core.ensemble import RewardEnsemble
from calibrated_rlhf.core.gold import Gold
from calibrated_rlhf.core.normalization import (OPTIMIZED, NormalizationMethod, RewardStats, RewardTransform,
                                                RunningNormalizer, minmax_batch, whiten_batch)
from calibrated_rlhf.core.preferences import is_conversational, render_many
from calibrated_rlhf.core.progress import Progress


def iter_rewards(
    reward_model: Any, sequences: list[list[int]], pad_token_id: int, batch_size: int = 64
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Yield (indices, reward, ensemble_std or None) batch by batch, for one model or an ensemble.

    For one model the reward is its raw output; for a :class:`RewardEnsemble` it is the aggregate of the
    members' calibrated rewards, which the ensemble's own temperature then calibrates.
    """
    from calibrated_rlhf.core.reward_model import iter_scores

    if not isinstance(reward_model, RewardEnsemble):
        for idx, raw in iter_scores(reward_model, sequences, pad_token_id, batch_size):
            yield idx, raw, None
        return
    # Members score the same length-sorted batches, so the batches line up row for row.
    streams = [iter_scores(m, sequences, pad_token_id, batch_size) for m in reward_model.members]
    for batches in zip(*streams):
        idx = batches[0][0]
        reward, ensemble_std = reward_model.spec.aggregate(np.stack([r for _, r in batches], axis=1))
        yield idx, reward, ensemble_std


def score_rewards(reward_model: Any, sequences: list[list[int]], pad_token_id: int,
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
    """(reward, ensemble_std or None) of each sequence, in input order; see :func:`iter_rewards`."""
    reward = np.empty(len(sequences))
    ensemble_std = np.empty(len(sequences)) if isinstance(reward_model, RewardEnsemble) else None
    for idx, r, s in iter_rewards(reward_model, sequences, pad_token_id, batch_size):
        reward[idx] = r
        if ensemble_std is not None:
            ensemble_std[idx] = s
    return reward, ensemble_std


def reward_fingerprint(reward_model: Any) -> str:
    """The weight fingerprint of one model, or the ensemble's fingerprint."""
    if isinstance(reward_model, RewardEnsemble):
        return reward_model.fingerprint()
    from calibrated_rlhf.core.reward_model import model_fingerprint

    return model_fingerprint(reward_model)


@dataclass(frozen=True)
class ScoredRewards:
    """Rewards of a batch of responses, in input order; ``calibrated``/``normalized`` need a transform."""

    raw: np.ndarray
    calibrated: np.ndarray | None = None
    normalized: np.ndarray | None = None
    ensemble_std: np.ndarray | None = None  # the members' disagreement, for a reward ensemble


def as_completion(prompt: Any, response: Any) -> Any:
    """The response as the reward model saw completions in training: an assistant message after a
    conversational prompt, the text itself after a text prompt."""
    if is_conversational(prompt) and isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    return response


@dataclass
class RewardScorer:
    """Scores responses with a reward model (or ensemble) and applies the frozen reward transform.

    ``raw_multiplier`` scales the raw output (the scale experiment). Lengths are the caller's: the served
    model checks them against the trained length (``serving.model.fit_lengths``) between :meth:`render` and
    :meth:`raw_of_ids`.
    """

    reward_model: Any
    tokenizer: Any
    transform: RewardTransform | None = None
    batch_size: int = 64
    raw_multiplier: float = 1.0

    def render(self, prompts: Sequence[Any], responses: Sequence[Any]) -> list[list[int]]:
        """Token ids of each (prompt, response), EOS or end-of-turn included."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        return render_many(self.tokenizer, prompts, [as_completion(p, r) for p, r in zip(prompts, responses)])

    def raw(self, prompts: Sequence[Any], responses: Sequence[Any]) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw rewards (times ``raw_multiplier``) and the ensemble's disagreement (None for one model)."""
        return self.raw_of_ids(self.render(prompts, responses))

    def iter_raw(self, prompts: Sequence[Any], responses: Sequence[Any]
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """(indices, raw, ensemble_std) batch by batch, in length-sorted order: for statistics that stream."""
        ids = self.render(prompts, responses)
        batches = iter_rewards(self.reward_model, ids, self.tokenizer.pad_token_id, self.batch_size)
        for idx, reward, ensemble_std in batches:
            yield idx, self.raw_multiplier * reward, ensemble_std

    def raw_of_ids(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`raw` of sequences already rendered (and length-checked) with :meth:`render`."""
        reward, ensemble_std = score_rewards(self.reward_model, ids, self.tokenizer.pad_token_id, self.batch_size)
        return self.raw_multiplier * reward, ensemble_std

    def score(self, prompts: Sequence[Any], responses: Sequence[Any]) -> ScoredRewards:
        """Raw, calibrated and normalized rewards (the last two when a transform is set)."""
        raw, ensemble_std = self.raw(prompts, responses)
        if self.transform is None:
            return ScoredRewards(raw=raw, ensemble_std=ensemble_std)
        t = self.transform
        return ScoredRewards(raw=raw, calibrated=t.calibrate(raw), normalized=t.normalize(raw),
                             ensemble_std=ensemble_std)


# ---- the reward an RL run optimizes -----------------------------------------------------------------

def gold_offset(scorer: RewardScorer, task: Gold, prompts: Sequence[Any],
                responses: Sequence[Any]) -> float | None:
    """Mean of ``calibrated - scale * gold`` over a reference set: where the proxy-gold gap counts from.

    A calibrated reward model estimates the true logit ``scale * gold`` up to a constant; this is that
    constant on the distribution RL starts from (None without a reference set).
    """
    if not len(responses):
        return None
    calibrated = scorer.score(prompts, responses).calibrated
    gold = task.gold_rewards(prompts, responses)
    return float(np.mean(calibrated - task.scale * gold))


class RLScoreFn:
    """``score_fn(prompts, responses)``: raw, calibrated and normalized rewards, the ``score`` RL optimizes
    under normalization ``method`` (also under its own name when computed from the batch), and, for an
    ensemble, ``ensemble_std``; each response's ``repeated_words`` and, given the reward model's training
    responses' ``profile``, its ``repetition_surprisal`` (``core.early_warning``): warning signs that need no
    gold. ``running_zscore`` keeps its running moments in ``normalizer``; they are the function's state
    (``state_dict`` / ``load_state_dict``), which every checkpoint carries, so a resumed run continues the same
    rewards.

    On the synthetic task it adds ``gold`` and, given ``offset`` (:func:`gold_offset`), ``gold_gap``:
    calibrated proxy minus the true logit ``scale * gold``, relative to the reference set, so it starts
    near 0 and grows when RL exploits the reward model's errors (calibrated-logit units).
    """

    def __init__(self, scorer: RewardScorer, method: NormalizationMethod, task: Gold | None = None,
                 offset: float | None = None, profile: RepetitionProfile | None = None) -> None:
        self.scorer, self.method, self.task, self.offset, self.profile = scorer, method, task, offset, profile
        self.clip = scorer.transform.clip if scorer.transform is not None else None
        self.normalizer = RunningNormalizer(self.clip) if method == "running_zscore" else None

    def _batch_form(self, scored: ScoredRewards) -> np.ndarray:
        """The methods computed from the batch (and, for running_zscore, the batches before it)."""
        if self.method == "minmax_batch":
            return minmax_batch(scored.raw)
        if self.method == "whiten_batch":
            return whiten_batch(scored.calibrated)
        if self.method == "running_zscore":
            return self.normalizer(scored.calibrated)
        return np.clip(scored.calibrated, -self.clip, self.clip) if self.clip is not None else scored.calibrated

    def __call__(self, prompts: list, responses: list) -> dict[str, torch.Tensor]:
        scored = self.scorer.score(prompts, responses)
        out = {"raw": scored.raw, "calibrated": scored.calibrated, "normalized": scored.normalized}
        if scored.ensemble_std is not None:
            out["ensemble_std"] = scored.ensemble_std
        out[REPEATED_WORDS] = repeated_words(responses)
        if self.profile is not None:
            out[REPETITION_SURPRISAL] = self.profile.surprisal(responses)
        if self.method in BATCH_FORMS:
            out[OPTIMIZED[self.method]] = self._batch_form(scored)
        out["score"] = out[OPTIMIZED[self.method]]
        if self.task is not None:
            out["gold"] = self.task.gold_rewards(prompts, responses)
            if self.offset is not None:
                out["gold_gap"] = out["calibrated"] - self.task.scale * out["gold"] - self.offset
        return {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in out.items()}

    def state_dict(self) -> dict[str, Any]:
        """What the rewards of later batches depend on: the running moments (empty for the other methods)."""
        return {"normalizer": self.normalizer.state_dict()} if self.normalizer is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (self.normalizer is not None) != ("normalizer" in state):
            raise ValueError(f"score function state {sorted(state)} does not fit normalization method {self.method!r}")
        if self.normalizer is not None:
            self.normalizer.load_state_dict(state["normalizer"])


# The methods whose score is computed from the batch rather than read off the scorer's output.
BATCH_FORMS = ("minmax_batch", "whiten_batch", "running_zscore", "calibrated_clip")


def rl_score_fn(scorer: RewardScorer, method: NormalizationMethod, task: Gold | None = None,
                offset: float | None = None, profile: RepetitionProfile | None = None) -> RLScoreFn:
    """The score function RL optimizes under ``method`` (:class:`RLScoreFn`)."""
    return RLScoreFn(scorer, method, task, offset, profile)


def reference_statistics(scorer: RewardScorer, prompts: Sequence[Any], responses: Sequence[Any],
                         temperature: float) -> tuple[RewardStats, np.ndarray, np.ndarray | None]:
    """Calibrated-reward statistics of a reference set, streamed batch by batch (mergeable, so a
    distributed or resumed computation gives the same transform); plus the raw rewards and the
    ensemble_std per response (None for one model)."""
    stats = RewardStats()
    raw = np.empty(len(responses))
    ensemble_std = None
    with Progress(len(responses), "reference rewards") as bar:
        for idx, rewards, batch_std in scorer.iter_raw(prompts, responses):
            stats.update(rewards / temperature)
            raw[idx] = rewards
            if batch_std is not None:
                ensemble_std = np.empty(len(responses)) if ensemble_std is None else ensemble_std
                ensemble_std[idx] = batch_std
            bar.update(len(idx))
    return stats, raw, ensemble_std
