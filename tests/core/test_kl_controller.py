"""The PI controller of log beta (core.kl_controller) on a simulated KL(beta) response, its bounds, anti-windup
and state; Ziegler's controller kept as it was (tests/core/test_ppo_kl.py holds its hand-computed betas)."""

from __future__ import annotations

import json
import math
import random

import pytest

from calibrated_rlhf.core.kl_controller import (
    BETA_MAX,
    BETA_MIN,
    DEFAULT_GAIN,
    ERROR_CLIP_HIGH,
    ERROR_CLIP_LOW,
    PIKLController,
    make_kl_controller,
)


def simulate(kind: str, beta: float, target: float, horizon: int, updates: int = 120, batch: int = 32,
             lag: float = 0.15, gain: float = DEFAULT_GAIN, noise: float = 0.0, seed: int = 0,
             step: float = math.inf) -> tuple[list[float], list[float]]:
    """A policy whose KL relaxes (``lag`` of the way per update, rising by at most ``step`` per update: the
    policy's step size) towards the optimum of E[r] - beta KL for a unit-Gaussian reward: the tilted policy,
    KL = 1 / (2 beta^2); each batch's KL is that times a mean-one log-normal factor of spread ``noise``. Returns
    the batch KL and the beta of every update."""
    rng = random.Random(seed)
    ctl = make_kl_controller(kind, beta, target, horizon, gain)  # type: ignore[arg-type]
    kl, kls, betas = 0.0, [], []
    for _ in range(updates):
        betas.append(ctl.value)
        kl += min(lag * (1.0 / (2.0 * ctl.value**2) - kl), step)
        seen = kl * math.exp(noise * rng.gauss(0.0, 1.0) - noise**2 / 2.0)
        kls.append(seen)
        ctl.update(seen, batch)
    return kls, betas


