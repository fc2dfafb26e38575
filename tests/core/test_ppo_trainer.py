"""End-to-end PPO on a tiny Llama: learning, KL control, logging, safety stops, checkpoints, resume."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from calibrated_rlhf.core.checkpointing import latest_checkpoint, list_checkpoints
from calibrated_rlhf.core.ppo import PPOConfig, PPOEarlyStop, PPOTrainer

from .test_ppo_helpers import PROMPTS, build_tokenizer, score_fn, tiny_models

PERF = "ppo/perf/"


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def make_trainer(tok, value_model: str = "separate", seed: int = 0, score=score_fn, fingerprint=None,
                 **overrides) -> PPOTrainer:
    base = dict(seed=seed, num_updates=30, batch_size=16, num_mini_batches=2, num_ppo_epochs=2,
                response_length=8, learning_rate=1e-3, beta=0.02, kl_target=2.0, kl_horizon=200,
                value_model=value_model)
    base.update(overrides)
    cfg = PPOConfig(**base)
    policy, vm = tiny_models(tok, seed=seed, value=value_model == "separate")
    return PPOTrainer(cfg, policy, tok, PROMPTS, score, value_model=vm, fingerprint=fingerprint)


def _mean(hist, key, sl):
    xs = [h[key] for h in hist[sl]]
    return sum(xs) / len(xs)


def test_reward_rises_and_beta_follows_the_controller(tok) -> None:
    trainer = make_trainer(tok)
    result = trainer.train()
    h = result.history
    assert result.updates == 30 and result.episodes == 30 * 16 and not result.stopped_early
    first, last = _mean(h, "ppo/rewards/gold", slice(0, 5)), _mean(h, "ppo/rewards/gold", slice(-5, None))
    assert last > first + 0.5, (first, last)
    # the adaptive controller, replayed from the logged KLs
    beta = 0.02
    for rec in h:
        assert rec["ppo/objective/beta"] == pytest.approx(beta, rel=1e-12)
        err = min(max(rec["ppo/objective/kl"] / 2.0 - 1.0, -0.2), 0.2)
        beta *= 1 + err * 16 / 200
    assert result.beta == pytest.approx(beta, rel=1e-12)
    # below target beta falls; once the KL overshoots it, beta climbs
    cross = next(i for i, rec in enumerate(h) if rec["ppo/objective/kl"] > 2.0)
    if cross > 0:
        assert h[cross]["ppo/objective/beta"] < 0.02
    assert result.beta > h[cross]["ppo/objective/beta"] * 1.05
    required = ["ppo/objective/kl", "ppo/objective/beta", "ppo/objective/kl_target", "ppo/objective/beta_effective",
                "ppo/rewards/normalized", "ppo/rewards/gold", "ppo/rewards/raw", "ppo/policy/entropy",
                "ppo/policy/clipfrac", "ppo/policy/approx_kl", "ppo/losses/policy", "ppo/value/loss",
                "ppo/value/explained_variance", "ppo/rollout/response_length", "ppo/perf/episodes_per_s"]
    for key in required:
        assert key in h[-1] and math.isfinite(h[-1][key]), key
    assert all(k.startswith("ppo/") for k in h[-1])
    assert h[-1]["ppo/rewards/raw"] == pytest.approx(3 * h[-1]["ppo/rewards/gold"] + 1, abs=1e-5)


def test_shared_value_head_learns(tok) -> None:
    trainer = make_trainer(tok, value_model="shared", num_updates=25)
    h = trainer.train().history
    assert _mean(h, "ppo/rewards/gold", slice(-5, None)) > _mean(h, "ppo/rewards/gold", slice(0, 5)) + 0.3


def test_fixed_beta_and_reward_scale(tok) -> None:
    trainer = make_trainer(tok, num_updates=4, kl_control="fixed", beta=0.05, reward_scale=4.0)
    h = trainer.train().history
    for rec in h:
        assert rec["ppo/objective/beta"] == 0.05
        assert rec["ppo/objective/beta_effective"] == pytest.approx(0.2)
        # the penalty part of the reward uses beta * reward_scale
        assert rec["ppo/objective/non_score_reward"] == pytest.approx(-0.2 * rec["ppo/objective/kl"], abs=1e-6)


def test_missing_eos_penalty(tok) -> None:
    # 3 tokens rarely end in EOS: the penalty shows in the score
    trainer = make_trainer(tok, num_updates=2, response_length=3, missing_eos_penalty=1.5, reward_scale=2.0)
    for rec in trainer.train().history:
        no_eos = 1.0 - rec["ppo/rollout/eos_fraction"]
        assert no_eos > 0.5
        expected = rec["ppo/rewards/normalized"] - 1.5 * 2.0 * no_eos
        assert rec["ppo/objective/score"] == pytest.approx(expected, abs=1e-5)


def test_samples_every_k_and_callback(tok) -> None:
    seen = []
    trainer = make_trainer(tok, num_updates=4, sample_every=2, num_samples=3)
    trainer.callbacks.append(lambda u, m, rows: seen.append((u, m["ppo/step"], rows)))
    result = trainer.train()
    assert [u for u, _, _ in seen] == [1, 2, 3, 4] and [s for _, s, _ in seen] == [1.0, 2.0, 3.0, 4.0]
    assert [rows is None for _, _, rows in seen] == [True, False, True, False]
    assert len(result.samples) == 6 and {r["update"] for r in result.samples} == {2, 4}
    row = result.samples[0]
    assert {"prompt", "response", "score", "normalized", "gold", "raw"} <= set(row)
    assert row["prompt"] in PROMPTS and isinstance(row["response"], str)


def test_kl_stop(tok) -> None:
    trainer = make_trainer(tok, num_updates=30, kl_control="fixed", beta=0.0, kl_target=0.05, kl_stop_multiple=2.0)
    result = trainer.train()
    assert result.stopped_early and "KL" in result.stop_reason and result.updates < 30
    with pytest.raises(PPOEarlyStop) as e:
        trainer.step()
    assert e.value.metrics["ppo/objective/kl"] > 0.1


def test_ensemble_disagreement_stop(tok) -> None:
    """Disagreement that grows with the reward the policy chases stops the run once past the threshold."""

    def ensemble_score(prompts, responses):
        out = score_fn(prompts, responses)
        out["ensemble_std"] = out["normalized"].abs() + 0.1
        return out

    calm = make_trainer(tok, num_updates=3, score=ensemble_score, ensemble_std_stop=1e6).train()
    assert not calm.stopped_early and "ppo/rewards/ensemble_std" in calm.history[-1]
    threshold = calm.history[0]["ppo/rewards/ensemble_std"] * 0.5
    stopped = make_trainer(tok, num_updates=3, score=ensemble_score, ensemble_std_stop=threshold).train()
    assert stopped.stopped_early and "ensemble std" in stopped.stop_reason and stopped.updates == 0
    # without an 'ensemble_std' from score_fn the threshold has nothing to judge: training runs
    assert not make_trainer(tok, num_updates=1, ensemble_std_stop=1e-6).train().stopped_early


def test_repetition_surprisal_stop(tok) -> None:
    """The score function's repetition surprisal past its threshold stops the run before the batch is optimized on;
    a threshold above any batch's never does."""
    from calibrated_rlhf.core.early_warning import RepetitionProfile

    profile = RepetitionProfile.of(["a b c", "a b", "a a b"])  # never a word three times

    def counting_score(prompts, responses):
        return {**score_fn(prompts, responses), "repetition_surprisal": torch.as_tensor(profile.surprisal(responses))}

    calm = make_trainer(tok, num_updates=2, score=counting_score, repetition_surprisal_stop=100.0).train()
    surprisal = calm.history[0]["ppo/rewards/repetition_surprisal"]
    assert not calm.stopped_early and surprisal > 0
    stopped = make_trainer(tok, num_updates=2, score=counting_score, repetition_surprisal_stop=surprisal / 2).train()
    assert stopped.stopped_early and stopped.updates == 0
    assert stopped.stop_reason == (f"repetition surprisal {surprisal:.3f} exceeds repetition_surprisal_stop = "
                                   f"{surprisal / 2:.3f}")


