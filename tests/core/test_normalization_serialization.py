"""Serialized reward statistics and transforms: round trips, and a bad field named before anything loads."""

import json
import math

import numpy as np
import pytest

from calibrated_rlhf.core.ensemble import EnsembleSpec
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


# ---- QuantileSketch.from_dict ------------------------------------------------------------------------------


def _sketch_dict():
    return QuantileSketch(relative_accuracy=0.02).update([-3.0, -1.0, 0.0, 0.5, 2.0, 2.0]).to_dict()


@pytest.mark.parametrize("key", ["count", "zero_count", "positive", "negative", "min", "max", "relative_accuracy",
                                 "zero_threshold"])
def test_sketch_missing_field_is_named(key):
    data = _sketch_dict()
    del data[key]
    with pytest.raises(ValueError, match=rf"^QuantileSketch dict is missing field '{key}'$"):
        QuantileSketch.from_dict(data)


@pytest.mark.parametrize("key, value, message", [
    ("count", -1, r"^QuantileSketch\.count must be an integer >= 0, got -1$"),
    ("count", 6.0, r"^QuantileSketch\.count must be an integer >= 0, got 6\.0$"),
    ("zero_count", True, r"^QuantileSketch\.zero_count must be an integer >= 0, got True$"),
    ("relative_accuracy", "0.02", r"^QuantileSketch\.relative_accuracy must be a number, got '0\.02'$"),
    ("zero_threshold", None, r"^QuantileSketch\.zero_threshold must be a number, got None$"),
    ("min", "low", r"^QuantileSketch\.min must be a number, got 'low'$"),
    ("max", None, r"^QuantileSketch\.max must be a number, got None$"),
    ("min", 5.0, r"^QuantileSketch\.min/max must be finite with min <= max, got 5\.0, 2\.0$"),
    ("min", math.nan, r"^QuantileSketch\.min/max must be finite"),
    ("max", math.inf, r"^QuantileSketch\.min/max must be finite"),
    ("zero_count", 2, r"^QuantileSketch\.count \(6\) does not equal the sum of bucket counts$"),
])
def test_sketch_bad_field_is_named(key, value, message):
    data = _sketch_dict()
    data[key] = value
    with pytest.raises(ValueError, match=message):
        QuantileSketch.from_dict(data)


@pytest.mark.parametrize("side", ["positive", "negative"])
@pytest.mark.parametrize("buckets", [
    {"keys": [1, 1], "counts": [1, 1]},        # keys not strictly increasing
    {"keys": [2, 1], "counts": [1, 1]},
    {"keys": [1, 2], "counts": [2, 0]},        # an empty bucket is never stored
    {"keys": [1, 2], "counts": [2, -1]},
    {"keys": [1, 2], "counts": [2]},           # lengths differ
    {"keys": [[1, 2]], "counts": [[1, 1]]},    # not 1-D
])
def test_sketch_inconsistent_buckets_are_refused(side, buckets):
    data = _sketch_dict()
    data[side] = buckets
    with pytest.raises(ValueError, match=rf"^QuantileSketch\.{side} must hold equally long 'keys' \(strictly "
                                         r"increasing\) and positive 'counts'$"):
        QuantileSketch.from_dict(data)


@pytest.mark.parametrize("side", ["positive", "negative"])
@pytest.mark.parametrize("buckets", [{"keys": [1]}, {"counts": [1]}, [1, 2], {"keys": ["a"], "counts": [1]},
                                     {"keys": [1], "counts": [None]}])
def test_sketch_buckets_that_are_not_integer_lists_are_refused(side, buckets):
    data = _sketch_dict()
    data[side] = buckets
    with pytest.raises(ValueError, match=rf"^QuantileSketch\.{side} must hold integer lists 'keys' and 'counts'$"):
        QuantileSketch.from_dict(data)


