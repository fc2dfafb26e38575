"""PPO for language models with an adaptive KL penalty, on top of ``accelerate``.

One update (``PPOTrainer.step``) reads top to bottom:

1. take the next batch of prompts; sample responses with a KV cache; truncate at EOS;
2. score them with the user's ``score_fn``; logprobs under the frozen reference policy; values;
3. per-token reward ``-beta_eff * KL_t`` plus the normalized score (minus the missing-EOS
   penalty) on the last response token;
4. GAE over response tokens, advantage whitening over the global batch;
5. ``num_ppo_epochs`` passes of ``num_mini_batches`` minibatches: clipped policy loss, clipped
   value loss, gradient clipping, AdamW;
6. feed the batch KL to the KL controller; log; sample rows; checkpoint.

Statistics that steer the run (the KL fed to the controller, the stop checks, whitening) are
reduced across processes, so every rank takes the same decisions.
"""

from __future__ import annotations

import copy
import ctypes
import json
import math
import os
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from calibrated_rlhf.core.ppo.checkpoint import (
    STATE_FILE,
    check_fingerprint,
    ckpt_name,
    latest_checkpoint,
    list_checkpoints,
    load_pretrained_weights,
    mark_complete,
    mark_started,
    prune,
    publish,
    read_state,
    resume_fingerprint,
    rng_state,
    set_rng_state,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from calibrated_rlhf.core.ppo.config import PPOConfig
from calibrated_rlhf.core.ppo.gae import compute_gae, masked_mean, masked_whiten
from calibrated_rlhf.core.ppo.kl import AdaptiveKLController, kl_per_token, make_kl_controller
from calibrated_rlhf.core.ppo.losses import clipped_policy_loss, clipped_value_loss
from calibrated_rlhf.core.ppo.rollout import (
    PolicyAndValue,
    cpu_threads,
    decode_responses,
    hidden_size_of,
    left_pad,
    position_ids_from_mask,
    response_logprobs,
    sample_responses,
    sequence_values,
)
from calibrated_rlhf.core.staging import make_staging_dir

ScoreFn = Callable[[list[str], list[str]], Mapping[str, torch.Tensor]]
# Called on the main process after every update: (update number, metrics, sample rows or None).
UpdateCallback = Callable[[int, dict[str, float], "list[dict[str, Any]] | None"], None]

__all__ = ["PPOEarlyStop", "PPOResult", "PPOTrainer", "ScoreFn", "latest_checkpoint", "list_checkpoints"]


class PPOEarlyStop(RuntimeError):
    """Training stopped for safety (KL blow-up or non-finite numbers); ``reason`` says which."""

    def __init__(self, reason: str, metrics: dict[str, float] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.metrics = metrics or {}


@dataclass
class PPOResult:
    """What ``train()`` returns."""

    history: list[dict[str, float]]
    samples: list[dict[str, Any]]
    updates: int
    episodes: int
    beta: float
    stopped_early: bool = False
    stop_reason: str | None = None
    last_checkpoint: str | None = None
    controller_state: dict[str, Any] = field(default_factory=dict)


class PPOTrainer:
    """PPO on a causal LM against a frozen reference, scored by ``score_fn``.

    Args:
        config: hyperparameters.
        policy: a transformers causal LM (trained in place).
        tokenizer: its tokenizer (needs ``pad_token_id``; ``eos_token_id`` unless the config sets one).
        prompts: prompt strings; taken in a seeded shuffled order, epoch after epoch.
        score_fn: ``score_fn(prompts, responses) -> {config.score_key: Tensor[B], ...}``; the other keys'
            batch means are logged as ``ppo/rewards/<key>``. Must return the same keys every call.
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

    def __init__(
        self,
        config: PPOConfig,
        policy: nn.Module,
        tokenizer: Any,
        prompts: Sequence[str],
        score_fn: ScoreFn,
        ref_policy: nn.Module | None = None,
        value_model: nn.Module | None = None,
        accelerator: Any | None = None,
        callbacks: Sequence[UpdateCallback] = (),
        fingerprint: Mapping[str, Any] | None = None,
    ) -> None:
        from accelerate import Accelerator

        self.config = config
        self.accelerator = accelerator if accelerator is not None else Accelerator()
        acc = self.accelerator
        self.rank = acc.process_index
        self.world_size = acc.num_processes
        self.device = acc.device
        self.tokenizer = tokenizer
        self.score_fn = score_fn
        self.callbacks = list(callbacks)

        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None or self.eos_token_id is None:
            raise ValueError("tokenizer needs a pad token and an EOS token (or set config.eos_token_id)")

        # Distinct sampling noise per rank; prompt order is shared and sliced by rank.
        self._seed_everything(config.seed + self.rank)
        self._gen = torch.Generator(device="cpu").manual_seed(config.seed + self.rank)
        self._np_rng = np.random.default_rng([config.seed, self.rank])

        self.prompts = list(prompts)
        self._prompt_ids: list[list[int]] = tokenizer(self.prompts, add_special_tokens=True)["input_ids"]
        self._prompt_text_cache: dict[int, str] = {}
        self._global_batch = config.batch_size * self.world_size
        if len(self.prompts) < self._global_batch:
            raise ValueError(f"{len(self.prompts)} prompts < one global batch ({self._global_batch})")
        self._data_epoch = 0
        self._data_pos = 0
        self._perm = self._permutation(0)

        # Models: the reference is frozen and kept out of the optimizer and DDP.
        initial_fingerprint = weights_fingerprint(policy)
        if ref_policy is None:
            ref_policy = copy.deepcopy(policy)
        if config.disable_dropout:
            disable_dropout(ref_policy)
        ref_policy.requires_grad_(False)
        self.ref_policy = ref_policy.eval().to(self.device)
        self._ref_fingerprint = weights_fingerprint(self.ref_policy)
        self.fingerprint = resume_fingerprint(
            config, reference_policy=self._ref_fingerprint, initial_policy=initial_fingerprint,
            tokenizer=tokenizer_fingerprint(tokenizer), prompts=self.prompts, world_size=self.world_size,
            extra=fingerprint)

        if config.value_model == "shared":
            if value_model is not None:
                raise ValueError("value_model given but config.value_model == 'shared'")
            head = nn.Linear(hidden_size_of(policy), 1)
            g = torch.Generator().manual_seed(config.seed)
            with torch.no_grad():
                # small init: the value head starts near zero, as is usual for RLHF value heads
                head.weight.copy_(torch.randn(head.weight.shape, generator=g) / (hidden_size_of(policy) + 1))
                head.bias.zero_()
            wrapper = PolicyAndValue(policy, value_head=head.to(next(policy.parameters()).dtype))
        else:
            if value_model is None:
                value_model = _default_value_model(policy, config.seed)
            wrapper = PolicyAndValue(policy, value_model=value_model)

        if config.disable_dropout:
            disable_dropout(wrapper)
        wrapper.to(self.device)
        params = [p for p in wrapper.parameters() if p.requires_grad]
        optimizer = _adamw(params, config)
        self.model, self.optimizer = acc.prepare(wrapper, optimizer)
        self._unwrapped = wrapper  # the module DDP (if any) wraps; unwrap_model is slow per call
        if config.cpu_malloc_tuning and self.device.type == "cpu":
            tune_glibc_malloc()
        self._pool = None
        if (config.cpu_parallel and self.device.type == "cpu" and self.world_size == 1
                and config.value_model == "separate"):
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppo-value")
            # in model.parameters() order: the policy's, then the value model's
            self._grad_params = tuple([p for p in part.parameters() if p.requires_grad]
                                      for part in (wrapper.policy, wrapper.value_model))
        self.kl_controller: AdaptiveKLController = make_kl_controller(
            config.kl_control, config.beta, config.kl_target, config.kl_horizon
        )

        self.update = 0  # completed updates
        self.episodes = 0  # episodes consumed, all processes
        self.history: list[dict[str, float]] = []
        self.samples: list[dict[str, Any]] = []
        self.last_checkpoint: str | None = None
        # {"run", "update", "checkpoint"} of the checkpoint this trainer continued from
        self.resumed_from: dict[str, Any] | None = None
        self._score_keys: list[str] | None = None

    # ------------------------------------------------------------------ public API
    @property
    def beta(self) -> float:
        """Current KL weight in normalized-reward units."""
        return self.kl_controller.beta

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

    def train(self, num_updates: int | None = None, resume_from: str | os.PathLike | None = None) -> PPOResult:
        """Run updates until ``num_updates`` (default ``config.num_updates``) are done in total.

        ``resume_from``: a checkpoint directory, or "latest" for the newest in ``checkpoint_dir``.
        A :class:`PPOEarlyStop` ends the loop; the result carries ``stopped_early`` and the reason.
        With a ``checkpoint_dir``, the run folder records its writer when training starts and is marked
        complete once ``config.num_updates`` are done or training stopped early (see ``checkpoint.py``).
        """
        cfg = self.config
        total = cfg.num_updates if num_updates is None else num_updates
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        run_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None
        if run_dir is not None and self.is_main_process:
            mark_started(run_dir, self.resumed_from)
        stopped, reason = False, None
        while self.update < total:
            try:
                self.step()
            except PPOEarlyStop as e:
                stopped, reason = True, e.reason
                if self.is_main_process:
                    print(f"[ppo] early stop at update {self.update + 1}: {e.reason}", flush=True)
                break
        if (not stopped and cfg.checkpoint_every is not None
                and (self.last_checkpoint is None or Path(self.last_checkpoint).name != ckpt_name(self.update))):
            self.save_checkpoint()
        if run_dir is not None and self.is_main_process and (stopped or self.update >= cfg.num_updates):
            mark_complete(run_dir, {"update": self.update, "stopped_early": stopped, "stop_reason": reason})
        return PPOResult(
            history=self.history, samples=self.samples, updates=self.update, episodes=self.episodes,
            beta=self.beta, stopped_early=stopped, stop_reason=reason, last_checkpoint=self.last_checkpoint,
            controller_state=self.kl_controller.state_dict(),
        )

    def step(self) -> dict[str, float]:
        """One PPO update. Returns its metrics (``ppo/...`` keys); raises :class:`PPOEarlyStop`."""
        cfg = self.config
        t_start = time.perf_counter()
        model = self.model
        unwrapped = self.unwrapped
        policy = unwrapped.policy

        # 1. rollout ---------------------------------------------------------------------------
        idx = self._next_prompt_indices()
        prompt_texts = [self.prompts[i] for i in idx]
        query, query_mask = left_pad([self._prompt_ids[i] for i in idx], self.pad_token_id, self.device)
        Lq = query.shape[1]
        was_training = model.training
        model.eval()  # no dropout while sampling or computing the old logprobs/values
        with cpu_threads(cfg.decode_threads if self.device.type == "cpu" else None):
            samples = sample_responses(
                policy, query, query_mask, cfg.response_length, cfg.temperature, self.eos_token_id,
                self.pad_token_id, generator=self._gen,
                value_head=unwrapped.value_head if cfg.value_model == "shared" else None,
                fast_decode=cfg.fast_decode,
            )
        t_gen = time.perf_counter()
        responses, mask_bool = samples.responses, samples.mask
        input_ids = torch.cat([query, responses], dim=1)
        # post-EOS positions stay attendable: causality keeps them from touching earlier tokens
        attn = torch.cat([query_mask, torch.ones_like(responses)], dim=1)
        pos = position_ids_from_mask(attn)
        # With one minibatch the first PPO forward runs at the rollout parameters: it can also
        # provide the old values, which saves the value model's rollout forward.
        reuse_first = cfg.num_mini_batches == 1 and cfg.value_model == "separate" and cfg.disable_dropout
        # With the worker core available, the reference and value forwards run there while this core
        # decodes, scores and runs the policy forward: four independent passes, two per core.
        overlap = reuse_first and self._pool is not None
        worker = None
        values = None
        if overlap:
            if was_training:
                model.train()  # dropout is off (reuse_first): the mode only matters for consistency

            def worker_job() -> tuple[torch.Tensor, torch.Tensor]:
                torch.set_num_threads(1)
                with torch.inference_mode():
                    ref = response_logprobs(self.ref_policy, input_ids, attn, pos, Lq, cfg.temperature)
                return ref, unwrapped.values(input_ids, attn, pos, Lq)

            worker = self._pool.submit(worker_job)
        else:
            with torch.inference_mode():
                ref_logprobs = response_logprobs(self.ref_policy, input_ids, attn, pos, Lq, cfg.temperature)
                if samples.values is not None:
                    values = samples.values
                elif not reuse_first:
                    values = sequence_values(unwrapped.value_model, input_ids, attn, pos, Lq)
            if was_training:
                model.train()
        mask = mask_bool.float()
        t_fwd = time.perf_counter()

        with cpu_threads(1 if overlap else None):
            try:
                response_texts = decode_responses(
                    self.tokenizer, [self._prompt_ids[i] for i in idx], [self._prompt_decoded(i) for i in idx],
                    responses, mask_bool,
                )
                scores = self.score_fn(prompt_texts, response_texts)
                first_logits = (unwrapped.policy_logits(input_ids, attn, pos, Lq, cfg.temperature)
                                if overlap else None)
            finally:
                if worker is not None:
                    ref_logprobs, first_vpred = worker.result()  # waits even when scoring failed
        # leave inference mode: these become constants inside autograd graphs below
        responses = responses.clone()
        logprobs = samples.logprobs.clone() * mask
        ref_logprobs = ref_logprobs.clone() * mask
        key = cfg.score_key
        if key not in scores:
            raise KeyError(f"score_fn must return the optimized score under '{key}' (config.score_key)")
        score_keys = sorted(scores)
        if self._score_keys is None:
            self._score_keys = score_keys
        elif score_keys != self._score_keys:
            raise KeyError(f"score_fn keys changed from {self._score_keys} to {score_keys}")
        score_tensors = {k: torch.as_tensor(scores[k]).detach().float().reshape(-1).to(self.device)
                         for k in score_keys}
        if score_tensors[key].numel() != len(idx):
            raise ValueError(f"score_fn returned a '{key}' tensor of the wrong length")
        t_rollout = time.perf_counter()
        if reuse_first:
            if not overlap:
                first_logits, first_vpred = model(input_ids, attn, pos, Lq, cfg.temperature)
            values = first_vpred.detach().float()
        else:
            first_logits = first_vpred = None
        values = values.clone() * mask

        # 2. rewards ---------------------------------------------------------------------------
        beta = self.kl_controller.beta
        beta_eff = beta * cfg.reward_scale
        kl = kl_per_token(logprobs, ref_logprobs, cfg.kl_estimator) * mask
        score = score_tensors[key].clone()
        if cfg.missing_eos_penalty is not None:
            score = score - cfg.missing_eos_penalty * cfg.reward_scale * (~samples.has_eos).float()
        rewards = -beta_eff * kl
        last = (mask.sum(1).long() - 1).clamp_min(0)
        rewards[torch.arange(len(idx), device=self.device), last] += score

        # 3. advantages ------------------------------------------------------------------------
        advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask, reduce=self._reduce_sum)

        # Global statistics in one reduction: they steer the controller and the stop checks.
        seq_kl = kl.sum(1)
        nonfinite = sum(int(not bool(torch.isfinite(x).all())) for x in
                        (logprobs, ref_logprobs, values, rewards, advantages, *score_tensors.values()))
        resid = (returns - values) * mask
        local = [
            seq_kl.sum(), (-beta_eff * seq_kl).sum(), score.sum(), mask.sum(),
            samples.has_eos.float().sum(), torch.tensor(float(nonfinite)),
            (returns * mask).sum(), (returns * returns * mask).sum(), resid.sum(), (resid * resid).sum(),
            (values * mask).sum(),
            *[score_tensors[k].sum() for k in score_keys],
        ]
        g = self._reduce_sum(torch.stack([x.double().cpu() for x in local]))
        n_ep = float(self._global_batch)
        n_tok = max(float(g[3]), 1.0)
        g_kl = float(g[0]) / n_ep
        var_ret = float(g[7]) / n_tok - (float(g[6]) / n_tok) ** 2
        var_res = float(g[9]) / n_tok - (float(g[8]) / n_tok) ** 2
        metrics: dict[str, float] = {
            "ppo/objective/kl": g_kl,
            "ppo/objective/beta": beta,
            "ppo/objective/beta_effective": beta_eff,
            "ppo/objective/kl_target": cfg.kl_target,
            "ppo/objective/non_score_reward": float(g[1]) / n_ep,
            "ppo/objective/score": float(g[2]) / n_ep,
            "ppo/objective/rlhf_reward": (float(g[2]) + float(g[1])) / n_ep,
            "ppo/rollout/response_length": float(g[3]) / n_ep,
            "ppo/rollout/eos_fraction": float(g[4]) / n_ep,
            "ppo/value/explained_variance": 1.0 - var_res / var_ret if var_ret > 1e-12 else float("nan"),
            "ppo/value/mean": float(g[10]) / n_tok,
        }
        for j, k in enumerate(score_keys):
            metrics[f"ppo/rewards/{k}"] = float(g[11 + j]) / n_ep
        if float(g[5]) > 0:
            raise PPOEarlyStop("non-finite reward, logprob, value or advantage in the rollout", metrics)
        if cfg.kl_stop_multiple is not None and g_kl > cfg.kl_stop_multiple * cfg.kl_target:
            raise PPOEarlyStop(
                f"KL {g_kl:.3f} exceeds kl_stop_multiple * kl_target = "
                f"{cfg.kl_stop_multiple * cfg.kl_target:.3f}", metrics,
            )
        disagreement = metrics.get("ppo/rewards/ensemble_std")
        if cfg.ensemble_std_stop is not None and disagreement is not None and disagreement > cfg.ensemble_std_stop:
            # The policy has moved to where the reward models disagree: past it, the proxy is not to be trusted.
            raise PPOEarlyStop(f"reward ensemble std {disagreement:.3f} exceeds ensemble_std_stop = "
                               f"{cfg.ensemble_std_stop:.3f}", metrics)

        # 4. PPO epochs --------------------------------------------------------------------------
        B = len(idx)
        mb = cfg.mini_batch_size
        stats: dict[str, list[torch.Tensor]] = {k: [] for k in
                                                ("policy", "value", "clipfrac", "vclipfrac", "approx_kl",
                                                 "entropy", "ratio", "grad_norm")}
        batch = (input_ids, attn, pos, responses, mask, logprobs, advantages, values, returns)
        for epoch in range(cfg.num_ppo_epochs):
            order = torch.from_numpy(self._np_rng.permutation(B)) if cfg.num_mini_batches > 1 else None
            for start in range(0, B, mb):
                if order is None:
                    mb_ids, mb_attn, mb_pos, mb_resp, m, mb_old, mb_adv, mb_val, mb_ret = batch
                else:
                    sel = order[start:start + mb].to(self.device)
                    mb_ids, mb_attn, mb_pos, mb_resp, m, mb_old, mb_adv, mb_val, mb_ret = (x[sel] for x in batch)
                # epoch 0 of a single minibatch starts from the forward made at rollout time
                pre_logits, pre_vpred = first_logits, first_vpred
                first_logits = first_vpred = None

                def policy_part(logits: torch.Tensor | None) -> tuple[Any, torch.Tensor | None, torch.Tensor]:
                    if logits is None:
                        logits = unwrapped.policy_logits(mb_ids, mb_attn, mb_pos, Lq, cfg.temperature)
                    return self._policy_terms(logits, mb_resp, mb_old, mb_adv, m, epoch)

                def value_part(vpred: torch.Tensor | None) -> tuple[Any, torch.Tensor]:
                    if vpred is None:
                        vpred = unwrapped.values(mb_ids, mb_attn, mb_pos, Lq)
                    vl = clipped_value_loss(vpred.float(), mb_val, mb_ret, m, cfg.cliprange_value)
                    return vl, cfg.vf_coef * vl.loss

                if self._pool is not None:
                    # policy and value are independent networks: two single-threaded streams, one
                    # per core, beat one two-threaded stream of ops this small (gradients identical)
                    pl, entropy, vl, loss, grad_norms = self._parallel_backward(
                        lambda: policy_part(pre_logits), lambda: value_part(pre_vpred)
                    )
                else:
                    if pre_logits is None:  # through the (possibly DDP-wrapped) module
                        pre_logits, pre_vpred = model(mb_ids, mb_attn, mb_pos, Lq, cfg.temperature)
                    pl, entropy, p_loss = policy_part(pre_logits)
                    vl, v_loss = value_part(pre_vpred)
                    total = p_loss + v_loss
                    self.accelerator.backward(total)
                    loss = total.detach()
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
                if self._pool is not None:
                    grad_norm = self._clip_by_norms(grad_norms, max_norm)
                else:
                    grad_norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
                bad = (not math.isfinite(float(grad_norm))) or (not math.isfinite(float(loss)))
                if self.world_size > 1:
                    # a NaN loss on one rank with finite synced grads must stop every rank
                    bad = bool(self._reduce_sum(torch.tensor([float(bad)], dtype=torch.float64))[0] > 0)
                if bad:
                    self.optimizer.zero_grad(set_to_none=True)
                    raise PPOEarlyStop("non-finite loss or gradient norm", metrics)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for k, v in (("policy", pl.loss), ("value", vl.loss), ("clipfrac", pl.clipfrac),
                             ("vclipfrac", vl.clipfrac), ("approx_kl", pl.approx_kl), ("entropy", entropy),
                             ("ratio", pl.ratio_mean), ("grad_norm", torch.as_tensor(grad_norm))):
                    if v is not None:
                        stats[k].append(v.detach().reshape(()).double().cpu())

        names = list(stats)
        local_means = torch.stack([torch.stack(stats[k]).mean() for k in names])
        glob = self._reduce_sum(local_means) / self.world_size
        gm = dict(zip(names, (float(x) for x in glob)))
        metrics.update({
            "ppo/losses/policy": gm["policy"],
            "ppo/losses/total": gm["policy"] + cfg.vf_coef * gm["value"],
            "ppo/value/loss": gm["value"],
            "ppo/value/clipfrac": gm["vclipfrac"],
            "ppo/policy/clipfrac": gm["clipfrac"],
            "ppo/policy/approx_kl": gm["approx_kl"],
            "ppo/policy/entropy": gm["entropy"],
            "ppo/policy/ratio": gm["ratio"],
            "ppo/optim/grad_norm": gm["grad_norm"],
            "ppo/optim/lr": float(self.optimizer.param_groups[0]["lr"]),
        })

        # 5. KL control, bookkeeping ------------------------------------------------------------
        self.kl_controller.update(g_kl, self._global_batch)
        self.update += 1
        self.episodes += self._global_batch
        t_end = time.perf_counter()
        metrics.update({
            "ppo/step": float(self.update),
            "ppo/episodes": float(self.episodes),
            "ppo/objective/beta_next": self.kl_controller.beta,
            "ppo/perf/episodes_per_s": self._global_batch / (t_end - t_start),
            "ppo/perf/rollout_s": t_rollout - t_start,
            "ppo/perf/generate_s": t_gen - t_start,
            # decoding and scoring; when overlapped, with the old-logprob and value forwards beside them
            "ppo/perf/score_s": t_rollout - t_fwd,
            "ppo/perf/update_s": t_end - t_start,
        })
        self.history.append(metrics)

        rows = None
        if cfg.sample_every is not None and self.update % cfg.sample_every == 0:
            rows = []
            for i in range(min(cfg.num_samples, B)):
                row: dict[str, Any] = {"update": self.update, "prompt": prompt_texts[i],
                                       "response": response_texts[i], "score": float(score[i])}
                for k in score_keys:
                    row[k] = float(score_tensors[k][i])
                rows.append(row)
            self.samples.extend(rows)
        if cfg.checkpoint_every is not None and self.update % cfg.checkpoint_every == 0:
            self.save_checkpoint()
        if self.is_main_process:
            for cb in self.callbacks:
                cb(self.update, metrics, rows)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str | os.PathLike | None = None) -> str:
        """Write a checkpoint atomically (staging folder, then rename) and return its path.

        Layout of ``<checkpoint_dir>/update_000042/``: ``policy/`` (save_pretrained + tokenizer),
        ``value_model/`` (save_pretrained) or ``value_head.pt``, ``optimizer.pt``,
        ``trainer_state.json`` (update, episodes, controller, data position, history, samples,
        config, resume fingerprint, where this run resumed from), ``rng_state_<rank>.pt`` (python,
        numpy, torch and the trainer's own generators).
        """
        acc = self.accelerator
        root = Path(directory) if directory is not None else Path(self.config.checkpoint_dir or "checkpoints")
        final = root / ckpt_name(self.update)
        # the staging name is the main process's (it carries its pid): every rank writes into that one
        shared = [str(make_staging_dir(root, final.name)) if self.is_main_process else None]
        if self.world_size > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(shared, from_process=0)
        tmp = Path(shared[0])
        try:
            if self.is_main_process:
                self._write_checkpoint_files(tmp)
            torch.save(rng_state(self._gen, self._np_rng), tmp / f"rng_state_{self.rank}.pt")
            acc.wait_for_everyone()
            if self.is_main_process:
                publish(tmp, final)
                prune(root, self.config.keep_checkpoints)
            acc.wait_for_everyone()
        except BaseException:
            # a save that failed in this process leaves nothing behind; a killed one is swept later
            if self.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.last_checkpoint = str(final)
        return str(final)

    def _write_checkpoint_files(self, folder: Path) -> None:
        m = self.unwrapped
        m.policy.save_pretrained(folder / "policy", safe_serialization=True)
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(folder / "policy")
        if m.value_model is not None:
            m.value_model.save_pretrained(folder / "value_model", safe_serialization=True)
        else:
            torch.save(m.value_head.state_dict(), folder / "value_head.pt")
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        state = {
            "update": self.update,
            "episodes": self.episodes,
            "kl_controller": self.kl_controller.state_dict(),
            "data": {"epoch": self._data_epoch, "pos": self._data_pos},
            "world_size": self.world_size,
            "score_keys": self._score_keys,
            "ref_fingerprint": self._ref_fingerprint,
            "fingerprint": self.fingerprint,
            "resumed_from": self.resumed_from,
            "saved_at": time.time(),
            "history": self.history,
            "samples": self.samples,
            "config": self.config.model_dump(mode="json"),
        }
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore everything ``save_checkpoint`` wrote; "latest" picks the newest in checkpoint_dir.

        Refused, naming the fields, when the checkpoint's resume fingerprint differs from this trainer's.
        """
        if str(path) == "latest":
            found = latest_checkpoint(self.config.checkpoint_dir or "checkpoints")
            if found is None:
                raise FileNotFoundError(f"no checkpoint in {self.config.checkpoint_dir}")
            path = found
        path = Path(path)
        state = read_state(path)
        if state["world_size"] != self.world_size:
            raise ValueError(f"checkpoint was written by {state['world_size']} processes, not {self.world_size}")
        if "fingerprint" in state:
            check_fingerprint(path, state["fingerprint"], self.fingerprint)
        elif state["ref_fingerprint"] != self._ref_fingerprint:  # written before resume fingerprints
            raise ValueError("the reference policy differs from the one this checkpoint was trained against")
        m = self.unwrapped
        load_pretrained_weights(m.policy, path / "policy")
        if m.value_model is not None:
            load_pretrained_weights(m.value_model, path / "value_model")
        else:
            m.value_head.load_state_dict(torch.load(path / "value_head.pt", map_location=self.device))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device,
                                                  weights_only=False))
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.update = int(state["update"])
        self.episodes = int(state["episodes"])
        self._data_epoch = int(state["data"]["epoch"])
        self._data_pos = int(state["data"]["pos"])
        self._perm = self._permutation(self._data_epoch)
        self._score_keys = state["score_keys"]
        self.history = list(state["history"])
        self.samples = list(state["samples"])
        set_rng_state(torch.load(path / f"rng_state_{self.rank}.pt", weights_only=False), self._gen, self._np_rng)
        self.last_checkpoint = str(path)
        self.resumed_from = {"run": path.resolve().parent.name, "update": self.update, "checkpoint": str(path)}

    # ------------------------------------------------------------------ internals
    def _policy_terms(
        self, logits: torch.Tensor, responses: torch.Tensor, old_logprobs: torch.Tensor,
        advantages: torch.Tensor, mask: torch.Tensor, epoch: int,
    ) -> tuple[Any, torch.Tensor | None, torch.Tensor]:
        """(clipped-loss output, entropy statistic or None, policy part of the loss)."""
        cfg = self.config
        logp_all = torch.log_softmax(logits.float(), dim=-1)
        new_logprobs = logp_all.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
        pl = clipped_policy_loss(new_logprobs, old_logprobs, advantages, mask, cfg.cliprange)
        loss = pl.loss
        entropy = None
        if cfg.entropy_coef > 0:
            ent = masked_mean(-(logp_all.exp() * logp_all).sum(-1), mask)
            loss = loss - cfg.entropy_coef * ent
            entropy = ent.detach()
        elif epoch == 0:
            # the entropy of the sampling policy is a diagnostic: the first epoch sees it
            with torch.no_grad():
                entropy = masked_mean(-(logp_all.exp() * logp_all).sum(-1), mask)
        return pl, entropy, loss

    def _parallel_backward(
        self, policy_part: Callable[[], tuple], value_part: Callable[[], tuple]
    ) -> tuple[Any, torch.Tensor | None, Any, torch.Tensor, list[torch.Tensor]]:
        """Forward and backward of the policy (here) and the value model (worker thread) at once.

        Each side also takes the norms of its own gradients, the first half of the clipping.
        """
        policy_params, value_params = self._grad_params

        def value_job() -> tuple[Any, torch.Tensor, list[torch.Tensor]]:
            torch.set_num_threads(1)  # a thread's intra-op setting is its own
            vl, v_loss = value_part()
            self.accelerator.backward(v_loss)
            return vl, v_loss.detach(), _grad_norms(value_params)

        with cpu_threads(1):
            future = self._pool.submit(value_job)
            try:
                pl, entropy, p_loss = policy_part()
                self.accelerator.backward(p_loss)
                p_norms = _grad_norms(policy_params)
            finally:
                vl, v_loss, v_norms = future.result()  # waits even when the policy half failed
        return pl, entropy, vl, p_loss.detach() + v_loss, p_norms + v_norms

    def _clip_by_norms(self, norms: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` from per-tensor norms already taken, in ``model.parameters()`` order.

        Same total norm and scaling as torch's; the multiply is skipped when the factor is exactly 1.
        """
        if not norms:
            return torch.tensor(0.0)
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if float(factor) < 1.0:
            torch._foreach_mul_([p.grad for group in self._grad_params for p in group if p.grad is not None], factor)
        return total

    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        from accelerate.utils import reduce

        return reduce(t.to(self.device), reduction="sum").to(t.device)

    def _prompt_decoded(self, i: int) -> str:
        """The prompt's tokens decoded back to text (cached: every response is cut against it)."""
        text = self._prompt_text_cache.get(i)
        if text is None:
            text = self.tokenizer.decode(self._prompt_ids[i], skip_special_tokens=True)
            self._prompt_text_cache[i] = text
        return text

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.config.seed, 10_007, epoch]).permutation(len(self.prompts))

    def _next_prompt_indices(self) -> list[int]:
        G = self._global_batch
        if self._data_pos + G > len(self.prompts):
            # drop the ragged tail so every update has a full global batch
            self._data_epoch += 1
            self._data_pos = 0
            self._perm = self._permutation(self._data_epoch)
        start = self._data_pos + self.rank * self.config.batch_size
        idx = self._perm[start:start + self.config.batch_size].tolist()
        self._data_pos += G
        return idx

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


# ---------------------------------------------------------------------- helpers
def _grad_norms(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The 2-norm of each gradient present, as ``clip_grad_norm_`` takes them."""
    grads = [p.grad for p in params if p.grad is not None]
    return list(torch._foreach_norm(grads, 2.0)) if grads else []


# glibc's mallopt parameters (malloc.h) and the values set: buffers up to 32 MiB come from the heap
# and stay there, where the default dynamic threshold hands many activation-sized ones to mmap
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD_BYTES = 32 << 20


def tune_glibc_malloc() -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl) has no such entry point
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, 2 * MALLOC_MMAP_THRESHOLD_BYTES)
    )


def _adamw(params: list[nn.Parameter], config: PPOConfig) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it for these parameters (one kernel instead of a
    per-tensor loop: the step of a small model is otherwise dominated by dispatch overhead)."""
    kw = dict(lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps,
              weight_decay=config.weight_decay)
    if all(p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
           and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(params, **kw)


def _default_value_model(policy: nn.Module, seed: int) -> nn.Module:
    """A fresh sequence-classification model (num_labels=1) with the policy's architecture."""
    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(policy.config)
    cfg.num_labels = 1
    state = torch.get_rng_state()
    torch.manual_seed(seed + 1)
    try:
        model = AutoModelForSequenceClassification.from_config(cfg)
    finally:
        torch.set_rng_state(state)
    return model.to(next(policy.parameters()).device)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability in ``model`` to zero (modules and float attributes alike)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "hidden_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
