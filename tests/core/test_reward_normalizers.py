"""The batch and running normalizations RL can optimize instead of the frozen z-score, against plain numpy."""

import json
import math

import numpy as np
import pytest
import torch

from calibrated_rlhf.core.normalization import (QuantileSketch, RewardStats, RewardTransform, RunningMoments,
                                                RunningNormalizer, minmax_batch, whiten_batch)


def test_whiten_batch_is_the_population_z_score():
    x = np.array([1.0, 2.0, 4.0, 9.0])
    np.testing.assert_allclose(whiten_batch(x), (x - x.mean()) / (x.std() + 1e-8))


def test_minmax_batch_maps_the_batch_onto_0_1():
    np.testing.assert_allclose(minmax_batch(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])
    np.testing.assert_allclose(minmax_batch(np.array([0.25, 0.5, 0.3])), [0.0, 1.0, 0.2])  # a span under 1


def test_running_normalizer_scores_each_batch_against_all_batches_so_far():
    norm = RunningNormalizer(clip=None)
    a, b = np.array([0.0, 2.0]), np.array([4.0, 6.0])
    norm(a)
    seen = np.concatenate([a, b])
    np.testing.assert_allclose(norm(b), (b - seen.mean()) / seen.std())



def test_whiten_batch_degenerate_batches_become_zeros():
    assert whiten_batch(np.array([])).shape == (0,)
    np.testing.assert_array_equal(whiten_batch(np.array([3.0])), [0.0])
    np.testing.assert_array_equal(whiten_batch(np.array([2.0, 2.0, 2.0])), [0.0, 0.0, 0.0])
    # two values are enough to whiten: -1 and +1
    np.testing.assert_allclose(whiten_batch(np.array([1.0, 3.0])), [-1.0, 1.0], atol=1e-7)


def test_whiten_batch_eps_guards_the_division():
    x = np.array([0.0, 2.0])
    np.testing.assert_allclose(whiten_batch(x, eps=1.0), [-0.5, 0.5])
    assert whiten_batch([1, 2, 3]).dtype == np.float64


def test_minmax_batch_degenerate_batches():
    assert minmax_batch(np.array([])).shape == (0,)
    np.testing.assert_array_equal(minmax_batch(np.array([5.0, 5.0])), [0.0, 0.0])
    np.testing.assert_allclose(minmax_batch([1, 3]), [0.0, 1.0])  # a list of ints is fine
    assert minmax_batch([2, 2]).dtype == np.float64 and whiten_batch([2]).dtype == np.float64
    assert RunningNormalizer(clip=None)([1, 1]).dtype == np.float64


def test_running_normalizer_clips_both_tails_and_keeps_none_unclipped():
    first = np.array([0.0, 0.0, 0.0, 10.0])
    z = (first - first.mean()) / first.std()  # [-0.577 x3, 1.732]
    np.testing.assert_allclose(RunningNormalizer(clip=1.0)(first), np.clip(z, -1.0, 1.0))
    np.testing.assert_allclose(RunningNormalizer(clip=None)(first), z)
    np.testing.assert_allclose(RunningNormalizer(clip=0.5)(-first), np.clip(-z, -0.5, 0.5))


def test_running_normalizer_of_a_constant_start_is_zero_then_learns_the_spread():
    norm = RunningNormalizer(clip=5.0)
    np.testing.assert_array_equal(norm(np.array([2.0, 2.0])), [0.0, 0.0])
    out = norm(np.array([4.0]))
    seen = np.array([2.0, 2.0, 4.0])
    np.testing.assert_allclose(out, (4.0 - seen.mean()) / seen.std())
    assert norm.moments.count == 3


def test_running_normalizer_resumed_from_its_state_continues_the_same_rewards():
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=5) for _ in range(4)]
    a = RunningNormalizer(clip=2.0)
    for b in batches[:2]:
        a(b)
    state = json.loads(json.dumps(a.state_dict()))
    b = RunningNormalizer(clip=2.0)
    b.load_state_dict(state)
    for batch in batches[2:]:
        np.testing.assert_array_equal(a(batch), b(batch))
    assert b.moments.count == 20 and b.clip == 2.0


def _transform(**over):
    kw = dict(temperature=2.0, mean=0.5, std=1.5, clip=3.0, computed_on="x", reward_model_version=None, n=10)
    kw.update(over)
    return RewardTransform(**kw)


