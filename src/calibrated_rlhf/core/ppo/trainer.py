"""PPO for language models with an adaptive KL penalty, on top of ``accelerate``.

One update (``PPOTrainer.step``) reads top to bottom, as CleanRL's ppo.py does:

1. ``_rollout``: take the next prompts; sample responses with a KV cache, cut at EOS; score them
   with ``score_fn``; logprobs under the frozen reference policy; old values;
2. ``_rewards``: per-token reward ``-beta_eff * KL_t`` plus the score (minus the missing-EOS
   penalty) on the last response token;
3. ``_advantages``: GAE over response tokens, whitened over the global batch;
4. ``_check``: the rollout's figures; the safety stops;
5. ``_optimize``: ``num_ppo_epochs`` passes of ``num_mini_batches`` minibatches: clipped policy
   loss, clipped value loss, gradient clipping, AdamW;
6. ``_finish``: feed the batch KL to the KL controller (beta, and a slow climb's step); log; sample rows; checkpoint.

Where the passes run (one thread, or the value model beside the policy on CPU) is the
``schedule``'s business (``schedule.py``); the algorithm is the same either way. Statistics that
steer the run (the KL fed to the controller, the stop checks, whitening) are reduced across
processes, so every rank takes the same decisions.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from calibrated_rlhf.core import metric_keys as K
from calibrated_rlhf.core.causal_lm import decode_responses, left_pad
from calibrated_rlhf.core.chat import prompt_label, stop_token_id
from calibrated_rlhf.core.checkpointing import checkpoints as ckpt
from calibrated_rlhf.core.kl import kl_per_token
from calibrated_rlhf.core.kl_controller import make_kl_controller
from calibrated_rlhf.core.ppo.config import PPOConfig
from calibrated_rlhf.core.ppo.gae import compute_gae, masked_whiten
from calibrated_rlhf.core.ppo.losses import policy_terms, value_terms
from calibrated_rlhf.core.ppo.models import (adamw, disable_dropout, frozen_reference, policy_and_value,
                                             reference_logprobs, set_learning_rate, with_lora)
from calibrated_rlhf.core.ppo.prompts import PromptStream
from calibrated_rlhf.core.ppo.results import PPOEarlyStop, PPOResult, ScoreFn, UpdateCallback, sample_rows
from calibrated_rlhf.core.ppo.rollout import (Inputs, Minibatch, PolicyAndValue, Rollout, batch_inputs,
                                              response_logprobs, sample_responses, score_tensors)
from calibrated_rlhf.core.ppo.stats import (OPTIM_STATS, fitted_warning_reason, optimization_metrics, perf_metrics,
                                             rollout_metrics, stop_reason)
from calibrated_rlhf.core.progress import Progress
from calibrated_rlhf.core.speed.schedule import make_schedule

logger = logging.getLogger(__name__)

__all__ = ["PPOEarlyStop", "PPOResult", "PPOTrainer", "ScoreFn", "disable_dropout"]


class PPOTrainer:
    """PPO on a causal LM against a frozen reference, scored by ``score_fn``.

    Args:
        config: hyperparameters.
        policy: a transformers causal LM (trained in place).
        tokenizer: its tokenizer (needs ``pad_token_id``; ``eos_token_id`` unless the config sets one).
        prompts: prompt strings, or message lists rendered with the tokenizer's chat template (answered up to
            its end of turn); taken in a seeded shuffled order, epoch after epoch.
        score_fn: ``score_fn(prompts, responses) -> {config.score_key: Tensor[B], ...}`` (prompts as given,
            responses as text); the other keys' batch means are logged as ``ppo/rewards/<key>``. Must return
            the same keys every call.
        ref_policy: frozen reference; a deep copy of ``policy`` (taken now) when None.
        value_model: separate value network (``*ForSequenceClassification``, ``num_labels=1``); when
            None in "separate" mode one is built from the policy's config with a fresh trunk.
        accelerator: an ``accelerate.Accelerator``; one is created when None.
        callbacks: called on the main process after each update.
        fingerprint: settings that change the run's result but that the trainer cannot see (the reward
            model's weight fingerprint, the reward transform, ...), flat ``name -> JSON value``. They join
            the trainer's own (config, reference and initial policy, tokenizer, prompts) in
            ``self.fingerprint``, which every checkpoint records and a resume must match.

    The constructor seeds Python's, numpy's and torch's global generators with ``seed + rank``;
    sampling and minibatch shuffling use the trainer's own generators, saved in checkpoints.
    Prompts are tokenized once, with the tokenizer's special tokens and no truncation.
    """

    def __init__(self, config: PPOConfig, policy: nn.Module, tokenizer: Any, prompts: Sequence[Any],
                 score_fn: ScoreFn, ref_policy: nn.Module | None = None, value_model: nn.Module | None = None,
                 accelerator: Any | None = None, callbacks: Sequence[UpdateCallback] = (),
                 fingerprint: Mapping[str, Any] | None = None) -> None:
        from accelerate import Accelerator

        self.config = config
        self.accelerator = accelerator if accelerator is not None else Accelerator()
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.tokenizer = tokenizer
        self.score_fn = score_fn
        self.callbacks = list(callbacks)
        self.pad_token_id = tokenizer.pad_token_id
        # Conversational prompts are answered up to the chat template's end of turn (core.chat).
        self.eos_token_id = (config.eos_token_id if config.eos_token_id is not None
                             else stop_token_id(tokenizer, prompts))
        if self.pad_token_id is None or self.eos_token_id is None:
            raise ValueError("tokenizer needs a pad token and an EOS token (or set config.eos_token_id)")
        # Distinct sampling noise per rank; prompt order is shared and sliced by rank.
        random.seed(config.seed + self.rank)
        np.random.seed((config.seed + self.rank) % 2**32)
        torch.manual_seed(config.seed + self.rank)
        self._gen = torch.Generator(device="cpu").manual_seed(config.seed + self.rank)
        self._np_rng = np.random.default_rng([config.seed, self.rank])
        self.data = PromptStream(prompts, tokenizer, config.seed, config.batch_size, self.rank, self.world_size)
        self._global_batch = self.data.global_batch
        self._build_models(policy, ref_policy, value_model, fingerprint)
        self.kl_controller = make_kl_controller(config.kl_control, config.beta, config.kl_target, config.kl_horizon,
                                                config.kl_gain, config.kl_climb_episodes)
        self.update = 0  # completed updates
        self.episodes = 0  # episodes consumed, all processes
        self.history: list[dict[str, float]] = []
        self.samples: list[dict[str, Any]] = []
        self.last_checkpoint: str | None = None
        self.resumed_from: dict[str, Any] | None = None  # continued from: {"run", "update", "checkpoint"}
        self._score_keys: list[str] | None = None

    def _build_models(self, policy: nn.Module, ref_policy: nn.Module | None, value_model: nn.Module | None,
                      extra_fingerprint: Mapping[str, Any] | None) -> None:
        """The frozen reference (kept out of the optimizer and DDP), the trained policy and value
        function behind one module, the optimizer, the resume fingerprint and the schedule."""
        cfg = self.config
        initial_fingerprint = ckpt.weights_fingerprint(policy)
        policy, value_model = with_lora(policy, value_model, cfg)
        self.ref_policy = frozen_reference(policy, ref_policy, cfg).to(self.device)
        self._ref_fingerprint = ckpt.weights_fingerprint(self.ref_policy)
        self.fingerprint = ckpt.resume_fingerprint(
            cfg, reference_policy=self._ref_fingerprint, initial_policy=initial_fingerprint,
            tokenizer=ckpt.tokenizer_fingerprint(self.tokenizer), prompts=self.prompts, world_size=self.world_size,
            extra={**(extra_fingerprint or {}), **self.data.chat_fingerprint(self.tokenizer, self.eos_token_id)})
        wrapper = policy_and_value(cfg, policy, value_model).to(self.device)
        optimizer = adamw([p for p in wrapper.parameters() if p.requires_grad], cfg)
        self.model, self.optimizer = self.accelerator.prepare(wrapper, optimizer)
        self._unwrapped = wrapper  # the module DDP (if any) wraps; unwrap_model is slow per call
        self.schedule = make_schedule(cfg, self.accelerator, self.model, wrapper)

    # ------------------------------------------------------------------ public API
    @property
    def beta(self) -> float:
        """Current KL weight in normalized-reward units."""
        return self.kl_controller.value

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped(self) -> PolicyAndValue:
        """Policy and value function without any DDP wrapper."""
        return self._unwrapped

    @property
    def policy(self) -> nn.Module:
        return self.unwrapped.policy

    @property
    def value_model(self) -> nn.Module:
        m = self.unwrapped
        return m.value_model if m.value_model is not None else m.value_head

    @property
    def prompts(self) -> list[Any]:
        return self.data.texts

    @property
    def _pool(self) -> Any:
        """The value model's worker thread pool when the CPU overlap schedule runs, else None."""
        return self.schedule.pool

    def train(self, num_updates: int | None = None, resume_from: str | os.PathLike | None = None) -> PPOResult:
        """Run updates until ``num_updates`` (default ``config.num_updates``) are done in total.

        ``resume_from``: a checkpoint directory, or "latest" for the newest in ``checkpoint_dir``. A
        :class:`PPOEarlyStop` ends the loop (``stopped_early``, the reason), a stop signal with a checkpoint
        (``checkpoint.stop_if_signalled``). With a ``checkpoint_dir``, the run folder records its writer and
        is marked complete once ``config.num_updates`` are done or training stopped early."""
        cfg = self.config
        total = cfg.num_updates if num_updates is None else num_updates
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        run_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None
        if run_dir is not None and self.is_main_process:
            ckpt.mark_started(run_dir, self.resumed_from)
        stopped, reason = False, None
        bar = Progress(total - self.update, "PPO", terminal=None if self.is_main_process else False)
        while self.update < total:
            try:
                m = self.step()
            except PPOEarlyStop as e:
                stopped, reason = True, e.reason
                if self.is_main_process:
                    logger.warning("PPO early stop after %d updates: %s", self.update, e.reason)
                break
            if self.is_main_process:
                bar.update(1, kl=m[K.PPO_KL], beta=m[K.PPO_BETA], score=m[K.PPO_SCORE])
            ckpt.stop_if_signalled(self)
        bar.close()
        if (cfg.checkpoint_every is not None  # at the end, and where a stop rule fired (the policy it fired on)
                and (self.last_checkpoint is None or Path(self.last_checkpoint).name != ckpt.ckpt_name(self.update))):
            self.save_checkpoint()
        if run_dir is not None and self.is_main_process and (stopped or self.update >= cfg.num_updates):
            ckpt.mark_complete(run_dir, {"update": self.update, "stopped_early": stopped, "stop_reason": reason})
        return PPOResult(history=self.history, samples=self.samples, updates=self.update, episodes=self.episodes,
                         beta=self.beta, stopped_early=stopped, stop_reason=reason,
                         last_checkpoint=self.last_checkpoint, controller_state=self.kl_controller.state_dict())

    def step(self) -> dict[str, float]:
        """One PPO update. Returns its metrics (``ppo/...`` keys); raises :class:`PPOEarlyStop`."""
        t_start = time.perf_counter()
        roll = self._rollout()
        kl, score, rewards = self._rewards(roll)
        advantages, returns = self._advantages(roll, rewards)
        metrics = self._check(roll, kl, score, rewards, advantages, returns)
        metrics.update(self._optimize(roll, advantages, returns, metrics))
        return self._finish(roll, score, metrics, t_start)

    # ------------------------------------------------------------------ 1. rollout
    def _rollout(self) -> Rollout:
        cfg, unwrapped = self.config, self.unwrapped
        idx = self.data.next_indices()
        query, query_mask = left_pad([self.data.ids[i] for i in idx], self.pad_token_id, self.device)
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling or computing the old logprobs/values
        with self.schedule.decoding():
            samples = sample_responses(
                unwrapped.policy, query, query_mask, cfg.response_length, cfg.sampling_temperature, self.eos_token_id,
                self.pad_token_id, generator=self._gen,
                value_head=unwrapped.value_head if cfg.value_model == "shared" else None,
                speed=cfg.speed.active())
        t_gen = time.perf_counter()
        ids = torch.cat([query, samples.responses], dim=1)
        # post-EOS positions stay attendable: causality keeps them from touching earlier tokens
        attn = torch.cat([query_mask, torch.ones_like(samples.responses)], dim=1)
        x = batch_inputs(ids, attn, query.shape[1], cfg.sampling_temperature, unwrapped.policy, cfg.speed.active())
        old = self.schedule.old_passes(
            x,
            reference=lambda: reference_logprobs(self.ref_policy, lambda ref: response_logprobs(
                ref, x.ids, x.attn, x.pos, x.start, x.sampling_temperature, cfg.speed.active().trim_last_layer,
                x.trunk)),
            old_values=lambda: (samples.values if samples.values is not None else unwrapped.values(
                x.ids, x.attn, x.pos, x.start, x.trunk)),
            score=lambda: self._score(idx, samples.responses, samples.mask),
            was_training=was_training)
        mask = samples.mask.float()
        texts, scores = old.scored
        # leave inference mode: these become constants inside autograd graphs below
        return Rollout(
            idx=idx, inputs=x, responses=samples.responses.clone(), mask=mask, has_eos=samples.has_eos,
            logprobs=samples.logprobs.clone() * mask, ref_logprobs=old.ref_logprobs.clone() * mask,
            values=old.values.clone() * mask, scores=scores, texts=texts, first=old.first,
            times=(t_gen, old.t_score_start, old.t_score_end))

    def _score(self, idx: list[int], responses: torch.Tensor, mask: torch.Tensor
               ) -> tuple[list[str], dict[str, torch.Tensor]]:
        """Decoded responses and every ``score_fn`` entry as a float tensor [B], keys sorted."""
        texts = decode_responses(self.tokenizer, [self.data.ids[i] for i in idx],
                                 [self.data.decoded(i) for i in idx], responses, mask)
        scores = self.score_fn([self.data.texts[i] for i in idx], texts)
        tensors = score_tensors(scores, self.config.score_key, self._score_keys, len(idx), self.device)
        self._score_keys = list(tensors)
        return texts, tensors

    # ------------------------------------------------------------------ 2. rewards, 3. advantages
    def _rewards(self, roll: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-token KL, the optimized score after any missing-EOS penalty, per-token rewards)."""
        cfg = self.config
        beta_eff = self.kl_controller.value * cfg.reward_scale
        kl = kl_per_token(roll.logprobs, roll.ref_logprobs, cfg.kl_estimator) * roll.mask
        score = roll.scores[cfg.score_key].clone()
        if cfg.missing_eos_penalty is not None:
            score = score - cfg.missing_eos_penalty * cfg.reward_scale * (~roll.has_eos).float()
        rewards = -beta_eff * kl
        last = (roll.mask.sum(1).long() - 1).clamp_min(0)
        rewards[torch.arange(len(roll.idx), device=self.device), last] += score
        return kl, score, rewards

    def _advantages(self, roll: Rollout, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        advantages, returns = compute_gae(rewards, roll.values, roll.mask, self.config.gamma, self.config.lam)
        if self.config.whiten_advantages:
            advantages = masked_whiten(advantages, roll.mask, reduce=self._reduce_sum)
        return advantages, returns

    # ------------------------------------------------------------------ 4. rollout figures, safety stops
    def _check(self, roll: Rollout, kl: torch.Tensor, score: torch.Tensor, rewards: torch.Tensor,
               advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        cfg = self.config
        beta = self.kl_controller.value
        metrics, nonfinite = rollout_metrics(
            kl=kl, score=score, mask=roll.mask, has_eos=roll.has_eos, values=roll.values, returns=returns,
            scores=roll.scores, beta=beta, beta_eff=beta * cfg.reward_scale, kl_target=cfg.kl_target,
            checked=(roll.logprobs, roll.ref_logprobs, roll.values, rewards, advantages, *roll.scores.values()),
            n_episodes=self._global_batch, reduce=self._reduce_sum)
        reason = stop_reason(metrics, nonfinite, cfg)
        if reason is not None:
            raise PPOEarlyStop(reason, metrics)
        return metrics

    # ------------------------------------------------------------------ 5. optimization epochs
    def _optimize(self, roll: Rollout, advantages: torch.Tensor, returns: torch.Tensor,
                  metrics: dict[str, float]) -> dict[str, float]:
        cfg = self.config
        B, mb = len(roll.idx), cfg.mini_batch_size
        stats: dict[str, list[torch.Tensor]] = {k: [] for k in OPTIM_STATS}
        first = roll.first  # epoch 0 of a single minibatch starts from the forward made at rollout time
        for epoch in range(cfg.num_ppo_epochs):
            order = torch.from_numpy(self._np_rng.permutation(B)) if cfg.num_mini_batches > 1 else None
            for start in range(0, B, mb):
                sel = order[start:start + mb].to(self.device) if order is not None else None
                batch = Minibatch(roll.inputs.select(sel), *(x if sel is None else x[sel] for x in (
                    roll.responses, roll.mask, roll.logprobs, advantages, roll.values, returns)))
                for k, v in self._train_minibatch(batch, first, epoch, metrics).items():
                    stats[k].append(v.detach().reshape(()).double().cpu())
                first = None
        return optimization_metrics(stats, self._reduce_sum, self.world_size, cfg.vf_coef,
                                    float(self.optimizer.param_groups[0]["lr"]))

    def _train_minibatch(self, mb: Minibatch, first: tuple[torch.Tensor, torch.Tensor] | None, epoch: int,
                         metrics: dict[str, float]) -> dict[str, torch.Tensor]:
        """One optimizer step; returns the minibatch's statistics."""
        cfg = self.config
        stats, loss, grad_norm = self.schedule.backward(
            mb.inputs, first,
            # the entropy is a diagnostic of the sampling policy (the first epoch's) unless it is a bonus
            lambda logits: policy_terms(logits, mb.responses, mb.old_logprobs, mb.advantages, mb.mask,
                                        cfg.cliprange, cfg.entropy_coef, with_entropy=epoch == 0),
            lambda vpred: value_terms(vpred, mb.old_values, mb.returns, mb.mask, cfg.cliprange_value, cfg.vf_coef),
            cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf)
        bad = (not math.isfinite(float(grad_norm))) or (not math.isfinite(float(loss)))
        if self.world_size > 1:
            # a NaN loss on one rank with finite synced grads must stop every rank
            bad = bool(self._reduce_sum(torch.tensor([float(bad)], dtype=torch.float64))[0] > 0)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            raise PPOEarlyStop("non-finite loss or gradient norm", metrics)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**stats, "grad_norm": torch.as_tensor(grad_norm)}

    # ------------------------------------------------------------------ 6. KL control, bookkeeping
    def _finish(self, roll: Rollout, score: torch.Tensor, metrics: dict[str, float],
                t_start: float) -> dict[str, float]:
        cfg = self.config
        self.kl_controller.update(metrics[K.PPO_KL], self._global_batch)
        set_learning_rate(self.optimizer, cfg.learning_rate * self.kl_controller.step_scale)  # a slow climb's step
        self.update += 1
        self.episodes += self._global_batch
        t_gen, t_score, t_rollout = roll.times
        metrics.update({
            K.PPO_STEP: float(self.update), K.PPO_EPISODES: float(self.episodes),
            K.PPO_BETA_NEXT: self.kl_controller.value,
            **perf_metrics(self._global_batch, t_start, t_gen, t_score, t_rollout, time.perf_counter()),
        })
        self.history.append(metrics)
        rows = None
        if cfg.sample_every is not None and self.update % cfg.sample_every == 0:
            rows = sample_rows(self.update, [prompt_label(self.data.texts[i]) for i in roll.idx], roll.texts, score,
                               roll.scores, cfg.num_samples)
            self.samples.extend(rows)
        if cfg.checkpoint_every is not None and self.update % cfg.checkpoint_every == 0:
            self.save_checkpoint()
        if self.is_main_process:
            for cb in self.callbacks:
                cb(self.update, metrics, rows)
        if (reason := fitted_warning_reason(self.history, cfg)) is not None:  # every rank: histories are reduced
            raise PPOEarlyStop(reason, metrics)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str | os.PathLike | None = None) -> str:
        """Write a checkpoint atomically (staging folder, then rename) and return its path; the
        layout is :func:`~calibrated_rlhf.core.checkpointing.checkpoints.save_trainer`'s."""
        root = Path(directory) if directory is not None else Path(self.config.checkpoint_dir or "checkpoints")
        self.last_checkpoint = str(ckpt.save_trainer(self, root))
        return self.last_checkpoint

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore everything ``save_checkpoint`` wrote; "latest" picks the newest in checkpoint_dir.

        Refused, naming the fields, when the checkpoint's resume fingerprint differs from this trainer's.
        """
        path = ckpt.resolve_checkpoint(path, self.config.checkpoint_dir)
        ckpt.restore_trainer(self, path)
        self.last_checkpoint = str(path)
        self.resumed_from = {"run": path.resolve().parent.name, "update": self.update, "checkpoint": str(path)}

    # ------------------------------------------------------------------ internals
    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        from accelerate.utils import reduce

        return reduce(t.to(self.device), reduction="sum").to(t.device)