def test_nonfinite_reward_stops(tok) -> None:
    def bad_score(prompts, responses):
        out = score_fn(prompts, responses)
        out["normalized"] = out["normalized"].clone()
        out["normalized"][3] = float("nan")
        return out

    trainer = make_trainer(tok, num_updates=3, score=bad_score)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    result = trainer.train()
    assert result.stopped_early and "non-finite" in result.stop_reason and result.updates == 0
    # nothing was updated with the bad batch
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


def test_score_fn_contract_errors(tok) -> None:
    trainer = make_trainer(tok, num_updates=1, score=lambda p, r: {"gold": torch.zeros(len(p))})
    with pytest.raises(KeyError):
        trainer.step()


def _weights(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}


@pytest.mark.parametrize(("value_model", "lora"), [("separate", None), ("shared", None), ("separate", {"r": 4})])
def test_resume_gives_identical_run(tok, tmp_path: Path, value_model: str, lora: dict | None) -> None:
    """Resumed from its middle checkpoint, a run ends as the uninterrupted one; with LoRA the checkpoint holds
    the adapters (the base weights, the reference, are the starting model's)."""
    kw = dict(num_updates=6, checkpoint_every=3, num_mini_batches=4, value_model=value_model, lora=lora)
    full = make_trainer(tok, checkpoint_dir=str(tmp_path / "a"), **kw)
    res_full = full.train()
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["update_000003", "update_000006"]

    # a fresh process would rebuild the same starting models, then resume
    resumed = make_trainer(tok, checkpoint_dir=str(tmp_path / "b"), **kw)
    resumed.load_checkpoint(tmp_path / "a" / "update_000003")
    assert resumed.update == 3 and len(resumed.history) == 3
    assert resumed.kl_controller.state_dict() == {**full.kl_controller.state_dict(), "beta": resumed.beta,
                                                  "steps": 3}
    res_resumed = resumed.train()
    assert res_resumed.updates == 6
    assert len(res_resumed.history) == len(res_full.history) == 6
    for a, b in zip(res_full.history, res_resumed.history):
        assert {k: v for k, v in a.items() if not k.startswith(PERF)} == \
               {k: v for k, v in b.items() if not k.startswith(PERF)}
    wa, wb = _weights(full), _weights(resumed)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert res_resumed.beta == res_full.beta
    opt_a, opt_b = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


