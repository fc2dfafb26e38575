"""A synthetic preference task whose true preference probabilities are known.

Every word of a small vocabulary carries a hidden utility; a response's gold reward is the mean utility
of its words. With ``max_repeats`` set, a word's occurrences past that many in one response carry
``repeat_utility`` instead: a rater tires of the same word. The pairs' uniform draws rarely repeat a word that
often, so a reward model learns the penalty from a few pairs at most, and a policy that concentrates on its
best words meets it where the proxy does not: the over-optimization task (docs/overoptimization.md).

A pair's label is drawn with the true probability ``p = sigmoid(scale * (gold_a - gold_b))``, and ``p`` is kept
beside the pair, so every quality figure (accuracy, NLL, ECE, the recovered scale) can be read against its
optimum. The pairs come as text or, with ``format="conversational"``, as chat messages: the same draws, labels
and gold rewards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from calibrated_rlhf.core.chat import response_text

CITIES = (
    "Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Delhi", "Quito", "Rome", "Berlin", "Madrid",
    "Dublin", "Nairobi", "Seoul", "Hanoi", "Lisbon", "Vienna", "Prague", "Austin", "Denver", "Sydney",
)
TOPICS = (
    "weather", "food", "markets", "museums", "parks", "traffic", "music", "people", "history", "rivers",
    "bridges", "trains", "coffee", "gardens", "beaches", "streets", "festivals", "schools", "libraries", "hotels",
)
TEMPLATES = (
    "Describe the {topic} in {city}.",
    "Tell me about the {topic} in {city}.",
    "What is special about the {topic} in {city}?",
    "Write a short note on the {topic} of {city}.",
    "How would you rate the {topic} in {city}?",
    "Summarize the {topic} around {city}.",
    "Give me your view of the {topic} in {city}.",
    "Review the {topic} of {city} briefly.",
)
FORMATS = ("text", "conversational")
# Plain English words, so responses read as (odd) text and a BPE tokenizer keeps each one whole.
WORDS = (
    "bright", "calm", "busy", "quiet", "warm", "cold", "fresh", "stale", "clean", "dirty",
    "lively", "dull", "friendly", "rude", "cheap", "costly", "green", "grey", "open", "closed",
    "safe", "risky", "grand", "plain", "famous", "hidden", "sunny", "rainy", "tasty", "bland",
    "modern", "ancient", "crowded", "empty", "charming", "gloomy", "smooth", "rough", "rich", "poor",
    "gentle", "harsh", "vivid", "faded", "lovely", "awful", "pleasant", "noisy", "elegant", "shabby",
    "cozy", "bleak", "festive", "tired", "splendid", "messy", "neat", "wild", "tidy", "broken",
)


@dataclass(frozen=True)
class SyntheticTask:
    """The hidden ground truth of the synthetic task: word utilities and the true preference scale."""

    words: tuple[str, ...]
    utilities: tuple[float, ...]
    scale: float
    max_repeats: int = 0  # 0: every occurrence counts its word's utility
    repeat_utility: float = -1.0

    def gold_reward(self, response: str) -> float:
        """Mean utility of the task's words in ``response``; other tokens count as utility 0, and so does a
        response with no words at all. With ``max_repeats``, occurrences of a word past that many count
        ``repeat_utility``.

        Works on any text, so the gold reward of a policy's generated responses is defined too.
        """
        tokens = re.findall(r"[A-Za-z]+", response.lower())
        return float(np.mean(self.token_utilities(tokens))) if tokens else 0.0

    def token_utilities(self, tokens: Sequence[str]) -> list[float]:
        """Each token's utility in its response, repeats past ``max_repeats`` included."""
        table = dict(zip(self.words, self.utilities))
        if self.max_repeats <= 0:
            return [table.get(t, 0.0) for t in tokens]
        seen: dict[str, int] = {}
        out = []
        for t in tokens:
            seen[t] = seen.get(t, 0) + 1
            out.append(table.get(t, 0.0) if t not in table or seen[t] <= self.max_repeats else self.repeat_utility)
        return out

    def gold_rewards(self, prompts: Sequence[Any], responses: Sequence[Any]) -> np.ndarray:
        """:meth:`gold_reward` of each response (given as text or as messages); the prompts do not count."""
        return np.array([self.gold_reward(response_text(r)) for r in responses], dtype=np.float64)

    def with_scale(self, scale: float) -> SyntheticTask:
        return replace(self, scale=float(scale))

    def true_prob(self, gold_a: np.ndarray, gold_b: np.ndarray) -> np.ndarray:
        """P(a preferred over b) under the task's Bradley-Terry model."""
        return 1.0 / (1.0 + np.exp(-self.scale * (np.asarray(gold_a) - np.asarray(gold_b))))

    def to_dict(self) -> dict:
        d = {"words": list(self.words), "utilities": list(self.utilities), "scale": self.scale}
        # Written only when on, so a task without it keeps the file it always had.
        return {**d, "max_repeats": self.max_repeats, "repeat_utility": self.repeat_utility} if self.max_repeats else d

    @classmethod
    def from_dict(cls, d: dict) -> SyntheticTask:
        return cls(words=tuple(d["words"]), utilities=tuple(float(u) for u in d["utilities"]), scale=float(d["scale"]),
                   max_repeats=int(d.get("max_repeats", 0)), repeat_utility=float(d.get("repeat_utility", -1.0)))


