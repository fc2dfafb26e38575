"""The whole DAG on conversational data: a real `kedro run --env tiny` (forked, tests/harness.py) of the
synthetic task given as chat messages, data_prep through PPO, its evaluation and the served model."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from calibrated_rlhf.core import chat
from calibrated_rlhf.core.normalization import RewardTransform
from calibrated_rlhf.core.preferences import is_conversational, plain, tokenize_pairs
from calibrated_rlhf.core.reward_model import score_sequences
from tests.harness import kedro_run, latest_run, preload, saved
from tests.project import make_project

# conf/tiny, as chat, with fewer pairs and shorter sampling (reference replies, PPO); every stage but the
# run-comparison report
STAGES = "data_prep,reward_model,calibration,policy_init,normalization,ppo"
CHAT_PARAMS = ",".join([
    "data_prep.source.synthetic.format=conversational",
    "data_prep.source.synthetic.n_pairs=160",
    "normalization.max_new_tokens=8",
    "ppo.trainer.num_updates=2",
    "ppo.evaluation.n_prompts=4",
])


def newest(project, filepath: str):
    """The newest completed version's file or folder of a versioned catalog entry."""
    root = project / filepath
    (version,) = sorted((p for p in root.iterdir() if (p / "_complete.json").exists()), reverse=True)[:1]
    return version / root.name


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    preload()
    project = make_project(tmp_path_factory.mktemp("chat_run") / "project")
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", STAGES, "--params", CHAT_PARAMS, name="chat")
    assert code == 0, out[-4000:]
    return project


@pytest.fixture(scope="module")
def models(chat_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(newest(chat_run, "data/06_models/tokenizer"))
    model = AutoModelForSequenceClassification.from_pretrained(newest(chat_run, "data/06_models/reward_model"))
    return tokenizer, model.eval()


def reward_of_replies(tokenizer, model, prompts, replies) -> np.ndarray:
    """Raw rewards of replies as the reward model's training pairs are tokenized (assistant messages)."""
    pairs = pd.DataFrame({"prompt": prompts, "chosen": [[{"role": "assistant", "content": r}] for r in replies]})
    pairs["rejected"] = pairs["chosen"]
    return score_sequences(model, list(tokenize_pairs(pairs, tokenizer)["chosen_ids"]), tokenizer.pad_token_id)


def test_the_tokenizer_speaks_the_template_and_ends_turns_with_eos(chat_run, models):
    tokenizer, _ = models
    train = saved(chat_run, "data/03_primary/train_pairs.parquet")
    assert all(is_conversational(p) and is_conversational(c) for p, c in zip(train["prompt"], train["chosen"]))
    assert chat.end_of_turn_id(tokenizer) == tokenizer.eos_token_id
    # the role markers are whole tokens of the tokenizer trained on the rendered chat
    assert {"\u2581<user>", "\u2581<assistant>"} <= set(tokenizer.get_vocab())


def test_normalization_sampled_chat_replies_and_scored_them_as_assistant_messages(chat_run, models):
    tokenizer, model = models
    reference = saved(chat_run, "data/07_model_output/reference_responses.parquet")
    prompts = [plain(p) for p in reference["prompt"]]
    calibration = saved(chat_run, "data/03_primary/calibration_pairs.parquet")
    assert {json.dumps(p) for p in prompts} == {json.dumps(plain(p)) for p in calibration["prompt"]}
    assert all(p[-1]["role"] == "user" for p in prompts)
    replies = list(reference["response"])
    assert all(isinstance(r, str) for r in replies)
    transform = RewardTransform.from_dict(saved(chat_run, "data/06_models/reward_transform.json"))
    calibrated = transform.calibrate(reward_of_replies(tokenizer, model, prompts, replies))
    assert transform.n == len(replies)
    assert transform.mean == pytest.approx(calibrated.mean(), rel=1e-4, abs=1e-5)
    assert transform.std == pytest.approx(calibrated.std(), rel=1e-4)


def test_ppo_scored_its_chat_replies_as_pairs_would_be_and_evaluation_ran(chat_run, models):
    tokenizer, model = models
    samples = pd.read_csv(newest(chat_run, "data/07_model_output/ppo_samples.csv"))
    prompts = [json.loads(p) for p in samples["prompt"]]
    assert prompts and all(p[0]["role"] == "user" for p in prompts)
    replies = samples["response"].fillna("").tolist()
    np.testing.assert_allclose(samples["raw"], reward_of_replies(tokenizer, model, prompts, replies), atol=1e-4)
    metrics = latest_run(chat_run).data.metrics
    for key in ("ppo/eval/gold_reference", "ppo/eval/gold_policy", "ppo/eval/gold_gain_ci_low",
                "ppo/rewards/normalized", "ppo/rewards/gold", "normalization/mean", "normalization/std"):
        assert math.isfinite(metrics[key]), key
    assert metrics["normalization/std"] > 0


def test_the_served_model_takes_message_lists(chat_run, models, monkeypatch):
    import mlflow

    monkeypatch.chdir(chat_run)  # where the run's artifacts are

    tokenizer, model = models
    published = saved(chat_run, "data/06_models/published_reward_model.json")
    test = saved(chat_run, "data/03_primary/test_pairs.parquet").head(3)
    prompts, replies = [plain(p) for p in test["prompt"]], [plain(c)[0]["content"] for c in test["chosen"]]
    mlflow.set_tracking_uri(f"sqlite:///{chat_run / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model(published["model_uri"])
    out = served.predict(pd.DataFrame({"prompt": prompts, "response": replies}))
    np.testing.assert_allclose(out["raw"], reward_of_replies(tokenizer, model, prompts, replies), atol=1e-5)
    as_messages = served.predict(pd.DataFrame({"prompt": prompts, "chosen": [plain(c) for c in test["chosen"]],
                                               "rejected": [plain(r) for r in test["rejected"]]}))
    np.testing.assert_allclose(as_messages["raw_chosen"], out["raw"], atol=1e-5)
