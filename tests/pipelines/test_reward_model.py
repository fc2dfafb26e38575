import numpy as np
import pytest

from calibrated_rlhf.core.backbone import BackboneParams
from calibrated_rlhf.core.reward_model import RewardTrainingParams
from calibrated_rlhf.pipelines.data_prep import create_pipeline as data_prep
from calibrated_rlhf.pipelines.data_prep.nodes import SourceParams, SyntheticParams
from calibrated_rlhf.core.preferences import SplitParams
from calibrated_rlhf.pipelines.reward_model import create_pipeline as reward_model
from calibrated_rlhf.pipelines.reward_model.nodes import RewardModelSize, reward_backbone
from calibrated_rlhf.pipelines.pair_scores import score_pairs
from tests.conftest import TINY_BACKBONE
from tests.pipelines.helpers import data_prep_params, run

TRAINING = dict(num_train_epochs=2, per_device_train_batch_size=16, logging_steps=2, learning_rate=3e-3)


@pytest.fixture(scope="module")
def prepared():
    source = SourceParams(synthetic=SyntheticParams(n_pairs=400, n_words=8, max_words=4, n_rating_levels=4))
    return run(data_prep(), data_prep_params(source))


def train(prepared, size=None, **overrides):
    return run(reward_model(), {
        "tokenizer": prepared["tokenizer"],
        "train_pairs": prepared["train_pairs"],
        "validation_pairs": prepared["validation_pairs"],
        "test_pairs": prepared["test_pairs"],
        "params:backbone": BackboneParams(**TINY_BACKBONE),
        "params:reward_model.training": RewardTrainingParams(**{**TRAINING, **overrides}),
        "params:reward_model.size": size or RewardModelSize(),
    })


def test_the_reward_model_takes_its_own_size_and_only_from_config(prepared):
    shared = BackboneParams(**TINY_BACKBONE)
    out = train(prepared, size=RewardModelSize(num_hidden_layers=2, hidden_size=48), num_train_epochs=1)
    config = out["reward_model"].config
    assert (config.num_hidden_layers, config.hidden_size) == (2, 48)
    assert (shared.num_hidden_layers, shared.hidden_size) != (2, 48)  # the shared block was something else
    assert reward_backbone(shared, RewardModelSize()) == shared
    with pytest.raises(ValueError, match="applies to a backbone built from config"):
        reward_backbone(shared.model_copy(update={"name_or_path": "some/folder"}), RewardModelSize(hidden_size=64))


def test_reward_model_learns_and_reports_the_issue_metrics(prepared):
    out = train(prepared)
    m = {k: v["value"] for k, v in out["rm_test_metrics"].items()}
    for key in ("rm/test_accuracy", "rm/test_bayes_accuracy", "rm/test_reward_mean", "rm/test_reward_std",
                "rm/test_margin_mean", "rm/test_expected_accuracy"):
        assert np.isfinite(m[key]), key
    # better than chance on a task whose Bayes accuracy is well above it
    assert m["rm/test_bayes_accuracy"] > 0.65
    assert m["rm/test_expected_accuracy"] > 0.55
    curves = out["rm_training_history"]
    assert len(curves["rm/train/loss"]) >= 5 and "rm/validation/loss" in curves
    steps = [p["step"] for p in curves["rm/train/loss"]]
    assert steps == sorted(steps)
    scores = out["test_scores"]
    assert len(scores) == len(prepared["test_pairs"]) and scores["reward_chosen"].notna().all()


def test_margins_from_ratings_widen_the_learned_margins(prepared):
    assert "margin" in prepared["train_pairs"].columns  # ratings became margins in data_prep
    with_margin = train(prepared, use_margin=True)
    without = train(prepared, use_margin=False)
    widened = with_margin["rm_test_metrics"]["rm/test_margin_mean"]["value"]
    plain = without["rm_test_metrics"]["rm/test_margin_mean"]["value"]
    assert widened > plain


def test_scores_follow_the_pair_not_its_batch(prepared):
    out = train(prepared, num_train_epochs=1)
    model, tok, pairs = out["reward_model"], prepared["tokenizer"], prepared["test_pairs"]
    full = score_pairs(model, tok, pairs)
    part = score_pairs(model, tok, pairs.iloc[::-1][:7])
    expected = full.set_index("pair_id").loc[part["pair_id"], "reward_chosen"].to_numpy()
    np.testing.assert_allclose(part["reward_chosen"], expected, atol=1e-5)


