"""Reward statistics that merge across shards, and the frozen reward transform used during RL.

The pipeline (1) fits a temperature on held-out pairs, (2) streams *calibrated* rewards
``raw / temperature`` of a reference set (responses sampled from the reference policy, or the
dataset's responses) through :class:`RewardStats`, possibly in shards that are merged afterwards,
and (3) freezes everything in a :class:`RewardTransform` stored next to the reward model:

    normalized = clip((raw / temperature - mean) / std, -clip, clip)

Only an affine map is used: no min-max scaling, whose range depends on the most extreme samples seen.
If the raw rewards change by ``a * r + b`` (``a > 0``), refitting gives ``a * temperature`` and
statistics shifted by ``b / (a * temperature)``, so calibrated probabilities and normalized rewards
are unchanged: the transform removes the reward model's arbitrary offset and scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from calibrated_rlhf.core.ensemble import EnsembleSpec
from calibrated_rlhf.core.metrics import sigmoid

DEFAULT_QUANTILE_LEVELS: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def _finite_values(values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise ValueError(f"rewards contain {idx.size} non-finite values (first indices: {idx[:10].tolist()})")
    return arr


def _require(mapping: Mapping[str, Any], key: str, owner: str) -> Any:
    if key not in mapping:
        raise ValueError(f"{owner} dict is missing field {key!r}")
    return mapping[key]


def _number(value: Any, name: str) -> float:
    # bool is an int subclass, but True is never a meaningful statistic.
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _count(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------------
# Moments


@dataclass
class RunningMoments:
    """Count, mean and sum of squared deviations (``m2``) of a stream, mergeable across shards.

    ``update`` folds a batch in place with the pairwise formula of Chan et al. (each batch is
    summarized exactly with a two-pass mean/variance first, then combined), which is the Welford
    update generalized to batches. ``merge`` combines two accumulators into a new one; merging
    shard statistics equals one pass over all data up to float rounding.
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: Any) -> RunningMoments:
        """Add a batch of values (any shape; flattened). Returns ``self``."""
        x = _finite_values(values)
        if x.size:
            batch_mean = float(np.mean(x))
            batch_m2 = float(np.sum((x - batch_mean) ** 2))
            merged = self.merge(RunningMoments(int(x.size), batch_mean, batch_m2))
            self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2
        return self

    def merge(self, other: RunningMoments) -> RunningMoments:
        """A new accumulator equal to one that saw both streams; neither input changes."""
        if other.count == 0:
            return RunningMoments(self.count, self.mean, self.m2)
        if self.count == 0:
            return RunningMoments(other.count, other.mean, other.m2)
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        return RunningMoments(n, mean, m2)

    @property
    def variance(self) -> float:
        """Population variance ``m2 / count`` (divides by n, not n - 1); NaN when empty."""
        return self.m2 / self.count if self.count else math.nan

    @property
    def std(self) -> float:
        """Population standard deviation ``sqrt(m2 / count)``; NaN when empty."""
        return math.sqrt(self.variance)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunningMoments:
        owner = "RunningMoments"
        count = _count(_require(data, "count", owner), f"{owner}.count")
        mean = _number(_require(data, "mean", owner), f"{owner}.mean")
        m2 = _number(_require(data, "m2", owner), f"{owner}.m2")
        if not math.isfinite(mean):
            raise ValueError(f"{owner}.mean must be finite, got {mean}")
        if not (math.isfinite(m2) and m2 >= 0.0):
            raise ValueError(f"{owner}.m2 must be finite and >= 0, got {m2}")
        return cls(count, mean, m2)


# --------------------------------------------------------------------------------------------------
# Quantiles


