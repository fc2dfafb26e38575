"""The whole DAG on conversational data from a local checkpoint folder of a real architecture, with LoRA,
through one real `kedro run` (forked, tests/harness.py).

The folder (``tests.chat_checkpoint``: Qwen2, a ChatML template, a tokenizer without a pad token) is
read with ``from_pretrained`` as a downloaded model is. The synthetic task is given as chat messages, so
every policy sample (normalization's reference replies, PPO's rollouts, the evaluation) is rendered with
the ChatML template and ends at ``<|im_end|>``, and the reward model must score each reply exactly as a
pair with that reply is tokenized. The reward model and PPO train through LoRA adapters; what the run
saves must be plain, merged transformers models that the next stage loads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from calibrated_rlhf.core import chat
from calibrated_rlhf.core.normalization import RewardTransform
from calibrated_rlhf.core.preferences import is_conversational, plain, tokenize_pairs
from calibrated_rlhf.core.reward_model import score_sequences
from tests.harness import kedro_run, latest_run, preload, saved, squash

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


def chat_params(chat_checkpoint: Path) -> str:
    return ",".join([f"backbone.name_or_path={chat_checkpoint}", f"policy_init.name_or_path={chat_checkpoint}",
                     "data_prep.source.synthetic.format=conversational", "data_prep.source.synthetic.n_pairs=160",
                     "reward_model.training.lora={r: 4}", "ppo.trainer.lora={r: 4}", "ppo.trainer.num_updates=2",
                     "normalization.max_new_tokens=8", "ppo.evaluation.n_prompts=4"])


@pytest.fixture(scope="module")
def chat_run(tiny_run_project, chat_checkpoint):
    preload()
    params = chat_params(chat_checkpoint)
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
    # the terse progress lines of a run whose stderr is a file
    for loop in ("PPO2/2(", "referencesamples", "referencerewards", "rewardmodel"):
        assert loop in text, loop
    # the reward model from a causal LM: one line of ours instead of transformers' table of the expected keys
    assert "itstrunk,anewscorehead" in text and "LOADREPORT" not in text
    for noise in ("register_new_resolver()isdeprecated", "`gradient_checkpointing`isdeprecated",
                  "`is_gradient_checkpointing`isdeprecated", "PassingaPythonobjectas`python_model`"):
        assert noise not in text


def test_lora_ppo_measures_its_kl_against_the_policy_with_adapters_off(chat_run):
    """Update 1 samples from the initial policy (adapters start at zero): no divergence but float rounding
    between the sampling and the full forward (~1e-7 here). From update 2 the adapters have trained, so the KL to
    the reference (the same weights, adapters off) is well away from 0 (~1e-4 here; the per-batch estimate may
    be negative); a reference read with the adapters on would be the sampling policy itself, its KL at the
    rounding level at every update."""
    from mlflow import MlflowClient

    from calibrated_rlhf.core import metric_keys as keys

    project, _ = chat_run
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    kl = {m.step: m.value for m in client.get_metric_history(latest_run(project).info.run_id, keys.PPO_KL)}
    assert sorted(kl) == [1, 2], kl
    assert abs(kl[1]) < 1e-5 < abs(kl[2]), kl


@pytest.fixture(scope="module")
def models(chat_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    project, _ = chat_run
    tokenizer = AutoTokenizer.from_pretrained(newest(project, "data/06_models/tokenizer"))
    model = AutoModelForSequenceClassification.from_pretrained(newest(project, "data/06_models/reward_model"))
    return tokenizer, model.eval()


def reward_of_replies(tokenizer, model, prompts, replies) -> np.ndarray:
    """Raw rewards of replies as the reward model's training pairs are tokenized (assistant messages)."""
    pairs = pd.DataFrame({"prompt": prompts, "chosen": [[{"role": "assistant", "content": r}] for r in replies]})
    pairs["rejected"] = pairs["chosen"]
    return score_sequences(model, list(tokenize_pairs(pairs, tokenizer)["chosen_ids"]), tokenizer.pad_token_id)


def test_the_data_is_chat_and_replies_end_at_the_templates_end_of_turn(chat_run, models):
    project, _ = chat_run
    tokenizer, _ = models
    train = saved(project, "data/03_primary/train_pairs.parquet")
    assert all(is_conversational(p) and is_conversational(c) for p, c in zip(train["prompt"], train["chosen"]))
    assert chat.end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_normalization_sampled_chat_replies_and_scored_them_as_assistant_messages(chat_run, models):
    project, _ = chat_run
    tokenizer, model = models
    reference = saved(project, "data/07_model_output/reference_responses.parquet")
    prompts = [plain(p) for p in reference["prompt"]]
    calibration = saved(project, "data/03_primary/calibration_pairs.parquet")
    assert {json.dumps(p) for p in prompts} == {json.dumps(plain(p)) for p in calibration["prompt"]}
    assert all(p[-1]["role"] == "user" for p in prompts)
    replies = list(reference["response"])
    assert all(isinstance(r, str) for r in replies)
    transform = RewardTransform.from_dict(saved(project, "data/06_models/reward_transform.json"))
    calibrated = transform.calibrate(reward_of_replies(tokenizer, model, prompts, replies))
    assert transform.n == len(replies)
    assert transform.mean == pytest.approx(calibrated.mean(), rel=1e-4, abs=1e-5)
    assert transform.std == pytest.approx(calibrated.std(), rel=1e-4)


