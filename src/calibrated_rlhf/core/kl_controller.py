"""The KL-penalty controllers PPO, RLOO and GRPO share: PI on log beta (default), Ziegler's, fixed.

A controller is a plain object, free of any trainer: ``value`` is the KL weight to apply,
``update(kl, n_episodes)`` folds in one batch's KL, and ``state_dict()`` / ``load_state_dict()``
carry its state through checkpoints as a JSON-able dict. PPOTrainer drives it through exactly that
interface, and so does the TRL RLOO/GRPO callback (``core.rl.kl_control``)::

    ctl = make_kl_controller("pi", beta=0.1, kl_target=4.0, horizon=250)
    # at the end of each step, with the batch mean of each sequence's summed KL:
    trainer_args.beta = ctl.update(kl=mean_seq_kl, n_episodes=batch_size)

``horizon`` is one concept for both adaptive kinds: the episodes over which a sustained unit error moves
``log beta`` by one (Ziegler's ``beta *= 1 + err * n / horizon`` is ``log beta += err * n / horizon`` to first
order). Ziegler's error is ``kl / target - 1`` clipped to +-0.2, so over ``N`` episodes beta moves by at most
``exp(0.2 N / horizon)``: 1.5x over PPO's default run at horizon 1000, which is why targets far from where the
initial beta lands were missed. The PI controller keeps Ziegler's error but clips it to [-0.5, 1], so the same
horizon moves beta up to five times as far, and its proportional term answers a KL excursion at once instead of
after the integral has caught up.

Why the integral waits out the climb: every run starts at KL 0, and the policy's step size, not beta, limits how
fast its KL can rise. Integrating that shortfall wound log beta down by several nats while nothing answered (PPO
at a target of 16, horizon 100: beta 0.1 -> 3e-4, then KL 20-30 to the end), and the run then sat above its
target until the integral had climbed back, in the second half the target is judged on (PPO without the gate:
4.40 for 4, 0.575 for 0.5). So until the KL first reaches the target, a batch still rising above its trend moves
beta through the proportional term only (conditional integration); after that, every batch counts.

Why the start is ``initial_beta(kl_target)``: with the reward normalized, ``beta * kl`` is a penalty in reward
standard deviations, and the betas the controller settled at held ``beta * kl_target`` near 0.2-0.5 for every
target and method, so a start at 0.25 / kl_target leaves the integral a factor of about two to find instead of
the 50x a constant start missed by at the ends of the range.

Why the step moves too, during a slow climb (``climb_episodes``): a climb limited by the policy's step is one
beta cannot speed up (while the gate holds the integral, beta already sits at ``e^-1`` of its start, a penalty of a
few hundredths of a reward standard deviation). GRPO at a learning rate of 1e-4 was still climbing towards a
target of 4 at update 85 of 120, so the judged second half held the climb. A trainer that asks for it gets
``step_scale``, a factor on its learning rate: each update of the climb whose trend rises by less than
``kl_target * n_episodes / climb_episodes`` (the pace that reaches the target within ``climb_episodes``)
multiplies it by ``e^(n_episodes / climb_episodes)``, up to :data:`STEP_SCALE_MAX`. Once the KL has reached the
target, the scale stays where the climb left it: that is the step at which this policy answers at the asked
pace, and for GRPO, whose penalty acts through the same step, the step at which beta has authority. The budget
is a third of the run (conf/base: 1,200 of RLOO's and GRPO's 3,840 episodes), so the climb ends before the judged
second half. A tighter one misfires: every climb starts at KL 0 and its first updates rise slowly whatever the
step, so at 400 episodes the climbs to 8 and 16 at the default step counted as slow, ran at 1.4-1.8 times it, and
overshot (RLOO 6.91 for 8, 13.59 for 16; 7.55 and 15.70 at 1,200). Measured on GRPO at a target of 4 (seeds 0,
1): at 1e-4 the second-half KL went from 3.98 and 3.27 without the climb's step to 3.83 and 4.19 with it; at
3e-4 from 4.63 and 4.41 to 4.44 and 4.22.

Why the error is linear in the KL, not ``log(kl / target)``: the integral settles where the error averages zero
over the batches. With a linear error that is the arithmetic mean KL, the figure a target is judged by; with a
log error it is the geometric mean, below the arithmetic one by about half the squared coefficient of variation
of the batch KL (which is ~0.3-0.5 per batch of 32 here), so the KL would settle several percent above target. Why the
clip is asymmetric: every run starts at KL 0 whatever beta is (the policy is the reference), and a KL under
target rises by itself, pulled by the reward, while a KL over it falls only as fast as beta pushes it back. A
full -1 at the start lowered beta by e^-1.3 within five updates in the first trials and let GRPO run to KL 18
against a target of 4; counting anything below half the target as half halves the integral's drift there.
"""

