"""The project's KL controller as a TRL callback: the controller's formula on a logged KL sequence, and its
state through a checkpoint and a resume of TRL's real RLOO trainer, directly and through the library's entry
point (``core.rl.trainers.train`` with ``core.checkpointing.trl_checkpoints``), running reward statistics included."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from calibrated_rlhf.core.kl_controller import AdaptiveKLController
from calibrated_rlhf.core.rl.kl_control import BETA, BETA_NEXT, SEQUENCE_KL, KLControlCallback, sequence_kl


def test_callback_follows_the_controllers_formula_on_a_logged_kl_sequence():
    cb = KLControlCallback("adaptive", beta=0.1, kl_target=2.0, horizon=100, episodes_per_step=8)
    trainer = SimpleNamespace(beta=None)
    cb.bind(trainer)
    assert trainer.beta == 0.1
    # per-token KL and mean length as TRL logs them; steps 3 and 4 share one record (logging every 2 steps)
    records = [(1, 0.05, 10.0), (2, 0.5, 8.0), (4, 0.2, 10.0), (5, 0.1, 20.0), (6, 0.25, 8.0)]
    beta, expected = 0.1, []
    for step, kl, length in records:
        seq = kl * length
        err = min(max(seq / 2.0 - 1.0, -0.2), 0.2)  # Ziegler et al. 2019, written out independently
        n = 8 * (step - (records[records.index((step, kl, length)) - 1][0] if step > 1 else 0))
        expected.append((seq, beta, beta * (1 + err * n / 100)))
        beta = expected[-1][2]
    for (step, kl, length), (seq, applied, new) in zip(records, expected):
        logs = {"kl": kl, "completions/mean_length": length}
        cb.on_log(None, SimpleNamespace(global_step=step), None, logs=logs)
        assert logs[SEQUENCE_KL] == pytest.approx(seq)
        assert logs[BETA] == pytest.approx(applied) and logs[BETA_NEXT] == pytest.approx(new)
        assert trainer.beta == pytest.approx(new)
    # the multiplicative update saturates: KL far above target raises beta by at most 20% * n / horizon
    assert expected[0][2] < 0.1 and expected[1][2] > expected[1][1]
    # a record without KL (the end-of-training summary) or a step already seen changes nothing
    cb.on_log(None, SimpleNamespace(global_step=7), None, logs={"train_runtime": 1.0})
    cb.on_log(None, SimpleNamespace(global_step=6), None, logs={"kl": 9.0, "completions/mean_length": 9.0})
    assert trainer.beta == pytest.approx(beta) and cb.controller.steps == len(records)
    assert sequence_kl({"kl": 0.5}) is None


def test_fixed_beta_stays_and_state_rebuilds_the_callback():
    cb = KLControlCallback("fixed", beta=0.3, kl_target=2.0, horizon=100, episodes_per_step=4)
    trainer = SimpleNamespace(beta=None)
    cb.bind(trainer)
    cb.on_log(None, SimpleNamespace(global_step=1), None, logs={"kl": 5.0, "completions/mean_length": 10.0})
    assert trainer.beta == 0.3
    adaptive = KLControlCallback("adaptive", beta=0.3, kl_target=2.0, horizon=100, episodes_per_step=4)
    adaptive.on_log(None, SimpleNamespace(global_step=3), None, logs={"kl": 5.0, "completions/mean_length": 10.0})
    rebuilt = KLControlCallback.from_state(adaptive.state())
    assert rebuilt.controller.state_dict() == adaptive.controller.state_dict() and rebuilt.last_step == 3
    assert isinstance(rebuilt.controller, AdaptiveKLController) and rebuilt.beta != 0.3
    # without the z-score the trainer applies beta times the optimized reward's scale, as PPO does
    scaled = KLControlCallback("adaptive", beta=0.3, kl_target=2.0, horizon=100, episodes_per_step=4, reward_scale=2.5)
    scaled.bind(trainer)
    assert trainer.beta == pytest.approx(0.75)
    logs = {"kl": 5.0, "completions/mean_length": 10.0}
    scaled.on_log(None, SimpleNamespace(global_step=1), None, logs=logs)
    assert trainer.beta == pytest.approx(2.5 * logs[BETA_NEXT]) and logs[BETA] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="beta > 0"):
        KLControlCallback("adaptive", beta=0.0)


def _train(tiny_tokenizer, policy_dir, prompts, out, max_steps=4, resume=None, save_steps=None, kl_control="adaptive",
           climb_episodes=None):
    from calibrated_rlhf.core.rl.config import RLConfig
    from calibrated_rlhf.core.rl.kl_control import kl_callback
    from calibrated_rlhf.core.rl.reward import ScoreReward
    from calibrated_rlhf.core.rl.trainers import build_trainer

    def score_fn(prompts, responses):  # any deterministic reward of the text will do
        return {"score": torch.tensor([len(r.split()) / 5.0 for r in responses])}

    # a KL target far below what sampling reaches, so beta moves at every update; with a climb, one far above, so
    # every update is a slow climb and the step grows at each
    config = RLConfig(algorithm="rloo", num_updates=max_steps, batch_size=4, num_generations=2, response_length=6,
                      learning_rate=5e-3, beta=0.2, kl_target=1e3 if climb_episodes else 1e-3, kl_horizon=8,
                      kl_control=kl_control, kl_climb_episodes=climb_episodes, lr_schedule="linear")
    trainer, history = build_trainer(config, policy_dir, tiny_tokenizer, prompts, ScoreReward(score_fn, tiny_tokenizer),
                                     out, save_steps=save_steps)
    trainer.train(resume_from_checkpoint=resume)
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return kl_callback(trainer), trainer.beta, params, history.points


def test_a_slow_climb_scales_the_trl_step_and_a_resumed_run_keeps_it(tiny_tokenizer, synthetic_pairs, tmp_path):
    """The PI controller's ``step_scale`` reaches TRL's optimizer through its schedule (linear here, so the test
    also sees the scale compose with the decay), and a run resumed from update 2 steps at the same rates."""
    from calibrated_rlhf.core.backbone import BackboneParams, build_causal_backbone
    from tests.conftest import TINY_BACKBONE

    policy_dir = tmp_path / "policy"
    build_causal_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer).save_pretrained(policy_dir)
    prompts = list(dict.fromkeys(synthetic_pairs["prompt"]))[:16]
    run = dict(kl_control="pi", climb_episodes=8)
    whole_cb, _, whole_params, whole_points = _train(tiny_tokenizer, policy_dir, prompts, tmp_path / "a", **run)
    _train(tiny_tokenizer, policy_dir, prompts, tmp_path / "b", save_steps=2, **run)
    resumed_cb, _, resumed_params, resumed_points = _train(tiny_tokenizer, policy_dir, prompts, tmp_path / "c",
                                                           resume=str(tmp_path / "b" / "checkpoint-2"), **run)
    lrs = [p["learning_rate"] for p in whole_points if "learning_rate" in p]
    # TRL logs the rate the update used: linear decay over 4 steps times e^(4 / 8) per slow update before it
    assert lrs == pytest.approx([5e-3 * (1 - k / 4) * math.exp(0.5 * k) for k in range(4)], rel=1e-9)
    assert whole_cb.controller.step_scale == pytest.approx(math.exp(2.0))
    assert [p["learning_rate"] for p in resumed_points if "learning_rate" in p] == pytest.approx(lrs[2:], rel=1e-12)
    assert resumed_cb.controller.state_dict() == pytest.approx(whole_cb.controller.state_dict())
    assert torch.allclose(resumed_params, whole_params, atol=1e-6)


@pytest.mark.parametrize("kl_control", ["pi", "adaptive"])
def test_resumed_trl_run_equals_an_uninterrupted_one(tiny_tokenizer, synthetic_pairs, tmp_path, kl_control):
    from calibrated_rlhf.core.backbone import BackboneParams, build_causal_backbone
    from tests.conftest import TINY_BACKBONE

    policy_dir = tmp_path / "policy"
    build_causal_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer).save_pretrained(policy_dir)
    prompts = list(dict.fromkeys(synthetic_pairs["prompt"]))[:16]

    whole_cb, whole_beta, whole_params, whole_points = _train(tiny_tokenizer, policy_dir, prompts, tmp_path / "a",
                                                              kl_control=kl_control)
    _train(tiny_tokenizer, policy_dir, prompts, tmp_path / "b", save_steps=2, kl_control=kl_control)
    saved = tmp_path / "b" / "checkpoint-2"
    resumed_cb, resumed_beta, resumed_params, resumed_points = _train(tiny_tokenizer, policy_dir, prompts,
                                                                      tmp_path / "c", resume=str(saved),
                                                                      kl_control=kl_control)
    assert whole_cb.controller.steps == 4 and whole_beta != 0.2  # the controller moved beta at each update
    assert whole_cb.controller.kind == resumed_cb.controller.kind == kl_control
    # transformers rebuilt the callback from the checkpoint, and the trainer follows the rebuilt one
    assert resumed_cb.controller.state_dict() == pytest.approx(whole_cb.controller.state_dict())
    assert resumed_beta == pytest.approx(whole_beta, rel=1e-9)
    whole_betas = [p[BETA_NEXT] for p in whole_points if BETA_NEXT in p]
    assert len(set(whole_betas)) == 4  # a new beta after every update
    assert [p[BETA_NEXT] for p in resumed_points if BETA_NEXT in p] == pytest.approx(whole_betas[2:], rel=1e-12)
    assert torch.allclose(resumed_params, whole_params, atol=1e-6)


class _Crash(RuntimeError):
    """Stands for the process dying mid-run."""


def test_interrupted_rloo_run_resumes_through_the_library_to_the_uninterrupted_result(tiny_tokenizer, synthetic_pairs,
                                                                                     tmp_path):
    """``core.rl.trainers.train`` with checkpoints, running_zscore on: a run that dies after its checkpoint at
    update 2 and is resumed (``resume_from: latest``) ends with the weights, betas, rewards and running moments
    of a run never interrupted."""
    from calibrated_rlhf.core.backbone import BackboneParams, build_causal_backbone, build_reward_backbone
    from calibrated_rlhf.core.normalization import RewardTransform
    from calibrated_rlhf.core.checkpointing import ResumeMismatchError, list_checkpoints, resolve_resume
    from calibrated_rlhf.core.checkpointing.checkpoints import COMPLETE_FILE, read_run
    from calibrated_rlhf.core.checkpointing.trl_checkpoints import TRL_DIR, Checkpointing, resume_fingerprint
    from calibrated_rlhf.core.rl.config import RLConfig
    from calibrated_rlhf.core.rl.reward import ScoreReward
    from calibrated_rlhf.core.rl.trainers import train
    from calibrated_rlhf.core.scoring import RewardScorer, rl_score_fn
    from calibrated_rlhf.core.staging import MARK
    from tests.conftest import TINY_BACKBONE

    torch.manual_seed(0)
    policy = build_causal_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer)
    reward_model = build_reward_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer).eval()
    transform = RewardTransform(temperature=0.5, mean=0.0, std=1.0, clip=3.0, computed_on="x",
                                reward_model_version=None, n=2)
    prompts = list(dict.fromkeys(synthetic_pairs["prompt"]))[:16]

    class Reward(ScoreReward):
        def __init__(self, crash_at: int | None = None) -> None:
            super().__init__(rl_score_fn(RewardScorer(reward_model, tiny_tokenizer, transform), "running_zscore"),
                             tiny_tokenizer)
            self.calls, self.crash_at = 0, crash_at

        def __call__(self, *args, **kwargs):
            self.calls += 1
            if self.calls == self.crash_at:
                raise _Crash
            return super().__call__(*args, **kwargs)

    config = RLConfig(algorithm="rloo", num_updates=4, batch_size=4, num_generations=2, response_length=6,
                      learning_rate=5e-3, beta=0.2, kl_target=1e-3, kl_horizon=8)
    fingerprint = resume_fingerprint(config, policy, tiny_tokenizer, prompts, {"normalization.method": "running_zscore"})
    root = tmp_path / "checkpoints"

    def run(name, reward, resume=None):
        return train(config, policy, tiny_tokenizer, prompts, reward, workdir=tmp_path,
                     checkpointing=Checkpointing(root / name, fingerprint, every=2, resume=resume))

    whole_reward = Reward()
    whole = run("whole", whole_reward)
    with pytest.raises(_Crash):
        run("killed", Reward(crash_at=3))  # dies generating update 3, after the checkpoint of update 2
    assert [c.name for c in list_checkpoints(root / "killed")] == ["update_000002"]
    assert not (root / "killed" / COMPLETE_FILE).exists() and not list(root.rglob(f"*{MARK}*"))
    saved = root / "killed" / "update_000002"
    assert (saved / TRL_DIR / "trainer_state.json").is_file() and (saved / "score_state_0.json").is_file()

    # another configuration cannot continue it: the error names the field
    other = resume_fingerprint(config.model_copy(update={"kl_target": 2e-3}), policy, tiny_tokenizer, prompts,
                               {"normalization.method": "running_zscore"})
    with pytest.raises(ResumeMismatchError, match="kl_target"):
        resolve_resume("latest", root, other)
    resume = resolve_resume("latest", root, fingerprint, exclude=[root / "resumed"])
    assert (resume.run, resume.update) == ("killed", 2)  # the finished run is never offered
    resumed_reward = Reward()
    resumed = run("resumed", resumed_reward, resume)
    assert (root / "resumed" / COMPLETE_FILE).is_file() and read_run(root / "resumed")["resumed_from"]["run"] == "killed"

    assert whole_reward.state_dict()["normalizer"]["count"] == 4 * 4
    assert resumed_reward.state_dict() == whole_reward.state_dict()
    for key in (BETA, BETA_NEXT, SEQUENCE_KL, "rewards/score/mean", "rewards/calibrated/mean"):
        assert [p[key] for p in resumed.history if key in p] == pytest.approx([p[key] for p in whole.history
                                                                               if key in p], rel=1e-9), key
    assert len([p for p in whole.history if BETA in p]) == 4
    for a, b in zip(whole.policy.parameters(), resumed.policy.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_grpo_settings_reach_trls_config_and_rloo_refuses_what_it_cannot_do(tmp_path):
    """The step schedule, GRPO's reward scaling and its KL gradient go to TRL's config as set, null leaves TRL's
    defaults, and RLOO takes only the values that describe what it does (no scaling, no KL correction)."""
    from pydantic import ValidationError

    from calibrated_rlhf.core.rl.config import RLConfig
    from calibrated_rlhf.core.rl.trainers import trl_config

    grpo = trl_config(RLConfig(algorithm="grpo", lr_schedule="constant", scale_rewards="none",
                               kl_bias_correction=False), tmp_path)
    assert (grpo.lr_scheduler_type, grpo.scale_rewards, grpo.use_bias_correction_kl) == ("constant", "none", False)
    trl_default = trl_config(RLConfig(algorithm="grpo"), tmp_path)
    assert (trl_default.lr_scheduler_type, trl_default.scale_rewards, trl_default.use_bias_correction_kl) == \
        ("linear", "group", True)
    rloo = trl_config(RLConfig(algorithm="rloo", scale_rewards="none", kl_bias_correction=False), tmp_path)
    assert type(rloo).__name__ == "RLOOConfig"
    with pytest.raises(ValidationError, match="kl_bias_correction is GRPO's"):
        RLConfig(algorithm="rloo", kl_bias_correction=True)
    with pytest.raises(ValidationError, match="scale_rewards is GRPO's"):
        RLConfig(algorithm="rloo", scale_rewards="group")
