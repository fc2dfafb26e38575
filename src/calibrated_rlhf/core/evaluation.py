"""The one evaluation protocol of every RL method (PPO, RLOO, GRPO, DPO): the final policy's gold reward on
test prompts against the reference policy's, with a 95% interval of the gain paired by prompt, and the
final policy's KL to the reference measured on the same samples.

The KL is the k1 estimate of each sampled sequence's summed KL(pi || pi_ref), EOS included, averaged: the
same quantity the KL controllers target, so methods are compared in one unit (nats per sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core.gold import Gold
from calibrated_rlhf.core.policy import decode_samples, sample_ids
from calibrated_rlhf.core.progress import Progress

Z_95 = 1.96


@dataclass(frozen=True)
class PolicyEvaluation:
    """Figures of one evaluation; ``gold_*`` are NaN off the synthetic task (no gold reward there)."""

    gold_reference: float
    gold_policy: float
    gold_gain: float
    gold_gain_ci_low: float
    gold_gain_ci_high: float
    kl_reference: float  # mean per-sequence KL(pi || pi_ref) on the policy's samples, nats
    kl_reference_ci_low: float
    kl_reference_ci_high: float

    def metrics(self) -> dict[str, float]:
        """The figures under the protocol's metric keys (gold figures only when they exist)."""
        out = {keys.EVAL_KL_REFERENCE: self.kl_reference, keys.EVAL_KL_REFERENCE_CI_LOW: self.kl_reference_ci_low,
               keys.EVAL_KL_REFERENCE_CI_HIGH: self.kl_reference_ci_high}
        if not np.isnan(self.gold_policy):
            out |= {keys.EVAL_GOLD_REFERENCE: self.gold_reference, keys.EVAL_GOLD_POLICY: self.gold_policy,
                    keys.EVAL_GOLD_GAIN: self.gold_gain, keys.EVAL_GOLD_GAIN_CI_LOW: self.gold_gain_ci_low,
                    keys.EVAL_GOLD_GAIN_CI_HIGH: self.gold_gain_ci_high}
        return out


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and its normal 95% interval."""
    arr = np.asarray(values, dtype=np.float64)
    half = Z_95 * arr.std(ddof=1) / np.sqrt(len(arr)) if len(arr) > 1 else float("nan")
    return float(arr.mean()), float(arr.mean() - half), float(arr.mean() + half)


@torch.inference_mode()
def sequence_logprobs(model: torch.nn.Module, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]],
                      pad_token_id: int, batch_size: int = 64) -> np.ndarray:
    """Sum of each response's token log-probabilities under ``model``, given its prompt (right-padded batches)."""
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros(len(response_ids))
    for start in range(0, len(response_ids), batch_size):
        rows = [list(p) + list(r) for p, r in zip(prompt_ids[start:start + batch_size],
                                                  response_ids[start:start + batch_size])]
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
        token = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        for i, (p, r) in enumerate(zip(prompt_ids[start:start + batch_size], response_ids[start:start + batch_size])):
            # the token at position t is predicted at t - 1
            out[start + i] = float(token[i, len(p) - 1:len(p) - 1 + len(r)].sum())
    return out


def evaluate_policy(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer, prompts: list,
                    task: Gold | None, samples_per_prompt: int, max_new_tokens: int,
                    seed: int) -> PolicyEvaluation:
    """Sample ``samples_per_prompt`` responses per prompt from both policies with the same seed; the gold gain
    is paired by prompt, and the KL is measured on the policy's own samples."""
    def sample(model):
        rows = sample_ids(model, tokenizer, prompts, samples_per_prompt, max_new_tokens, seed=seed)
        return rows, decode_samples(tokenizer, rows)

    with Progress(2 if task is None else 3, "evaluation (policy samples, KL, reference samples)") as bar:
        rows, texts = sample(policy)
        bar.update(1)
        prompt_ids, response_ids = [r[1] for r in rows], [r[2] for r in rows]
        kl = (sequence_logprobs(policy, prompt_ids, response_ids, tokenizer.pad_token_id)
              - sequence_logprobs(reference, prompt_ids, response_ids, tokenizer.pad_token_id))
        bar.update(1, kl_reference=float(kl.mean()))
        nan = float("nan")
        gold = (nan,) * 5
        if task is not None:
            _, ref_texts = sample(reference)

            def per_prompt(responses: list[str]) -> np.ndarray:
                g = task.gold_rewards([r[0] for r in rows], responses)
                return g.reshape(len(prompts), samples_per_prompt).mean(axis=1)

            ref, new = per_prompt(ref_texts), per_prompt(texts)
            gold = (float(ref.mean()), float(new.mean()), *mean_interval(new - ref))
            bar.update(1, gold_gain=gold[2])
    return PolicyEvaluation(*gold, *mean_interval(kl))
