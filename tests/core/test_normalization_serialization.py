"""Serialized reward statistics and transforms: round trips, and a bad field named before anything loads."""

import json
import math

import numpy as np
import pytest

from calibrated_rlhf.core.normalization import (QuantileSketch, RewardStats, RewardTransform, RunningMoments,
                                                identity_transform, transform_from_stats)


def _transform(**over):
    kw = dict(temperature=2.0, mean=0.5, std=1.5, clip=3.0, computed_on="reference_policy_samples",
              reward_model_version="v1", n=10, quantiles={"0.5": 0.25})
    kw.update(over)
    return RewardTransform(**kw)


def test_sketch_round_trips_through_json_with_every_field():
    rng = np.random.default_rng(0)
    sketch = QuantileSketch(relative_accuracy=0.01, zero_threshold=1e-3).update(
        np.concatenate([rng.normal(size=200), np.zeros(5)]))
    data = json.loads(json.dumps(sketch.to_dict()))
    back = QuantileSketch.from_dict(data)
    assert back.to_dict() == sketch.to_dict()
    assert (back.relative_accuracy, back.zero_threshold, back.count, back.zero_count) == (0.01, 1e-3, 205, 5)
    assert (back.min, back.max) == (sketch.min, sketch.max)
    levels = np.linspace(0, 1, 11)
    np.testing.assert_array_equal(back.quantiles(levels), sketch.quantiles(levels))


def test_moments_round_trip():
    m = RunningMoments().update([1.0, 2.0, 4.0])
    back = RunningMoments.from_dict(json.loads(json.dumps(m.to_dict())))
    assert (back.count, back.mean, back.m2) == (m.count, m.mean, m.m2)


def test_transform_round_trips_and_from_dict_names_a_bad_field():
    t = _transform()
    assert RewardTransform.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    data = t.to_dict()
    data["std"] = 0.0
    with pytest.raises(ValueError, match=r"RewardTransform\.std must be finite and > 0"):
        RewardTransform.from_dict(data)