def test_pi_controller_resumes_to_the_uninterrupted_beta_trajectory(tok, tmp_path: Path) -> None:
    """The PI controller's integral, last error, KL trend and first-crossing flag ride in the checkpoint: resumed
    from update 3, the betas and the controller's state are bit for bit the uninterrupted run's. The target is
    small enough for the climb to end at once, so the integral moves beta at every update."""
    kw = dict(num_updates=6, checkpoint_every=3, num_mini_batches=1, kl_control="pi", kl_target=0.002, kl_horizon=64)
    full = make_trainer(tok, checkpoint_dir=str(tmp_path / "a"), **kw)
    betas = [h["ppo/objective/beta_next"] for h in full.train().history]
    assert len(set(betas)) == 6  # the controller moved beta at every update
    resumed = make_trainer(tok, checkpoint_dir=str(tmp_path / "b"), **kw)
    resumed.load_checkpoint(tmp_path / "a" / "update_000003")
    assert resumed.kl_controller.kind == "pi" and resumed.kl_controller.steps == 3
    assert [h["ppo/objective/beta_next"] for h in resumed.train().history] == betas
    assert resumed.kl_controller.state_dict() == full.kl_controller.state_dict()


def test_a_slow_climb_raises_ppos_step_and_a_resumed_run_keeps_it(tok, tmp_path: Path) -> None:
    """``kl_climb_episodes``: with a target no batch reaches, every update is a slow climb, so the PI controller's
    step scale grows by e^(16 / 64) per update of 16 episodes and each update's logged rate is the configured one
    times the scale the updates before it left; resumed from update 3, the rates and weights are the uninterrupted
    run's (the scaled rate is in the optimizer's saved state)."""
    kw = dict(num_updates=6, checkpoint_every=3, num_mini_batches=1, kl_control="pi", kl_target=1e3,
              kl_climb_episodes=64)
    full = make_trainer(tok, checkpoint_dir=str(tmp_path / "a"), **kw)
    rates = [h["ppo/optim/lr"] for h in full.train().history]
    assert rates == pytest.approx([1e-3 * math.exp(0.25 * k) for k in range(6)], rel=1e-9)
    resumed = make_trainer(tok, checkpoint_dir=str(tmp_path / "b"), **kw)
    resumed.load_checkpoint(tmp_path / "a" / "update_000003")
    assert [h["ppo/optim/lr"] for h in resumed.train().history] == rates
    assert resumed.kl_controller.step_scale == full.kl_controller.step_scale == pytest.approx(math.exp(1.5))
    wa, wb = _weights(full), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def running_zscore_score(tok):
    """The library's running_zscore score function over a tiny reward model: stateful, its moments grow with
    every batch."""
    from calibrated_rlhf.core.normalization import RewardTransform
    from calibrated_rlhf.core.scoring import RewardScorer, rl_score_fn

    _, reward_model = tiny_models(tok, seed=7)
    transform = RewardTransform(temperature=0.5, mean=0.0, std=1.0, clip=3.0, computed_on="x",
                                reward_model_version=None, n=2)
    return rl_score_fn(RewardScorer(reward_model.eval(), tok, transform), "running_zscore")