@dataclass(frozen=True)
class SyntheticSpec:
    """How to draw the synthetic task and its preference pairs."""

    seed: int = 0
    n_pairs: int = 8000
    n_words: int = 40
    min_words: int = 3
    max_words: int = 8
    scale: float = 4.0
    pairs_per_prompt: int = 4
    n_rating_levels: int = 0  # > 0 adds chosen_rating / rejected_rating columns (graded preferences)
    format: str = "text"  # or "conversational": the same pairs as a user message and assistant replies
    max_repeats: int = 0  # > 0: a word's occurrences past this many in a response carry repeat_utility
    repeat_utility: float = -1.0

    def to_dict(self) -> dict:
        return asdict(self)


def make_task(spec: SyntheticSpec) -> SyntheticTask:
    """Draw word utilities from U[-1, 1] with the spec's seed."""
    if not 2 <= spec.n_words <= len(WORDS):
        raise ValueError(f"n_words must be in [2, {len(WORDS)}], got {spec.n_words}")
    rng = np.random.default_rng([spec.seed, 1])
    words = tuple(rng.permutation(WORDS)[: spec.n_words].tolist())
    utilities = tuple(float(u) for u in rng.uniform(-1.0, 1.0, size=spec.n_words))
    if spec.max_repeats < 0:
        raise ValueError(f"max_repeats must be >= 0 (0: off), got {spec.max_repeats}")
    return SyntheticTask(words=words, utilities=utilities, scale=float(spec.scale), max_repeats=spec.max_repeats,
                         repeat_utility=float(spec.repeat_utility))


def make_pairs(spec: SyntheticSpec, task: SyntheticTask) -> pd.DataFrame:
    """Draw preference pairs: prompt, chosen, rejected, gold rewards and the true P(chosen preferred).

    Labels are sampled, not thresholded: the chosen response is the worse one with probability
    1 - p, exactly as human label noise would have it, so no model can beat the Bayes accuracy.
    """
    if spec.format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {spec.format!r}")
    if spec.min_words < 1 or spec.max_words < spec.min_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {spec.min_words}, {spec.max_words}")
    rng = np.random.default_rng([spec.seed, 2])
    utility = np.asarray(task.utilities)
    prompts = [t.format(topic=topic, city=city) for t in TEMPLATES for topic in TOPICS for city in CITIES]
    n_prompts = math.ceil(spec.n_pairs / spec.pairs_per_prompt)
    if n_prompts > len(prompts):
        raise ValueError(
            f"n_pairs={spec.n_pairs} with pairs_per_prompt={spec.pairs_per_prompt} needs {n_prompts} prompts; "
            f"the task has {len(prompts)}: raise pairs_per_prompt"
        )
    prompt_idx = rng.permutation(len(prompts))[:n_prompts]

    def response() -> tuple[str, float]:
        n = int(rng.integers(spec.min_words, spec.max_words + 1))
        idx = rng.integers(len(utility), size=n)
        # A leading space: TRL joins prompt and completion as plain strings.
        text = " " + " ".join(task.words[i] for i in idx)
        return text, task.gold_reward(text) if task.max_repeats else float(utility[idx].mean())

    rows = []
    for k in range(spec.n_pairs):
        prompt = prompts[prompt_idx[k // spec.pairs_per_prompt]]
        (a, g_a), (b, g_b) = response(), response()
        while b == a:
            b, g_b = response()
        p_a = float(task.true_prob(g_a, g_b))
        a_wins = rng.random() < p_a
        chosen, rejected = (a, b) if a_wins else (b, a)
        g_c, g_r = (g_a, g_b) if a_wins else (g_b, g_a)
        rows.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "gold_chosen": g_c,
                "gold_rejected": g_r,
                "true_prob": p_a if a_wins else 1.0 - p_a,
            }
        )
    df = pd.DataFrame(rows)
    if spec.n_rating_levels > 0:
        # Ratings as a rater would give them: the gold reward binned onto a 1..L scale.
        edges = np.linspace(-1.0, 1.0, spec.n_rating_levels + 1)[1:-1]
        df["chosen_rating"] = np.digitize(df["gold_chosen"], edges) + 1
        df["rejected_rating"] = np.digitize(df["gold_rejected"], edges) + 1
    return as_conversational(df) if spec.format == "conversational" else df


def as_conversational(pairs: pd.DataFrame) -> pd.DataFrame:
    """The pairs in TRL's conversational form: the prompt as a user message, each response as an assistant
    reply (its text without the leading space a text pair needs). Labels, gold rewards and true
    probabilities are untouched, and :meth:`SyntheticTask.gold_reward` reads the reply's text alike."""
    out = pairs.copy()
    out["prompt"] = pd.Series([[{"role": "user", "content": p}] for p in pairs["prompt"]], index=out.index,
                              dtype=object)
    for col in ("chosen", "rejected"):
        out[col] = pd.Series([[{"role": "assistant", "content": r.strip()}] for r in pairs[col]], index=out.index,
                             dtype=object)
    return out


def bayes_accuracy(true_prob: np.ndarray) -> float:
    """Expected accuracy of the gold ordering against sampled labels: E[max(p, 1 - p)]."""
    p = np.asarray(true_prob, dtype=np.float64)
    return float(np.mean(np.maximum(p, 1.0 - p)))
