"""Reward-model ensembles: K members, each on its own calibrated scale, aggregated into one reward.

Each member i has its own temperature T_i (fitted on the held-out pairs on its own), so the members are
compared on the calibrated logit scale ``c_i = r_i / T_i`` rather than on their arbitrary raw scales.
The ensemble's reward before its own calibration is an aggregate of the ``c_i``:

- ``mean``: the average member;
- ``min``: the worst case, pessimistic wherever any member is;
- ``mean_minus_std``: ``mean - std_penalty * std``, penalized where the members disagree.

That aggregate plays the role of one model's raw output downstream: a second temperature is fitted to
it on the held-out pairs and the frozen normalization is taken on it, so the reward transform keeps its
meaning. ``std`` is the ensemble_std (population std over members), reported as ``ensemble_std``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Aggregation = Literal["mean", "min", "mean_minus_std"]


class EnsembleParams(BaseModel):
    """How the members of a reward-model ensemble differ and how their rewards are combined.

    The number of members is ``reward_model.ensemble_size`` (it shapes the pipeline, so it sits beside
    this block); with 1 the pipeline trains a single reward model, exactly as without an ensemble.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the run instead of being ignored

    aggregation: Aggregation = Field(
        "mean", description="mean | min (worst case) | mean_minus_std (mean - std_penalty * members' std), "
        "over the members' calibrated rewards r_i / T_i.")
    std_penalty: float = Field(1.0, ge=0, description="lambda of mean_minus_std.")
    bootstrap: bool = Field(False, description="Each member trains on its own bootstrap resample of the train "
                            "pairs (with replacement); false: all on the same pairs, differing by seed only.")


AGGREGATIONS: tuple[str, ...] = ("mean", "min", "mean_minus_std")


def ensemble_std_of(calibrated: np.ndarray) -> np.ndarray:
    """Per row, the population std of the members' calibrated rewards (shape (n, K) -> (n,))."""
    calibrated = _as_matrix(calibrated)
    return calibrated.std(axis=1)


def aggregate_rewards(calibrated: np.ndarray, aggregation: Aggregation, std_penalty: float = 1.0) -> np.ndarray:
    """One reward per row from the members' calibrated rewards (shape (n, K) -> (n,))."""
    calibrated = _as_matrix(calibrated)
    if aggregation == "mean":
        return calibrated.mean(axis=1)
    if aggregation == "min":
        return calibrated.min(axis=1)
    if aggregation == "mean_minus_std":
        return calibrated.mean(axis=1) - std_penalty * ensemble_std_of(calibrated)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def _as_matrix(calibrated: Any) -> np.ndarray:
    m = np.asarray(calibrated, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] < 1:
        raise ValueError(f"member rewards must be a matrix (rows, members), got shape {m.shape}")
    return m


