"""TRL's RLOO and GRPO trainers built from :class:`RLConfig`, with the project's KL controller attached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from calibrated_rlhf.core.history import HistoryCallback
from calibrated_rlhf.core.rl.config import RLConfig
from calibrated_rlhf.core.rl.kl_control import KLControlCallback, attach_kl_control


def trl_config(config: RLConfig, output_dir: str | Path, save_steps: int | None = None) -> Any:
    """TRL's ``RLOOConfig`` or ``GRPOConfig``: one log record per update (the controller reads each)."""
    from trl import GRPOConfig, RLOOConfig

    common = dict(
        output_dir=str(output_dir), seed=config.seed, data_seed=config.seed, max_steps=config.num_updates,
        per_device_train_batch_size=config.batch_size, num_generations=config.num_generations,
        max_completion_length=config.response_length, temperature=config.sampling_temperature,
        learning_rate=config.learning_rate, max_grad_norm=config.max_grad_norm,
        num_iterations=config.num_iterations, epsilon=config.epsilon, beta=config.beta,
        # one generation per update: a checkpoint then never falls inside a generation buffer
        gradient_accumulation_steps=1, steps_per_generation=1,
        logging_steps=1, report_to=[], disable_tqdm=True, bf16=False, activation_checkpointing=False,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        restore_callback_states_from_checkpoint=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        model_init_kwargs={"dtype": torch.float32},
    )
    if config.algorithm == "grpo":
        extra = {"scale_rewards": config.scale_rewards} if config.scale_rewards is not None else {}
        return GRPOConfig(**common, **extra)
    extra = ({"normalize_advantages": config.normalize_advantages}
             if config.normalize_advantages is not None else {})
    return RLOOConfig(**common, **extra)


def build_trainer(config: RLConfig, policy_dir: str | Path, tokenizer: Any, prompts: list[str], reward: Any,
                  output_dir: str | Path, save_steps: int | None = None
                  ) -> tuple[Any, HistoryCallback]:
    """The trainer and the recorder of its log. The policy and TRL's frozen reference are both loaded from
    ``policy_dir`` (the reference policy, saved): the same weights PPO starts from and is anchored to."""
    from datasets import Dataset
    from trl import GRPOTrainer, RLOOTrainer

    cls = GRPOTrainer if config.algorithm == "grpo" else RLOOTrainer
    if len(prompts) < config.batch_size // config.num_generations:
        raise ValueError(f"{len(prompts)} prompts < one update's {config.batch_size // config.num_generations}")
    trainer = cls(model=str(policy_dir), reward_funcs=[reward], args=trl_config(config, output_dir, save_steps),
                  train_dataset=Dataset.from_dict({"prompt": list(prompts)}), processing_class=tokenizer)
    attach_kl_control(trainer, KLControlCallback(config.kl_control, config.beta, config.kl_target, config.kl_horizon,
                                                 episodes_per_step=config.episodes_per_update))
    history = HistoryCallback()
    trainer.add_callback(history)  # after the KL callback: it records the beta and KL that callback adds
    return trainer, history
