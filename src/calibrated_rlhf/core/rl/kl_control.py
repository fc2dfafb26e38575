"""The project's KL controller driving a TRL trainer's ``beta`` (RLOO, GRPO) as a ``TrainerCallback``.

TRL's RLOO and GRPO read ``trainer.beta`` on every batch and log ``kl``, a per-token mean over the
completions of the logged steps. The controller (``core.kl_controller``, the one PPO uses) expects the batch
mean of each sequence's summed KL: ``kl * completions/mean_length`` is that, exactly for one process.

The callback's state (the controller's and the last step it saw) goes into every checkpoint through
transformers' ``ExportableState``; with ``restore_callback_states_from_checkpoint=True`` transformers
rebuilds the callback from that state on resume, without the trainer, so :func:`attach_kl_control` adds a
second, stateless callback that binds whichever KL callback is registered to the trainer at train start.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from calibrated_rlhf.core.kl_controller import DEFAULT_GAIN, AdaptiveKLController, KLControl, make_kl_controller

# What TRL's RLOO and GRPO trainers log (per-token mean KL, mean completion length in tokens).
TRL_KL = "kl"
TRL_MEAN_LENGTH = "completions/mean_length"
# What the callback adds to each record: the per-sequence KL, the beta the step used, the next beta.
SEQUENCE_KL = "kl_sequence"
BETA = "beta"
BETA_NEXT = "beta_next"


def sequence_kl(logs: dict[str, Any]) -> float | None:
    """The batch mean of per-sequence KL from one TRL log record; None when it carries no KL."""
    kl, length = logs.get(TRL_KL), logs.get(TRL_MEAN_LENGTH)
    if kl is None or length is None:
        return None
    return float(kl) * float(length)


class KLControlCallback(TrainerCallback, ExportableState):
    """Sets ``trainer.beta`` from the controller after each logged step (and at train start, so a resumed
    run continues with the beta it had). ``episodes_per_step``: completions trained on per optimizer step.
    ``reward_scale``: the optimized reward's scale when it is not normalized (``RewardTransform.scale_of``):
    the trainer applies ``beta * reward_scale``, as PPO does, so one ``beta`` means the same across reward
    models; ``beta`` itself, in normalized-reward units, is what the controller moves and the log shows.

    ``climb_episodes``: the PI controller's climb pace (``core.kl_controller``); its ``step_scale`` multiplies the
    trainer's learning-rate schedule (:func:`scale_step`).

    Register it before the callbacks that record logs: it adds :data:`SEQUENCE_KL`, :data:`BETA` and
    :data:`BETA_NEXT` to each record that carries a KL."""

    def __init__(self, kind: KLControl = "adaptive", beta: float = 0.05, kl_target: float = 4.0,
                 horizon: int = 1000, episodes_per_step: int = 1, reward_scale: float = 1.0,
                 controller_state: dict | None = None, last_step: int = 0, gain: float = DEFAULT_GAIN,
                 climb_episodes: int | None = None) -> None:
        if beta <= 0:
            # TRL loads no reference model when beta starts at 0, and a multiplicative controller never leaves 0
            raise ValueError(f"KL control needs beta > 0, got {beta}")
        self.kind, self.init_beta, self.kl_target, self.horizon = kind, float(beta), float(kl_target), int(horizon)
        self.episodes_per_step = int(episodes_per_step)
        self.reward_scale = float(reward_scale)
        self.gain = float(gain)
        self.climb_episodes = climb_episodes
        self.controller: AdaptiveKLController = make_kl_controller(kind, beta, kl_target, horizon, gain,
                                                                   climb_episodes)
        if controller_state is not None:
            self.controller.load_state_dict(controller_state)
        self.last_step = int(last_step)
        self.trainer: Any = None

    @property
    def beta(self) -> float:
        return self.controller.value

    def bind(self, trainer: Any) -> None:
        self.trainer = trainer
        trainer.beta = self.controller.value * self.reward_scale
        scale_step(trainer, self.controller.step_scale)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        kl = sequence_kl(logs or {})
        if kl is None or state.global_step <= self.last_step:
            return
        applied = self.controller.value
        n = self.episodes_per_step * (state.global_step - self.last_step)
        self.last_step = int(state.global_step)
        new = self.controller.update(kl, n)
        if self.trainer is not None:
            self.trainer.beta = new * self.reward_scale
            scale_step(self.trainer, self.controller.step_scale)
        # into the record itself, so the callbacks after this one (history, trackers) log them with the KL
        logs.update({SEQUENCE_KL: kl, BETA: applied, BETA_NEXT: new})

    def state(self) -> dict:
        # the controller's state rides as an __init__ argument: transformers rebuilds the callback with it
        return {"args": {"kind": self.kind, "beta": self.init_beta, "kl_target": self.kl_target,
                         "horizon": self.horizon, "episodes_per_step": self.episodes_per_step,
                         "reward_scale": self.reward_scale, "gain": self.gain,
                         "climb_episodes": self.climb_episodes,
                         "controller_state": self.controller.state_dict(), "last_step": self.last_step},
                "attributes": {}}


def scale_step(trainer: Any, scale: float) -> None:
    """From the next optimizer step on, the trainer's learning rate is ``scale`` times its schedule's. Setting it
    twice gives the same rates, so a resumed run whose scheduler state carries a scaled base gets them too: the
    scale multiplies each group's ``initial_lr``, which the scheduler set once and the optimizer's state keeps.
    Before the trainer has built its optimizer (a bind ahead of ``train``) there is nothing to scale."""
    optimizer, scheduler = getattr(trainer, "optimizer", None), getattr(trainer, "lr_scheduler", None)
    if optimizer is None or scheduler is None:
        return
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper, where there is one
    for i, group in enumerate(optimizer.param_groups):
        scheduler.base_lrs[i] = group["initial_lr"] * scale
        group["lr"] = scheduler.base_lrs[i] * scheduler.lr_lambdas[i](scheduler.last_epoch)
    # the trainer logs get_last_lr() as the rate of the coming step: without this it would show the old scale
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


class _BindKLControl(TrainerCallback):
    """Binds the registered :class:`KLControlCallback` (the restored one after a resume) to the trainer."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        callbacks = self.trainer.callback_handler.callbacks
        kl = kl_callback(self.trainer)
        kl.bind(self.trainer)
        # A restored callback is appended last; put it back right after this one, before the recorders
        # (the list is being walked: moving a later item forward keeps every callback visited once).
        callbacks.remove(kl)
        callbacks.insert(callbacks.index(self) + 1, kl)


def attach_kl_control(trainer: Any, callback: KLControlCallback) -> KLControlCallback:
    """Register ``callback`` on a TRL RLOO/GRPO trainer; ``trainer.beta`` follows it from now on."""
    if not trainer.args.restore_callback_states_from_checkpoint:
        raise ValueError("KL control needs restore_callback_states_from_checkpoint=True in the trainer's config, "
                         "or a resumed run would restart the controller")
    trainer.add_callback(_BindKLControl(trainer))
    trainer.add_callback(callback)
    callback.bind(trainer)
    return callback


def kl_callback(trainer: Any) -> KLControlCallback:
    """The KL callback registered on ``trainer`` now (after a resume, the restored one)."""
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, KLControlCallback)]
    if len(found) != 1:
        raise ValueError(f"expected one KLControlCallback on the trainer, found {len(found)}")
    return found[0]