def test_scale_of_each_method_in_z_score_units():
    t = _transform()
    expected = {"zscore": 1.0, "none": 1.5, "raw": 3.0, "minmax_batch": 1.0, "running_zscore": 1.0,
                "whiten_batch": 1.0, "calibrated_clip": 1.5}
    assert {m: t.scale_of(m) for m in expected} == expected
    with pytest.raises(ValueError, match=r"^normalization method must be one of \['calibrated_clip', 'minmax_batch',"
                                         r" 'none', 'raw', 'running_zscore', 'whiten_batch', 'zscore'\], got 'z'$"):
        t.scale_of("z")


def test_normalize_clips_floats_arrays_and_tensors_alike():
    t = _transform(temperature=2.0, mean=0.0, std=1.0, clip=3.0)
    raw = [-10.0, -4.0, 2.0, 8.0]
    expected = [-3.0, -2.0, 1.0, 3.0]
    np.testing.assert_allclose(t.normalize(np.array(raw)), expected)
    torch.testing.assert_close(t.normalize(torch.tensor(raw, dtype=torch.float64)),
                               torch.tensor(expected, dtype=torch.float64))
    assert t.normalize(-10.0) == -3.0 and t.normalize(8.0) == 3.0
    np.testing.assert_allclose(_transform(clip=None, mean=1.0, std=2.0).normalize(np.array(raw)),
                               (np.array(raw) / 2.0 - 1.0) / 2.0)


def test_preference_probability_is_the_sigmoid_of_the_calibrated_margin():
    t = _transform(temperature=2.0)
    a, b = np.array([1.0, 0.0, 50.0]), np.array([0.0, 1.0, -1000.0])
    np.testing.assert_allclose(t.preference_probability(a, b), 1 / (1 + np.exp(-(a - b) / 2.0)), rtol=1e-12)
    assert t.preference_probability(3, 3) == 0.5


def test_rescaled_changes_only_the_temperature():
    t = _transform()
    assert t.rescaled(1.0) is t
    r = t.rescaled(4.0)
    assert r.temperature == 8.0 and (r.mean, r.std, r.clip) == (t.mean, t.std, t.clip)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="multiplier must be finite and > 0"):
            t.rescaled(bad)


# ---- the quantile sketch's guarantee -------------------------------------------------------------------------


@pytest.mark.parametrize("accuracy", [0.005, 0.05])
def test_sketch_quantiles_are_within_the_relative_error_of_the_lower_order_statistic(accuracy):
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(scale=5.0, size=400), -rng.lognormal(size=100), np.zeros(20),
                             [1e-12, -1e-12]])
    sketch = QuantileSketch(relative_accuracy=accuracy, zero_threshold=1e-9).update(values)
    levels = np.linspace(0.0, 1.0, 101)
    exact = np.quantile(values, levels, method="lower")
    est = sketch.quantiles(levels)
    assert np.all(np.abs(est - exact) <= np.maximum(accuracy * np.abs(exact), 1e-9) + 1e-12)
    assert est[0] == values.min() and est[-1] == values.max()
    assert sketch.zero_count == 22 and sketch.count == values.size


def test_sketch_estimates_stay_inside_the_observed_range():
    sketch = QuantileSketch(relative_accuracy=0.2).update([1.05, 1.1, 1.15])
    est = sketch.quantiles([0.0, 0.5, 1.0])
    assert est[0] == 1.05 and est[2] == 1.15 and 1.05 <= est[1] <= 1.15
    neg = QuantileSketch(relative_accuracy=0.2).update([-1.15, -1.1, -1.05])
    assert -1.15 <= neg.quantiles([0.5])[0] <= -1.05


def test_sketch_refuses_bad_levels_and_an_empty_stream():
    sketch = QuantileSketch().update([1.0, 2.0])
    for bad in ([-0.01], [1.01], [0.5, math.nan]):
        with pytest.raises(ValueError, match=r"^quantile levels must be in \[0, 1\], got"):
            sketch.quantiles(bad)
    np.testing.assert_array_equal(sketch.quantiles([0.0, 1.0]), [1.0, 2.0])
    with pytest.raises(ValueError, match=r"^cannot take quantiles of an empty QuantileSketch$"):
        QuantileSketch().quantiles([0.5])


@pytest.mark.parametrize("kw, message", [
    ({"relative_accuracy": 0.0}, r"^QuantileSketch\.relative_accuracy must be in \(0, 1\), got 0\.0$"),
    ({"relative_accuracy": 1.0}, r"^QuantileSketch\.relative_accuracy must be in \(0, 1\), got 1\.0$"),
    ({"zero_threshold": 0.0}, r"^QuantileSketch\.zero_threshold must be finite and > 0, got 0\.0$"),
    ({"zero_threshold": math.inf}, r"^QuantileSketch\.zero_threshold must be finite and > 0, got inf$"),
])
def test_sketch_settings_are_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        QuantileSketch(**kw)