def test_ppo_scored_its_chat_replies_as_pairs_would_be_and_evaluation_ran(chat_run, models):
    project, _ = chat_run
    tokenizer, model = models
    samples = pd.read_csv(newest(project, "data/07_model_output/ppo_samples.csv"))
    prompts = [json.loads(p) for p in samples["prompt"]]
    assert prompts and all(p[0]["role"] == "user" for p in prompts)
    replies = samples["response"].fillna("").tolist()
    np.testing.assert_allclose(samples["raw"], reward_of_replies(tokenizer, model, prompts, replies), atol=1e-4)
    metrics = latest_run(project).data.metrics
    for key in ("eval/gold_reference", "eval/gold_policy", "eval/gold_gain_ci_low",
                "ppo/rewards/normalized", "ppo/rewards/gold", "normalization/mean", "normalization/std"):
        assert math.isfinite(metrics[key]), key
    assert metrics["normalization/std"] > 0


def test_the_served_model_takes_message_lists(chat_run, models, monkeypatch):
    import mlflow

    project, _ = chat_run
    monkeypatch.chdir(project)  # where the run's artifacts are

    tokenizer, model = models
    published = saved(project, "data/06_models/published_reward_model.json")
    test = saved(project, "data/03_primary/test_pairs.parquet").head(3)
    prompts, replies = [plain(p) for p in test["prompt"]], [plain(c)[0]["content"] for c in test["chosen"]]
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model(published["model_uri"])
    out = served.predict(pd.DataFrame({"prompt": prompts, "response": replies}))
    np.testing.assert_allclose(out["raw"], reward_of_replies(tokenizer, model, prompts, replies), atol=1e-5)
    as_messages = served.predict(pd.DataFrame({"prompt": prompts, "chosen": [plain(c) for c in test["chosen"]],
                                               "rejected": [plain(r) for r in test["rejected"]]}))
    np.testing.assert_allclose(as_messages["raw_chosen"], out["raw"], atol=1e-5)


@pytest.mark.parametrize("stage,algorithm", [("rl", "rloo"), ("rl", "grpo"), ("dpo", "dpo")])
def test_rloo_grpo_and_dpo_train_on_the_chat_data(chat_run, chat_checkpoint, stage, algorithm):
    """The other RL methods through a real `kedro run` of their stage on the chat run's conversational pairs
    and ChatML policy: each finishes and evaluates its policy on the gold reward. Last in the module: the tests
    above read the chat run as the project's latest."""
    from mlflow import MlflowClient

    from calibrated_rlhf.core import metric_keys as keys

    project, _ = chat_run
    params = chat_params(chat_checkpoint) + (f",rl.algorithm={algorithm}" if stage == "rl" else "")
    code, log = kedro_run(project, "--env", "tiny", "--params", params, "--pipelines", stage, name=f"chat_{algorithm}")
    assert code == 0, log[-4000:]
    run = latest_run(project)
    assert run.data.tags[keys.RL_ALGORITHM_TAG] == algorithm
    for key in (keys.EVAL_GOLD_POLICY, keys.EVAL_GOLD_GAIN, keys.EVAL_KL_REFERENCE):
        assert math.isfinite(run.data.metrics[key]), key
    if stage == "rl":  # tiny: 3 updates, each with the KL the controller read
        client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
        kl = client.get_metric_history(run.info.run_id, keys.RL_KL)
        assert len(kl) == 3 and all(math.isfinite(m.value) for m in kl)
    else:
        assert math.isfinite(run.data.metrics[keys.DPO_TRAIN_LOSS])


def test_two_runs_from_one_checkpoint_train_the_same_reward_model(tmp_path, chat_checkpoint):
    """The score head a checkpoint gets is new: drawn under ``backbone.seed``, so a rerun of one configuration
    trains the same reward model byte for byte, and another seed another one. Unseeded, the head followed
    whatever the process had drawn before it: the seed did nothing (the last assertion), and two fresh
    `kedro run --env real_model`s ended at different weights (forked runs here start from one generator state)."""
    from tests.project import make_project

    preload()
    project = make_project(tmp_path / "project")
    params = chat_params(chat_checkpoint)
    for i, seed in enumerate((0, 0, 1)):
        code, log = kedro_run(project, "--env", "tiny", "--pipelines", "data_prep,reward_model", "--params",
                              f"{params},backbone.seed={seed}", name=f"rerun_{i}")
        assert code == 0, log[-4000:]
    root = project / "data" / "06_models" / "reward_model"
    first, rerun, other = (v / "reward_model" / "model.safetensors" for v in sorted(root.iterdir()))
    assert first.read_bytes() == rerun.read_bytes()
    assert not torch.equal(weights(first.parent)["score.weight"], weights(other.parent)["score.weight"])
