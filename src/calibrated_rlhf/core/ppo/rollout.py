"""Models as PPO sees them, and rollout sampling with a KV cache.

A policy is any transformers causal LM: it is split into its backbone
(``getattr(model, model.base_model_prefix)``) and output head (``get_output_embeddings()``) so
logits are only computed over the response window. A separate value model is a transformers
``*ForSequenceClassification`` with ``num_labels=1`` (backbone + ``score`` head), read per token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from calibrated_rlhf.core.causal_lm import (backbone_of, position_ids_from_mask, response_mask, sample_categorical,
                                            value_head_of)
from calibrated_rlhf.core.ppo.losses import logprobs_from_logits
from calibrated_rlhf.core.speed import frozen_trunk, trimmed_forward
from calibrated_rlhf.core.speed.config import PPOSpeed
from calibrated_rlhf.core.speed.fast_decode import Decoding


def _response_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response_start: int,
    trim: bool = False,
    trunk: frozen_trunk.Trunk | None = None,
) -> torch.Tensor:
    """Last hidden states at the positions that predict each response token: [B, R, H].

    The final token is left out of the forward: nothing is predicted from it and, attention being
    causal, no earlier position depends on it. ``trim`` runs the last layer at those positions only
    (:mod:`~calibrated_rlhf.core.speed.trimmed_forward`) where the architecture allows it; ``trunk`` (the
    batch's frozen layers, run once: :mod:`~calibrated_rlhf.core.speed.frozen_trunk`) starts the forward above
    them where the model shares them.
    """
    ids, attn, pos = input_ids[:, :-1], attention_mask[:, :-1], position_ids[:, :-1]
    backbone = backbone_of(model)
    shared = frozen_trunk.starts_from(model, trunk, ids, attn, pos)
    with frozen_trunk.layers_from(backbone, trunk.layer) if shared else contextlib.nullcontext():
        embeds = trunk.hidden if shared else None
        if trim:
            h = trimmed_forward.response_hidden(model, backbone, ids, attn, pos, response_start - 1, embeds)
            if h is not None:
                return h
        inputs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
        h = backbone(**inputs, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    return h[:, response_start - 1 :]


class PolicyAndValue(nn.Module):
    """Policy plus value function behind one ``forward``, so DDP sees a single module.

    ``value_model`` (separate mode) or ``value_head`` (shared mode: a linear map of the policy's
    last hidden state) must be given, not both. ``trim_last_layer``: see :func:`_response_hidden`.
    """

    def __init__(
        self, policy: nn.Module, value_model: nn.Module | None = None, value_head: nn.Module | None = None,
        trim_last_layer: bool = False,
    ) -> None:
        super().__init__()
        if (value_model is None) == (value_head is None):
            raise ValueError("give exactly one of value_model (separate) or value_head (shared)")
        self.policy = policy
        self.value_model = value_model
        self.value_head = value_head
        self.trim_last_layer = trim_last_layer

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        response_start: int,
        sampling_temperature: float = 1.0,
        trunk: frozen_trunk.Trunk | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, R, V] (already divided by sampling_temperature) and values [B, R] for the response.

        Position ``response_start - 1 + t`` predicts response token t and holds the value of the
        state before it is emitted.
        """
        h_resp = _response_hidden(self.policy, input_ids, attention_mask, position_ids, response_start,
                                  self.trim_last_layer, trunk)
        logits = self._logits(h_resp, sampling_temperature)
        if self.value_head is not None:
            values = self.value_head(h_resp).squeeze(-1)
        else:
            values = self.values(input_ids, attention_mask, position_ids, response_start, trunk)
        return logits, values

    def policy_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        response_start: int,
        sampling_temperature: float = 1.0,
        trunk: frozen_trunk.Trunk | None = None,
    ) -> torch.Tensor:
        """The policy half of ``forward`` (separate value model only)."""
        h_resp = _response_hidden(self.policy, input_ids, attention_mask, position_ids, response_start,
                                  self.trim_last_layer, trunk)
        return self._logits(h_resp, sampling_temperature)

    def _logits(self, h_resp: torch.Tensor, sampling_temperature: float) -> torch.Tensor:
        logits = self.policy.get_output_embeddings()(h_resp)
        return logits / sampling_temperature if sampling_temperature != 1.0 else logits

    def values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, response_start: int,
        trunk: frozen_trunk.Trunk | None = None,
    ) -> torch.Tensor:
        """The value half of ``forward`` (separate value model only)."""
        return sequence_values(self.value_model, input_ids, attention_mask, position_ids, response_start,
                               self.trim_last_layer, trunk)


def sequence_values(
    value_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response_start: int,
    trim: bool = False,
    trunk: frozen_trunk.Trunk | None = None,
) -> torch.Tensor:
    """Per-token values [B, R] from a sequence-classification model's head applied at every position."""
    h = _response_hidden(value_model, input_ids, attention_mask, position_ids, response_start, trim, trunk)
    return value_head_of(value_model)(h).squeeze(-1).float()


def response_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response_start: int,
    sampling_temperature: float = 1.0,
    trim: bool = False,
    trunk: frozen_trunk.Trunk | None = None,
) -> torch.Tensor:
    """log p(response token) [B, R] under a causal LM, with the sampling temperature applied."""
    h = _response_hidden(model, input_ids, attention_mask, position_ids, response_start, trim, trunk)
    logits = model.get_output_embeddings()(h).float()
    if sampling_temperature != 1.0:
        logits = logits / sampling_temperature
    return logprobs_from_logits(logits, input_ids[:, response_start:])


