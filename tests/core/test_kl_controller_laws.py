"""The KL controllers' update laws, written out independently, and their state through a checkpoint."""

import math

import pytest
import torch

from calibrated_rlhf.core.kl_controller import (STEP_SCALE_MAX, AdaptiveKLController, FixedKLController, PIKLController,
                                                make_kl_controller)
from calibrated_rlhf.core.kl import kl_per_token


def test_ziegler_update_is_the_clipped_proportional_law():
    ctl = AdaptiveKLController(beta=0.1, kl_target=4.0, horizon=1000)
    assert ctl.update(kl=4.4, n_episodes=100) == pytest.approx(0.1 * (1 + 0.1 * 0.1))  # err 0.1, inside the clip
    assert ctl.update(kl=40.0, n_episodes=100) == pytest.approx(0.1 * 1.01 * (1 + 0.2 * 0.1))  # err clipped at 0.2
    assert ctl.steps == 2


def test_ziegler_lowers_beta_below_target_and_clips_at_minus_0_2():
    ctl = AdaptiveKLController(beta=1.0, kl_target=4.0, horizon=100)
    assert ctl.update(kl=3.6, n_episodes=10) == pytest.approx(1.0 * (1 - 0.1 * 0.1))
    assert ctl.update(kl=0.0, n_episodes=50) == pytest.approx(0.99 * (1 - 0.2 * 0.5))
    assert ctl.update(kl=4.0, n_episodes=50) == pytest.approx(0.99 * 0.9)  # on target: unchanged
    assert ctl.value == ctl.beta and ctl.steps == 3


def test_fixed_controller_counts_steps_and_never_moves():
    ctl = FixedKLController(beta=0.3, kl_target=1.0, horizon=10)
    for kl in (0.0, 100.0, -5.0):
        assert ctl.update(kl=kl, n_episodes=64) == 0.3
    assert ctl.steps == 3 and ctl.value == 0.3
    assert ctl.state_dict() == {"kind": "fixed", "beta": 0.3, "kl_target": 1.0, "horizon": 10, "steps": 3}


def _pi_by_hand(beta0, target, horizon, gain, kls, n):
    lo, hi = math.log(1e-4), math.log(1e2)
    integral, trend, reached, betas, errors = 0.0, 0.0, False, [], []
    for kl in kls:
        e = min(max(kl / target - 1.0, -0.5), 1.0)
        reached = reached or kl >= target
        if reached or kl <= trend * 1.05:  # during the climb a batch above the KL's trend leaves the integral alone
            integral = min(max(integral + e * n / horizon, lo - math.log(beta0)), hi - math.log(beta0))
        trend += 0.25 * (kl - trend)
        betas.append(math.exp(min(max(math.log(beta0) + integral + gain * e, lo), hi)))
        errors.append(e)
    return betas, integral, errors


@pytest.mark.parametrize("gain", [0.0, 0.7, 2.0])
def test_pi_update_is_the_clamped_proportional_integral_law(gain):
    # the climb (rising: 1, 3; falling back: 0.2), the first crossing (5), then every batch integrates (2.5, 2.5)
    kls = [0.0, 1.0, 3.0, 0.2, 5.0, 9.0, 400.0, 4.0, -2.0, 2.5, 2.5]
    ctl = PIKLController(beta=0.05, kl_target=4.0, horizon=200, gain=gain)
    want, integral, errors = _pi_by_hand(0.05, 4.0, 200, gain, kls, n=32)
    got = [ctl.update(kl=kl, n_episodes=32) for kl in kls]
    assert got == pytest.approx(want, rel=1e-12)
    assert ctl.integral == pytest.approx(integral, rel=1e-12) and ctl.error == errors[-1]
    assert ctl.steps == len(kls) and ctl.value == got[-1]


def test_pi_saturates_at_its_bounds_and_comes_back_when_the_error_turns():
    hi = PIKLController(beta=50.0, kl_target=1.0, horizon=10, gain=1.0)
    for _ in range(20):
        beta = hi.update(kl=100.0, n_episodes=10)
    assert beta == pytest.approx(100.0) and hi.integral == pytest.approx(math.log(100.0) - math.log(50.0))
    assert hi.update(kl=0.0, n_episodes=10) < 100.0 * math.exp(-0.5)  # the integral did not wind up past the bound
    lo = PIKLController(beta=2e-4, kl_target=1.0, horizon=10, gain=1.0)
    for _ in range(20):
        beta = lo.update(kl=0.0, n_episodes=10)
    assert beta == pytest.approx(1e-4) and lo.integral == pytest.approx(math.log(1e-4) - math.log(2e-4))
    assert lo.update(kl=3.0, n_episodes=10) > 1e-4 * math.exp(1.0)


