"""The hyperparameters of an RLOO or GRPO run (TRL's trainers), named as PPO's where the concept is PPO's."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from calibrated_rlhf.core.fitted_warning import FittedWarningField
from calibrated_rlhf.core.kl_controller import derive_beta
from calibrated_rlhf.core.lora import LoraParams

RLAlgorithm = Literal["rloo", "grpo"]


class RLConfig(BaseModel):
    """What :func:`calibrated_rlhf.core.rl.trainers.build_trainer` hands to TRL's ``RLOOConfig`` / ``GRPOConfig``.

    ``beta`` is in the units of the optimized reward per nat, as PPO's: with the frozen z-score, normalized
    reward units. RLOO subtracts ``beta`` times each sequence's k1 KL from its reward (Ziegler et al.); GRPO
    adds ``beta`` times the per-token k3 KL to its loss.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt key must fail, not leave the default in force

    algorithm: RLAlgorithm = Field("rloo", description="rloo (TRL RLOOTrainer) | grpo (TRL GRPOTrainer).")
    seed: int = Field(0, description="Seed of the prompt order, sampling and initialization.")
    num_updates: int = Field(120, gt=0, description="Optimizer steps (one generation batch each).")
    batch_size: int = Field(32, gt=0, description="Completions per update and process; a multiple of num_generations.")
    num_generations: int = Field(4, ge=2, description="Completions per prompt: the group (GRPO) or the "
                                 "leave-one-out baseline's (RLOO).")
    response_length: int = Field(24, gt=0, description="Maximum new tokens sampled per completion.")
    sampling_temperature: float = Field(1.0, gt=0, description="Temperature of the policy's sampling.")
    learning_rate: float = Field(
        1e-3, gt=0, description="AdamW learning rate, shaped by lr_schedule and a slow climb's step "
        "(kl_climb_episodes). One pass per batch (PPO takes four) needs a larger step than PPO's to reach a KL target.")
    lr_schedule: Literal["linear", "constant"] = Field(
        "linear", description="The learning rate over the run: linear (decay to zero, TRL's default) or constant. "
        "Held KL needs a step that still answers beta in the second half, where a target is judged: conf/base "
        "sets constant.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    num_iterations: int = Field(1, gt=0, description="Optimization passes over each generation batch.")
    epsilon: float = Field(0.2, gt=0, description="Clip range of the importance ratio.")
    kl_control: Literal["pi", "adaptive", "fixed"] = Field(
        "adaptive", description="pi / adaptive: the project's controller (PPO's, core.kl_controller: PI on log beta "
        "or Ziegler's) sets beta after each update from the per-sequence KL; fixed: beta stays as given (TRL's own "
        "behaviour).")
    beta: float = Field(0.1, gt=0, description="Initial KL weight, in optimized-reward units per nat; "
                        "null: core.kl_controller.initial_beta: penalty_at_target / kl_target.")
    penalty_at_target: float = Field(
        0.25, gt=0, description="beta: null starts at this penalty, in reward standard deviations, for a KL at "
        "target: 0.25 on the default task, where the controller settles at 0.2-0.5; a model whose KL answers beta "
        "late wants a start near where it settles (conf/real_model: 0.75).")
    kl_target: float = Field(4.0, gt=0, description="Per-sequence KL target of the controller, nats.")
    kl_horizon: int = Field(1000, gt=0, description="Controller horizon, episodes (the integral time of pi).")
    kl_gain: float = Field(2.0, ge=0, description="pi only: proportional gain on the error kl / kl_target - 1.")
    kl_climb_episodes: int | None = Field(
        None, gt=0, description="pi only: a climb to the target slower than kl_target per this many episodes raises "
        "the learning rate, up to tenfold (core.kl_controller: step_scale); null: the step stays as given.")
    kl_bias_correction: bool | None = Field(
        None, description="GRPO: TRL's use_bias_correction_kl; null = TRL's default (true). true weighs the KL term's "
        "gradient by log(pi / pi_ref), whose mean under the policy is the KL itself: a score-function gradient "
        "without a baseline, whose noise grows with beta (GRPO's KL rose from 0.5 to 2 as beta climbed to 80); "
        "false weighs it by 1 - pi_ref / pi, whose mean is zero, and held a target of 0.5 (conf/base). RLOO's KL "
        "is in its reward, with nothing to correct: null or false.")
    scale_rewards: Literal["group", "batch", "none"] | None = Field(
        None, description="GRPO: divide rewards by the group's (group), the batch's (batch) or no (none) standard "
        "deviation; null = TRL's default (group). Group and batch cancel the temperature and z-score, and put the "
        "advantages, and so beta, in units of a standard deviation that moves with the group; none keeps them in "
        "normalized-reward units, as RLOO's and PPO's (conf/base). RLOO divides by nothing: null or none.")
    normalize_advantages: bool | None = Field(
        None, description="RLOO only: whiten the advantages over the batch; null = TRL's default (off).")
    fitted_warning: FittedWarningField = Field(
        None, description="A fitted warning's JSON path (core.fitted_warning; the over-optimization report writes one "
        "for its own task), read when the config is built: stop after the update whose score over the run's signals "
        "and settings exceeds its threshold, keeping that update's checkpoint. A model of the runs it was fitted "
        "on (PPO and RLOO; GRPO reads as RLOO): fit one on a pilot with known gold before trusting it; None = off.",
    )
    lora: LoraParams | None = Field(
        None, description="LoRA adapters instead of a full fine-tune (TRL's reference is then the policy with its "
        "adapters off: no second model); the trained policy is merged. null trains every weight.")

    @model_validator(mode="before")
    @classmethod
    def _derived_beta(cls, data: Any) -> Any:  # beta: null -> initial_beta(kl_target)
        return derive_beta(data, cls.model_fields["kl_target"].default)

    @model_validator(mode="after")
    def _consistent(self) -> "RLConfig":
        if self.batch_size % self.num_generations:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of num_generations "
                             f"({self.num_generations})")
        if self.algorithm != "grpo" and self.kl_bias_correction:
            raise ValueError(f"kl_bias_correction is GRPO's; algorithm is {self.algorithm!r}: leave it null or false")
        # "none" is what RLOO does (no reward is divided by a standard deviation), so one config serves both
        if self.algorithm != "grpo" and self.scale_rewards not in (None, "none"):
            raise ValueError(f"scale_rewards is GRPO's; algorithm is {self.algorithm!r}: leave it null or none")
        if self.algorithm != "rloo" and self.normalize_advantages is not None:
            raise ValueError(f"normalize_advantages is RLOO's; algorithm is {self.algorithm!r}: leave it null")
        return self

    @property
    def episodes_per_update(self) -> int:
        """Completions one update trains on, per process (new ones when ``num_iterations`` is 1)."""
        return self.batch_size
