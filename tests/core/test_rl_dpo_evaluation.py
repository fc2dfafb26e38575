"""DPO's implicit reward as a Bradley-Terry reward (its calibration on pairs with known probabilities), and the
one evaluation protocol's KL and gold figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from calibrated_rlhf.core.backbone import BackboneParams, build_causal_backbone
from calibrated_rlhf.core.calibration import fit_temperature
from calibrated_rlhf.core.evaluation import evaluate_policy, sequence_logprobs
from calibrated_rlhf.core.metrics import preference_report
from calibrated_rlhf.core.rl import dpo
from calibrated_rlhf.core.synthetic import SyntheticTask
from tests.conftest import TINY_BACKBONE


@pytest.fixture(scope="module")
def two_policies(tiny_tokenizer):
    reference = build_causal_backbone(BackboneParams(**TINY_BACKBONE, seed=0), tiny_tokenizer).eval()
    policy = build_causal_backbone(BackboneParams(**TINY_BACKBONE, seed=1), tiny_tokenizer).eval()
    return policy, reference


def _logprob(model, ids: list[int], start: int) -> float:
    """log p(ids[start:] | ids[:start]) from one unpadded forward: the definition, written out."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    return float(sum(logits[t - 1, ids[t]] for t in range(start, len(ids))))


def test_implicit_reward_is_beta_log_ratio_on_dpos_completion_split(two_policies, tiny_tokenizer):
    policy, reference = two_policies
    prompt, completion = "Describe the food in Paris.", " calm bright"
    prompt_ids, ids = dpo.completion_ids(tiny_tokenizer, prompt, completion)
    assert ids[-1] == tiny_tokenizer.eos_token_id and prompt_ids + ids == tiny_tokenizer(
        prompt + completion + tiny_tokenizer.eos_token)["input_ids"]
    full, start = prompt_ids + ids, len(prompt_ids)
    expected = 0.3 * (_logprob(policy, full, start) - _logprob(reference, full, start))
    got = dpo.implicit_rewards(policy, reference, tiny_tokenizer, [prompt, prompt], [completion, " dull"], 0.3)
    assert got[0] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_implicit_reward_calibrates_like_a_reward_model_on_pairs_with_known_probabilities(two_policies,
                                                                                         tiny_tokenizer,
                                                                                         synthetic_pairs):
    """Labels drawn from sigmoid(implicit margin / T): the temperature fit recovers T, and after it the
    test NLL sits at the Bayes NLL of the known probabilities."""
    policy, reference = two_policies
    rng = np.random.default_rng(0)
    base = synthetic_pairs.sample(n=600, replace=True, random_state=0).reset_index(drop=True)
    margin = (dpo.implicit_rewards(policy, reference, tiny_tokenizer, list(base["prompt"]), list(base["chosen"]), 0.5)
              - dpo.implicit_rewards(policy, reference, tiny_tokenizer, list(base["prompt"]), list(base["rejected"]),
                                     0.5))
    true_t = float(margin.std()) / 2.0  # calibrated logits of std 2: informative, not saturated
    p = 1.0 / (1.0 + np.exp(-margin / true_t))
    first = rng.random(len(p)) < p  # the first response is preferred with probability p
    pairs = pd.DataFrame({"pair_id": np.arange(len(p)), "prompt": base["prompt"],
                          "chosen": np.where(first, base["chosen"], base["rejected"]),
                          "rejected": np.where(first, base["rejected"], base["chosen"]),
                          "true_prob": np.where(first, p, 1 - p)})
    scores = dpo.score_pairs(policy, reference, tiny_tokenizer, pairs, 0.5)
    margins = (scores["reward_chosen"] - scores["reward_rejected"]).to_numpy()
    np.testing.assert_allclose(margins, np.where(first, margin, -margin), rtol=1e-5, atol=1e-6)
    calibration, test = slice(0, 300), slice(300, None)
    fit = fit_temperature(margins[calibration])
    assert abs(fit.temperature - true_t) < 3 * fit.std_error
    after = preference_report(margins[test], fit.temperature, scores["true_prob"].to_numpy()[test])
    assert after["nll"] - after["bayes_nll"] < 0.02
    assert after["ece_equal_mass"] < 0.08


def test_evaluation_protocol_kl_and_gold(two_policies, tiny_tokenizer):
    policy, reference = two_policies
    task = SyntheticTask.from_dict({"words": ["calm", "bright", "dull"], "utilities": [0.5, 1.0, -1.0], "scale": 4.0})
    prompts = ["Describe the food in Paris.", "Describe the weather in Oslo.", "Describe a day."]
    same = evaluate_policy(reference, reference, tiny_tokenizer, prompts, task, 3, 6, seed=5)
    assert same.kl_reference == 0.0 and same.gold_gain == 0.0  # the same samples, the same model
    other = evaluate_policy(policy, reference, tiny_tokenizer, prompts, task, 3, 6, seed=5)
    assert other.kl_reference_ci_low > 0  # two random models: far apart on the policy's own samples
    assert other.gold_reference == same.gold_reference  # the reference's samples do not depend on the policy
    assert set(other.metrics()) >= {"eval/kl_reference", "eval/gold_gain", "eval/gold_gain_ci_low"}
    assert "eval/gold_gain" not in evaluate_policy(policy, reference, tiny_tokenizer, prompts, None, 2, 6,
                                                       seed=5).metrics()
    # batched, right-padded log-probabilities equal the unpadded definition
    rows = [([1, 5, 7], [9, 3]), ([1, 4], [8, 8, 2, 6])]
    got = sequence_logprobs(policy, [r[0] for r in rows], [r[1] for r in rows], tiny_tokenizer.pad_token_id)
    for value, (p, r) in zip(got, rows):
        assert value == pytest.approx(_logprob(policy, p + r, len(p)), rel=1e-4)