from __future__ import annotations

import math
from typing import Any, Literal

KLControl = Literal["pi", "adaptive", "fixed"]

# The PI controller's bounds (normalized-reward units per nat). Below 1e-4 the penalty is nil against a unit-scale
# reward; above 1e2 the policy is pinned to the reference whatever the reward. Clamping log beta there (and the
# integral with it) keeps a target the policy cannot reach in the run (KL 16 at a small step) from winding the
# integral up so far that it takes the rest of the run to come back.
BETA_MIN, BETA_MAX = 1e-4, 1e2
# The error kl / target - 1 is clipped to [-ERROR_CLIP_LOW, ERROR_CLIP_HIGH]: a batch KL of 0 (the first
# updates, the policy still at the reference) or negative (k1's batch mean can be) counts as half the target, and
# 100x the target as twice it, no more.
ERROR_CLIP_LOW, ERROR_CLIP_HIGH = 0.5, 1.0
# Proportional gain: a KL twice the target (error 1) multiplies beta by e^gain at once. The policy's KL answers a
# change of beta only over several updates; a weak proportional term leaves the integral to do the work and it
# winds up over that lag: at gain 0.5 and horizon 200, RLOO at target 0.5 ran to KL 2.8, beta rose to 4 and the KL
# then fell to 0.001. A strong proportional term and an integral time of 5-10% of the run's episodes (conf/base:
# PPO 100 of 1,920, RLOO and GRPO 400 of 3,840) brake at once and leave the integral only the offset. PPO's is the
# shorter: its KL answers beta slowest (four small steps per batch), and at 200 one seed sat 12-13% over targets 1, 2
# for a whole second half while the integral caught up.
DEFAULT_GAIN = 2.0
# The penalty, in normalized-reward standard deviations, that the whole KL budget costs at the start (initial_beta).
PENALTY_AT_TARGET = 0.25
# Weight of the newest batch in the KL trend that the climb's conditional integration compares each batch with: about
# the last four updates, long enough to smooth one batch's noise, short enough to follow the climb from KL 0.
TREND_WEIGHT = 0.25
# How far above its trend a batch's KL must be to count as still climbing. PPO's climbs to targets 4 and 16 led their
# trend by 8-30%; a KL creeping towards a level short of the target leads by less and less, and integrates again.
CLIMB_LEAD = 0.05
# The step's range during a slow climb: tenfold takes a step of 1e-4 to the RL stage's default of 1e-3, and no
# further, so a policy that cannot climb at all (its reward flat) is not driven to a step that diverges.
STEP_SCALE_MAX = 10.0


def initial_beta(kl_target: float, penalty_at_target: float = PENALTY_AT_TARGET) -> float:
    """The starting KL weight for a target, in normalized-reward units per nat: ``penalty_at_target / kl_target``.

    With the reward normalized, ``beta * kl`` is a penalty in reward standard deviations, so the beta that holds a
    target scales as ``1 / kl_target``: on the default task the controllers settled at ``beta * kl_target`` of
    0.19-0.22 for PPO, 0.35-0.39 for RLOO and 0.53 for GRPO over targets 0.5 to 16. Starting at 0.25 of a
    standard deviation leaves the integral a factor of about two to find, where a constant start was off by up to
    50x at the ends of that range. A model whose policy moves further per update settles higher: SmolLM2-135M's PPO
    with LoRA held ``beta * kl_target`` at 0.4-1.2, and from 0.25 its KL overshot a target of 4 to 9.5 before beta
    caught up (conf/real_model sets 0.75). Refuses a target or a penalty that is not positive."""
    if not kl_target > 0:
        raise ValueError(f"an initial beta needs kl_target > 0, got {kl_target}")
    if not penalty_at_target > 0:
        raise ValueError(f"an initial beta needs penalty_at_target > 0, got {penalty_at_target}")
    return penalty_at_target / kl_target