def test_sketch_of_one_value_has_min_equal_to_max_and_loads():
    data = QuantileSketch().update([2.5]).to_dict()
    back = QuantileSketch.from_dict(data)
    assert (back.min, back.max, back.count) == (2.5, 2.5, 1)
    assert back.quantiles([0.0, 0.5, 1.0]).tolist() == [2.5, 2.5, 2.5]


def test_empty_sketch_round_trips_with_no_min_or_max():
    data = QuantileSketch(relative_accuracy=0.1).to_dict()
    assert (data["min"], data["max"], data["count"]) == (None, None, 0)
    back = QuantileSketch.from_dict(json.loads(json.dumps(data)))
    assert back.count == 0 and back.min == math.inf and back.max == -math.inf
    assert back.relative_accuracy == 0.1
    # an empty sketch that was loaded goes on like a new one
    back.update([1.0, -1.0])
    assert (back.min, back.max) == (-1.0, 1.0)


# ---- RunningMoments and RewardStats -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["count", "mean", "m2"])
def test_moments_missing_field_is_named(key):
    data = RunningMoments().update([1.0, 3.0]).to_dict()
    del data[key]
    with pytest.raises(ValueError, match=rf"^RunningMoments dict is missing field '{key}'$"):
        RunningMoments.from_dict(data)


@pytest.mark.parametrize("key, value, message", [
    ("count", -2, r"^RunningMoments\.count must be an integer >= 0, got -2$"),
    ("mean", "1", r"^RunningMoments\.mean must be a number, got '1'$"),
    ("m2", None, r"^RunningMoments\.m2 must be a number, got None$"),
    ("mean", math.inf, r"^RunningMoments\.mean must be finite, got inf$"),
    ("m2", -1e-3, r"^RunningMoments\.m2 must be finite and >= 0, got -0\.001$"),
    ("m2", math.nan, r"^RunningMoments\.m2 must be finite and >= 0, got nan$"),
])
def test_moments_bad_field_is_named(key, value, message):
    data = RunningMoments().update([1.0, 3.0]).to_dict()
    data[key] = value
    with pytest.raises(ValueError, match=message):
        RunningMoments.from_dict(data)


def test_moments_of_a_constant_stream_have_m2_zero_and_load():
    back = RunningMoments.from_dict({"count": 3, "mean": 2.0, "m2": 0.0})
    assert (back.count, back.mean, back.m2, back.std) == (3, 2.0, 0.0, 0.0)


def test_reward_stats_round_trip_and_disagreeing_counts():
    stats = RewardStats.from_values([0.5, -1.0, 2.0, 3.0], relative_accuracy=0.01)
    back = RewardStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert back.to_dict() == stats.to_dict()
    assert back.sketch.relative_accuracy == 0.01
    for key in ("moments", "sketch"):
        data = stats.to_dict()
        del data[key]
        with pytest.raises(ValueError, match=rf"^RewardStats dict is missing field '{key}'$"):
            RewardStats.from_dict(data)
    data = stats.to_dict()
    data["moments"]["count"] = 5
    with pytest.raises(ValueError, match=r"^RewardStats: moments\.count and sketch\.count disagree$"):
        RewardStats.from_dict(data)


