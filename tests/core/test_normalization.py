"""Mergeable reward statistics, the quantile sketch's bound, and the frozen reward transform."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibrated_rlhf.core.calibration import CalibrationWarning, fit_temperature
from calibrated_rlhf.core.normalization import (
    DEFAULT_QUANTILE_LEVELS,
    QuantileSketch,
    RewardStats,
    RewardTransform,
    RunningMoments,
    transform_from_stats,
)


def split(values: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    return np.split(values, sorted({min(max(c, 0), values.size) for c in cuts}))


# --------------------------------------------------------------------------------------------------
# Moments


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=300),
    offset=st.sampled_from([0.0, 1e6]),
    cuts=st.lists(st.integers(0, 300), max_size=6),
)
def test_merged_shards_equal_one_pass(values, offset, cuts):
    x = np.asarray(values) + offset  # the offset probes cancellation in naive sum-of-squares formulas
    shards = [RunningMoments().update(part) for part in split(x, cuts)]
    merged = RunningMoments()
    for shard in reversed(shards):  # merge order does not matter
        merged = merged.merge(shard)
    streamed = RunningMoments()
    for part in split(x, cuts):
        streamed.update(part)
    for stats in (merged, streamed):
        assert stats.count == x.size
        assert stats.mean == pytest.approx(np.mean(x), rel=1e-12, abs=1e-9)
        assert stats.std == pytest.approx(np.std(x), rel=1e-7, abs=1e-7)  # population std (ddof=0)


def test_moments_basics_and_round_trip():
    stats = RunningMoments().update(np.array([1.0, 2.0, 3.0, 4.0]))
    assert (stats.count, stats.mean, stats.m2) == (4, 2.5, 5.0)
    assert stats.variance == 1.25 and stats.std == math.sqrt(1.25)
    assert RunningMoments.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats
    assert math.isnan(RunningMoments().std)
    assert RunningMoments().merge(stats) == stats and stats.merge(RunningMoments()) == stats
    with pytest.raises(ValueError, match=r"2 non-finite values \(first indices: \[1, 2\]\)"):
        RunningMoments().update([1.0, np.nan, np.inf])


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"mean": 0.0, "m2": 1.0}, "'count'"),
        ({"count": -1, "mean": 0.0, "m2": 1.0}, "RunningMoments.count"),
        ({"count": 2, "mean": "0", "m2": 1.0}, "RunningMoments.mean"),
        ({"count": 2, "mean": 0.0, "m2": -1.0}, "RunningMoments.m2"),
    ],
)
def test_moments_from_bad_dict(data, field):
    with pytest.raises(ValueError, match=field):
        RunningMoments.from_dict(data)


# --------------------------------------------------------------------------------------------------
# Quantile sketch


def sketch_samples(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(1.0, 2.0, n)
    if kind == "lognormal":
        return rng.lognormal(0.0, 3.0, n)
    if kind == "with_zeros":
        return np.where(rng.random(n) < 0.2, 0.0, rng.standard_cauchy(n))
    return np.round(rng.normal(0.0, 1.0, n), 1)  # heavy ties


def assert_within_bound(sketch: QuantileSketch, x: np.ndarray, levels: np.ndarray) -> None:
    estimates = sketch.quantiles(levels)
    exact = np.quantile(x, levels, method="lower")
    # The bound of the class docstring, plus rounding at bucket boundaries.
    bound = np.maximum(sketch.relative_accuracy * np.abs(exact), sketch.zero_threshold) * (1 + 1e-9)
    assert np.all(np.abs(estimates - exact) <= bound)


@settings(max_examples=20, deadline=None)
@given(
    kind=st.sampled_from(["normal", "lognormal", "with_zeros", "ties"]),
    seed=st.integers(0, 2**32 - 1),
    accuracy=st.sampled_from([0.001, 0.005, 0.05]),
    cuts=st.lists(st.integers(0, 20_000), max_size=4),
)
def test_sketch_error_bound_and_exact_merge(kind, seed, accuracy, cuts):
    x = sketch_samples(kind, 20_000, seed)
    levels = np.linspace(0.0, 1.0, 101)
    single = QuantileSketch(accuracy).update(x)
    assert_within_bound(single, x, levels)
    merged = QuantileSketch(accuracy)
    for part in split(x, cuts):
        merged = merged.merge(QuantileSketch(accuracy).update(part))
    assert merged.to_dict() == single.to_dict()


def test_sketch_extremes_are_exact_and_memory_is_bounded():
    x = np.random.default_rng(0).lognormal(0.0, 2.0, 100_000)
    sketch = QuantileSketch(0.005).update(x)
    lo, hi = sketch.quantiles([0.0, 1.0])
    assert (lo, hi) == (x.min(), x.max())
    g = (1 + 0.005) / (1 - 0.005)
    assert sketch.positive_keys.size <= math.log(x.max() / x.min()) / math.log(g) + 2
    assert sketch.negative_keys.size == 0 and sketch.zero_count == 0


def test_sketch_round_trip_and_validation():
    sketch = QuantileSketch().update(sketch_samples("with_zeros", 5_000, 1))
    restored = QuantileSketch.from_dict(json.loads(json.dumps(sketch.to_dict())))
    assert restored.to_dict() == sketch.to_dict()
    np.testing.assert_array_equal(restored.quantiles([0.1, 0.5, 0.9]), sketch.quantiles([0.1, 0.5, 0.9]))
    bad = sketch.to_dict() | {"count": sketch.count + 1}
    with pytest.raises(ValueError, match="QuantileSketch.count"):
        QuantileSketch.from_dict(bad)
    with pytest.raises(ValueError, match="'negative'"):
        QuantileSketch.from_dict({k: v for k, v in sketch.to_dict().items() if k != "negative"})
    with pytest.raises(ValueError, match="cannot merge"):
        sketch.merge(QuantileSketch(0.01))
    with pytest.raises(ValueError, match="empty"):
        QuantileSketch().quantiles([0.5])
    with pytest.raises(ValueError, match="relative_accuracy"):
        QuantileSketch(1.5)


# --------------------------------------------------------------------------------------------------
# RewardStats


def test_reward_stats_merge_and_round_trip():
    x = np.random.default_rng(2).normal(0.5, 1.5, 30_000)
    whole = RewardStats.from_values(x)
    merged = RewardStats.from_values(x[:10_000]).merge(RewardStats.from_values(x[10_000:]))
    assert merged.count == whole.count == x.size
    assert merged.mean == pytest.approx(np.mean(x), rel=1e-13)
    assert merged.std == pytest.approx(np.std(x), rel=1e-12)
    assert merged.quantiles() == whole.quantiles()
    assert list(whole.quantiles()) == ["0.01", "0.05", "0.25", "0.5", "0.75", "0.95", "0.99"]
    restored = RewardStats.from_dict(json.loads(json.dumps(whole.to_dict())))
    assert restored.to_dict() == whole.to_dict()
    with pytest.raises(ValueError, match="disagree"):
        RewardStats.from_dict(whole.to_dict() | {"moments": RunningMoments(3, 0.0, 1.0).to_dict()})


# --------------------------------------------------------------------------------------------------
# RewardTransform


def make_transform(**overrides) -> RewardTransform:
    fields = dict(
        temperature=2.0,
        mean=0.5,
        std=1.5,
        clip=3.0,
        computed_on="reference_policy_samples",
        reward_model_version="rm-2026-11-01",
        n=4096,
        quantiles={"0.05": -1.9, "0.5": 0.5, "0.95": 2.9},
    )
    return RewardTransform(**(fields | overrides))


def test_transform_formulas():
    t = make_transform()
    raw = np.array([-20.0, 0.0, 1.0, 4.0, 20.0])
    np.testing.assert_allclose(t.calibrate(raw), raw / 2.0)
    np.testing.assert_allclose(t.normalize(raw), np.clip((raw / 2.0 - 0.5) / 1.5, -3.0, 3.0))
    assert t.normalize(20.0) == 3.0 and t.normalize(-20.0) == -3.0
    unclipped = make_transform(clip=None)
    assert unclipped.normalize(20.0) == pytest.approx((10.0 - 0.5) / 1.5)
    np.testing.assert_allclose(t.preference_probability(3.0, 1.0), 1 / (1 + math.exp(-1.0)))


def test_transform_on_torch_tensors():
    torch = pytest.importorskip("torch")
    t = make_transform()
    raw = torch.tensor([-20.0, 1.0, 20.0])
    out = t.normalize(raw)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), t.normalize(raw.numpy()), rtol=1e-6)


def test_transform_round_trips_through_json():
    t = make_transform()
    restored = RewardTransform.from_dict(json.loads(json.dumps(t.to_dict())))
    assert restored == t
    assert RewardTransform.from_dict(make_transform(clip=None, reward_model_version=None).to_dict()).clip is None
    with pytest.raises(AttributeError):
        t.temperature = 1.0  # frozen


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"temperature": 0.0}, "RewardTransform.temperature"),
        ({"temperature": -1.0}, "RewardTransform.temperature"),
        ({"temperature": float("nan")}, "RewardTransform.temperature"),
        ({"temperature": "2.0"}, "RewardTransform.temperature"),
        ({"std": 0.0}, "RewardTransform.std"),
        ({"std": float("inf")}, "RewardTransform.std"),
        ({"mean": float("nan")}, "RewardTransform.mean"),
        ({"mean": None}, "RewardTransform.mean"),
        ({"clip": 0.0}, "RewardTransform.clip"),
        ({"clip": -1.0}, "RewardTransform.clip"),
        ({"computed_on": ""}, "RewardTransform.computed_on"),
        ({"reward_model_version": 3}, "RewardTransform.reward_model_version"),
        ({"n": 0}, "RewardTransform.n"),
        ({"n": 1.5}, "RewardTransform.n"),
        ({"n": True}, "RewardTransform.n"),
        ({"quantiles": {"median": 1.0}}, "RewardTransform.quantiles"),
        ({"quantiles": {"0.5": float("inf")}}, r"RewardTransform.quantiles\['0.5'\]"),
        ({"quantiles": [1.0]}, "RewardTransform.quantiles"),
        ({"format_version": 2}, "format_version"),
        ({"bias": 1.0}, r"unknown fields \['bias'\]"),
    ],
)
def test_bad_dicts_name_the_field(change, field):
    data = make_transform().to_dict() | change
    with pytest.raises(ValueError, match=field):
        RewardTransform.from_dict(data)


@pytest.mark.parametrize("missing", ["temperature", "std", "computed_on", "quantiles"])
def test_missing_field_is_named(missing):
    data = make_transform().to_dict()
    del data[missing]
    with pytest.raises(ValueError, match=f"missing field '{missing}'"):
        RewardTransform.from_dict(data)


def test_transform_from_stats_uses_calibrated_statistics():
    raw = np.random.default_rng(3).normal(4.0, 3.0, 10_000)
    stats = RewardStats.from_values(raw / 2.0)
    t = transform_from_stats(2.0, stats, 5.0, "dataset_responses", None)
    assert (t.mean, t.std, t.n) == (stats.mean, stats.std, 10_000)
    assert set(t.quantiles) == {f"{q:g}" for q in DEFAULT_QUANTILE_LEVELS}
    z = t.normalize(raw)
    assert abs(np.mean(z)) < 1e-12 and np.std(z) == pytest.approx(1.0, rel=1e-12)


def test_transform_from_degenerate_stats():
    with pytest.raises(ValueError, match="identical"):
        transform_from_stats(1.0, RewardStats.from_values(np.full(10, 3.0)), None, "x", None)
    with pytest.raises(ValueError, match="at least 2"):
        transform_from_stats(1.0, RewardStats.from_values([1.0]), None, "x", None)


# --------------------------------------------------------------------------------------------------
# The promise: an affine change of the reward model's scale changes nothing downstream


def reward_model_outputs(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw rewards of chosen/rejected held-out responses, labels, and reference responses."""
    rng = np.random.default_rng(seed)
    gold_a, gold_b = rng.normal(0, 1, 4000), rng.normal(0, 1, 4000)
    labels = (rng.random(4000) < 1 / (1 + np.exp(-(gold_a - gold_b) * 1.7))).astype(float)
    reference = rng.normal(0.3, 1.2, 3000)
    return gold_a, gold_b, labels, reference


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(1e-2, 1e2),
    shift=st.floats(-1e3, 1e3),
    seed=st.integers(0, 2**32 - 1),
)
def test_affine_reward_change_leaves_probabilities_and_normalized_rewards_unchanged(scale, shift, seed):
    r_a, r_b, labels, reference = reward_model_outputs(seed)

    def pipeline(transform_raw):
        a, b, ref = (transform_raw(v) for v in (r_a, r_b, reference))
        with warnings.catch_warnings():
            warnings.simplefilter("error", CalibrationWarning)
            temperature = fit_temperature(a - b, labels).temperature
        stats = RewardStats.from_values(ref / temperature)
        t = transform_from_stats(temperature, stats, clip=5.0, computed_on="reference_policy_samples",
                                 reward_model_version=None)
        return t, t.preference_probability(a, b), t.normalize(ref)

    base, p, z = pipeline(lambda v: v)
    moved, p2, z2 = pipeline(lambda v: scale * v + shift)
    # Margins of scale * r + shift are scale * margins (up to the rounding of the shift).
    assert moved.temperature == pytest.approx(scale * base.temperature, rel=1e-9)
    np.testing.assert_allclose(p2, p, rtol=1e-9, atol=1e-12)
    # Rounding in scale * r + shift is ~1e-16 * |shift|, i.e. relative to the spread of r: loosen by that.
    tol = 1e-9 + 1e-14 * abs(shift) / scale
    np.testing.assert_allclose(z2, z, rtol=0, atol=tol)
    assert moved.std * moved.temperature == pytest.approx(scale * base.std * base.temperature, rel=1e-9)