@dataclass
class Samples:
    """Output of :func:`sample_responses` (all [B, R] except the query tensors)."""

    responses: torch.Tensor  # sampled tokens; pad after the first EOS
    logprobs: torch.Tensor  # log p of each sampled token under the sampling policy (sampling_temperature applied)
    mask: torch.Tensor  # 1 for tokens up to and including the first EOS
    has_eos: torch.Tensor  # [B] bool
    values: torch.Tensor | None  # shared-trunk values read off the same forward passes


@dataclass
class Inputs:
    """Prompt + response token batch as the models read it; ``start`` is where the response begins."""

    ids: torch.Tensor
    attn: torch.Tensor
    pos: torch.Tensor
    start: int
    sampling_temperature: float
    trunk: frozen_trunk.Trunk | None = None  # the frozen layers' output over ``ids[:, :-1]`` (speed.frozen_trunk)

    def select(self, sel: torch.Tensor | None) -> "Inputs":
        if sel is None:
            return self
        return Inputs(self.ids[sel], self.attn[sel], self.pos[sel], self.start, self.sampling_temperature,
                      self.trunk.select(sel) if self.trunk is not None else None)


def batch_inputs(ids: torch.Tensor, attn: torch.Tensor, start: int, sampling_temperature: float, policy: nn.Module,
                 speed: PPOSpeed) -> Inputs:
    """A sampled batch as the models read it; with ``speed.frozen_trunk`` (the knobs that apply), the policy's
    frozen layers run over it once here, for every later forward to start above them."""
    pos = position_ids_from_mask(attn)
    trunk = (frozen_trunk.run_trunk(policy, ids[:, :-1], attn[:, :-1], pos[:, :-1]) if speed.frozen_trunk
             else None)
    return Inputs(ids, attn, pos, start, sampling_temperature, trunk)


@dataclass
class Rollout:
    """One update's batch on this process: what was sampled, how it scored, the old policy's view.

    Per-token tensors are [B, R] over the response window, zero past each response's end.
    """

    idx: list[int]  # prompt indices
    inputs: Inputs
    responses: torch.Tensor
    mask: torch.Tensor  # float, 1 for tokens up to and including the first EOS
    has_eos: torch.Tensor
    logprobs: torch.Tensor  # under the sampling policy
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: dict[str, torch.Tensor]  # every score_fn entry, sorted by name
    texts: list[str]  # decoded responses
    first: tuple[torch.Tensor, torch.Tensor] | None  # first PPO forward, when made at rollout time
    times: tuple[float, float, float]  # when sampling ended, scoring started, scoring ended


@dataclass
class Minibatch:
    """The rows of a :class:`Rollout` one optimizer step trains on, with their advantages and returns."""

    inputs: Inputs
    responses: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    old_values: torch.Tensor
    returns: torch.Tensor


@torch.inference_mode()
def sample_responses(
    policy: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_length: int,
    sampling_temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    value_head: nn.Module | None = None,
    speed: PPOSpeed | None = None,
) -> Samples:
    """Ancestral sampling (top_k=0, top_p=1) from left-padded prompts with a KV cache.

    The logprobs of the sampled tokens come from the same cached forward passes, so the rollout
    needs no second policy forward; with ``value_head`` the values do too. Sampling stops early
    once every row has produced EOS. ``speed`` (the knobs that apply; None: the plain path) picks how the
    steps after the prompt run (:class:`~calibrated_rlhf.core.speed.fast_decode.Decoding`).
    """
    lm_head = policy.get_output_embeddings()
    B = query_ids.shape[0]
    device = query_ids.device
    responses = torch.full((B, response_length), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, response_length), dtype=torch.float32, device=device)
    values = torch.zeros((B, response_length), dtype=torch.float32, device=device) if value_head is not None else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    decoding = Decoding(policy, query_ids, query_mask, response_length, speed)
    h = decoding.h
    for t in range(response_length):
        logits = lm_head(h).float()
        if sampling_temperature != 1.0:
            logits = logits / sampling_temperature
        probs = torch.softmax(logits, dim=-1)
        tok = sample_categorical(probs, generator)
        responses[:, t] = tok.squeeze(1)
        # the log of the one probability drawn, not a log_softmax over the vocabulary
        logprobs[:, t] = probs.gather(-1, tok).squeeze(1).log()
        if values is not None:
            values[:, t] = value_head(h).squeeze(-1).float()
        done = done | (tok.squeeze(1) == eos_token_id)
        if t + 1 == response_length or bool(done.all()):
            break
        h = decoding.step(tok, t)

    mask, has_eos = response_mask(responses, eos_token_id)
    responses = responses.masked_fill(~mask, pad_token_id)
    logprobs = logprobs * mask
    if values is not None:
        values = values * mask
    return Samples(responses=responses, logprobs=logprobs, mask=mask, has_eos=has_eos, values=values)


def score_tensors(scores: Mapping[str, Any], key: str, known_keys: list[str] | None, n: int,
                  device: torch.device | str) -> dict[str, torch.Tensor]:
    """``score_fn``'s output as float tensors [n] on ``device``, keys sorted; checks that the optimized
    ``key`` is there with one entry per episode and that the keys are ``known_keys`` (unless None)."""
    if key not in scores:
        raise KeyError(f"score_fn must return the optimized score under '{key}' (config.score_key)")
    keys = sorted(scores)
    if known_keys is not None and keys != known_keys:
        raise KeyError(f"score_fn keys changed from {known_keys} to {keys}")
    tensors = {k: torch.as_tensor(scores[k]).detach().float().reshape(-1).to(device) for k in keys}
    if tensors[key].numel() != n:
        raise ValueError(f"score_fn returned a '{key}' tensor of the wrong length")
    return tensors