# ---- RewardTransform -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("over, message", [
    ({"temperature": 0.0}, r"^RewardTransform\.temperature must be finite and > 0, got 0\.0$"),
    ({"temperature": -1.0}, r"^RewardTransform\.temperature must be finite and > 0, got -1\.0$"),
    ({"temperature": math.inf}, r"^RewardTransform\.temperature must be finite and > 0, got inf$"),
    ({"temperature": "2"}, r"^RewardTransform\.temperature must be a number, got '2'$"),
    ({"std": 0.0}, r"^RewardTransform\.std must be finite and > 0, got 0\.0$"),
    ({"std": math.nan}, r"^RewardTransform\.std must be finite and > 0, got nan$"),
    ({"std": None}, r"^RewardTransform\.std must be a number, got None$"),
    ({"mean": math.nan}, r"^RewardTransform\.mean must be finite, got nan$"),
    ({"mean": "0"}, r"^RewardTransform\.mean must be a number, got '0'$"),
    ({"clip": 0.0}, r"^RewardTransform\.clip must be None or finite and > 0, got 0\.0$"),
    ({"clip": -1}, r"^RewardTransform\.clip must be None or finite and > 0, got -1\.0$"),
    ({"clip": math.inf}, r"^RewardTransform\.clip must be None or finite and > 0, got inf$"),
    ({"clip": "5"}, r"^RewardTransform\.clip must be a number, got '5'$"),
    ({"computed_on": ""}, r"^RewardTransform\.computed_on must be a non-empty string, got ''$"),
    ({"computed_on": None}, r"^RewardTransform\.computed_on must be a non-empty string, got None$"),
    ({"reward_model_version": 3}, r"^RewardTransform\.reward_model_version must be a string or None, got 3$"),
    ({"n": 0}, r"^RewardTransform\.n must be an integer >= 1, got 0$"),
    ({"n": 2.0}, r"^RewardTransform\.n must be an integer >= 1, got 2\.0$"),
    ({"quantiles": [0.5]}, r"^RewardTransform\.quantiles must be a mapping of level -> value, got list$"),
    ({"quantiles": {0.5: 1.0}}, r"^RewardTransform\.quantiles keys must be levels in \[0, 1\] written as text, "
                                r"got 0\.5$"),
    ({"quantiles": {"1.5": 1.0}}, r"^RewardTransform\.quantiles keys must be levels in \[0, 1\] written as text, "
                                  r"got '1\.5'$"),
    ({"quantiles": {"-0.1": 1.0}}, r"keys must be levels in \[0, 1\]"),
    ({"quantiles": {"median": 1.0}}, r"^RewardTransform\.quantiles keys must be levels in \[0, 1\] written as "
                                     r"text, got 'median'$"),
    ({"quantiles": {"0.5": "x"}}, r"^RewardTransform\.quantiles\['0\.5'\] must be a number, got 'x'$"),
    ({"quantiles": {"0.5": math.inf}}, r"^RewardTransform\.quantiles\['0\.5'\] must be finite, got inf$"),
    ({"ensemble": {"aggregation": "mean"}}, r"^RewardTransform\.ensemble: EnsembleSpec dict is missing the field "
                                            r"'member_temperatures'$"),
])
def test_transform_bad_field_is_named(over, message):
    with pytest.raises(ValueError, match=message):
        _transform(**over)


def test_transform_accepts_the_edges_of_each_range():
    t = _transform(quantiles={"0": -1.0, "1": 2.0, "0.5": 0}, n=1, clip=None, reward_model_version=None,
                   temperature=1e-12, std=1e-12)
    assert t.quantiles == {"0": -1.0, "1": 2.0, "0.5": 0.0}
    assert t.n == 1 and t.clip is None and t.reward_model_version is None


def test_transform_equality_and_to_dict_do_not_depend_on_number_types():
    a = _transform(temperature=2, mean=0, std=np.float32(1.5), clip=np.int64(3), n=np.int64(10),
                   quantiles={"0.5": np.float64(0.25)})
    b = _transform(temperature=2.0, mean=0.0, std=1.5, clip=3.0, n=10)
    assert a == b
    data = a.to_dict()
    assert json.loads(json.dumps(data)) == data
    for key in ("temperature", "mean", "std", "clip"):
        assert type(data[key]) is float, key
    assert type(data["n"]) is int and type(data["quantiles"]["0.5"]) is float


def test_transform_to_dict_lists_every_field_and_only_an_ensemble_carries_its_key():
    t = _transform()
    assert t.to_dict() == {"format_version": 1, "temperature": 2.0, "mean": 0.5, "std": 1.5, "clip": 3.0,
                           "computed_on": "reference_policy_samples", "reward_model_version": "v1", "n": 10,
                           "quantiles": {"0.5": 0.25}}
    spec = {"aggregation": "mean", "member_temperatures": [1.0, 2.0]}
    e = _transform(ensemble=spec)
    assert e.ensemble == EnsembleSpec.from_dict(spec).to_dict()  # stored normalized, defaults filled in
    assert e.ensemble["aggregation"] == "mean" and list(e.ensemble["member_temperatures"]) == [1.0, 2.0]
    assert "std_penalty" in e.ensemble and "std_penalty" not in spec
    assert RewardTransform.from_dict(json.loads(json.dumps(e.to_dict()))) == e
    assert e.to_dict()["ensemble"] == e.ensemble