# ---- the baselines and the scale experiment, beside the transform ---------------------------------------


def _transform(**kw):
    base = dict(temperature=2.0, mean=0.5, std=1.5, clip=5.0, computed_on="policy_samples",
                reward_model_version="abc", n=10)
    return RewardTransform(**{**base, **kw})


def test_rescaled_transform_gives_the_same_normalized_reward_for_scaled_raw_outputs():
    t = _transform()
    raw = np.array([-3.0, 0.1, 2.5, 7.0])
    for a in (0.25, 1.0, 4.0):
        np.testing.assert_allclose(t.rescaled(a).normalize(a * raw), t.normalize(raw), rtol=1e-12)
    assert t.rescaled(1.0) is t
    with pytest.raises(ValueError, match="multiplier"):
        t.rescaled(0.0)


def test_scale_of_each_method_in_zscore_units():
    t = _transform()
    raw = np.random.default_rng(0).normal(size=1000) * 3.0
    # The spread of each optimized reward, divided by the normalized reward's spread (no clip active).
    z_std = t.normalize(raw).std()
    assert t.scale_of("zscore") == 1.0
    assert t.scale_of("none") == pytest.approx(t.calibrate(raw).std() / z_std)
    assert t.scale_of("raw") == pytest.approx(raw.std() / z_std)
    with pytest.raises(ValueError, match="normalization method must be one of"):
        t.scale_of("whitened")


def test_minmax_batch_depends_on_the_batch_and_maps_to_the_unit_interval():
    from calibrated_rlhf.core.normalization import minmax_batch

    raw = np.array([1.0, 3.0, 2.0])
    np.testing.assert_allclose(minmax_batch(raw), [0.0, 1.0, 0.5])
    # The same response (raw 2.0) gets another reward in another batch: the scale floats.
    assert minmax_batch(np.array([2.0, 10.0]))[0] != minmax_batch(raw)[2]
    np.testing.assert_array_equal(minmax_batch(np.array([4.0, 4.0])), [0.0, 0.0])


def test_identity_transform_is_calibration_only():
    from calibrated_rlhf.core.normalization import identity_transform

    stats = RewardStats.from_values(np.array([1.0, 2.0, 3.0, 4.0]))
    t = identity_transform(2.0, stats, None, "abc")
    assert (t.mean, t.std, t.computed_on, t.n) == (0.0, 1.0, "none", 4)
    np.testing.assert_allclose(t.normalize(np.array([4.0])), t.calibrate(np.array([4.0])))
