"""An over-optimization warning that needs no gold, and the gold-based judgement of any such warning.

A user running RL on a learned reward cannot see the gold reward; by the time a held-out human evaluation
shows the policy got worse, the damage is done. What a user can see at every update is the policy's KL to the
reference, its entropy, with a reward ensemble how much the members disagree on the policy's samples, and the
samples themselves. Disagreement is meant to measure what over-optimization is: the policy reaching responses the
reward models' training pairs did not pin down, where each member extrapolates its own way (Coste et al., ICLR
2024; Eisenstein et al., 2023). It does so only where the members err independently: on the over-optimization
task they share one blind spot, and their disagreement falls as the gold does (docs/overoptimization.md). KL and
entropy only say how far the policy has moved.

The blind spot is where the training pairs put little data, and that a user can measure without any reward
model: :class:`RepetitionProfile` scores each sample by how rarely the training responses repeat a word as often
(its surprisal under them). It is one feature; the principle, samples leaving the support of the reward model's
data, carries to whatever features a domain's known hacks move (length, format).

A rule here fires at the first update at which the series it is given crosses its threshold; relative rules
divide by the series' value at an early update, whose samples are (nearly) the reference policy's. The report
gives it trailing means of the logged per-update figures. The online stop rules (PPO's ``kl_stop_multiple``,
``ensemble_std_stop`` and ``repetition_surprisal_stop``; RLOO's and GRPO's ``StopOnWarning``) test each raw batch
value against a threshold set from the reference set, so a threshold chosen here carries over to them
approximately, not exactly.

The judgement needs the gold (the synthetic task's): a run *over-optimizes* when its gold, smoothed over a
few updates, ends ``min_drop`` or more below its peak. A warning *catches* it when it fires no later than the
peak plus ``late_fraction`` of the run; on a run that does not over-optimize, any firing is a *false alarm*. A
drawdown rule on the gold itself is no warning but a yardstick for the rest: a turn that is still inside a batch's
noise at the deadline cannot be seen then even in the gold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibrated_rlhf.core.chat import response_text
from calibrated_rlhf.core.signals import REPEATED_WORDS, REPETITION_SURPRISAL



def word_counts(response: Any) -> list[int]:
    """How often each distinct word of a response occurs in it (whitespace-separated, case-folded)."""
    return sorted(Counter(response_text(response).lower().split()).values())


def repeated_words(responses: Sequence[Any]) -> np.ndarray:
    """Each response's share of words that repeat an earlier word of the same response (0 for an empty one).

    Degenerate repetition is the oldest reward hack of text generation, and one a reward model cannot flag when
    its training pairs hardly show it: every member then extrapolates the same way (the blind spot above). But a
    policy that says its best word twice is not yet exploiting anything: this share rises in runs that only
    improve, so it is a diagnostic here, and :class:`RepetitionProfile` the warning.
    """
    out = np.zeros(len(responses))
    for i, response in enumerate(responses):
        counts = word_counts(response)
        if counts:
            out[i] = 1.0 - len(counts) / sum(counts)
    return out


@dataclass(frozen=True)
class RepetitionProfile:
    """How often the reward model's training responses repeat their most frequent word, to score how far outside
    that support a response lies: the surprisal ``-log P(c)`` of its own most frequent word's count ``c``.

    A reward model is only trustworthy where its training pairs put data; over-optimization is the policy moving to
    where they put little. A count most training responses show (a word said twice) costs under a nat; one they
    almost never show costs several, whatever the reward model makes of it. Add-one smoothing over the counts seen
    plus one bin for any larger count keeps every surprisal finite, so an unseen count costs about ``log N``
    nats for ``N`` training responses. Needs no gold and no second model: only the pairs the reward model was
    trained on.
    """

    probabilities: tuple[float, ...]  # P(c) for c = 0 (an empty response) .. the largest seen, then any larger

    @classmethod
    def of(cls, responses: Sequence[Any]) -> RepetitionProfile:
        top = np.array([max(word_counts(r), default=0) for r in responses], dtype=int)
        if not len(top):
            raise ValueError("a repetition profile needs at least one training response")
        counts = np.bincount(top, minlength=top.max() + 2).astype(np.float64) + 1.0  # + 1: add-one smoothing
        return cls(tuple(float(p) for p in counts / counts.sum()))

    def surprisal(self, responses: Sequence[Any]) -> np.ndarray:
        """``-log P(c)`` of each response's most frequent word's count, nats."""
        last = len(self.probabilities) - 1
        top = [min(max(word_counts(r), default=0), last) for r in responses]
        return -np.log(np.asarray(self.probabilities)[top]) if top else np.zeros(0)


def warning_reason(name: str, value: float, threshold: float) -> str:
    """Why a stop rule fired, in the words every trainer logs and a run's summary keeps."""
    what = {"ensemble_std": "reward ensemble std", REPETITION_SURPRISAL: "repetition surprisal"}.get(name, name)
    return f"{what} {value:.3f} exceeds {name}_stop = {threshold:.3f}"