def test_sketch_default_settings():
    s = QuantileSketch()
    assert (s.relative_accuracy, s.zero_threshold, s.count, s.zero_count, s.min, s.max) == (
        0.005, 1e-9, 0, 0, math.inf, -math.inf)


def test_values_at_the_zero_threshold_count_as_zero():
    s = QuantileSketch(zero_threshold=0.5).update([0.5, -0.5, 0.25, 0.75, -0.75])
    assert s.zero_count == 3
    assert s.positive_counts.sum() == 1 and s.negative_counts.sum() == 1


def test_merged_sketches_equal_one_pass_and_different_settings_are_refused():
    rng = np.random.default_rng(4)
    a_vals, b_vals = rng.normal(size=50), rng.normal(loc=2.0, size=70)
    a, b = QuantileSketch().update(a_vals), QuantileSketch().update(b_vals)
    one = QuantileSketch().update(np.concatenate([a_vals, b_vals]))
    assert a.merge(b).to_dict() == one.to_dict() == b.merge(a).to_dict()
    assert a.merge(QuantileSketch()).to_dict() == a.to_dict()
    with pytest.raises(ValueError, match=r"^cannot merge QuantileSketch with different settings: relative_accuracy "
                                         r"0\.005 vs 0\.01, zero_threshold 1e-09 vs 1e-09$"):
        a.merge(QuantileSketch(relative_accuracy=0.01))
    with pytest.raises(ValueError, match=r"zero_threshold 1e-09 vs 0\.001$"):
        a.merge(QuantileSketch(zero_threshold=1e-3))


def test_stats_of_shards_merge_to_the_stats_of_the_whole():
    rng = np.random.default_rng(5)
    x = rng.normal(size=90)
    merged = RewardStats().update(x[:30]).merge(RewardStats().update(x[30:]))
    assert merged.count == 90
    assert merged.mean == pytest.approx(x.mean()) and merged.std == pytest.approx(x.std())
    assert merged.sketch.to_dict() == RewardStats().update(x).sketch.to_dict()
    m = RunningMoments().update([1.0, 2.0])
    assert RunningMoments().merge(m).to_dict() == m.to_dict() == m.merge(RunningMoments()).to_dict()
    assert math.isnan(RunningMoments().variance)


def test_non_finite_rewards_are_refused_naming_their_count_and_first_indices():
    with pytest.raises(ValueError, match=r"^rewards contain 2 non-finite values \(first indices: \[1, 3\]\)$"):
        RewardStats().update([0.0, math.nan, 1.0, math.inf])
    bad = np.full(12, math.nan)
    with pytest.raises(ValueError, match=r"contain 12 non-finite values \(first indices: \[0, 1, 2, 3, 4, 5, 6, 7, 8, "
                                         r"9\]\)$"):
        QuantileSketch().update(bad)


def test_a_stream_in_batches_equals_the_stream_at_once():
    x = np.array([0.0, -1.0, 2.0, 0.0, 3.0, -4.0])
    batched = QuantileSketch().update(x[:2]).update(x[2:4]).update(x[4:])
    assert batched.to_dict() == QuantileSketch().update(x).to_dict()
    assert batched.count == 6 and batched.zero_count == 2
    moments = RunningMoments().update([5.0]).merge(RunningMoments().update([1.0, 3.0]))
    assert (moments.count, moments.mean, moments.m2) == (3, 3.0, 8.0)


def test_sketch_writes_integer_lists():
    data = json.loads(json.dumps(QuantileSketch().update([0.5, 2.0, -3.0, 2.0]).to_dict()))
    for side in ("positive", "negative"):
        assert all(type(v) is int for v in data[side]["keys"] + data[side]["counts"]), data[side]


def test_the_largest_value_is_exact_and_the_one_below_it_is_within_the_bound():
    # with accuracy 0.2 (g = 1.5) the bucket holding 1.5 is represented by 1.2: only the tracked max makes q = 1 exact
    sketch = QuantileSketch(relative_accuracy=0.2).update([1.0, 1.2, 1.5])
    assert sketch.quantiles([1.0])[0] == 1.5
    assert abs(sketch.quantiles([0.5])[0] - 1.2) <= 0.2 * 1.2