def test_bad_training_parameters_fail_before_training():
    with pytest.raises(ValueError, match="learning_rate"):
        RewardTrainingParams(learning_rate=-1)
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        RewardTrainingParams(per_device_train_batch_size=0)


# ---- effects, not presence ---------------------------------------------------------------------------

def _train_seeded(prepared, seed: int, **overrides):
    return run(reward_model(), {
        "tokenizer": prepared["tokenizer"],
        "train_pairs": prepared["train_pairs"],
        "validation_pairs": prepared["validation_pairs"],
        "test_pairs": prepared["test_pairs"],
        "params:backbone": BackboneParams(**{**TINY_BACKBONE, "seed": seed}),
        "params:reward_model.training": RewardTrainingParams(**{**TRAINING, "seed": seed, **overrides}),
        "params:reward_model.size": RewardModelSize(),
    })


@pytest.mark.slow
def test_centering_pulls_the_reward_mean_towards_zero(prepared):
    """The Bradley-Terry loss leaves the offset free; TRL's centering term c * mean((r_c + r_r)^2) pins it.
    Same data, same seeds, same everything but the coefficient: the centered runs' held-out |mean reward|
    is smaller, seed by seed and in total. (A strong coefficient keeps the comparison far from chance.)"""
    centered, free = [], []
    for seed in (0, 1, 2):
        with_c = _train_seeded(prepared, seed, center_rewards_coefficient=1.0)["rm_test_metrics"]
        without = _train_seeded(prepared, seed, center_rewards_coefficient=None)["rm_test_metrics"]
        centered.append(abs(with_c["rm/test_reward_mean"]["value"]))
        free.append(abs(without["rm/test_reward_mean"]["value"]))
    assert all(c < f for c, f in zip(centered, free)), (centered, free)
    assert sum(centered) < 0.5 * sum(free), (centered, free)


@pytest.fixture(scope="module")
def prepared_large_test():
    """More held-out pairs than `prepared`: 40% of ~2000 pairs' prompts go to the test split."""
    source = SourceParams(synthetic=SyntheticParams(seed=3, n_pairs=2000, n_words=8, max_words=5))
    split = SplitParams(train=0.5, validation=0.05, calibration=0.05, test=0.4)
    return run(data_prep(), data_prep_params(source, split))


def _accuracy(chosen_scores: np.ndarray, rejected_scores: np.ndarray) -> np.ndarray:
    """Per-pair correctness against the observed label; a tie counts one half (a coin flip)."""
    return np.where(chosen_scores > rejected_scores, 1.0, np.where(chosen_scores == rejected_scores, 0.5, 0.0))


@pytest.mark.slow
def test_reward_model_beats_trivial_scorers_on_held_out_pairs(prepared_large_test):
    """Held-out accuracy of the trained reward model vs the best of two scorers that cannot know the task:
    a constant (every pair a tie, 1/2) and the response length in words (longer preferred). The gap must
    exceed 3 binomial standard errors of the difference (unpaired, so conservative)."""
    out = _train_seeded(prepared_large_test, 0, center_rewards_coefficient=0.01)
    pairs, scores = prepared_large_test["test_pairs"], out["test_scores"]
    n = len(pairs)
    assert n >= 700, n
    assert list(scores["pair_id"]) == list(pairs["pair_id"])
    acc_rm = _accuracy(scores["reward_chosen"].to_numpy(), scores["reward_rejected"].to_numpy()).mean()
    length = _accuracy(pairs["chosen"].str.split().str.len().to_numpy(),
                       pairs["rejected"].str.split().str.len().to_numpy()).mean()
    acc_trivial = max(0.5, length)
    se = np.sqrt(acc_rm * (1 - acc_rm) / n + acc_trivial * (1 - acc_trivial) / n)
    assert acc_rm - acc_trivial > 3 * se, dict(rm=acc_rm, length=length, se=se, n=n)
    # the logged figure is the same accuracy (no ties among real-valued rewards)
    assert out["rm_test_metrics"]["rm/test_accuracy"]["value"] == pytest.approx(acc_rm)
