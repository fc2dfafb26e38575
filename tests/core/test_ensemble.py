"""Aggregation math of reward-model ensembles, their spec, and the transform that carries them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calibrated_rlhf.core.backbone import BackboneParams, build_reward_backbone
from calibrated_rlhf.core.ensemble import (
    EnsembleSpec,
    RewardEnsemble,
    aggregate_rewards,
    bootstrap_indices,
    ensemble_std_of,
)
from calibrated_rlhf.core.normalization import RewardTransform
from calibrated_rlhf.core.reward_model import model_fingerprint, score_sequences
from calibrated_rlhf.core.scoring import iter_rewards, reward_fingerprint, score_rewards
from tests.conftest import TINY_BACKBONE

finite = st.floats(-50, 50, allow_nan=False)
matrices = st.integers(1, 6).flatmap(
    lambda k: arrays(np.float64, st.tuples(st.integers(1, 20), st.just(k)), elements=finite))


def test_aggregations_against_direct_computation():
    c = np.array([[1.0, 3.0, 2.0], [-1.0, -1.0, -1.0], [0.0, 4.0, -4.0]])
    np.testing.assert_allclose(aggregate_rewards(c, "mean"), [2.0, -1.0, 0.0])
    np.testing.assert_allclose(aggregate_rewards(c, "min"), [1.0, -1.0, -4.0])
    std = np.array([np.sqrt(2 / 3), 0.0, np.sqrt(32 / 3)])  # population std over 3 members
    np.testing.assert_allclose(ensemble_std_of(c), std)
    np.testing.assert_allclose(aggregate_rewards(c, "mean_minus_std", 0.5), [2.0, -1.0, 0.0] - 0.5 * std)


@settings(max_examples=60, deadline=None)
@given(matrices, st.floats(0, 5))
def test_aggregates_are_ordered_and_equal_for_agreeing_members(c, lam):
    mean, low = aggregate_rewards(c, "mean"), aggregate_rewards(c, "min")
    penalized = aggregate_rewards(c, "mean_minus_std", lam)
    assert np.all(low <= mean + 1e-9) and np.all(penalized <= mean + 1e-9)
    # A member repeated K times is an ensemble that agrees with itself: every aggregate is that member.
    same = np.repeat(c[:, :1], c.shape[1], axis=1)
    for agg in ("mean", "min", "mean_minus_std"):
        np.testing.assert_allclose(aggregate_rewards(same, agg, lam), c[:, 0], atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(matrices, st.lists(st.floats(0.05, 20), min_size=6, max_size=6))
def test_members_raw_scales_do_not_reach_the_aggregate(raw, scales):
    """Member i rescaled by a_i is recalibrated to a_i * T_i: the aggregate must not move."""
    k = raw.shape[1]
    temps = np.linspace(0.5, 2.0, k)
    a = np.array(scales[:k])
    for agg in ("mean", "min", "mean_minus_std"):
        base = EnsembleSpec(agg, tuple(temps)).aggregate(raw)
        scaled = EnsembleSpec(agg, tuple(a * temps)).aggregate(raw * a)
        np.testing.assert_allclose(scaled[0], base[0], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(scaled[1], base[1], rtol=1e-9, atol=1e-9)


def test_unknown_aggregation_and_bad_shapes_are_named():
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate_rewards(np.zeros((2, 2)), "median")
    with pytest.raises(ValueError, match="matrix"):
        aggregate_rewards(np.zeros(3), "mean")
    with pytest.raises(ValueError, match="expected rewards of 2 members, got 3"):
        EnsembleSpec("mean", (1.0, 1.0)).aggregate(np.zeros((4, 3)))


@pytest.mark.parametrize("kwargs, field", [
    ({"aggregation": "vote", "member_temperatures": (1.0,)}, "aggregation"),
    ({"aggregation": "mean", "member_temperatures": ()}, "member_temperatures"),
    ({"aggregation": "mean", "member_temperatures": (1.0, 0.0)}, r"member_temperatures\[1\]"),
    ({"aggregation": "mean", "member_temperatures": (1.0,), "std_penalty": -1.0}, "std_penalty"),
    ({"aggregation": "mean", "member_temperatures": (1.0,), "member_versions": ("a", "b")}, "member_versions"),
    ({"aggregation": "mean", "member_temperatures": (1.0,), "reference_ensemble_std": float("nan")},
     "reference_ensemble_std"),
])
def test_spec_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"EnsembleSpec.{field}"):
        EnsembleSpec(**kwargs)


def test_spec_round_trip_and_fingerprint():
    spec = EnsembleSpec("mean_minus_std", (0.5, 2.0), std_penalty=0.3, member_versions=("a", "b"),
                        reference_ensemble_std=0.4)
    assert EnsembleSpec.from_dict(spec.to_dict()) == spec
    assert spec.fingerprint() == EnsembleSpec.from_dict(spec.to_dict()).fingerprint()
    assert spec.fingerprint() != EnsembleSpec("mean", (0.5, 2.0), 0.3, ("a", "b")).fingerprint()
    assert spec.fingerprint() != EnsembleSpec("mean_minus_std", (0.5, 2.0), 0.3, ("a", "c")).fingerprint()
    with pytest.raises(ValueError, match="unknown fields"):
        EnsembleSpec.from_dict({**spec.to_dict(), "weights": [1, 1]})
    with pytest.raises(ValueError, match="missing the field 'member_temperatures'"):
        EnsembleSpec.from_dict({"aggregation": "mean"})


def test_transform_carries_the_ensemble_and_one_model_keeps_its_format():
    base = dict(temperature=0.8, mean=0.1, std=1.5, clip=5.0, computed_on="policy_samples",
                reward_model_version="x", n=10)
    single = RewardTransform(**base)
    assert "ensemble" not in single.to_dict()  # one model's transform reads exactly as before
    spec = EnsembleSpec("min", (0.5, 1.5), member_versions=("a", "b"), reference_ensemble_std=0.2).to_dict()
    ens = RewardTransform(**base, ensemble=spec)
    assert RewardTransform.from_dict(ens.to_dict()) == ens
    assert ens.to_dict()["ensemble"]["member_temperatures"] == [0.5, 1.5]
    with pytest.raises(ValueError, match=r"RewardTransform.ensemble: EnsembleSpec.aggregation"):
        RewardTransform.from_dict({**ens.to_dict(), "ensemble": {**spec, "aggregation": "vote"}})


def test_bootstrap_is_seeded_with_replacement():
    a, b = bootstrap_indices(500, 3), bootstrap_indices(500, 3)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 500 and a.min() >= 0 and a.max() < 500
    assert len(np.unique(a)) < 400  # ~63% distinct rows: resampled with replacement
    assert not np.array_equal(a, bootstrap_indices(500, 4))


@pytest.fixture(scope="module")
def members(tiny_tokenizer):
    models = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        models.append(build_reward_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer).eval())
    return models


def test_ensemble_scores_equal_the_members_scored_one_by_one(members, tiny_tokenizer):
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(5, 40, size=rng.integers(3, 17))) for _ in range(37)]
    pad = tiny_tokenizer.pad_token_id
    spec = EnsembleSpec("mean_minus_std", (0.5, 1.0, 2.0), std_penalty=0.7,
                        member_versions=tuple(model_fingerprint(m) for m in members))
    ensemble = RewardEnsemble(members, spec)
    raw = np.stack([score_sequences(m, seqs, pad, batch_size=8) for m in members], axis=1)
    want_reward, want_ensemble_std = spec.aggregate(raw)
    reward, ensemble_std = score_rewards(ensemble, seqs, pad, batch_size=8)
    np.testing.assert_allclose(reward, want_reward, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ensemble_std, want_ensemble_std, rtol=1e-10, atol=1e-12)
    # One model through the same entry point: its raw output and no ensemble_std.
    single, none = score_rewards(members[0], seqs, pad, batch_size=8)
    np.testing.assert_allclose(single, raw[:, 0])
    assert none is None and all(s is None for _, _, s in iter_rewards(members[0], seqs, pad))
    assert reward_fingerprint(ensemble) == spec.fingerprint()
    assert reward_fingerprint(members[0]) == model_fingerprint(members[0])
    with pytest.raises(ValueError, match="2 member models for a spec of 3"):
        RewardEnsemble(members[:2], spec)


def test_a_transform_written_before_the_rename_still_loads():
    old = {"aggregation": "mean", "member_temperatures": [1.0, 2.0], "reference_std": 0.3}
    assert EnsembleSpec.from_dict(old).reference_ensemble_std == 0.3