def second_half_error(kls: list[float], target: float) -> float:
    half = kls[len(kls) // 2:]
    return sum(half) / len(half) / target - 1.0


@pytest.mark.parametrize("target", [0.5, 4.0, 16.0])
@pytest.mark.parametrize("start", [0.1, 10.0], ids=["beta_10x_too_low", "beta_10x_too_high"])
def test_pi_reaches_the_target_from_far_off_where_ziegler_does_not(target: float, start: float) -> None:
    """With a batch KL as noisy as the runs' (a spread of 0.3), within the issue's 10% from either side. A start 10x
    too high is the slower one: each move of the integral sets off a new climb that holds it (conditional
    integration), so it comes down in steps."""
    beta_star = 1.0 / math.sqrt(2.0 * target)  # the beta that holds the target in this simulation
    for seed in (0, 1):
        kls, betas = simulate("pi", start * beta_star, target, horizon=200, noise=0.3, seed=seed)
        assert abs(second_half_error(kls, target)) < 0.10
        half = betas[len(betas) // 2:]  # each beta carries the proportional term's answer to one batch's noise
        assert math.exp(sum(map(math.log, half)) / len(half)) == pytest.approx(beta_star, rel=0.5)
    # Ziegler's at its project horizon moves beta by at most exp(0.2 * 3840 / 1000) ~ 2.2x: still far off
    kls, _ = simulate("adaptive", start * beta_star, target, horizon=1000)
    assert abs(second_half_error(kls, target)) > 0.5


def test_a_climb_limited_by_the_policys_step_does_not_wind_the_integral_into_an_overshoot() -> None:
    """The runs' failure before conditional integration: PPO climbs from KL 0 at a pace its step size sets, whatever
    beta is. Integrating that shortfall wound log beta down by several nats (PPO at target 16: beta 0.1 -> 3e-4)
    and the KL then overshot for the rest of the run. Here the KL may rise by at most 0.2 per update towards a
    target of 4, from a start near the beta that holds it; beta must stay within the proportional term's reach of
    its start during the climb, and the second half must hold the target."""
    beta_star = 1.0 / math.sqrt(2.0 * 4.0)
    kls, betas = simulate("pi", beta_star, 4.0, horizon=100, updates=60, step=0.2, lag=0.3, noise=0.2)
    climb = next(i for i, kl in enumerate(kls) if kl >= 4.0)
    assert climb > 15  # the step limit, not beta, sets the climb's length
    assert min(betas[:climb]) > 0.5 * beta_star * math.exp(-DEFAULT_GAIN * ERROR_CLIP_LOW)
    after = kls[climb:climb + 10]
    assert sum(after) / len(after) < 1.25 * 4.0
    assert abs(second_half_error(kls, 4.0)) < 0.10


def test_gain_is_per_episode_so_batch_size_does_not_change_the_trajectory_per_episode() -> None:
    """Two controllers that see the same KL per episode, one in batches of 64 and one in batches of 32 with each
    KL repeated, end at the same integral (the proportional term sees the same error either way)."""
    a, b = PIKLController(0.1, 4.0, 200), PIKLController(0.1, 4.0, 200)
    for kl in [0.5, 2.0, 9.0, 4.5, 3.0]:
        a.update(kl, 64)
        b.update(kl, 32)
        b.update(kl, 32)
    assert a.integral == pytest.approx(b.integral, rel=1e-12) and a.value == pytest.approx(b.value, rel=1e-12)


def test_the_arithmetic_mean_kl_settles_on_the_target_under_batch_noise() -> None:
    """The judged figure is the arithmetic mean of the batch KLs. A linear error averages zero there; a log error
    would settle on the geometric mean, leaving the arithmetic one ~noise^2 / 2 (8% at a spread of 0.4) above."""
    errors = [second_half_error(simulate("pi", 0.35, 4.0, horizon=200, updates=400, noise=0.4, seed=s)[0], 4.0)
              for s in range(4)]
    assert abs(sum(errors) / len(errors)) < 0.03, errors


def test_error_is_clipped_asymmetrically_and_takes_zero_or_negative_kl() -> None:
    up, down = PIKLController(0.1, 4.0, 100, gain=0.0), PIKLController(0.1, 4.0, 100, gain=0.0)
    up.update(6.0, 10)
    down.update(4.0, 10)  # on target: the climb is over, and the integral unmoved
    down.update(3.0, 10)  # linear in the KL: 1.5x and 0.75x the target pull by +0.5 and -0.25
    assert math.log(up.value / 0.1) == pytest.approx(0.5 * 10 / 100)
    assert math.log(down.value / 0.1) == pytest.approx(-0.25 * 10 / 100)
    for kl in (0.0, -0.3, 4e-9, 1.0):  # the first update (policy = reference), a negative k1 mean, under half
        ctl = PIKLController(0.1, 4.0, 100, gain=0.5)
        ctl.update(kl, 10)
        assert ctl.error == -ERROR_CLIP_LOW
        integrated = 10 / 100 if kl <= 0 else 0.0  # a first KL above 0 is a climb: left to the proportional term
        assert ctl.value == pytest.approx(0.1 * math.exp(-ERROR_CLIP_LOW * (0.5 + integrated)))
    far = PIKLController(0.1, 4.0, 100)
    far.update(4e6, 10)
    assert far.error == ERROR_CLIP_HIGH
    with pytest.raises(ValueError, match="non-finite KL"):
        far.update(float("nan"), 10)


def test_anti_windup_a_saturated_controller_comes_back_at_once() -> None:
    """A target the policy cannot reach drives beta to its floor; once the KL passes the target, beta leaves the
    floor on the next update instead of first unwinding an integral that kept growing while saturated."""
    ctl = PIKLController(0.1, 16.0, 100, gain=0.5)
    for _ in range(200):  # KL stuck at 1 for 200 x 32 episodes: an unclamped integral would reach -32
        ctl.update(1.0, 32)
    assert ctl.value == pytest.approx(BETA_MIN)
    assert ctl.log_beta0 + ctl.integral == pytest.approx(math.log(BETA_MIN))
    ctl.update(32.0, 32)  # KL now twice the target
    assert ctl.value > 2.0 * BETA_MIN
    for _ in range(200):
        ctl.update(1e6, 32)
    assert ctl.value == pytest.approx(BETA_MAX)
    ctl.update(1.0, 32)
    assert ctl.value < 0.7 * BETA_MAX


@pytest.mark.parametrize("beta", [0.0, 2 * BETA_MAX])
def test_pi_rejects_a_start_outside_its_bounds(beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        PIKLController(beta, 4.0, 100)


def test_pi_state_round_trips_through_json_exactly() -> None:
    ctl = make_kl_controller("pi", 0.1, 4.0, 250, gain=0.7)
    for kl in [0.0, 1.0, 9.0, 30.0, 3.3]:
        ctl.update(kl, 32)
    state = json.loads(json.dumps(ctl.state_dict()))
    other = make_kl_controller("pi", 0.7, 1.0, 5, gain=2.0)
    other.load_state_dict(state)
    assert other.state_dict() == ctl.state_dict()
    assert [other.update(k, 32) for k in (5.0, 2.0, 4.1)] == [ctl.update(k, 32) for k in (5.0, 2.0, 4.1)]
    with pytest.raises(ValueError, match="'pi'"):
        make_kl_controller("adaptive", 0.1, 4.0, 250).load_state_dict(state)


def test_initial_beta_prices_the_whole_budget_at_a_quarter_of_a_reward_standard_deviation() -> None:
    from calibrated_rlhf.core.kl_controller import PENALTY_AT_TARGET, initial_beta
    from calibrated_rlhf.core.ppo.config import PPOConfig
    from calibrated_rlhf.core.rl.config import RLConfig

    assert [initial_beta(t) * t for t in (0.5, 4.0, 16.0)] == pytest.approx([PENALTY_AT_TARGET] * 3)
    with pytest.raises(ValueError, match="kl_target > 0"):
        initial_beta(0.0)
    # beta: null in the parameters derives it from the target given, or from the config's default target
    assert PPOConfig(beta=None, kl_target=16.0).beta == pytest.approx(PENALTY_AT_TARGET / 16.0)
    assert PPOConfig(beta=None).beta == pytest.approx(PENALTY_AT_TARGET / PPOConfig().kl_target)
    assert RLConfig(beta=None, kl_target=0.5).beta == pytest.approx(PENALTY_AT_TARGET / 0.5)
    assert RLConfig(beta=0.3, kl_target=0.5).beta == 0.3  # a beta given is kept
    # a model that settles higher starts higher: penalty_at_target scales every target's start alike
    assert PPOConfig(beta=None, kl_target=4.0, penalty_at_target=0.75).beta == pytest.approx(0.1875)
    assert RLConfig(beta=None, kl_target=1.0, penalty_at_target=0.75).beta == pytest.approx(0.75)
    assert PPOConfig(beta=0.3, penalty_at_target=0.75).beta == 0.3
    with pytest.raises(ValueError, match="penalty_at_target > 0"):
        initial_beta(1.0, 0.0)