def test_running_zscore_resume_equals_an_uninterrupted_run(tok, tmp_path: Path) -> None:
    kw = dict(num_updates=4, checkpoint_every=2, batch_size=8, num_mini_batches=1, score_key="score")
    full = make_trainer(tok, checkpoint_dir=str(tmp_path / "a"), score=running_zscore_score(tok), **kw)
    res_full = full.train()
    # a fresh process: new score function, moments at zero, until the checkpoint restores them
    resumed = make_trainer(tok, checkpoint_dir=str(tmp_path / "b"), score=running_zscore_score(tok), **kw)
    assert resumed.score_fn.normalizer.moments.count == 0
    resumed.load_checkpoint(tmp_path / "a" / "update_000002")
    assert resumed.score_fn.normalizer.moments.count == 2 * 8
    res_resumed = resumed.train()
    assert resumed.score_fn.state_dict() == full.score_fn.state_dict()
    for a, b in zip(res_full.history, res_resumed.history, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith(PERF)} == \
               {k: v for k, v in b.items() if not k.startswith(PERF)}
    wa, wb = _weights(full), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a checkpoint without the moments cannot continue a running_zscore run
    (tmp_path / "a" / "update_000002" / "score_state_0.json").unlink()
    again = make_trainer(tok, checkpoint_dir=str(tmp_path / "c"), score=running_zscore_score(tok), **kw)
    with pytest.raises(ValueError, match="score_state_0.json"):
        again.load_checkpoint(tmp_path / "a" / "update_000002")


def test_resume_latest_through_train(tok, tmp_path: Path) -> None:
    kw = dict(num_updates=4, checkpoint_every=2, checkpoint_dir=str(tmp_path), kl_control="adaptive")
    first = make_trainer(tok, **kw)
    first.train(num_updates=2)
    second = make_trainer(tok, **kw)
    res = second.train(resume_from="latest")
    assert res.updates == 4 and res.last_checkpoint.endswith("update_000004")
    assert second.episodes == 64