def test_pi_accepts_the_edges_of_its_range_and_refuses_beyond():
    assert PIKLController(beta=1e-4, kl_target=1.0, horizon=10).value == 1e-4
    assert PIKLController(beta=1e2, kl_target=1.0, horizon=10, gain=0.0).value == 1e2
    with pytest.raises(ValueError, match=r"^pi KL control needs 0\.0001 <= beta <= 100, got 5e-05$"):
        PIKLController(beta=5e-5, kl_target=1.0, horizon=10)
    with pytest.raises(ValueError, match=r"^pi KL control needs 0\.0001 <= beta <= 100, got 101$"):
        PIKLController(beta=101, kl_target=1.0, horizon=10)
    with pytest.raises(ValueError, match=r"^pi KL control needs gain >= 0, got -0\.1$"):
        PIKLController(beta=0.1, kl_target=1.0, horizon=10, gain=-0.1)


def test_pi_refuses_a_non_finite_kl_naming_the_update():
    ctl = PIKLController(beta=0.1, kl_target=1.0, horizon=10)
    ctl.update(kl=1.0, n_episodes=4)
    with pytest.raises(ValueError, match=r"^pi KL control got a non-finite KL \(nan\) at update 2$"):
        ctl.update(kl=math.nan, n_episodes=4)
    with pytest.raises(ValueError, match=r"non-finite KL \(inf\)"):
        ctl.update(kl=math.inf, n_episodes=4)
    assert ctl.steps == 1


def test_pi_state_resumes_the_same_trajectory():
    a = PIKLController(beta=0.2, kl_target=2.0, horizon=50, gain=1.5)
    assert a.state_dict() == {"kind": "pi", "beta": 0.2, "kl_target": 2.0, "horizon": 50, "steps": 0, "gain": 1.5,
                              "log_beta0": math.log(0.2), "integral": 0.0, "error": 0.0, "kl_trend": 0.0,
                              "reached": False, "climb_episodes": None, "step_scale": 1.0}  # nothing seen yet
    for kl in (0.5, 1.5):  # still climbing: the trend and the not-yet-reached flag decide the next integration
        a.update(kl=kl, n_episodes=16)
    state = a.state_dict()
    assert state["reached"] is False and state["kl_trend"] == pytest.approx(0.25 * 0.5 + 0.25 * (1.5 - 0.125))
    assert state["kind"] == "pi" and state["gain"] == 1.5 and state["steps"] == 2
    assert state["log_beta0"] == pytest.approx(math.log(0.2)) and state["error"] == a.error
    b = PIKLController(beta=1.0, kl_target=9.0, horizon=7, gain=0.0)
    b.load_state_dict(state)
    assert b.state_dict() == state
    for kl in (1.9, 0.1, 2.5, 0.0):
        assert b.update(kl=kl, n_episodes=16) == a.update(kl=kl, n_episodes=16)
    assert b.state_dict() == a.state_dict() and a.reached
    # past the first crossing, a batch under the target that leads its trend still integrates: only if the flag
    # came back with the state does a restored controller do the same
    c = PIKLController(beta=1.0, kl_target=9.0, horizon=7, gain=0.0)
    c.load_state_dict(a.state_dict())
    assert 1.05 * a.kl_trend < 1.9 < a.kl_target
    assert c.update(kl=1.9, n_episodes=16) == a.update(kl=1.9, n_episodes=16) and c.integral == a.integral


def test_adaptive_state_resumes_and_a_foreign_kind_is_refused():
    a = AdaptiveKLController(beta=0.1, kl_target=3.0, horizon=500)
    a.update(kl=5.0, n_episodes=64)
    b = AdaptiveKLController(beta=9.0, kl_target=1.0, horizon=1)
    b.load_state_dict(a.state_dict())
    assert (b.beta, b.kl_target, b.horizon, b.steps) == (a.beta, 3.0, 500, 1)
    assert b.update(kl=2.0, n_episodes=64) == a.update(kl=2.0, n_episodes=64)
    legacy = {k: v for k, v in a.state_dict().items() if k != "kind"}  # a checkpoint from before "kind"
    AdaptiveKLController(1.0, 1.0, 1).load_state_dict(legacy)
    with pytest.raises(ValueError, match=r"^controller state is for 'pi', not 'adaptive'$"):
        AdaptiveKLController(1.0, 1.0, 1).load_state_dict({**a.state_dict(), "kind": "pi"})
    with pytest.raises(ValueError, match=r"^controller state is for 'adaptive', not 'pi'$"):
        PIKLController(0.1, 1.0, 1).load_state_dict(a.state_dict())


def test_make_kl_controller_builds_each_kind_with_its_settings():
    pi = make_kl_controller("pi", beta=0.2, kl_target=3.0, horizon=40, gain=0.5)
    assert isinstance(pi, PIKLController) and (pi.beta, pi.kl_target, pi.horizon, pi.gain) == (0.2, 3.0, 40, 0.5)
    assert make_kl_controller("pi", 0.2, 3.0, 40).gain == 2.0
    ad = make_kl_controller("adaptive", 0.2, 3.0, 40)
    assert type(ad) is AdaptiveKLController and (ad.beta, ad.kl_target, ad.horizon) == (0.2, 3.0, 40)
    fx = make_kl_controller("fixed", 0.2, 3.0, 40)
    assert type(fx) is FixedKLController and (fx.beta, fx.kl_target, fx.horizon) == (0.2, 3.0, 40)
    with pytest.raises(ValueError, match=r"^unknown kl_control 'ziegler'$"):
        make_kl_controller("ziegler", 0.2, 3.0, 40)


