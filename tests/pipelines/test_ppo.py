import numpy as np
import pytest
import torch
import pandas as pd

from calibrated_rlhf.core.backbone import BackboneParams, build_reward_backbone
from calibrated_rlhf.core.normalization import NormalizationParams, RewardTransform
from calibrated_rlhf.core.synthetic import SyntheticSpec, make_task
from calibrated_rlhf.pipelines.ppo import nodes
from calibrated_rlhf.pipelines.stage import ensemble_std_stop
from tests.conftest import TINY_BACKBONE


def transform(temperature=0.5, mean=0.2, std=2.0, clip=3.0) -> RewardTransform:
    return RewardTransform(temperature=temperature, mean=mean, std=std, clip=clip, computed_on="policy_samples",
                           reward_model_version=None, n=100)


@pytest.fixture(scope="module")
def reward_model(tiny_tokenizer):
    torch.manual_seed(0)
    m = build_reward_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer)
    with torch.no_grad():
        m.score.weight.mul_(50.0)
    return m.eval()


PROMPTS = ["Describe the food in Paris.", "Tell me about the parks in Oslo."] * 3
RESPONSES = [" calm bright", " dull", " grey cold rainy", " lively", " bright bright", " quiet"]


def test_score_fn_applies_the_frozen_transform_and_adds_gold(reward_model, tiny_tokenizer):
    task = make_task(SyntheticSpec(seed=1, n_words=12))
    t = transform()
    fn = nodes.make_score_fn(reward_model, tiny_tokenizer, t, task, "zscore", 1.0)
    out = fn(PROMPTS, RESPONSES)
    raw = out["raw"].double().numpy()
    np.testing.assert_allclose(out["calibrated"].numpy(), raw / 0.5, rtol=1e-5)
    np.testing.assert_allclose(out["normalized"].numpy(), np.clip((raw / 0.5 - 0.2) / 2.0, -3, 3), rtol=1e-5)
    torch.testing.assert_close(out["score"], out["normalized"])
    assert out["gold"][0].item() == pytest.approx(task.gold_reward(" calm bright"))


def test_min_max_is_per_batch_and_scale_free(reward_model, tiny_tokenizer):
    fn = nodes.make_score_fn(reward_model, tiny_tokenizer, transform(), None, "minmax_batch", 1.0)
    a, b = fn(PROMPTS, RESPONSES)["score"], fn(PROMPTS[:3], RESPONSES[:3])["score"]
    assert a.min() == 0 and a.max() == 1
    # the same response gets a different score in a different batch: the instability min-max brings
    assert not torch.allclose(a[:3], b)