def test_checkpoint_layout_and_atomicity(tok, tmp_path: Path, monkeypatch) -> None:
    trainer = make_trainer(tok, num_updates=2, checkpoint_every=1, checkpoint_dir=str(tmp_path))
    trainer.train(num_updates=1)
    ck = tmp_path / "update_000001"
    names = set(os.listdir(ck))
    assert {"policy", "value_model", "optimizer.pt", "trainer_state.json", "rng_state_0.pt"} <= names
    assert (ck / "policy" / "config.json").is_file()
    snapshot = {p: p.read_bytes() for p in ck.rglob("*") if p.is_file()}

    # a save that dies half-way leaves the earlier checkpoint untouched and no new complete one
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        trainer.step()  # update 2 saves a checkpoint
    monkeypatch.setattr(torch, "save", real_save)
    assert latest_checkpoint(tmp_path) == ck
    assert not (tmp_path / "update_000002").exists()
    assert {p: p.read_bytes() for p in ck.rglob("*") if p.is_file()} == snapshot
    # re-saving the same update replaces it whole
    trainer.save_checkpoint()
    assert latest_checkpoint(tmp_path).name == "update_000002"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_keep_checkpoints(tok, tmp_path: Path) -> None:
    trainer = make_trainer(tok, num_updates=4, checkpoint_every=1, checkpoint_dir=str(tmp_path), keep_checkpoints=2)
    trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["update_000003", "update_000004"]


def test_resume_against_another_reference_is_refused(tok, tmp_path: Path) -> None:
    trainer = make_trainer(tok, num_updates=1, checkpoint_every=1, checkpoint_dir=str(tmp_path))
    trainer.train()
    other = make_trainer(tok, seed=5, num_updates=1)
    with pytest.raises(ValueError, match="reference"):
        other.load_checkpoint(tmp_path / "update_000001")


def test_config_validation() -> None:
    with pytest.raises(ValidationError):
        PPOConfig(batch_size=0)
    with pytest.raises(ValidationError):
        PPOConfig(batch_size=16, num_mini_batches=3)
    with pytest.raises(ValidationError):
        PPOConfig(kl_estimator="k2")
    with pytest.raises(ValidationError):
        PPOConfig(checkpoint_every=5)  # needs checkpoint_dir
    with pytest.raises(ValidationError):
        PPOConfig(not_a_field=1)
    cfg = PPOConfig()
    assert (cfg.beta, cfg.kl_target, cfg.kl_horizon, cfg.kl_control, cfg.kl_estimator) == (0.1, 6.0, 10000,
                                                                                          "adaptive", "k1")
    for name, field in PPOConfig.model_fields.items():
        assert field.description, name


def test_single_minibatch_fast_path_matches_plain_path(tok) -> None:
    # one minibatch reuses the first PPO forward for the old values; with dropout left on (Llama's is
    # 0 anyway) the plain path runs a separate value forward: the runs must agree
    fast = make_trainer(tok, num_updates=4, num_mini_batches=1).train().history
    plain = make_trainer(tok, num_updates=4, num_mini_batches=1, disable_dropout=False).train().history
    for a, b in zip(fast, plain):
        for k, v in a.items():
            if not k.startswith(PERF):
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


def test_trimmed_last_layer_trains_as_the_full_forward(tok) -> None:
    # the last layer at the read positions only is the same function: the runs agree to float rounding
    runs = [make_trainer(tok, num_updates=3, speed={"trim_last_layer": trim}) for trim in (True, False)]
    (trim, full) = [r.train().history for r in runs]
    from calibrated_rlhf.core.speed import trimmed_forward

    assert trimmed_forward._checked.get(runs[0].policy) is True  # the trimmed path did run
    assert runs[1].policy not in trimmed_forward._checked
    for a, b in zip(trim, full):
        for k, v in a.items():
            # a clip fraction counts comparisons that float rounding decides while nothing is clipped
            # (the old and new values are equal up to rounding at the first epoch)
            if not k.startswith(PERF) and not k.endswith("clipfrac"):
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