def derive_beta(params: Any, default_target: float) -> Any:
    """Config data with ``beta: null`` given ``initial_beta`` of its ``kl_target`` (``default_target`` if absent) and
    its ``penalty_at_target`` (:data:`PENALTY_AT_TARGET` if absent)."""
    if isinstance(params, dict) and "beta" in params and params["beta"] is None:
        penalty = float(params.get("penalty_at_target", PENALTY_AT_TARGET))
        return {**params, "beta": initial_beta(float(params.get("kl_target", default_target)), penalty)}
    return params


class AdaptiveKLController:
    """Proportional controller of the KL weight (Ziegler et al. 2019, section 2.2).

    ``err = clip(kl / kl_target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + err * n / horizon)``, where
    ``kl`` is the batch mean of each sequence's summed per-token KL and ``n`` the episodes in it.
    """

    kind = "adaptive"
    step_scale = 1.0  # the factor on the trainer's learning rate; only the PI controller's climb moves it

    def __init__(self, beta: float, kl_target: float, horizon: int) -> None:
        self.beta = float(beta)
        self.kl_target = float(kl_target)
        self.horizon = int(horizon)
        self.steps = 0  # updates seen, kept for diagnostics and resume checks

    @property
    def value(self) -> float:
        """The KL weight to apply now (``beta``)."""
        return self.beta

    def update(self, kl: float, n_episodes: int) -> float:
        """Fold in one batch's KL; returns the new beta."""
        err = min(max(kl / self.kl_target - 1.0, -0.2), 0.2)
        self.beta = self.beta * (1.0 + err * n_episodes / self.horizon)
        self.steps += 1
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "beta": self.beta, "kl_target": self.kl_target,
                "horizon": self.horizon, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"controller state is for {state['kind']!r}, not {self.kind!r}")
        self.beta = float(state["beta"])
        self.kl_target = float(state["kl_target"])
        self.horizon = int(state["horizon"])
        self.steps = int(state["steps"])


class FixedKLController(AdaptiveKLController):
    """Constant beta; still counts steps so checkpoints look alike."""

    kind = "fixed"

    def update(self, kl: float, n_episodes: int) -> float:
        self.steps += 1
        return self.beta