def test_transform_from_dict_refuses_what_it_cannot_read():
    data = _transform().to_dict()
    with pytest.raises(ValueError, match=r"^RewardTransform\.from_dict needs a mapping, got list$"):
        RewardTransform.from_dict([data])
    with pytest.raises(ValueError, match=r"^RewardTransform\.format_version 2 is not supported \(expected 1\)$"):
        RewardTransform.from_dict({**data, "format_version": 2})
    with pytest.raises(ValueError, match=r"^RewardTransform dict has unknown fields \['extra', 'zz'\]$"):
        RewardTransform.from_dict({**data, "zz": 1, "extra": 2})
    for key in ("temperature", "mean", "std", "clip", "computed_on", "reward_model_version", "n", "quantiles"):
        partial = dict(data)
        del partial[key]
        with pytest.raises(ValueError, match=rf"^RewardTransform dict is missing field '{key}'$"):
            RewardTransform.from_dict(partial)
    # a dict written before format_version existed reads as version 1
    del data["format_version"]
    assert RewardTransform.from_dict(data) == _transform()


# ---- building a transform from statistics ------------------------------------------------------------------


def test_transform_from_stats_freezes_the_moments_and_quantiles_of_calibrated_rewards():
    values = np.array([-2.0, -0.5, 0.0, 1.0, 3.5])
    stats = RewardStats.from_values(values)
    t = transform_from_stats(2.0, stats, clip=4.0, computed_on="dataset_responses", reward_model_version="7",
                             quantile_levels=(0.0, 0.5, 1.0), ensemble={"aggregation": "mean",
                                                                         "member_temperatures": [1.0]})
    assert (t.temperature, t.clip, t.computed_on, t.reward_model_version, t.n) == (2.0, 4.0, "dataset_responses",
                                                                                   "7", 5)
    assert t.mean == pytest.approx(values.mean()) and t.std == pytest.approx(values.std())
    assert t.quantiles == {"0": -2.0, "0.5": pytest.approx(0.0, abs=1e-9), "1": 3.5}
    assert t.ensemble["aggregation"] == "mean"
    assert set(transform_from_stats(1.0, stats, None, "x", None).quantiles) == {
        "0.01", "0.05", "0.25", "0.5", "0.75", "0.95", "0.99"}


def test_transform_from_stats_refuses_too_few_or_identical_rewards():
    with pytest.raises(ValueError, match=r"^need at least 2 calibrated rewards to normalize, got 1$"):
        transform_from_stats(1.0, RewardStats.from_values([1.0]), None, "x", None)
    with pytest.raises(ValueError, match=r"^all calibrated rewards are identical \(std 0\)"):
        transform_from_stats(1.0, RewardStats.from_values([1.0, 1.0]), None, "x", None)
    assert transform_from_stats(1.0, RewardStats.from_values([1.0, 2.0]), None, "x", None).n == 2


def test_identity_transform_is_calibration_only_with_the_reference_quantiles():
    stats = RewardStats.from_values([-1.0, 0.0, 1.0, 2.0])
    t = identity_transform(0.5, stats, clip=3.0, reward_model_version="v2",
                           ensemble={"aggregation": "mean", "member_temperatures": [1.0]})
    assert (t.temperature, t.mean, t.std, t.clip, t.computed_on, t.reward_model_version, t.n) == (
        0.5, 0.0, 1.0, 3.0, "none", "v2", 4)
    assert t.quantiles == stats.quantiles()
    assert t.ensemble["member_temperatures"] == [1.0]
    assert identity_transform(0.5, stats, None, None).ensemble is None
