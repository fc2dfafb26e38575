"""The whole DAG from a local checkpoint folder of a real architecture, with LoRA, through `kedro run`.

The folder (``tests.chat_checkpoint``: Qwen2, a ChatML template, a tokenizer without a pad token) is
read with ``from_pretrained`` as a downloaded model is. The reward model and PPO train through LoRA
adapters; what the run saves must be plain, merged transformers models that the next stage loads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.harness import kedro_run, preload, squash

pytestmark = pytest.mark.slow

STAGES = "data_prep,reward_model,calibration,policy_init,normalization,ppo"


def newest(project: Path, filepath: str) -> Path:
    """The folder or file the newest completed run saved at a versioned catalog ``filepath``."""
    root = project / filepath
    versions = sorted(p for p in root.iterdir() if (p / "_complete.json").exists())
    assert versions, f"no completed version under {root}"
    return versions[-1] / root.name


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def chat_run(tiny_run_project, chat_checkpoint):
    preload()
    params = ",".join([f"backbone.name_or_path={chat_checkpoint}", f"policy_init.name_or_path={chat_checkpoint}",
                       "reward_model.training.lora={r: 4}", "ppo.trainer.lora={r: 4}", "ppo.trainer.num_updates=2",
                       "ppo.evaluation.n_prompts=4"])
    # every stage that builds, trains, loads or publishes a model; the run comparison (reporting) reads MLflow only
    code, log = kedro_run(tiny_run_project, "--env", "tiny", "--params", params, "--pipelines", STAGES,
                          name="chat_checkpoint")
    assert code == 0, log[-4000:]
    return tiny_run_project, log


def test_pad_token_is_added_to_the_tokenizer_and_the_reward_models_config(chat_run, chat_checkpoint):
    from transformers import AutoConfig, AutoTokenizer

    project, _ = chat_run
    assert AutoTokenizer.from_pretrained(chat_checkpoint).pad_token is None  # the source stays as it was
    tokenizer = AutoTokenizer.from_pretrained(newest(project, "data/06_models/tokenizer"))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template.startswith("{% for message in messages %}{{ '<|im_start|>'")
    config = AutoConfig.from_pretrained(newest(project, "data/06_models/reward_model"))
    assert config.architectures == ["Qwen2ForSequenceClassification"] and config.num_labels == 1
    assert config.pad_token_id == tokenizer.pad_token_id


def test_saved_models_are_merged_plain_transformers_models(chat_run, chat_checkpoint):
    project, _ = chat_run
    source = weights(chat_checkpoint)
    rm_folder = newest(project, "data/06_models/reward_model")
    reference, policy = (weights(newest(project, f"data/06_models/{name}")) for name in ("reference_policy", "policy"))
    reward_model = weights(rm_folder)
    for folder in (rm_folder, newest(project, "data/06_models/policy")):
        assert not (folder / "adapter_config.json").exists()
    for state in (reward_model, policy):
        assert not [k for k in state if "lora" in k]
    # policy_init.name_or_path: the checkpoint used as is
    assert all(torch.equal(reference[k], source[k]) for k in source)
    # LoRA adapts the trunk's linear layers and leaves the embeddings; merged, the change is in the weights
    q = "model.layers.0.self_attn.q_proj.weight"
    for state, base in ((reward_model, source), (policy, reference)):
        assert torch.equal(state["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
        assert not torch.equal(state[q], base[q])  # PPO (and reward-model training) changed the model
    assert reward_model["score.weight"].shape == (1, 32)


def test_rewards_are_finite_and_the_console_is_quiet(chat_run):
    project, log = chat_run
    transform = json.loads(newest(project, "data/06_models/reward_transform.json").read_text())
    assert math.isfinite(transform["temperature"]) and transform["temperature"] > 0
    assert math.isfinite(transform["mean"]) and transform["std"] > 0
    text = squash(log)
    assert "PPO2/2(" in text  # the terse progress line of a run whose stderr is a file
    for noise in ("register_new_resolver()isdeprecated", "`gradient_checkpointing`isdeprecated",
                  "`is_gradient_checkpointing`isdeprecated"):
        assert noise not in text