@dataclass(frozen=True)
class EnsembleSpec:
    """What turns K members' raw rewards into the ensemble's reward: temperatures and aggregation.

    ``member_versions`` are the members' weight fingerprints (as ``RewardTransform.reward_model_version``)
    so a transform names exactly which models it was computed for. ``reference_ensemble_std`` is the mean
    ``ensemble_std`` on the normalization's reference set (filled in by the normalization stage): the
    disagreement the reference policy itself sees, against which PPO's is judged.
    """

    aggregation: Aggregation
    member_temperatures: tuple[float, ...]
    std_penalty: float = 1.0
    member_versions: tuple[str | None, ...] = ()
    reference_ensemble_std: float | None = None
    FIELDS = ("aggregation", "std_penalty", "member_temperatures", "member_versions", "reference_ensemble_std")

    def __post_init__(self) -> None:
        name = "EnsembleSpec"
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"{name}.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        temps = tuple(float(t) for t in self.member_temperatures)
        if len(temps) < 1:
            raise ValueError(f"{name}.member_temperatures needs one temperature per member, got none")
        for i, t in enumerate(temps):
            if not (math.isfinite(t) and t > 0):
                raise ValueError(f"{name}.member_temperatures[{i}] must be finite and > 0, got {t}")
        if not (math.isfinite(float(self.std_penalty)) and float(self.std_penalty) >= 0):
            raise ValueError(f"{name}.std_penalty must be finite and >= 0, got {self.std_penalty}")
        versions = tuple(self.member_versions) or (None,) * len(temps)
        if len(versions) != len(temps):
            raise ValueError(f"{name}.member_versions has {len(versions)} entries for {len(temps)} members")
        ref = self.reference_ensemble_std
        if ref is not None and not (math.isfinite(float(ref)) and float(ref) >= 0):
            raise ValueError(f"{name}.reference_ensemble_std must be None or finite and >= 0, got {ref}")
        object.__setattr__(self, "member_temperatures", temps)
        object.__setattr__(self, "member_versions", versions)
        object.__setattr__(self, "std_penalty", float(self.std_penalty))
        if self.reference_ensemble_std is not None:
            object.__setattr__(self, "reference_ensemble_std", float(self.reference_ensemble_std))

    @property
    def size(self) -> int:
        return len(self.member_temperatures)

    def calibrate_members(self, raw: np.ndarray) -> np.ndarray:
        """Members' raw rewards (n, K) -> their calibrated rewards ``r_i / T_i``."""
        raw = _as_matrix(raw)
        if raw.shape[1] != self.size:
            raise ValueError(f"expected rewards of {self.size} members, got {raw.shape[1]}")
        return raw / np.asarray(self.member_temperatures)

    def aggregate(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Members' raw rewards (n, K) -> (the ensemble's reward, the ensemble_std), both (n,)."""
        calibrated = self.calibrate_members(raw)
        return aggregate_rewards(calibrated, self.aggregation, self.std_penalty), ensemble_std_of(calibrated)

    def fingerprint(self) -> str:
        """Names the ensemble: its members' fingerprints and how they are combined."""
        h = hashlib.sha256(f"{self.aggregation}:{self.std_penalty!r}".encode())
        for version, t in zip(self.member_versions, self.member_temperatures):
            h.update(f"|{version}:{t!r}".encode())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"aggregation": self.aggregation, "std_penalty": self.std_penalty,
                "member_temperatures": list(self.member_temperatures),
                "member_versions": list(self.member_versions), "reference_ensemble_std": self.reference_ensemble_std}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnsembleSpec:
        if not isinstance(data, Mapping):
            raise ValueError(f"EnsembleSpec.from_dict needs a mapping, got {type(data).__name__}")
        if "reference_std" in data:  # the field's name before it became reference_ensemble_std
            data = {("reference_ensemble_std" if k == "reference_std" else k): v for k, v in data.items()}
        unknown = sorted(set(data) - set(cls.FIELDS))
        if unknown:
            raise ValueError(f"EnsembleSpec dict has unknown fields {unknown}")
        for key in ("aggregation", "member_temperatures"):
            if key not in data:
                raise ValueError(f"EnsembleSpec dict is missing the field '{key}'")
        return cls(aggregation=data["aggregation"], member_temperatures=tuple(data["member_temperatures"]),
                   std_penalty=data.get("std_penalty", 1.0), member_versions=tuple(data.get("member_versions") or ()),
                   reference_ensemble_std=data.get("reference_ensemble_std"))


@dataclass
class RewardEnsemble:
    """K reward models scored together and combined by an :class:`EnsembleSpec`."""

    members: Sequence[Any]
    spec: EnsembleSpec

    def __post_init__(self) -> None:
        if len(self.members) != self.spec.size:
            raise ValueError(f"{len(self.members)} member models for a spec of {self.spec.size} temperatures")

    def fingerprint(self) -> str:
        return self.spec.fingerprint()


def bootstrap_indices(n: int, seed: int) -> np.ndarray:
    """A bootstrap resample (with replacement) of ``n`` rows, sorted so the data order stays stable."""
    if n < 1:
        raise ValueError("cannot resample an empty training set")
    return np.sort(np.random.default_rng(seed).integers(0, n, size=n))