@pytest.mark.parametrize("a", [0.25, 4.0])
def test_the_scale_experiment_leaves_the_transformed_score_unchanged(reward_model, tiny_tokenizer, a):
    t = transform()
    base = nodes.make_score_fn(reward_model, tiny_tokenizer, t, None, "zscore", 1.0)(PROMPTS, RESPONSES)
    scaled_fn = nodes.make_score_fn(reward_model, tiny_tokenizer, t.rescaled(a), None,
                                    "zscore", a)
    scaled = scaled_fn(PROMPTS, RESPONSES)
    torch.testing.assert_close(scaled["score"], base["score"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scaled["raw"], a * base["raw"], rtol=1e-5, atol=1e-6)


def test_reward_scale_keeps_beta_in_normalized_units():
    t = transform(temperature=0.5, std=2.0)
    assert t.scale_of("zscore") == 1.0
    assert t.scale_of("none") == 2.0
    assert t.scale_of("raw") == pytest.approx(1.0)  # std of raw = T * std of calibrated


def reference_set(pairs):
    from calibrated_rlhf.pipelines.normalization.nodes import reference_responses

    return reference_responses(pairs[:30])


def members(tokenizer, k=3):
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(build_reward_backbone(BackboneParams(**TINY_BACKBONE), tokenizer).eval())
    return out


def test_score_fn_of_an_ensemble_reports_its_disagreement(tiny_tokenizer):
    from calibrated_rlhf.core.ensemble import EnsembleSpec, RewardEnsemble
    from calibrated_rlhf.core.scoring import score_rewards
    from calibrated_rlhf.core.preferences import render_ids

    models = members(tiny_tokenizer)
    ens = RewardEnsemble(models, EnsembleSpec("min", (0.5, 1.0, 2.0)))
    t = transform()
    out = nodes.make_score_fn(ens, tiny_tokenizer, t, None, "zscore", 1.0)(PROMPTS, RESPONSES)
    ids = [render_ids(tiny_tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    reward, ensemble_std = score_rewards(ens, ids, tiny_tokenizer.pad_token_id)
    np.testing.assert_allclose(out["ensemble_std"].numpy(), ensemble_std, rtol=1e-5)
    np.testing.assert_allclose(out["normalized"].numpy(), t.normalize(reward), rtol=1e-5)
    assert "ensemble_std" not in nodes.make_score_fn(models[0], tiny_tokenizer, t, None, "zscore", 1.0)(
        PROMPTS, RESPONSES)


def test_gold_gap_counts_from_the_reference_set(reward_model, tiny_tokenizer, synthetic_pairs):
    task = make_task(SyntheticSpec(seed=1, n_words=12))
    ref = reference_set(synthetic_pairs)
    t = transform()
    offset = nodes.gold_offset(reward_model, tiny_tokenizer, t, task, ref)
    fn = nodes.make_score_fn(reward_model, tiny_tokenizer, t, task, "zscore", 1.0, offset)
    out = fn(list(ref["prompt"]), list(ref["response"]))
    # on the reference set itself the gap averages to zero; per response it is calibrated - scale * gold - offset
    assert abs(out["gold_gap"].double().mean().item()) < 1e-4
    want = out["calibrated"].double() - task.scale * out["gold"].double() - offset
    torch.testing.assert_close(out["gold_gap"].double(), want, rtol=1e-5, atol=1e-4)
    # the scale experiment moves neither the offset nor the gap
    a = 4.0
    scaled = nodes.gold_offset(reward_model, tiny_tokenizer, t.rescaled(a), task, ref, a)
    assert scaled == pytest.approx(offset, rel=1e-6, abs=1e-6)


def test_ensemble_stop_needs_an_ensemble_and_scales_its_reference_std():
    t = transform()
    assert ensemble_std_stop(t, None, "ppo") is None
    with pytest.raises(ValueError, match="ensemble_std_stop_multiple needs a reward ensemble"):
        ensemble_std_stop(t, 2.0, "ppo")
    from calibrated_rlhf.core.ensemble import EnsembleSpec

    ens = RewardTransform.from_dict({**t.to_dict(),
                                     "ensemble": EnsembleSpec("mean", (1.0, 1.0),
                                                              reference_ensemble_std=0.25).to_dict()})
    assert ensemble_std_stop(ens, 3.0, "ppo") == pytest.approx(0.75)


def test_repetition_stop_scales_the_reference_sets_surprisal_under_the_training_pairs_profile(tmp_path):
    from calibrated_rlhf.pipelines.stage import repetition_profile, repetition_surprisal_stop, warning_stops

    # the training responses' most frequent word: once in 3 of 4, twice in 1; never three times
    pairs = pd.DataFrame({"prompt": ["p", "q"], "chosen": ["a b", "c d e"], "rejected": ["x x", "y"]})
    reference = pd.DataFrame({"prompt": ["p", "q"], "response": ["a b", "z z z"]})
    for name, frame in (("pairs", pairs), ("ref", reference)):
        frame.to_parquet(tmp_path / f"{name}.parquet")
    profile = repetition_profile(pd.read_parquet(tmp_path / "pairs.parquet"))
    # add-one over counts 0, 1, 2 and one bin beyond: (1, 4, 2, 1) / 8
    np.testing.assert_allclose(profile.probabilities, [1 / 8, 4 / 8, 2 / 8, 1 / 8])
    reread = pd.read_parquet(tmp_path / "ref.parquet")
    want = 2.0 * (np.log(2) + np.log(8)) / 2
    assert repetition_surprisal_stop(profile, reread, None) is None
    assert repetition_surprisal_stop(profile, reread, 2.0) == pytest.approx(want)

    class Params:
        ensemble_std_stop_multiple, repetition_surprisal_stop_multiple = None, 2.0

    assert warning_stops(transform(), reread, profile, Params, "rl") == {"repetition_surprisal": pytest.approx(want)}
    Params.repetition_surprisal_stop_multiple = None
    assert warning_stops(transform(), reread, profile, Params, "rl") == {}


ISSUE_KEYS = ("ppo/objective/kl", "ppo/objective/beta", "ppo/rewards/raw", "ppo/rewards/calibrated",
              "ppo/rewards/normalized", "ppo/rewards/gold", "ppo/policy/entropy", "ppo/policy/clipfrac",
              "ppo/policy/approx_kl", "ppo/value/loss", "ppo/value/explained_variance",
              "ppo/rollout/response_length", "ppo/perf/episodes_per_s")


@pytest.mark.slow
def test_ppo_stage_logs_the_issue_metrics_and_checkpoints_per_run(reward_model, tiny_tokenizer, synthetic_pairs,
                                                                  tmp_path):
    from calibrated_rlhf.core.backbone import build_causal_backbone
    from calibrated_rlhf.core.ppo import PPOConfig
    from calibrated_rlhf.pipelines.ppo import create_pipeline
    from tests.pipelines.helpers import run

    task = make_task(SyntheticSpec(seed=1, n_words=12))
    params = nodes.PPOParams(
        trainer=PPOConfig(num_updates=3, batch_size=8, response_length=6, sample_every=1, num_ppo_epochs=2),
        evaluation=nodes.EvaluationParams(n_prompts=6, samples_per_prompt=2),
        checkpoint_root=str(tmp_path / "ckpt"), checkpoint_every=2)
    out = run(create_pipeline(), {
        "reference_policy": build_causal_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer),
        "tokenizer": tiny_tokenizer, "reward_model": reward_model, "reward_transform": transform().to_dict(),
        "reference_responses": reference_set(synthetic_pairs), "train_pairs": synthetic_pairs, "test_pairs": synthetic_pairs[:20],
        "synthetic_task": {**task.to_dict()}, "params:ppo": params, "params:normalization": NormalizationParams(),
        "params:backbone": BackboneParams(**TINY_BACKBONE),
    })
    history = out["ppo_history"]
    for key in (*ISSUE_KEYS, "ppo/rewards/gold_gap"):
        assert [p["step"] for p in history[key]] == [1, 2, 3], key
    assert all(np.isfinite(p["value"]) for k in ISSUE_KEYS for p in history[k])
    ev = {k: v["value"] for k, v in {**out["ppo_evaluation"], **out["ppo_summary"]}.items()}
    assert ev["eval/updates"] == 3 and ev["eval/final_beta"] == history["ppo/objective/beta"][-1]["value"]
    assert ev["eval/gold_gain_ci_low"] <= ev["eval/gold_gain"] <= ev["eval/gold_gain_ci_high"]
    assert ev["eval/kl_reference_ci_low"] <= ev["eval/kl_reference"] <= ev["eval/kl_reference_ci_high"]
    assert {"prompt", "response"} <= set(out["ppo_samples"].columns) and len(out["ppo_samples"]) > 0
    runs = list((tmp_path / "ckpt").iterdir())
    assert len(runs) == 1 and any(runs[0].iterdir())  # this run's own folder
    assert out["kl_control_diagram"].axes


def test_a_transform_of_other_weights_is_refused(reward_model, tiny_tokenizer):
    from calibrated_rlhf.core.reward_model import model_fingerprint

    mine = RewardTransform.from_dict({**transform().to_dict(), "reward_model_version": model_fingerprint(reward_model)})
    nodes.check_transform_matches(mine, reward_model)  # its own model passes
    other = RewardTransform.from_dict({**mine.to_dict(), "reward_model_version": "0" * 64})
    with pytest.raises(ValueError, match="computed for one reward model with fingerprint 000000000000"):
        nodes.check_transform_matches(other, reward_model)


@pytest.mark.slow
def test_stage_resumes_latest_only_under_the_same_reward_model(reward_model, tiny_tokenizer, synthetic_pairs,
                                                               tmp_path, caplog):
    import copy
    import logging
    import os
    import subprocess
    import sys

    from calibrated_rlhf.core.backbone import build_causal_backbone
    from calibrated_rlhf.core.checkpointing import ResumeMismatchError
    from calibrated_rlhf.core.ppo import PPOConfig
    from calibrated_rlhf.core.staging import MARK, host_name

    task = make_task(SyntheticSpec(seed=1, n_words=12))
    reference = build_causal_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer)
    data = dict(tokenizer=tiny_tokenizer, reward_transform=transform().to_dict(),
                reference_responses=reference_set(synthetic_pairs), train_pairs=synthetic_pairs,
                synthetic_task=task.to_dict())

    def stage(rm, updates, **kw):
        params = nodes.PPOParams(
            trainer=PPOConfig(num_updates=updates, batch_size=8, response_length=4, num_ppo_epochs=1),
            evaluation=nodes.EvaluationParams(n_prompts=2, samples_per_prompt=1),
            checkpoint_root=str(tmp_path), checkpoint_every=1, **kw)
        return nodes.train_ppo(reference, reward_model=rm, params=params, **data)

    stage(reward_model, 2)
    (first,) = tmp_path.iterdir()
    assert len(first.name) == 32  # no MLflow run here: a uuid, not a clock
    (first / "COMPLETE").unlink()  # as if killed after its last checkpoint
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    debris = {pid: first / f".update_000003{MARK}{host_name()}-{pid}-x1" for pid in (gone.pid, os.getpid())}
    for path in debris.values():
        path.mkdir()

    other = copy.deepcopy(reward_model)
    with torch.no_grad():
        other.score.weight.add_(1.0)
    with pytest.raises(ResumeMismatchError, match="reward_model"):
        stage(other, 3, resume_from="latest")
    assert not debris[gone.pid].exists() and debris[os.getpid()].exists()  # swept at the stage's start

    with caplog.at_level(logging.INFO, logger="calibrated_rlhf.pipelines"):  # the stage and pipelines.checkpoints
        _, history, *_ = stage(reward_model, 3, resume_from="latest")
    assert f"PPO resumes run {first.name} from update 2" in caplog.text
    assert [p["step"] for p in history["ppo/objective/kl"]] == [1, 2, 3]