def _merge_buckets(
    keys_a: np.ndarray, counts_a: np.ndarray, keys_b: np.ndarray, counts_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    keys, inverse = np.unique(np.concatenate([keys_a, keys_b]), return_inverse=True)
    counts = np.zeros(keys.size, dtype=np.int64)
    np.add.at(counts, inverse, np.concatenate([counts_a, counts_b]))
    return keys, counts


@dataclass(eq=False)  # array fields: compare via to_dict()
class QuantileSketch:
    """One-pass, mergeable quantile summary with a relative-error guarantee (log-bucket histogram).

    A value ``v`` with ``|v| > zero_threshold`` is counted in bucket ``i = ceil(log_g |v|)`` of its
    sign, with ``g = (1 + a) / (1 - a)`` and ``a = relative_accuracy``; smaller values are counted
    as zero. Bucket ``i`` covers ``(g^(i-1), g^i]`` and is represented by ``2 g^i / (g + 1)``, which
    is within ``a`` (relative) of every value in it. Counts per bucket tell exactly which bucket
    holds the k-th smallest value, so

        |quantile(q) - x_(k)| <= max(a * |x_(k)|, zero_threshold),   k = floor(q * (n - 1)),

    where ``x_(k)`` is the k-th smallest value (``numpy.quantile(..., method="lower")``). The min
    and max are tracked exactly: estimates are clamped to them, and ``q = 0`` and ``q = 1`` are
    exact. Merging adds bucket counts, so it is exact and order-independent. Memory grows with the
    dynamic range, not with the stream: at most ``log(max|v| / min|v|) / log(g) + 1`` buckets per
    sign (about 2,800 for ``a = 0.005`` and values in ``[1e-6, 1e6]``).
    """

    relative_accuracy: float = 0.005
    zero_threshold: float = 1e-9
    count: int = 0
    zero_count: int = 0
    min: float = math.inf
    max: float = -math.inf
    positive_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    positive_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    negative_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    negative_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        if not (0.0 < self.relative_accuracy < 1.0):
            raise ValueError(f"QuantileSketch.relative_accuracy must be in (0, 1), got {self.relative_accuracy}")
        if not (self.zero_threshold > 0.0 and math.isfinite(self.zero_threshold)):
            raise ValueError(f"QuantileSketch.zero_threshold must be finite and > 0, got {self.zero_threshold}")

    @property
    def _log_gamma(self) -> float:
        a = self.relative_accuracy
        return math.log1p(2.0 * a / (1.0 - a))  # log((1 + a) / (1 - a))

    def _bucket_keys(self, magnitudes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = np.ceil(np.log(magnitudes) / self._log_gamma).astype(np.int64)
        return np.unique(keys, return_counts=True)

    def update(self, values: Any) -> QuantileSketch:
        """Add a batch of values (any shape; flattened). Returns ``self``."""
        x = _finite_values(values)
        if not x.size:
            return self
        self.count += int(x.size)
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        pos = x[x > self.zero_threshold]
        neg = -x[x < -self.zero_threshold]
        self.zero_count += int(x.size - pos.size - neg.size)
        if pos.size:
            self.positive_keys, self.positive_counts = _merge_buckets(
                self.positive_keys, self.positive_counts, *self._bucket_keys(pos)
            )
        if neg.size:
            self.negative_keys, self.negative_counts = _merge_buckets(
                self.negative_keys, self.negative_counts, *self._bucket_keys(neg)
            )
        return self

    def merge(self, other: QuantileSketch) -> QuantileSketch:
        """A new sketch of both streams; both must share ``relative_accuracy`` and ``zero_threshold``."""
        if (self.relative_accuracy, self.zero_threshold) != (other.relative_accuracy, other.zero_threshold):
            raise ValueError(
                "cannot merge QuantileSketch with different settings: "
                f"relative_accuracy {self.relative_accuracy} vs {other.relative_accuracy}, "
                f"zero_threshold {self.zero_threshold} vs {other.zero_threshold}"
            )
        pos = _merge_buckets(self.positive_keys, self.positive_counts, other.positive_keys, other.positive_counts)
        neg = _merge_buckets(self.negative_keys, self.negative_counts, other.negative_keys, other.negative_counts)
        return QuantileSketch(
            self.relative_accuracy,
            self.zero_threshold,
            self.count + other.count,
            self.zero_count + other.zero_count,
            min(self.min, other.min),
            max(self.max, other.max),
            *pos,
            *neg,
        )

    def quantiles(self, qs: Iterable[float]) -> np.ndarray:
        """Estimates of the ``q``-quantiles (lower order statistic; see the class docstring)."""
        levels = np.asarray(list(qs), dtype=np.float64)
        if not np.all((levels >= 0.0) & (levels <= 1.0)):
            raise ValueError(f"quantile levels must be in [0, 1], got {levels.tolist()}")
        if self.count == 0:
            raise ValueError("cannot take quantiles of an empty QuantileSketch")
        gamma = math.exp(self._log_gamma)
        # Buckets in increasing order of value: negatives from the largest magnitude down, zero, positives.
        neg_values = -2.0 * np.exp(self.negative_keys[::-1] * self._log_gamma) / (gamma + 1.0)
        pos_values = 2.0 * np.exp(self.positive_keys * self._log_gamma) / (gamma + 1.0)
        values = np.concatenate([neg_values, [0.0], pos_values])
        counts = np.concatenate([self.negative_counts[::-1], [self.zero_count], self.positive_counts])
        ranks = np.floor(levels * (self.count - 1)).astype(np.int64)
        bucket = np.searchsorted(np.cumsum(counts), ranks, side="right")
        estimates = np.clip(values[bucket], self.min, self.max)
        # The extreme order statistics are tracked exactly.
        return np.where(ranks == 0, self.min, np.where(ranks == self.count - 1, self.max, estimates))

    def to_dict(self) -> dict[str, Any]:
        return {
            "relative_accuracy": self.relative_accuracy,
            "zero_threshold": self.zero_threshold,
            "count": self.count,
            "zero_count": self.zero_count,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "positive": {"keys": self.positive_keys.tolist(), "counts": self.positive_counts.tolist()},
            "negative": {"keys": self.negative_keys.tolist(), "counts": self.negative_counts.tolist()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantileSketch:
        owner = "QuantileSketch"
        count = _count(_require(data, "count", owner), f"{owner}.count")
        zero_count = _count(_require(data, "zero_count", owner), f"{owner}.zero_count")
        buckets = {}
        for side in ("positive", "negative"):
            raw = _require(data, side, owner)
            try:
                keys = np.asarray(raw["keys"], dtype=np.int64)
                counts = np.asarray(raw["counts"], dtype=np.int64)
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{owner}.{side} must hold integer lists 'keys' and 'counts'") from err
            if keys.shape != counts.shape or keys.ndim != 1 or np.any(counts <= 0) or np.any(np.diff(keys) <= 0):
                raise ValueError(f"{owner}.{side} must hold equally long 'keys' (strictly increasing) and positive 'counts'")
            buckets[side] = (keys, counts)
        if zero_count + sum(int(c.sum()) for _, c in buckets.values()) != count:
            raise ValueError(f"{owner}.count ({count}) does not equal the sum of bucket counts")
        if count:
            lo = _number(_require(data, "min", owner), f"{owner}.min")
            hi = _number(_require(data, "max", owner), f"{owner}.max")
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ValueError(f"{owner}.min/max must be finite with min <= max, got {lo}, {hi}")
        else:
            lo, hi = math.inf, -math.inf
        return cls(
            _number(_require(data, "relative_accuracy", owner), f"{owner}.relative_accuracy"),
            _number(_require(data, "zero_threshold", owner), f"{owner}.zero_threshold"),
            count,
            zero_count,
            lo,
            hi,
            *buckets["positive"],
            *buckets["negative"],
        )


# --------------------------------------------------------------------------------------------------
# Both together


@dataclass(eq=False)
class RewardStats:
    """Moments and a quantile sketch of one stream of (calibrated) rewards."""

    moments: RunningMoments = field(default_factory=RunningMoments)
    sketch: QuantileSketch = field(default_factory=QuantileSketch)

    @classmethod
    def from_values(cls, values: Any, relative_accuracy: float = 0.005) -> RewardStats:
        return cls(sketch=QuantileSketch(relative_accuracy)).update(values)

    def update(self, values: Any) -> RewardStats:
        """Add a batch of values. Returns ``self``."""
        x = _finite_values(values)
        self.moments.update(x)
        self.sketch.update(x)
        return self

    def merge(self, other: RewardStats) -> RewardStats:
        return RewardStats(self.moments.merge(other.moments), self.sketch.merge(other.sketch))

    @property
    def count(self) -> int:
        return self.moments.count

    @property
    def mean(self) -> float:
        return self.moments.mean

    @property
    def std(self) -> float:
        """Population standard deviation."""
        return self.moments.std

    def quantiles(self, qs: Iterable[float] = DEFAULT_QUANTILE_LEVELS) -> dict[str, float]:
        """Quantile estimates keyed by level as text (``"0.5"``), within the sketch's error bound."""
        levels = [float(q) for q in qs]
        return {_level_key(q): float(v) for q, v in zip(levels, self.sketch.quantiles(levels))}

    def to_dict(self) -> dict[str, Any]:
        return {"moments": self.moments.to_dict(), "sketch": self.sketch.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RewardStats:
        stats = cls(
            RunningMoments.from_dict(_require(data, "moments", "RewardStats")),
            QuantileSketch.from_dict(_require(data, "sketch", "RewardStats")),
        )
        if stats.moments.count != stats.sketch.count:
            raise ValueError("RewardStats: moments.count and sketch.count disagree")
        return stats


def _level_key(q: float) -> str:
    return f"{q:g}"


# --------------------------------------------------------------------------------------------------
# The frozen transform


@dataclass(frozen=True)
class RewardTransform:
    """Temperature, normalization statistics and clip for rewards fed to RL, plus provenance.

    ``mean``, ``std`` (population) and ``quantiles`` describe *calibrated* rewards ``raw / temperature``
    on the reference set named by ``computed_on`` (e.g. ``"reference_policy_samples"`` or
    ``"dataset_responses"``), of size ``n``. ``clip`` is ``None`` or a positive bound on
    ``|normalized|``. Every field is validated on construction, with an error naming the field.

    ``ensemble`` (an :class:`~calibrated_rlhf.core.ensemble.EnsembleSpec` as a dict) is set when the
    reward comes from an ensemble: "raw" is then the members' aggregate, and the transform describes
    the whole chain members -> aggregate -> calibrated -> normalized. ``None`` for one reward model.
    """

    temperature: float
    mean: float
    std: float
    clip: float | None
    computed_on: str
    reward_model_version: str | None
    n: int
    quantiles: dict[str, float] = field(default_factory=dict)
    ensemble: dict[str, Any] | None = None

    FORMAT_VERSION = 1

    def __post_init__(self) -> None:
        name = "RewardTransform"
        for key in ("temperature", "std"):
            value = _number(getattr(self, key), f"{name}.{key}")
            if not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"{name}.{key} must be finite and > 0, got {value}")
        if not math.isfinite(_number(self.mean, f"{name}.mean")):
            raise ValueError(f"{name}.mean must be finite, got {self.mean}")
        if self.clip is not None:
            clip = _number(self.clip, f"{name}.clip")
            if not (math.isfinite(clip) and clip > 0.0):
                raise ValueError(f"{name}.clip must be None or finite and > 0, got {clip}")
        if not isinstance(self.computed_on, str) or not self.computed_on:
            raise ValueError(f"{name}.computed_on must be a non-empty string, got {self.computed_on!r}")
        if self.reward_model_version is not None and not isinstance(self.reward_model_version, str):
            raise ValueError(f"{name}.reward_model_version must be a string or None, got {self.reward_model_version!r}")
        _count(self.n, f"{name}.n", minimum=1)
        if not isinstance(self.quantiles, Mapping):
            raise ValueError(f"{name}.quantiles must be a mapping of level -> value, got {type(self.quantiles).__name__}")
        quantiles = {}
        for key, value in self.quantiles.items():
            try:
                level = float(key)
            except (TypeError, ValueError):
                level = math.nan
            if not isinstance(key, str) or not 0.0 <= level <= 1.0:
                raise ValueError(f"{name}.quantiles keys must be levels in [0, 1] written as text, got {key!r}")
            value = _number(value, f"{name}.quantiles[{key!r}]")
            if not math.isfinite(value):
                raise ValueError(f"{name}.quantiles[{key!r}] must be finite, got {value}")
            quantiles[key] = value
        # Normalize numeric types so that equality and to_dict do not depend on how it was built.
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "mean", float(self.mean))
        object.__setattr__(self, "std", float(self.std))
        object.__setattr__(self, "clip", None if self.clip is None else float(self.clip))
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "quantiles", quantiles)
        if self.ensemble is not None:
            try:
                spec = EnsembleSpec.from_dict(self.ensemble)
            except ValueError as err:
                raise ValueError(f"{name}.ensemble: {err}") from None
            object.__setattr__(self, "ensemble", spec.to_dict())

    def calibrate(self, raw: Any) -> Any:
        """``raw / temperature``: rewards on the calibrated logit scale (differences are log-odds)."""
        return raw / self.temperature

    def normalize(self, raw: Any) -> Any:
        """``clip((raw / temperature - mean) / std, -clip, clip)``.

        Works on floats, NumPy arrays and torch tensors (clamped with ``Tensor.clamp``).
        """
        z = (raw / self.temperature - self.mean) / self.std
        if self.clip is None:
            return z
        if hasattr(z, "clamp"):
            return z.clamp(-self.clip, self.clip)
        return np.clip(z, -self.clip, self.clip)

    def rescaled(self, multiplier: float) -> RewardTransform:
        """The transform calibration would produce for raw outputs multiplied by ``multiplier``.

        The temperature fit is scale-equivariant (``a * r`` gives ``a * T``) and the statistics are taken
        on ``r / T``, so only the temperature changes: the scale experiment needs no recalibration.
        """
        if not (math.isfinite(multiplier) and multiplier > 0.0):
            raise ValueError(f"multiplier must be finite and > 0, got {multiplier}")
        return self if multiplier == 1.0 else replace(self, temperature=self.temperature * multiplier)

    def scale_of(self, method: str) -> float:
        """Spread of the reward RL optimizes under normalization ``method``, in z-score units.

        Only the ratio of reward scale to KL weight matters, so without the z-score the applied KL
        weight must follow the reward's own scale for beta to keep its meaning. ``minmax_batch`` has no
        fixed scale (that is its problem), so it counts as 1.
        """
        scales = {"zscore": 1.0, "none": self.std, "raw": self.std * self.temperature, "minmax_batch": 1.0,
                  "running_zscore": 1.0, "whiten_batch": 1.0, "calibrated_clip": self.std}
        if method not in scales:
            raise ValueError(f"normalization method must be one of {sorted(scales)}, got {method!r}")
        return scales[method]

    def preference_probability(self, raw_a: Any, raw_b: Any) -> np.ndarray:
        """Calibrated ``P(a preferred over b) = sigmoid((raw_a - raw_b) / temperature)``."""
        return sigmoid((np.asarray(raw_a, dtype=np.float64) - np.asarray(raw_b, dtype=np.float64)) / self.temperature)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict; :meth:`from_dict` restores an equal transform."""
        return {
            "format_version": self.FORMAT_VERSION,
            "temperature": self.temperature,
            "mean": self.mean,
            "std": self.std,
            "clip": self.clip,
            "computed_on": self.computed_on,
            "reward_model_version": self.reward_model_version,
            "n": self.n,
            "quantiles": dict(self.quantiles),
            # Only ensembles carry the key, so one model's transform reads as it always did.
            **({"ensemble": dict(self.ensemble)} if self.ensemble is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RewardTransform:
        """Validate and load; a missing, unknown or invalid field raises ``ValueError`` naming it."""
        name = "RewardTransform"
        if not isinstance(data, Mapping):
            raise ValueError(f"{name}.from_dict needs a mapping, got {type(data).__name__}")
        version = data.get("format_version", cls.FORMAT_VERSION)
        if version != cls.FORMAT_VERSION:
            raise ValueError(f"{name}.format_version {version!r} is not supported (expected {cls.FORMAT_VERSION})")
        fields = ("temperature", "mean", "std", "clip", "computed_on", "reward_model_version", "n", "quantiles")
        unknown = sorted(set(data) - set(fields) - {"format_version", "ensemble"})
        if unknown:
            raise ValueError(f"{name} dict has unknown fields {unknown}")
        return cls(**{key: _require(data, key, name) for key in fields}, ensemble=data.get("ensemble"))


NormalizationMethod = Literal["zscore", "none", "minmax_batch", "raw", "running_zscore", "whiten_batch",
                              "calibrated_clip"]
"""What RL optimizes: ``zscore`` the frozen z-score of calibrated rewards (the default); ``none`` the
calibrated reward ``r / T``; ``minmax_batch`` a per-batch min-max of the raw reward (the baseline argued
against); ``raw`` the reward model's output itself (the scale experiment's control); ``running_zscore`` the
z-score of calibrated rewards against their running mean and std, updated with every batch during RL and
clipped (TRL's ``use_score_scaling`` + ``use_score_norm`` + ``score_clip``); ``whiten_batch`` calibrated rewards
whitened within each batch (``whiten_rewards``); ``calibrated_clip`` the calibrated reward clipped at
``+-clip`` (a score clip in logit units)."""

OPTIMIZED: dict[str, str] = {"zscore": "normalized", "none": "calibrated", "minmax_batch": "minmax_batch",
                             "raw": "raw", "running_zscore": "running_zscore", "whiten_batch": "whiten_batch",
                             "calibrated_clip": "calibrated_clip"}  # method -> which reward RL optimizes
# The methods whose reward depends on the batch or on the batches before it, not on the response alone.
BATCH_DEPENDENT = ("minmax_batch", "running_zscore", "whiten_batch")


class NormalizationParams(BaseModel):
    """What RL optimizes, which reference distribution fixes the reward's mean and std, and the clip."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the run instead of being ignored

    method: NormalizationMethod = Field(
        "zscore", description="What RL optimizes: zscore (the frozen z-score of calibrated rewards), none "
        "(calibrated r / T; the transform keeps mean 0, std 1), minmax_batch (per-batch min-max of the raw "
        "reward, the baseline argued against), raw (the reward model's output: the scale experiment's control), "
        "running_zscore (calibrated rewards against their running mean and std during RL, clipped at clip), "
        "whiten_batch (calibrated rewards whitened per batch) or calibrated_clip (r / T clipped at +-clip).")
    reference: Literal["dataset_responses", "policy_samples"] = Field(
        "policy_samples",
        description="dataset_responses: the held-out pairs' chosen and rejected responses; policy_samples: "
        "responses sampled from the reference policy for held-out prompts (as the original RLHF work did).",
    )
    clip: float | None = Field(5.0, gt=0, description="Bound on |normalized reward|; null = no clip.")
    batch_size: int = Field(64, ge=1, description="Scoring batch; batches are formed from length-sorted responses.")
    samples_per_prompt: int = Field(2, ge=1, description="policy_samples: responses drawn per held-out prompt.")
    max_new_tokens: int = Field(24, ge=1, description="policy_samples: response length, as in PPO.")
    seed: int = Field(0)


def identity_transform(temperature: float, stats: RewardStats, clip: float | None, reward_model_version: str | None,
                       ensemble: dict[str, Any] | None = None) -> RewardTransform:
    """The "none" baseline: calibration only (mean 0, std 1), with the reference set's quantiles kept for
    comparison; ``computed_on`` is ``"none"``."""
    return RewardTransform(temperature=temperature, mean=0.0, std=1.0, clip=clip, computed_on="none",
                           reward_model_version=reward_model_version, n=stats.count, quantiles=stats.quantiles(),
                           ensemble=ensemble)


def minmax_batch(raw: np.ndarray) -> np.ndarray:
    """Per-batch min-max rescaling to [0, 1], the baseline this project argues against: its scale and
    offset change with every batch, so the same response gets another reward in another batch, and a
    batch of equal rewards becomes all zeros."""
    raw = np.asarray(raw, dtype=np.float64)
    span = raw.max() - raw.min() if raw.size else 0.0
    return (raw - raw.min()) / span if span > 0 else np.zeros_like(raw)


def whiten_batch(values: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Per-batch whitening: zero mean and unit (population) std within the batch; a constant batch
    becomes all zeros."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return np.zeros_like(values)
    return (values - values.mean()) / (values.std() + eps)


class RunningNormalizer:
    """The z-score of each batch against the running mean and std of every batch so far, itself included
    (TRL's ``use_score_scaling`` with ``use_score_norm``), clipped at ``+-clip``. Its state is the running
    moments (``state_dict``), which a resumed run must restore to continue the same rewards."""

    def __init__(self, clip: float | None) -> None:
        self.clip = clip
        self.moments = RunningMoments()

    def __call__(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        self.moments.update(values)
        std = self.moments.std
        z = (values - self.moments.mean) / std if std > 0 else np.zeros_like(values)
        return np.clip(z, -self.clip, self.clip) if self.clip is not None else z

    def state_dict(self) -> dict[str, Any]:
        return self.moments.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.moments = RunningMoments(int(state["count"]), float(state["mean"]), float(state["m2"]))


def transform_from_stats(
    temperature: float,
    stats: RewardStats,
    clip: float | None,
    computed_on: str,
    reward_model_version: str | None,
    quantile_levels: Iterable[float] = DEFAULT_QUANTILE_LEVELS,
    ensemble: dict[str, Any] | None = None,
) -> RewardTransform:
    """Freeze a :class:`RewardTransform` from statistics of *calibrated* rewards ``raw / temperature``."""
    if stats.count < 2:
        raise ValueError(f"need at least 2 calibrated rewards to normalize, got {stats.count}")
    if not stats.std > 0.0:
        raise ValueError("all calibrated rewards are identical (std 0): cannot normalize their scale")
    return RewardTransform(
        temperature=temperature,
        mean=stats.mean,
        std=stats.std,
        clip=clip,
        computed_on=computed_on,
        reward_model_version=reward_model_version,
        n=stats.count,
        quantiles=stats.quantiles(quantile_levels),
        ensemble=ensemble,
    )
