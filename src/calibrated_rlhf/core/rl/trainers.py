"""TRL's RLOO and GRPO trainers built from :class:`RLConfig`, with the project's KL controller attached."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core import stop_signals
from calibrated_rlhf.core.history import HistoryCallback
from calibrated_rlhf.core.lora import lora_config, merged
from calibrated_rlhf.core.progress import attach_progress
from calibrated_rlhf.core.checkpointing import trl_checkpoints as rl_checkpoint
from calibrated_rlhf.core.checkpointing.trl_checkpoints import Checkpointing, trl_output_dir
from calibrated_rlhf.core.rl.config import RLConfig
from calibrated_rlhf.core.rl import kl_control
from calibrated_rlhf.core.rl.kl_control import KLControlCallback, attach_kl_control
from calibrated_rlhf.core.early_warning import REPEATED_WORDS, REPETITION_SURPRISAL, warning_reason
from calibrated_rlhf.core.fitted_warning import FittedWarning
from calibrated_rlhf.core.rl.reward import SCORE_NAME, reward_metric
from calibrated_rlhf.core.staging import staging_dir

# TRL's log record -> the project's metric key (core.metric_keys), for every figure the stage tracks.
METRIC_KEYS: dict[str, str] = {
    kl_control.SEQUENCE_KL: keys.RL_KL, kl_control.TRL_KL: keys.RL_KL_PER_TOKEN, kl_control.BETA: keys.RL_BETA,
    kl_control.BETA_NEXT: keys.RL_BETA_NEXT, f"rewards/{SCORE_NAME}/mean": keys.RL_SCORE,
    kl_control.TRL_MEAN_LENGTH: keys.RL_RESPONSE_LENGTH, "completions/clipped_ratio": keys.RL_CLIPPED_FRACTION,
    "entropy": keys.RL_ENTROPY, "loss": keys.RL_LOSS, "grad_norm": keys.RL_GRAD_NORM, "learning_rate": keys.RL_LR,
    **{reward_metric(name): keys.rl_reward(name)
       for name in ("raw", "calibrated", "normalized", "minmax_batch", "gold", "gold_gap", "ensemble_std",
                    REPEATED_WORDS, REPETITION_SURPRISAL)},
}


def trl_config(config: RLConfig, output_dir: str | Path, save_steps: int | None = None) -> Any:
    """TRL's ``RLOOConfig`` or ``GRPOConfig``: one log record per update (the controller reads each)."""
    from trl import GRPOConfig, RLOOConfig

    common = dict(
        output_dir=str(output_dir), seed=config.seed, data_seed=config.seed, max_steps=config.num_updates,
        per_device_train_batch_size=config.batch_size, num_generations=config.num_generations,
        max_completion_length=config.response_length, temperature=config.sampling_temperature,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_schedule, max_grad_norm=config.max_grad_norm,
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
        if config.kl_bias_correction is not None:
            extra["use_bias_correction_kl"] = config.kl_bias_correction
        return GRPOConfig(**common, **extra)
    extra = ({"normalize_advantages": config.normalize_advantages}
             if config.normalize_advantages is not None else {})
    return RLOOConfig(**common, **extra)


def build_trainer(config: RLConfig, policy_dir: str | Path, tokenizer: Any, prompts: list[str], reward: Any,
                  output_dir: str | Path, save_steps: int | None = None, reward_scale: float = 1.0,
                  warning_stops: Mapping[str, float] | None = None) -> tuple[Any, HistoryCallback]:
    """The trainer and the recorder of its log. The policy and TRL's frozen reference are both loaded from
    ``policy_dir`` (the reference policy, saved): the same weights PPO starts from and is anchored to.
    ``warning_stops``: a score-function entry's threshold per stop rule (:class:`StopOnWarning`); the config's
    ``fitted_warning`` one over the run's signals together (:class:`StopOnFittedWarning`)."""
    from datasets import Dataset
    from trl import GRPOTrainer, RLOOTrainer

    cls = GRPOTrainer if config.algorithm == "grpo" else RLOOTrainer
    if len(prompts) < config.batch_size // config.num_generations:
        raise ValueError(f"{len(prompts)} prompts < one update's {config.batch_size // config.num_generations}")
    peft = {"peft_config": lora_config(config.lora, "CAUSAL_LM")} if config.lora is not None else {}
    trainer = cls(model=str(policy_dir), reward_funcs=[reward], args=trl_config(config, output_dir, save_steps),
                  train_dataset=Dataset.from_dict({"prompt": list(prompts)}), processing_class=tokenizer, **peft)
    attach_kl_control(trainer, KLControlCallback(config.kl_control, config.beta, config.kl_target, config.kl_horizon,
                                                 episodes_per_step=config.episodes_per_update,
                                                 reward_scale=reward_scale, gain=config.kl_gain,
                                                 climb_episodes=config.kl_climb_episodes))
    trainer.add_callback(StopOnSignal())
    for name, threshold in (warning_stops or {}).items():
        trainer.add_callback(StopOnWarning(name, threshold))
    history = HistoryCallback()
    trainer.add_callback(history)  # after the KL callback: it records the beta and KL that callback adds
    if config.fitted_warning is not None:  # after the history: it reads the run's records through this update's
        trainer.add_callback(StopOnFittedWarning(FittedWarning.from_dict(config.fitted_warning), config.algorithm,
                                                 config.kl_target, history))
    attach_progress(trainer, config.algorithm.upper(), {"kl": kl_control.SEQUENCE_KL, "beta": kl_control.BETA,
                                                        "reward": "reward"})
    return trainer, history


class StopOnSignal(TrainerCallback):
    """After SIGTERM/SIGINT (``core.stop_signals``): save a checkpoint at the end of this update (when the run
    checkpoints) and end training; :func:`train` then raises ``StopRequested``."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if stop_signals.requested() is not None:
            control.should_save = args.save_strategy != "no"
            control.should_training_stop = True


class StopOnWarning(TrainerCallback):
    """A gold-free stop rule (docs/overoptimization.md), PPO's ``<name>_stop``: end training after the update whose
    batch mean of the score function's ``name`` entry (``ensemble_std``: the reward ensemble's disagreement;
    ``repetition_surprisal``) exceeds ``threshold``, saving that update's checkpoint when the run checkpoints, so the
    policy it fired on is kept (and published)."""

    def __init__(self, name: str, threshold: float) -> None:
        self.name, self.threshold = name, threshold
        self.reason: str | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **_: Any) -> None:
        value = (logs or {}).get(reward_metric(self.name))
        if self.reason is None and value is not None and value > self.threshold:
            self.reason = warning_reason(self.name, value, self.threshold) + f" at update {state.global_step}"
            control.should_save = args.save_strategy != "no"
            control.should_training_stop = True


class StopOnFittedWarning(TrainerCallback):
    """PPO's ``fitted_warning`` for RLOO and GRPO: end training after the update whose fitted warning score exceeds
    its threshold, saving that update's checkpoint when the run checkpoints. It reads the history's records (TRL's
    keys, named as the stage logs them), which a resumed run restores, so the trailing means span the whole run."""

    def __init__(self, warning: FittedWarning, method: str, kl_target: float, history: HistoryCallback) -> None:
        self.warning, self.method, self.kl_target, self.history = warning, method, kl_target, history
        self.reason: str | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **_: Any) -> None:
        if self.reason is not None or not logs or kl_control.SEQUENCE_KL not in logs:
            return  # not an update's record (TRL's final summary has no KL)
        records = [{METRIC_KEYS.get(k, k): v for k, v in p.items()} for p in self.history.points
                   if kl_control.SEQUENCE_KL in p]
        self.reason = self.warning.stop_reason(records, self.method, self.kl_target)
        if self.reason is not None:
            control.should_save = args.save_strategy != "no"
            control.should_training_stop = True


@dataclass
class RLResult:
    policy: Any
    history: list[dict[str, float]]  # TRL's log records with the KL callback's figures, one per update
    runtime_s: float
    stop_reason: str | None = None  # why training ended before num_updates (the stop rule), else None


def train(config: RLConfig, reference_policy: Any, tokenizer: Any, prompts: list[str], reward: Any,
          reward_scale: float = 1.0, workdir: str | Path | None = None,
          checkpointing: Checkpointing | None = None, warning_stops: Mapping[str, float] | None = None) -> RLResult:
    """RLOO or GRPO from ``reference_policy`` (saved to a staging folder for TRL to load the policy and its
    frozen reference from); returns the trained policy on CPU and the per-update records.

    ``checkpointing``: checkpoints every ``every`` updates into ``run_dir`` (``core.checkpointing.trl_checkpoints``), and a run
    resumed from ``resume`` after checking its fingerprint; the records then cover the whole run.
    ``warning_stops``: per score-function entry, the batch mean past which training stops (:class:`StopOnWarning`)."""
    with staging_dir(workdir or tempfile.gettempdir(), f"rl-{config.algorithm}") as work:
        reference_policy.save_pretrained(Path(work) / "reference_policy")
        saving = checkpointing is not None and checkpointing.saving
        with (trl_output_dir(checkpointing.run_dir) if saving else nullcontext(Path(work) / "trainer")) as out:
            trainer, history = build_trainer(config, Path(work) / "reference_policy", tokenizer, prompts, reward, out,
                                             save_steps=checkpointing.every if saving else None,
                                             reward_scale=reward_scale, warning_stops=warning_stops)
            resume = rl_checkpoint.attach(trainer, checkpointing, reward, history.points) if checkpointing else None
            start = time.perf_counter()
            with stop_signals.deferred():
                trainer.train(resume_from_checkpoint=resume)
            runtime = time.perf_counter() - start
            # after TRL's checkpoint at the signalled update is published, before the run is marked complete
            stop_signals.raise_if_requested(f"after {config.algorithm.upper()} update {trainer.state.global_step}")
        if checkpointing is not None:
            rl_checkpoint.mark_complete(checkpointing, int(trainer.state.global_step))
    points = [p for p in history.points if kl_control.BETA in p or kl_control.TRL_KL in p or "loss" in p]
    stop = next((c.reason for c in trainer.callback_handler.callbacks
                 if isinstance(c, StopOnWarning | StopOnFittedWarning) and c.reason), None)
    return RLResult(merged(trainer.model).to("cpu").eval(), points, runtime, stop)
