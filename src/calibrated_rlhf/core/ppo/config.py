"""Every PPO hyperparameter in one typed, validated, documented model."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from calibrated_rlhf.core.fitted_warning import FittedWarningField
from calibrated_rlhf.core.kl_controller import derive_beta
from calibrated_rlhf.core.lora import LoraParams
from calibrated_rlhf.core.speed.config import PPOSpeed


class PPOConfig(BaseModel):
    """Hyperparameters of :class:`~calibrated_rlhf.core.ppo.trainer.PPOTrainer`.

    Reward units: ``beta`` and ``missing_eos_penalty`` are expressed in *normalized-reward* units.
    When the score fed to the trainer is not normalized, set ``reward_scale`` to the scale of that
    score (e.g. its standard deviation): the KL weight actually applied is ``beta * reward_scale``
    (logged as ``ppo/objective/beta_effective``). Only the ratio of reward scale to KL weight changes
    the optimum, so this keeps one ``beta`` meaningful across reward models.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- run length and batching -------------------------------------------------------------
    seed: int = Field(0, description="Seed for prompt order, sampling and minibatch shuffling.")
    num_updates: int = Field(32, gt=0, description="PPO updates (rollout + optimisation) run by train().")
    batch_size: int = Field(16, gt=0, description="Episodes (prompts) per update on each process.")
    num_mini_batches: int = Field(
        1, gt=0, description="Minibatches per PPO epoch; must divide batch_size (one optimizer step each)."
    )
    num_ppo_epochs: int = Field(4, gt=0, description="Passes over each rollout batch.")

    # --- sampling ----------------------------------------------------------------------------
    response_length: int = Field(24, gt=0, description="Maximum new tokens sampled per response.")
    sampling_temperature: float = Field(
        1.0, gt=0, description="Temperature of the policy's sampling; logprobs use the same temperature.")
    eos_token_id: int | None = Field(
        None, description="Token that ends a response; None takes the tokenizer's eos_token_id (the chat "
        "template's end of turn for conversational prompts)."
    )
    missing_eos_penalty: float | None = Field(
        None,
        description="Subtracted from the normalized score of a response that has no EOS within "
        "response_length (normalized-reward units, scaled by reward_scale). None disables it.",
    )

    # --- optimisation --------------------------------------------------------------------------
    learning_rate: float = Field(3e-6, gt=0, description="AdamW learning rate (policy and value).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the joint policy+value gradient norm to this; None = no clipping."
    )
    gamma: float = Field(1.0, ge=0, le=1, description="Discount over response tokens.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0, description="PPO policy ratio clip epsilon.")
    cliprange_value: float = Field(0.2, gt=0, description="Value prediction clip around the rollout value.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss in the total loss.")
    entropy_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus (0 = off, as in RLHF practice).")
    disable_dropout: bool = Field(
        True, description="Zero every dropout rate in the policy, value and reference models (PPO's ratios "
        "and values assume a deterministic network)."
    )
    whiten_advantages: bool = Field(True, description="Whiten advantages over valid response tokens (global batch).")

    # --- value model ---------------------------------------------------------------------------
    value_model: Literal["separate", "shared"] = Field(
        "separate",
        description="'separate': a distinct value network (its own backbone); "
        "'shared': a linear value head on the policy's last hidden states.",
    )

    lora: LoraParams | None = Field(
        None, description="LoRA adapters in the policy and the value model (which then starts from the policy's "
        "trunk); the reference is the policy with its adapters off, so its weights are held once. null: full "
        "fine-tune against a separate frozen reference.")

    # --- KL control ------------------------------------------------------------------------------
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1",
        description="Per-token KL estimator: k1 = logp - logp_ref; k3 = (r - 1) - log r, r = p_ref / p. "
        "It sets both the penalty in the reward and ppo/objective/kl, the KL the controller sees.",
    )
    kl_control: Literal["pi", "adaptive", "fixed"] = Field(
        "adaptive", description="'pi': proportional-integral control of log beta (core.kl_controller); 'adaptive': "
        "Ziegler et al. (2019) controller; 'fixed': constant beta."
    )
    beta: float = Field(0.1, ge=0, description="Initial KL weight, in normalized-reward units per nat; "
                        "null: core.kl_controller.initial_beta: penalty_at_target / kl_target.")
    penalty_at_target: float = Field(
        0.25, gt=0, description="beta: null starts at this penalty, in reward standard deviations, for a KL at "
        "target: 0.25 on the default task, where the controller settles at 0.2-0.5; a model whose KL answers beta "
        "late wants a start near where it settles (conf/real_model: 0.75).")
    kl_target: float = Field(6.0, gt=0, description="Target sequence KL (nats) of the pi and adaptive controllers.")
    kl_horizon: int = Field(10000, gt=0, description="Controller horizon, in episodes: a sustained unit error moves "
                            "log beta by one over it (the integral time of 'pi').")
    kl_gain: float = Field(2.0, ge=0, description="'pi' only: proportional gain on the error kl / kl_target - 1.")
    kl_climb_episodes: int | None = Field(
        None, gt=0, description="'pi' only: a climb to the target slower than kl_target per this many episodes "
        "raises the learning rate, up to tenfold (core.kl_controller: step_scale); null: the step stays as given.")
    score_key: str = Field(
        "normalized",
        description="Which score_fn output is optimized (the others are only logged); its units are the "
        "units of beta once divided by reward_scale.",
    )
    reward_scale: float = Field(
        1.0,
        gt=0,
        description="Scale of the score fed in, relative to normalized units; the applied KL weight is "
        "beta * reward_scale. Leave at 1.0 when the score is already normalized.",
    )

    # --- safety ----------------------------------------------------------------------------------
    kl_stop_multiple: float | None = Field(
        None, gt=0, description="Stop early when the batch KL exceeds this multiple of kl_target; None = off."
    )
    ensemble_std_stop: float | None = Field(
        None, gt=0, description="Stop early when the batch mean of score_fn's 'ensemble_std' (the reward "
        "ensemble's disagreement, logged as ppo/rewards/ensemble_std) exceeds this; None = off.",
    )
    repetition_surprisal_stop: float | None = Field(
        None, gt=0, description="Stop early when the batch mean of score_fn's 'repetition_surprisal' (how rarely "
        "the reward model's training responses repeat a word as often, logged as ppo/rewards/repetition_surprisal) "
        "exceeds this; None = off.",
    )
    fitted_warning: FittedWarningField = Field(
        None, description="A fitted warning's JSON path (core.fitted_warning; the over-optimization report writes one "
        "for its own task), read when the config is built: stop after the update whose score over the run's signals "
        "and settings exceeds its threshold, keeping the policy that update made. A model of the runs it was fitted "
        "on (PPO and RLOO): fit one on a pilot with known gold before trusting it; None = off.",
    )

    # --- speed ----------------------------------------------------------------------------------
    speed: PPOSpeed = Field(
        default_factory=PPOSpeed,
        description="The speed paths (decoding, trimmed forwards, CPU threads and malloc) behind one switch "
        "(speed.enabled; false runs the plain path). Each gives the plain path's numbers up to float rounding.",
    )

    # --- checkpoints and logging ---------------------------------------------------------------
    checkpoint_dir: str | None = Field(None, description="Directory for checkpoints; None disables them.")
    checkpoint_every: int | None = Field(
        None, gt=0, description="Save a checkpoint every N updates (and after the last); None = never."
    )
    keep_checkpoints: int | None = Field(
        None, gt=0, description="Keep only the newest N checkpoints; None keeps all."
    )
    sample_every: int | None = Field(
        None, gt=0, description="Record sample responses every K updates (for a table); None = never."
    )
    num_samples: int = Field(4, gt=0, description="Sample rows recorded each time (from the first process).")

    @model_validator(mode="before")
    @classmethod
    def _derived_beta(cls, data: Any) -> Any:  # beta: null -> initial_beta(kl_target)
        return derive_beta(data, cls.model_fields["kl_target"].default)

    @model_validator(mode="after")
    def _check(self) -> "PPOConfig":
        if self.batch_size % self.num_mini_batches:
            raise ValueError(
                f"num_mini_batches ({self.num_mini_batches}) must divide batch_size ({self.batch_size})"
            )
        if self.checkpoint_every is not None and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir")
        return self

    @property
    def mini_batch_size(self) -> int:
        """Episodes per optimizer step on each process."""
        return self.batch_size // self.num_mini_batches