@dataclass(frozen=True)
class Rule:
    """Fire when ``signal`` (relative to its value at update ``base`` if ``relative``) goes above ``threshold``, or
    below it when ``below``. A relative rule cannot fire before its base: a trailing mean's value at update ``base``
    averages the first ``base + 1`` batches, a steadier yardstick than the first batch alone.

    A ``drawdown`` rule fires when the signal falls more than ``threshold`` below its highest value since update
    ``base`` (updates before it are not read): a fall, not a level, is what a gain that has turned shows, whatever
    level it turned at."""

    signal: str
    threshold: float
    relative: bool = False
    below: bool = False
    base: int = 0
    drawdown: bool = False

    def __post_init__(self) -> None:
        if self.drawdown and (self.relative or self.below):
            raise ValueError(f"rule on {self.signal}: a drawdown is measured in the signal's own units from its "
                             "maximum, so it is neither relative nor below")

    def describe(self) -> str:
        if self.drawdown:
            since = "so far" if self.base == 0 else f"since update {self.base + 1}"
            return f"{self.signal} more than {self.threshold:g} below its maximum {since}"
        where = "its first value" if self.base == 0 else f"its value at update {self.base + 1}"
        value = f"{self.signal} / {where}" if self.relative else self.signal
        return f"{value} {'<' if self.below else '>'} {self.threshold:g}"

    def fires_at(self, values: Sequence[float]) -> int | None:
        """Index of the first update at which the rule fires, or None. Non-finite values never fire: a missing
        measurement is not evidence (nor is it a maximum)."""
        x = np.asarray(values, dtype=np.float64)
        if self.drawdown:
            # the first updates' trailing means average fewer batches: as a maximum they would be noise to fall from
            x = x[self.base:]
            finite = np.isfinite(x)
            peak = np.maximum.accumulate(np.where(finite, x, -np.inf))
            hits = np.flatnonzero(finite & (x < peak - self.threshold))
            return int(hits[0]) + self.base if len(hits) else None
        start = 0
        if self.relative:
            if len(x) <= self.base or not np.isfinite(x[self.base]) or x[self.base] <= 0:
                return None
            x, start = x[self.base:] / x[self.base], self.base
        with np.errstate(invalid="ignore"):
            hits = np.flatnonzero(x < self.threshold if self.below else x > self.threshold)
        return int(hits[0]) + start if len(hits) else None


@dataclass(frozen=True)
class GoldPath:
    """A run's gold along its updates, as the judgement reads it."""

    peak: int  # update of the smoothed gold's maximum
    drop: float  # smoothed gold at the peak minus at the end (>= 0)
    over_optimized: bool
    n_updates: int


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Centred moving mean, shrinking at the ends so every update keeps a value: the judgement looks at a finished
    run, so it may use the updates after each one."""
    x = np.asarray(values, dtype=np.float64)
    half = window // 2
    return np.array([x[max(0, i - half):i + half + 1].mean() for i in range(len(x))])


def gold_path(gold: Sequence[float], window: int = 5, min_drop: float = 0.1) -> GoldPath:
    """Where a run's gold peaked and whether it then fell by ``min_drop`` (gold units). The smoothing keeps one
    noisy batch from making a peak; ``min_drop`` should sit above the smoothed curve's noise (a batch mean of 32
    responses varies by about 0.05 on the synthetic task, a 5-update mean by about 0.02)."""
    g = smooth(gold, window)
    if not len(g):
        raise ValueError("a gold path needs at least one update")
    peak = int(np.argmax(g))
    drop = float(g[peak] - g[-1])
    return GoldPath(peak=peak, drop=drop, over_optimized=drop >= min_drop, n_updates=len(g))


@dataclass(frozen=True)
class Verdict:
    """One rule on one run: where it fired and how the gold judges that."""

    fired: int | None
    over_optimized: bool
    caught: bool  # over-optimized and fired by the peak plus late_fraction of the run
    false_alarm: bool  # not over-optimized, yet fired


def judge(rule: Rule, signal: Sequence[float], path: GoldPath, late_fraction: float = 0.1) -> Verdict:
    """The rule on one run's ``signal``, judged by its gold ``path``."""
    fired = rule.fires_at(signal)
    deadline = path.peak + late_fraction * path.n_updates
    caught = path.over_optimized and fired is not None and fired <= deadline
    return Verdict(fired=fired, over_optimized=path.over_optimized, caught=caught,
                   false_alarm=not path.over_optimized and fired is not None)


@dataclass(frozen=True)
class Score:
    """A rule over many runs: the share of over-optimizing runs caught and of safe runs falsely alarmed."""

    rule: Rule
    n_over: int
    n_safe: int
    caught: float  # NaN without over-optimizing runs
    false_alarms: float  # NaN without safe runs


def score(rule: Rule, verdicts: Sequence[Verdict]) -> Score:
    over = [v for v in verdicts if v.over_optimized]
    safe = [v for v in verdicts if not v.over_optimized]
    return Score(rule=rule, n_over=len(over), n_safe=len(safe),
                 caught=float(np.mean([v.caught for v in over])) if over else float("nan"),
                 false_alarms=float(np.mean([v.false_alarm for v in safe])) if safe else float("nan"))


def best_threshold(scores: Sequence[Score], max_false_alarms: float) -> Score | None:
    """Among one signal's thresholds, the one that catches most runs with at most ``max_false_alarms`` (ties: the
    fewer false alarms, then the earlier in ``scores``); None if no threshold stays that quiet."""
    allowed = [s for s in scores if not s.false_alarms > max_false_alarms]
    if not allowed:
        return None
    return max(allowed, key=lambda s: (np.nan_to_num(s.caught, nan=-1.0), -np.nan_to_num(s.false_alarms)))