class PIKLController(AdaptiveKLController):
    """Proportional-integral control of ``log beta`` on the error ``e = clip(kl / kl_target - 1, -0.5, 1)``::

        integral <- clamp(integral + e * n / horizon)          # per episode: batch-size independent
        log beta  = clamp(log beta_0 + integral + gain * e)    # to [log BETA_MIN, log BETA_MAX]

    The integral is dual ascent on the constraint KL = target (the Lagrangian view of beta); it alone removes
    a steady-state error. Until the KL first reaches the target, a batch more than ``CLIMB_LEAD`` above the KL's
    trend (an exponential average of weight ``TREND_WEIGHT``) leaves the integral where it is (module docstring).
    Anti-windup: the integral is clamped so ``log beta_0 + integral`` stays inside the beta bounds, so a
    saturated controller comes back as soon as the error changes sign. ``climb_episodes`` (None: off) lets a slow
    climb raise :attr:`step_scale`, the factor the trainer puts on its learning rate (module docstring). A KL that
    is not finite is an error: the trainer's own checks stop a diverged run before its KL reaches the controller.
    """

    kind = "pi"

    def __init__(self, beta: float, kl_target: float, horizon: int, gain: float = DEFAULT_GAIN,
                 climb_episodes: int | None = None) -> None:
        if not BETA_MIN <= beta <= BETA_MAX:
            raise ValueError(f"pi KL control needs {BETA_MIN:g} <= beta <= {BETA_MAX:g}, got {beta}")
        if gain < 0:
            raise ValueError(f"pi KL control needs gain >= 0, got {gain}")
        if climb_episodes is not None and climb_episodes <= 0:
            raise ValueError(f"pi KL control needs climb_episodes > 0 or None, got {climb_episodes}")
        super().__init__(beta, kl_target, horizon)
        self.gain = float(gain)
        self.log_beta0 = math.log(self.beta)
        self.integral = 0.0
        self.error = 0.0  # the last update's clipped error, kept for diagnostics
        self.kl_trend = 0.0  # moving average of the batch KL; 0 is the KL of the reference the run starts at
        self.reached = False  # whether a batch's KL has reached the target yet (the climb is over)
        self.climb_episodes = None if climb_episodes is None else int(climb_episodes)
        self.step_scale = 1.0

    def update(self, kl: float, n_episodes: int) -> float:
        if not math.isfinite(kl):
            raise ValueError(f"pi KL control got a non-finite KL ({kl}) at update {self.steps + 1}")
        lo, hi = math.log(BETA_MIN), math.log(BETA_MAX)
        e = min(max(kl / self.kl_target - 1.0, -ERROR_CLIP_LOW), ERROR_CLIP_HIGH)
        # Conditional integration during the climb (module docstring): until the KL first reaches the target, a batch
        # more than CLIMB_LEAD above its trend is still rising at the pace the policy's step allows, and the integral
        # waits. After the first crossing every batch counts: gating there would hold the KL on whichever side of
        # the target it sat, since the integral's fixed point is mean KL = target only when every batch counts.
        self.reached = self.reached or kl >= self.kl_target
        heading_for_target = not self.reached and kl > self.kl_trend * (1.0 + CLIMB_LEAD)
        if not heading_for_target:
            self.integral = min(max(self.integral + e * n_episodes / self.horizon, lo - self.log_beta0),
                                hi - self.log_beta0)
        rise = TREND_WEIGHT * (kl - self.kl_trend)
        self.kl_trend += rise
        if self.climb_episodes is not None and not self.reached:
            pace = n_episodes / self.climb_episodes  # of the climb budget this batch spent
            if rise < self.kl_target * pace:
                self.step_scale = min(self.step_scale * math.exp(pace), STEP_SCALE_MAX)
        self.beta = math.exp(min(max(self.log_beta0 + self.integral + self.gain * e, lo), hi))
        self.error = e
        self.steps += 1
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "gain": self.gain, "log_beta0": self.log_beta0, "integral": self.integral,
                "error": self.error, "kl_trend": self.kl_trend, "reached": self.reached,
                "climb_episodes": self.climb_episodes, "step_scale": self.step_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.gain = float(state["gain"])
        self.log_beta0 = float(state["log_beta0"])
        self.integral = float(state["integral"])
        self.error = float(state["error"])
        # a checkpoint from before the climb's gate integrated every batch, as this controller does once past it
        self.kl_trend = float(state.get("kl_trend", 0.0))
        self.reached = bool(state.get("reached", True))
        # a checkpoint from before the climb's step control ran without it
        self.climb_episodes = state.get("climb_episodes")
        self.step_scale = float(state.get("step_scale", 1.0))


def make_kl_controller(kind: KLControl, beta: float, kl_target: float, horizon: int, gain: float = DEFAULT_GAIN,
                       climb_episodes: int | None = None) -> AdaptiveKLController:
    """Controller for ``PPOConfig.kl_control`` / ``RLConfig.kl_control``; ``gain`` and ``climb_episodes`` are the PI
    controller's (the others keep a step scale of one)."""
    if kind == "pi":
        return PIKLController(beta, kl_target, horizon, gain, climb_episodes)
    if kind == "adaptive":
        return AdaptiveKLController(beta, kl_target, horizon)
    if kind == "fixed":
        return FixedKLController(beta, kl_target, horizon)
    raise ValueError(f"unknown kl_control {kind!r}")