@pytest.mark.parametrize("key", ["decode_threads", "fast_decode", "trim_last_layer", "frozen_trunk",
                                 "cpu_malloc_tuning", "cpu_parallel"])
def test_a_speed_knob_at_its_old_flat_place_is_refused(key: str) -> None:
    from calibrated_rlhf.core.speed.config import PPOSpeed

    value = PPOSpeed.model_fields[key].default
    with pytest.raises(ValidationError, match=f"{key}\n.*Extra inputs are not permitted"):
        PPOConfig(**{key: value})
    assert getattr(PPOConfig(speed={key: value}).speed, key) == value


def test_the_speed_switch_off_trains_as_the_fast_path(tok) -> None:
    # speed.enabled: false turns every path off whatever the knobs say (they stay at their defaults, all on):
    # the model's own forwards and decoding steps, one thread, no value thread; the statistics agree
    from calibrated_rlhf.core.speed import fast_decode, trimmed_forward

    runs = [make_trainer(tok, num_updates=3, num_mini_batches=1, speed={"enabled": on}) for on in (True, False)]
    assert runs[0]._pool is not None and runs[1]._pool is None  # the value model's thread
    fast, plain = [r.train().history for r in runs]
    assert trimmed_forward._checked.get(runs[0].policy) is True and fast_decode._checked.get(runs[0].policy) is True
    assert runs[1].policy not in trimmed_forward._checked and runs[1].policy not in fast_decode._checked
    assert len(fast) == len(plain) == 3
    for a, b in zip(fast, plain):
        assert a.keys() == b.keys()
        for k, v in a.items():
            # a clip fraction counts comparisons that float rounding decides while nothing is clipped
            if not k.startswith(PERF) and not k.endswith("clipfrac"):
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


@pytest.mark.parametrize("num_mini_batches,max_grad_norm", [(1, 1.0), (2, 1.0), (1, 1e-3)])
def test_parallel_value_backward_matches_sequential(tok, num_mini_batches: int, max_grad_norm: float) -> None:
    # with one intra-op thread everywhere the two schedules do the same float operations, the
    # gradient clipping included (split across the two threads in the parallel schedule)
    runs = []
    for parallel in (True, False):
        trainer = make_trainer(tok, num_updates=3, num_mini_batches=num_mini_batches, speed={"cpu_parallel": parallel},
                               max_grad_norm=max_grad_norm)
        assert (trainer._pool is not None) == parallel
        runs.append((trainer.train().history, _weights(trainer)))
    (h_par, w_par), (h_seq, w_seq) = runs
    if max_grad_norm < 1.0:
        assert all(h["ppo/optim/grad_norm"] > 10 * max_grad_norm for h in h_par)  # clipping did scale
    for a, b in zip(h_par, h_seq):
        assert {k: v for k, v in a.items() if not k.startswith(PERF)} == \
               {k: v for k, v in b.items() if not k.startswith(PERF)}
    assert all(torch.equal(w_par[k], w_seq[k]) for k in w_par)


def test_score_key_selects_the_optimized_entry(tok) -> None:
    def keyed(prompts, responses):
        out = score_fn(prompts, responses)
        return {"score": out.pop("normalized"), **out}

    trainer = make_trainer(tok, num_updates=2, score=keyed, score_key="score")
    h = trainer.train().history
    assert all(rec["ppo/objective/score"] == pytest.approx(rec["ppo/rewards/score"], abs=1e-6) for rec in h)
    assert "ppo/rewards/normalized" not in h[0]


def test_glibc_malloc_tuning_applies_where_there_is_glibc() -> None:
    import platform
    import sys

    from calibrated_rlhf.core.speed.schedule import tune_glibc_malloc

    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert tune_glibc_malloc() is expected