def test_k3_estimator_is_r_minus_1_minus_log_r():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    r = torch.exp(ref - logp)
    torch.testing.assert_close(kl_per_token(logp, ref, "k3"), (r - 1) - torch.log(r))
    torch.testing.assert_close(kl_per_token(logp, ref), logp - ref)
    with pytest.raises(ValueError, match=r"^unknown KL estimator 'k2'$"):
        kl_per_token(logp, ref, "k2")


def test_a_pi_checkpoint_from_before_the_climb_gate_resumes_integrating_every_batch():
    """A PI state saved before the controller kept a KL trend and a first-crossing flag loads as past the climb,
    which is how that controller treated every batch."""
    old = PIKLController(beta=0.2, kl_target=2.0, horizon=50)
    old.update(kl=3.0, n_episodes=16)
    state = {k: v for k, v in old.state_dict().items() if k not in ("kl_trend", "reached")}
    ctl = PIKLController(beta=1.0, kl_target=9.0, horizon=7)
    ctl.load_state_dict(state)
    assert ctl.reached and ctl.kl_trend == 0.0
    integral = ctl.integral
    ctl.update(kl=1.0, n_episodes=16)  # under the target and above the trend: integrated, as before the gate
    assert ctl.integral == pytest.approx(integral + (1.0 / 2.0 - 1.0) * 16 / 50)


def test_a_slow_climb_raises_the_step_until_the_target_is_reached():
    """``climb_episodes``: each update whose KL trend rises by less than ``kl_target * n / climb_episodes``
    multiplies ``step_scale`` by ``e^(n / climb_episodes)``; a climb at that pace, or one that has reached the
    target, leaves it; it never passes STEP_SCALE_MAX; and it rides with the state through a resume."""
    ctl = PIKLController(beta=0.1, kl_target=4.0, horizon=100, climb_episodes=100)
    ctl.update(kl=0.2, n_episodes=25)  # trend rise 0.05 < 4 * 25 / 100 = 1: slow
    assert ctl.step_scale == pytest.approx(math.exp(0.25))
    ctl.update(kl=0.4, n_episodes=25)  # rise 0.25 * (0.4 - 0.05) = 0.0875: slow
    assert ctl.step_scale == pytest.approx(math.exp(0.5))
    ctl.update(kl=8.0, n_episodes=25)  # rise 1.9 >= 1: at pace, and the target is reached
    assert ctl.step_scale == pytest.approx(math.exp(0.5)) and ctl.reached
    ctl.update(kl=0.1, n_episodes=25)  # past the first crossing the step stays where the climb left it
    assert ctl.step_scale == pytest.approx(math.exp(0.5))

    stuck = PIKLController(beta=0.1, kl_target=4.0, horizon=100, climb_episodes=100)
    for _ in range(20):  # a policy that never climbs: the scale stops at the bound
        stuck.update(kl=0.0, n_episodes=25)
    assert stuck.step_scale == STEP_SCALE_MAX == 10.0

    fast = PIKLController(beta=0.1, kl_target=10.0, horizon=100, climb_episodes=250)
    plain = PIKLController(beta=0.1, kl_target=10.0, horizon=100)
    off = PIKLController(beta=0.1, kl_target=4.0, horizon=100)
    for kl in (5.0, 9.0):  # trend rises 1.25, then 1.94: at least 10 * 25 / 250, and still short of the target
        fast.update(kl=kl, n_episodes=25)
        plain.update(kl=kl, n_episodes=25)
        off.update(kl=0.0, n_episodes=25)
    assert not fast.reached and fast.step_scale == off.step_scale == 1.0
    assert fast.beta == plain.beta and fast.integral == plain.integral  # the step leaves beta alone
    for other in (AdaptiveKLController(0.1, 4.0, 100), FixedKLController(0.1, 4.0, 100)):
        other.update(kl=0.0, n_episodes=25)
        assert other.step_scale == 1.0

    a = PIKLController(beta=0.1, kl_target=4.0, horizon=100, climb_episodes=50)
    a.update(kl=0.3, n_episodes=25)
    b = PIKLController(beta=0.1, kl_target=4.0, horizon=100)
    b.load_state_dict(a.state_dict())
    for kl in (0.5, 0.6, 5.0, 1.0):
        a.update(kl=kl, n_episodes=25)
        b.update(kl=kl, n_episodes=25)
        assert b.step_scale == a.step_scale
    assert a.step_scale == pytest.approx(math.exp(1.5))  # three slow updates of half the budget each
    with pytest.raises(ValueError, match=r"^pi KL control needs climb_episodes > 0 or None, got 0$"):
        PIKLController(beta=0.1, kl_target=1.0, horizon=10, climb_episodes=0)
