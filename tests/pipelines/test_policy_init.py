import numpy as np
import torch
import pytest

from calibrated_rlhf.core.backbone import BackboneParams, build_causal_backbone
from calibrated_rlhf.core.policy import SFTParams, decode_in_context, sample_responses
from calibrated_rlhf.core.synthetic import SyntheticSpec, make_task
from calibrated_rlhf.pipelines.normalization.nodes import NormalizationParams, reference_set
from calibrated_rlhf.pipelines.policy_init import create_pipeline
from calibrated_rlhf.pipelines.policy_init.nodes import PolicyInitParams
from tests.conftest import TINY_BACKBONE
from tests.pipelines.helpers import run


@pytest.fixture(scope="module")
def sft_out(tiny_tokenizer, synthetic_pairs):
    return run(create_pipeline(), {
        "tokenizer": tiny_tokenizer,
        "train_pairs": synthetic_pairs,
        "params:backbone": BackboneParams(**TINY_BACKBONE),
        "params:policy_init": PolicyInitParams(sft=SFTParams(num_train_epochs=3, per_device_train_batch_size=16,
                                                             learning_rate=3e-3, logging_steps=5)),
    })


def test_sft_lowers_the_loss_and_the_policy_writes_task_words(sft_out, tiny_tokenizer, synthetic_pairs):
    losses = [p["value"] for p in sft_out["policy_init_history"]["policy_init/train/loss"]]
    assert losses[-1] < 0.7 * losses[0]
    samples = sample_responses(sft_out["reference_policy"], tiny_tokenizer, list(synthetic_pairs["prompt"][:8]),
                               samples_per_prompt=2, max_new_tokens=12, seed=0)
    words = set(make_task(SyntheticSpec(seed=1, n_words=12)).words)
    written = [w for _, r in samples for w in r.split()]
    assert sum(w in words for w in written) > 0.5 * len(written)
    # responses continue their prompt as the training text does: with a leading space
    non_empty = [r for _, r in samples if r]
    assert sum(r.startswith(" ") for r in non_empty) > 0.6 * len(non_empty)


def test_sampling_is_seeded(sft_out, tiny_tokenizer):
    a = sample_responses(sft_out["reference_policy"], tiny_tokenizer, ["Describe the food in Paris."], 3, 10, seed=1)
    b = sample_responses(sft_out["reference_policy"], tiny_tokenizer, ["Describe the food in Paris."], 3, 10, seed=1)
    assert a == b


def test_decode_in_context_round_trips_prompt_plus_response(tiny_tokenizer):
    prompt, response = "Describe the food in Paris.", " calm bright"
    p_ids = tiny_tokenizer(prompt)["input_ids"]
    full = tiny_tokenizer(prompt + response)["input_ids"]
    assert full[: len(p_ids)] == p_ids
    assert decode_in_context(tiny_tokenizer, p_ids, full[len(p_ids):]) == response


def test_reference_set_samples_the_policy_on_held_out_prompts(sft_out, tiny_tokenizer, synthetic_pairs):
    params = NormalizationParams(samples_per_prompt=3, max_new_tokens=8)
    held_out = synthetic_pairs[:10]
    ref = reference_set(held_out, sft_out["reference_policy"], tiny_tokenizer, params)
    assert len(ref) == 3 * held_out["prompt"].nunique()
    assert set(ref["prompt"]) == set(held_out["prompt"])
    own = reference_set(held_out, None, tiny_tokenizer, NormalizationParams(reference="dataset_responses"))
    assert set(own["response"]) == set(held_out["chosen"]) | set(held_out["rejected"])


def test_a_given_model_is_used_as_is(tmp_path, tiny_tokenizer, synthetic_pairs):
    model = build_causal_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer)
    model.save_pretrained(tmp_path / "policy")
    out = run(create_pipeline(), {
        "tokenizer": tiny_tokenizer, "train_pairs": synthetic_pairs,
        "params:backbone": BackboneParams(**TINY_BACKBONE),
        "params:policy_init": PolicyInitParams(name_or_path=str(tmp_path / "policy")),
    })
    for a, b in zip(model.parameters(), out["reference_policy"].parameters()):
        np.testing.assert_array_equal(a.detach().numpy(), b.detach().numpy())


def test_sft_through_lora_returns_a_merged_plain_model(tiny_tokenizer, synthetic_pairs):
    from calibrated_rlhf.core.lora import LoraParams, has_adapters
    from calibrated_rlhf.pipelines.policy_init.nodes import init_policy

    backbone = BackboneParams(**TINY_BACKBONE)
    base = build_causal_backbone(backbone, tiny_tokenizer)  # the same seeded init the node builds
    params = PolicyInitParams(sft=SFTParams(per_device_train_batch_size=16, learning_rate=1e-2,
                                            lora=LoraParams(r=4, alpha=8)))
    model, _ = init_policy(tiny_tokenizer, synthetic_pairs[:64], backbone, params)
    assert type(model) is type(base) and not has_adapters(model)
    assert not any("lora" in k for k in model.state_dict())
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)  # not adapted
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[q], base.state_dict()[q])  # the adapters, merged
    assert all(p.requires_grad for p in model.parameters())  # a plain model again, as PPO expects


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_checkpoint_folder_loads_in_the_configured_dtype_and_attention(chat_checkpoint, dtype):
    from transformers import AutoTokenizer

    from calibrated_rlhf.core.backbone import build_reward_backbone, load_tokenizer

    assert AutoTokenizer.from_pretrained(chat_checkpoint).pad_token is None
    tokenizer = load_tokenizer(str(chat_checkpoint))
    assert tokenizer.pad_token == tokenizer.eos_token
    params = BackboneParams(name_or_path=str(chat_checkpoint), dtype=dtype, attn_implementation="eager")
    for model in (build_causal_backbone(params, tokenizer), build_reward_backbone(params, tokenizer)):
        assert model.dtype == getattr(torch, dtype)
        assert model.config._attn_implementation == "eager"
        assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.score.out_features == 1  # the score head added to a causal-LM checkpoint