# ---------------------------------------------------------------------- resume integrity
RUN = dict(num_updates=2, checkpoint_every=1, batch_size=8, num_mini_batches=1, num_ppo_epochs=1, response_length=4)
REWARD_A = {"reward_model": "a" * 64}


def _interrupted_run(tok, folder: Path, **overrides) -> PPOTrainer:
    """A run folder whose process stopped after one of its two updates (as a killed one would)."""
    trainer = make_trainer(tok, checkpoint_dir=str(folder), fingerprint=REWARD_A, **{**RUN, **overrides})
    trainer.train(num_updates=1)
    return trainer


@pytest.mark.parametrize("change, field", [(dict(kl_target=3.0), "kl_target"), (dict(batch_size=16), "batch_size"),
                                           (dict(fingerprint={"reward_model": "b" * 64}), "reward_model"),
                                           (dict(speed={"decode_threads": 2}), "speed.decode_threads")])
def test_resume_under_another_configuration_names_the_field(tok, tmp_path: Path, change, field) -> None:
    from calibrated_rlhf.core.checkpointing import ResumeMismatchError

    _interrupted_run(tok, tmp_path / "run")
    other = make_trainer(tok, checkpoint_dir=str(tmp_path / "other"), **{**RUN, "fingerprint": REWARD_A, **change})
    with pytest.raises(ResumeMismatchError, match=field) as e:
        other.load_checkpoint(tmp_path / "run" / "update_000001")
    assert list(e.value.fields) == [field]
    old, new = e.value.fields[field]
    assert old != new and str(old)[:12] in str(e.value) and str(new)[:12] in str(e.value)


def test_settings_that_do_not_change_the_result_may_differ_on_resume(tok, tmp_path: Path) -> None:
    _interrupted_run(tok, tmp_path / "run")
    more = make_trainer(tok, checkpoint_dir=str(tmp_path / "next"), fingerprint=REWARD_A,
                        **{**RUN, "num_updates": 3, "keep_checkpoints": 1, "sample_every": 1,
                           "speed": {"cpu_malloc_tuning": False}})
    more.load_checkpoint(tmp_path / "run" / "update_000001")
    assert more.train().updates == 3 and more.resumed_from["run"] == "run"


def test_run_folders_are_marked_started_and_complete(tok, tmp_path: Path) -> None:
    from calibrated_rlhf.core.checkpointing.checkpoints import COMPLETE_FILE, RUN_FILE

    trainer = _interrupted_run(tok, tmp_path / "run")
    assert (tmp_path / "run" / RUN_FILE).is_file() and not (tmp_path / "run" / COMPLETE_FILE).exists()
    trainer.train()
    assert (tmp_path / "run" / COMPLETE_FILE).is_file()


