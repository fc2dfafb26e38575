"""A preference task with a known gold over a real model's own text.

The synthetic task's gold lives in words its random policy invents; a pretrained model never writes
them. Here the responses are the model's own samples and the gold is a hidden function of them, so every
stage's gold figure (PPO's and RLOO's gold gain, the calibration's oracle) reads on real text as it does on
the synthetic task:

* prompts: instruction templates over several topics (:func:`make_prompts`);
* responses: ``samples_per_prompt`` samples per prompt through the chat template (the caller generates);
* gold: a hidden direction in the model's own last hidden state (:class:`~calibrated_rlhf.core.gold.
  HiddenStateGold`, drawn by the caller from the samples' states), or the synthetic task's kind
  (:class:`~calibrated_rlhf.core.synthetic.SyntheticTask`): utilities from U[-1, 1] for the ``n_words`` most
  frequent words of at least ``min_word_length`` letters in the samples (:func:`make_gold`), other words 0;
* scale: chosen so the pairs' Bayes accuracy is ``bayes_accuracy`` (:func:`scale_for_bayes_accuracy`);
* pairs: every two distinct samples of a prompt, the label drawn from
  ``sigmoid(scale * (gold_a - gold_b))`` and that probability kept (:func:`make_real_pairs`).
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from calibrated_rlhf.core.gold import Gold
from calibrated_rlhf.core.synthetic import SyntheticTask, bayes_accuracy

SUBJECTS = (
    "cooking pasta", "growing tomatoes", "learning to swim", "saving money", "training a puppy",
    "writing a resume", "planning a trip", "staying healthy", "reading more books", "learning a language",
    "running a marathon", "baking bread", "fixing a bike", "sleeping better", "making friends",
    "studying for exams", "drinking more water", "keeping a journal", "cleaning the kitchen", "starting a garden",
    "taking photos", "playing chess", "managing stress", "riding a bus", "painting a room",
    "reducing waste", "walking in the park", "learning to code", "cooking rice", "visiting a museum",
    "buying a laptop", "caring for a cat", "hiking safely", "making tea", "waking up early",
    "writing a poem", "choosing a book", "organizing a desk", "eating breakfast", "learning guitar",
)
TEMPLATES = (
    "Give me one tip for {s}.",
    "Explain in two sentences how to get started with {s}.",
    "What is the most common mistake people make when {s}?",
    "Describe why {s} is worth doing.",
    "Write a short motivating message about {s}.",
    "List two things I need for {s}.",
    "How long does it take to get good at {s}?",
    "What should a beginner know about {s}?",
)


def make_prompts(n_prompts: int, seed: int = 0) -> list[str]:
    """``n_prompts`` distinct instructions (templates x subjects), in a seeded order."""
    prompts = [t.format(s=s) for t in TEMPLATES for s in SUBJECTS]
    if not 1 <= n_prompts <= len(prompts):
        raise ValueError(f"n_prompts must be in [1, {len(prompts)}], got {n_prompts}")
    order = np.random.default_rng([seed, 3]).permutation(len(prompts))
    return [prompts[i] for i in order[:n_prompts]]


def words_of(text: str) -> list[str]:
    """The words :meth:`SyntheticTask.gold_reward` reads: lower-case runs of letters."""
    return re.findall(r"[A-Za-z]+", text.lower())


@dataclass(frozen=True)
class RealTaskSpec:
    """How the gold and the pairs are drawn from the model's samples."""

    n_words: int = 150
    min_word_length: int = 4
    bayes_accuracy: float = 0.75
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def make_gold(responses: list[str], spec: RealTaskSpec) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The ``n_words`` most frequent words (of ``min_word_length`` letters or more) of ``responses`` and a
    hidden utility for each from U[-1, 1]; ties in frequency are broken alphabetically, so the draw is a
    function of the texts and the seed alone."""
    counts = Counter(w for r in responses for w in words_of(r) if len(w) >= spec.min_word_length)
    if len(counts) < 2:
        raise ValueError(f"the responses hold {len(counts)} distinct words of >= {spec.min_word_length} letters; "
                         "the gold needs at least 2")
    words = tuple(w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: spec.n_words])
    utilities = np.random.default_rng([spec.seed, 4]).uniform(-1.0, 1.0, len(words))
    return words, tuple(float(u) for u in utilities)


def scale_for_bayes_accuracy(gold_diff: np.ndarray, target: float) -> float:
    """The Bradley-Terry scale at which pairs with these gold differences have Bayes accuracy ``target``.

    Bayes accuracy ``mean(sigmoid(scale |diff|))`` rises from 1/2 with the scale, so bisection on a log
    scale finds it; an error when even a huge scale cannot reach it (too many pairs of equal gold).
    """
    diff = np.abs(np.asarray(gold_diff, dtype=np.float64))
    if not 0.5 < target < 1.0:
        raise ValueError(f"target Bayes accuracy must be in (0.5, 1), got {target}")

    def accuracy(scale: float) -> float:
        return float(np.mean(1.0 / (1.0 + np.exp(-scale * diff))))

    lo, hi = 1e-3, 1e4
    if accuracy(hi) < target:
        raise ValueError(f"Bayes accuracy {target} is out of reach: {np.mean(diff == 0):.0%} of the pairs have equal "
                         f"gold; use more words or longer responses")
    for _ in range(100):
        mid = float(np.sqrt(lo * hi))
        lo, hi = (mid, hi) if accuracy(mid) < target else (lo, mid)
    return float(np.sqrt(lo * hi))


def make_real_pairs(prompts: list[str], samples: list[list[str]], spec: RealTaskSpec, gold: Gold | None = None,
                    ) -> tuple[pd.DataFrame, Gold]:
    """Pairs of every two distinct samples of each prompt, in TRL's conversational form, with sampled labels.

    ``gold`` is the hidden gold at scale 1 (a :class:`~calibrated_rlhf.core.gold.HiddenStateGold` over the
    model's states); None draws the words gold of :func:`make_gold`. Returns the pairs (``prompt``, ``chosen``,
    ``rejected`` as messages; ``gold_chosen``, ``gold_rejected``, ``true_prob`` = P(chosen preferred)) and the
    gold at the scale that gives ``spec.bayes_accuracy``.
    """
    if len(prompts) != len(samples):
        raise ValueError(f"{len(prompts)} prompts but {len(samples)} lists of samples")
    if gold is None:
        words, utilities = make_gold([r for rs in samples for r in rs], spec)
        gold = SyntheticTask(words=words, utilities=utilities, scale=1.0)
    responses = [(prompt, r) for prompt, rs in zip(prompts, samples) for r in dict.fromkeys(x.strip() for x in rs)
                 if r]
    values = gold.gold_rewards([[{"role": "user", "content": p}] for p, _ in responses], [r for _, r in responses])
    value = dict(zip(responses, values.tolist()))
    candidates = [(prompt, a, b) for prompt, rs in zip(prompts, samples)
                  for a, b in itertools.combinations([r for p, r in responses if p == prompt], 2)]
    if not candidates:
        raise ValueError("no prompt has two distinct non-empty samples")
    diff = np.array([value[(p, a)] - value[(p, b)] for p, a, b in candidates])
    gold = gold.with_scale(scale_for_bayes_accuracy(diff, spec.bayes_accuracy))
    p_a = 1.0 / (1.0 + np.exp(-gold.scale * diff))
    a_wins = np.random.default_rng([spec.seed, 5]).random(len(candidates)) < p_a
    rows = []
    for (prompt, a, b), p, win in zip(candidates, p_a, a_wins):
        chosen, rejected = (a, b) if win else (b, a)
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}],
                     "gold_chosen": value[(prompt, chosen)], "gold_rejected": value[(prompt, rejected)],
                     "true_prob": float(p if win else 1.0 - p)})
    pairs = pd.DataFrame(rows)
    assert abs(bayes_accuracy(pairs["true_prob"].to_numpy()) - spec.bayes_accuracy) < 1e-6
    return pairs, gold
