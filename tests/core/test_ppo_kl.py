"""KL estimators and KL controllers."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibrated_rlhf.core.kl import kl_per_token
from calibrated_rlhf.core.kl_controller import AdaptiveKLController, FixedKLController, make_kl_controller


def test_adaptive_controller_matches_hand_computed_betas() -> None:
    ctl = AdaptiveKLController(beta=0.1, kl_target=6.0, horizon=10_000)
    # err = clip(kl / 6 - 1, -0.2, 0.2); beta *= 1 + err * 1000 / 10000
    kls = [6.0, 12.0, 0.0, 6.6, 3.0]
    expected = [
        0.1,  # err 0
        0.102,  # err +0.2 (clipped from +1)
        0.09996,  # err -0.2
        0.1009596,  # err +0.1
        0.098940408,  # err -0.2 (clipped from -0.5)
    ]
    got = [ctl.update(kl, n_episodes=1000) for kl in kls]
    assert got == pytest.approx(expected, rel=1e-12)
    assert ctl.beta == pytest.approx(expected[-1], rel=1e-12)
    assert ctl.steps == len(kls)


def test_adaptive_controller_uses_episode_count() -> None:
    a = AdaptiveKLController(0.1, 6.0, 10_000)
    b = AdaptiveKLController(0.1, 6.0, 10_000)
    a.update(12.0, n_episodes=16)
    b.update(12.0, n_episodes=32)
    assert a.beta == pytest.approx(0.1 * (1 + 0.2 * 16 / 10_000))
    assert b.beta - 0.1 == pytest.approx(2 * (a.beta - 0.1))


def test_fixed_controller_stays_fixed() -> None:
    ctl = make_kl_controller("fixed", 0.05, 6.0, 10_000)
    assert isinstance(ctl, FixedKLController)
    for kl in [0.0, 100.0, 6.0, -3.0, 1e6]:
        assert ctl.update(kl, 512) == 0.05
    assert ctl.beta == 0.05 and ctl.steps == 5


@pytest.mark.parametrize("kind", ["adaptive", "fixed"])
def test_controller_state_round_trip(kind: str) -> None:
    ctl = make_kl_controller(kind, 0.1, 6.0, 10_000)
    for kl in [1.0, 9.0, 30.0]:
        ctl.update(kl, 64)
    state = json.loads(json.dumps(ctl.state_dict()))  # must survive JSON exactly
    other = make_kl_controller(kind, 0.7, 1.0, 5)
    other.load_state_dict(state)
    assert other.state_dict() == ctl.state_dict()
    assert other.update(11.0, 64) == ctl.update(11.0, 64)


def test_controller_state_kind_mismatch_raises() -> None:
    state = make_kl_controller("fixed", 0.1, 6.0, 100).state_dict()
    with pytest.raises(ValueError):
        make_kl_controller("adaptive", 0.1, 6.0, 100).load_state_dict(state)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_estimators_are_unbiased_for_categorical_kl(estimator: str) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        p_logits = torch.randn(6, generator=g)
        q_logits = p_logits + 0.7 * torch.randn(6, generator=g)
        logp = torch.log_softmax(p_logits.double(), -1)
        logq = torch.log_softmax(q_logits.double(), -1)
        exact = float((logp.exp() * (logp - logq)).sum())
        n = 200_000
        x = torch.multinomial(logp.exp(), n, replacement=True, generator=g)
        est = kl_per_token(logp[x], logq[x], estimator)
        se = float(est.std()) / n**0.5
        assert abs(float(est.mean()) - exact) < 5 * se + 1e-6, (estimator, float(est.mean()), exact)


def test_k3_has_lower_variance_than_k1_when_close() -> None:
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(8, generator=g).double(), -1)
    logq = torch.log_softmax(logp + 0.1 * torch.randn(8, generator=g).double(), -1)
    x = torch.multinomial(logp.exp(), 50_000, replacement=True, generator=g)
    assert kl_per_token(logp[x], logq[x], "k3").var() < kl_per_token(logp[x], logq[x], "k1").var()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=1, max_size=20), st.lists(st.floats(-30, 30), min_size=1, max_size=20))
def test_k3_is_never_negative(a: list[float], b: list[float]) -> None:
    n = min(len(a), len(b))
    lp, lq = torch.tensor(a[:n]), torch.tensor(b[:n])
    assert bool((kl_per_token(lp, lq, "k3") >= 0).all())


def test_k1_is_log_ratio_and_unknown_estimator_raises() -> None:
    lp, lq = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.equal(kl_per_token(lp, lq, "k1"), lp - lq)
    with pytest.raises(ValueError):
        kl_per_token(lp, lq, "k2")  # type: ignore[arg-type]


# ---- the trainer's logged KL, recomputed from scratch on a tiny run ------------------------------

@pytest.mark.parametrize("estimator,sampling_temperature", [("k1", 1.0), ("k3", 0.7)])
def test_trainer_logged_kl_equals_recomputed_sequence_kl(monkeypatch, estimator: str,
                                                          sampling_temperature: float) -> None:
    """ppo/objective/kl = batch mean of sum_t KL_t, KL_t from the sampled tokens' logprobs under the
    sampling policy and the reference. Recomputed here with a plain unpadded forward pass per episode."""
    import copy

    from calibrated_rlhf.core.ppo import PPOConfig, PPOTrainer
    from calibrated_rlhf.core.ppo import trainer as trainer_module

    from .test_ppo_helpers import PROMPTS, build_tokenizer, score_fn, tiny_models

    tok = build_tokenizer()
    policy, vm = tiny_models(tok, seed=0)
    ref, _ = tiny_models(tok, seed=5, value=False)  # a different reference: the KL is far from zero
    cfg = PPOConfig(seed=0, num_updates=1, batch_size=8, num_ppo_epochs=1, response_length=6,
                    learning_rate=1e-3, beta=0.1, kl_target=2.0, kl_estimator=estimator,
                    sampling_temperature=sampling_temperature)
    scored = []

    def recording_score_fn(prompts, responses):
        out = score_fn(prompts, responses)
        scored.append(out["normalized"].clone())
        return out

    trainer = PPOTrainer(cfg, policy, tok, PROMPTS, recording_score_fn, ref_policy=ref, value_model=vm)
    sampling_policy = copy.deepcopy(trainer.policy).eval()  # the weights the rollout samples from

    seen = []
    real_sample = trainer_module.sample_responses

    def spy(policy, query, query_mask, *args, **kwargs):
        out = real_sample(policy, query, query_mask, *args, **kwargs)
        seen.append((query.clone(), query_mask.clone(), out.responses.clone(), out.mask.clone()))
        return out

    gae_inputs = []
    real_gae = trainer_module.compute_gae

    def gae_spy(rewards, values, mask, gamma, lam):
        gae_inputs.append((rewards.clone(), mask.clone()))
        return real_gae(rewards, values, mask, gamma, lam)

    monkeypatch.setattr(trainer_module, "sample_responses", spy)
    monkeypatch.setattr(trainer_module, "compute_gae", gae_spy)
    metrics = trainer.step()
    assert len(seen) == 1 and len(gae_inputs) == 1 and len(scored) == 1
    rewards, reward_mask = gae_inputs[0]
    query, qmask, responses, rmask = seen[0]

    def token_logprobs(model, prompt_ids, resp_ids):
        ids = torch.tensor([prompt_ids + resp_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double() / sampling_temperature
        logp = torch.log_softmax(logits, -1)
        # the token at position p is predicted by the logits at p - 1
        pos = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(resp_ids) - 1)
        return logp[pos, torch.tensor(resp_ids)]

    seq_kls = []
    for b in range(query.shape[0]):
        prompt_ids = query[b][qmask[b].bool()].tolist()
        resp_ids = responses[b][rmask[b].bool()].tolist()
        assert resp_ids, "every response has at least one token"
        lp = token_logprobs(sampling_policy, prompt_ids, resp_ids)
        lr = token_logprobs(trainer.ref_policy, prompt_ids, resp_ids)
        d = lp - lr
        per_token = d if estimator == "k1" else torch.expm1(-d) + d
        seq_kls.append(float(per_token.sum()))
        # the reward GAE sees: a KL penalty -beta * KL_t on every token, plus the score on the last one
        n = len(resp_ids)
        expected_rewards = -0.1 * per_token
        expected_rewards[-1] += float(scored[0][b])
        torch.testing.assert_close(rewards[b, :n].double(), expected_rewards, rtol=1e-3, atol=1e-4)
        assert bool((rewards[b, n:] == 0).all()) and bool((reward_mask[b, :n] == 1).all())
    expected = sum(seq_kls) / len(seq_kls)
    assert abs(expected) > 0.05, "the two policies differ, so should their KL"
    assert metrics["ppo/objective/kl"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
    # the penalty entered the reward with the same KL: non_score_reward = -beta * kl
    assert metrics["ppo/objective/non_score_reward"] == pytest.approx(-0.1 * expected, rel=1e-3, abs=1e-5)