def test_latest_is_the_newest_interrupted_run_of_this_configuration(tok, tmp_path: Path) -> None:
    import json

    from calibrated_rlhf.core.checkpointing import ResumeMismatchError, find_resumable

    done = make_trainer(tok, checkpoint_dir=str(tmp_path / "done"), fingerprint=REWARD_A, **RUN)
    done.train()  # finished: never offered
    mine = _interrupted_run(tok, tmp_path / "older")
    newer = _interrupted_run(tok, tmp_path / "newer", kl_target=3.0)  # interrupted later, other config
    point = find_resumable(tmp_path, mine.fingerprint)
    assert (point.run, point.update, point.checkpoint.name) == ("older", 1, "update_000001")
    assert [(run, list(diffs)) for run, diffs in point.skipped] == [("newer", ["kl_target"])]
    assert find_resumable(tmp_path, newer.fingerprint).run == "newer"

    # no interrupted run of this configuration: refused, naming how the newest one differs
    third = make_trainer(tok, checkpoint_dir=str(tmp_path / "third"), fingerprint=REWARD_A,
                         **{**RUN, "kl_target": 5.0})
    with pytest.raises(ResumeMismatchError, match="newer.*kl_target: 3.0 in the checkpoint, 5.0 now"):
        find_resumable(tmp_path, third.fingerprint)

    # a run that has been continued (and has moved on) is no longer interrupted; its continuation is
    cont = make_trainer(tok, checkpoint_dir=str(tmp_path / "cont"), fingerprint=REWARD_A, **RUN)
    cont.load_checkpoint(find_resumable(tmp_path, mine.fingerprint).checkpoint)
    assert cont.resumed_from["run"] == "older"
    cont.train(num_updates=1)  # starts (run.json names "older"), saves nothing new, is "killed"
    assert find_resumable(tmp_path, mine.fingerprint).run == "older"  # nothing saved yet: still the one
    cont.save_checkpoint()
    assert find_resumable(tmp_path, mine.fingerprint).run == "cont"

    # a run whose writer is alive on this host is in progress, not interrupted
    import subprocess
    import sys

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_file = tmp_path / "cont" / "run.json"
        run_file.write_text(json.dumps({**json.loads(run_file.read_text()), "pid": live.pid}))
        # neither it nor the run it continues is offered: only "newer", of another configuration, is left
        with pytest.raises(ResumeMismatchError, match="newer"):
            find_resumable(tmp_path, mine.fingerprint)
    finally:
        live.kill()
        live.wait()
    assert find_resumable(tmp_path, mine.fingerprint).run == "cont"  # its writer is gone now


def test_latest_without_any_interrupted_run(tmp_path: Path) -> None:
    from calibrated_rlhf.core.checkpointing import find_resumable

    with pytest.raises(FileNotFoundError, match="no interrupted run"):
        find_resumable(tmp_path, {})


def test_staging_debris_of_a_dead_writer_is_swept_and_never_listed(tok, tmp_path: Path) -> None:
    import subprocess
    import sys

    from calibrated_rlhf.core.staging import make_staging_dir, sweep_stale

    _interrupted_run(tok, tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        name = "update_000002"
        mine = make_staging_dir(tmp_path / "run", name)  # this process's: alive
        debris = {pid: mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{pid}-")) for pid in
                  (dead.pid, live.pid)}
        for path in debris.values():
            path.mkdir()
            (path / "trainer_state.json").write_text("{}")  # even a complete-looking staging folder
        assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["update_000001"]
        assert sweep_stale(tmp_path) == [debris[dead.pid]]
        assert mine.exists() and debris[live.pid].exists() and not debris[dead.pid].exists()
    finally:
        live.kill()
        live.wait()


def test_a_checkpoint_is_staged_under_its_writers_name(tok, tmp_path: Path, monkeypatch) -> None:
    from calibrated_rlhf.core.staging import host_name

    seen = []
    real_save = torch.save

    def spy(obj, f, *a, **k):
        seen.append(Path(f).parent.name)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", spy)
    make_trainer(tok, checkpoint_dir=str(tmp_path), **RUN).train(num_updates=1)
    prefix = f".update_000001.staging-{host_name()}-{os.getpid()}-"
    assert seen and all(n.startswith(prefix) for n in seen)


def test_an_explicit_folder_resumes_whatever_its_run_state(tok, tmp_path: Path) -> None:
    from calibrated_rlhf.core.checkpointing import resolve_resume

    _interrupted_run(tok, tmp_path / "run")
    assert resolve_resume(None, tmp_path, {}) is None
    by_checkpoint = resolve_resume(tmp_path / "run" / "update_000001", tmp_path, {})
    by_run = resolve_resume(tmp_path / "run", tmp_path, {})  # a run folder: its newest checkpoint
    assert by_checkpoint.as_dict() == by_run.as_dict() == {
        "run": "run", "update": 1, "checkpoint": str(tmp_path / "run" / "update_000001")}
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_resume(tmp_path / "nowhere", tmp_path, {})
