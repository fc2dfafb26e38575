"""The served reward model refuses (or, when configured, truncates) inputs longer than it was trained for."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from calibrated_rlhf.core.backbone import BackboneParams, build_reward_backbone
from calibrated_rlhf.core.normalization import RewardTransform
from calibrated_rlhf.serving import CalibratedRewardModel, RequestError, fit_lengths, length_limit
from tests.conftest import TINY_BACKBONE

TRAINED_LENGTH = 48


@pytest.fixture(scope="module")
def bundle(tiny_tokenizer, tmp_path_factory):
    """Artifacts as log_reward_model writes them: a tokenizer that records the trained length."""
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    build_reward_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer).save_pretrained(root / "reward_model")
    tiny_tokenizer.save_pretrained(root / "tokenizer")
    config = json.loads((root / "tokenizer" / "tokenizer_config.json").read_text())
    config["model_max_length"] = TRAINED_LENGTH
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    transform = RewardTransform(temperature=2.0, mean=0.5, std=1.5, clip=None, computed_on="test",
                                reward_model_version=None, n=10)
    (root / "reward_transform.json").write_text(json.dumps(transform.to_dict()))
    return {"reward_model": str(root / "reward_model"), "tokenizer": str(root / "tokenizer"),
            "reward_transform": str(root / "reward_transform.json")}


def served(bundle, **model_config) -> CalibratedRewardModel:
    m = CalibratedRewardModel()
    m.load_context(SimpleNamespace(artifacts=bundle, model_config={"overlength": "reject", **model_config}))
    return m


def requests(n_words: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"prompt": ["Q"] * len(n_words),
                         "response": [" " + " ".join(["calm"] * n) for n in n_words]})


def test_the_limit_is_the_trained_length_capped_by_the_positions(bundle):
    m = served(bundle)
    assert m.max_length == min(TRAINED_LENGTH, TINY_BACKBONE["max_position_embeddings"]) == TRAINED_LENGTH
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=16))
    assert length_limit(model, SimpleNamespace(model_max_length=int(1e30))) == 16  # untrained tokenizer: no record
    ensemble = SimpleNamespace(members=[model, SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8))])
    assert length_limit(ensemble, SimpleNamespace(model_max_length=128)) == 8


def test_overlong_inputs_are_refused_by_default_naming_the_rows(bundle):
    m = served(bundle)
    ok = m.predict(None, requests([2, 3]))
    assert len(ok) == 2
    with pytest.raises(RequestError, match=rf"longer than the model's {TRAINED_LENGTH} tokens .*: "
                                           r"column 'response' rows 1, 3 \(\d+ tokens in row 1\)"):
        m.predict(None, requests([2, 60, 3, 40]))
    pairs = pd.DataFrame({"prompt": ["Q"] * 2, "chosen": [" calm", " calm"], "rejected": [" calm", " calm" * 60]})
    with pytest.raises(RequestError, match=r"column 'rejected' rows 1 "):
        m.predict(None, pairs)


def test_truncate_when_configured_scores_the_first_tokens(bundle):
    m = served(bundle, overlength="truncate")
    long = requests([60])
    out = m.predict(None, long)
    assert fit_lengths({"r": [[1, 2, 3], [4]]}, 2, "truncate") == {"r": [[1, 2], [4]]}
    assert fit_lengths({"r": [[1, 2, 3], [4]]}, 2, "truncate", side="left") == {"r": [[2, 3], [4]]}
    # Scoring the first TRAINED_LENGTH tokens of the long text equals scoring the truncated ids directly.
    from calibrated_rlhf.core.scoring import score_rewards
    from calibrated_rlhf.core.preferences import render_ids

    full = render_ids(m.tokenizer, long["prompt"][0], long["response"][0])
    assert len(full) > TRAINED_LENGTH
    raw, _ = score_rewards(m.model, [full[:TRAINED_LENGTH]], m.tokenizer.pad_token_id)
    assert out["raw"][0] == pytest.approx(float(raw[0]), abs=1e-6)


def test_an_unknown_overlength_option_is_refused(bundle):
    with pytest.raises(ValueError, match="overlength: expected one of .* got 'clip'"):
        served(bundle, overlength="clip")


@pytest.mark.slow
def test_logged_model_refuses_by_default_and_truncates_when_loaded_so(bundle, tmp_path, tiny_tokenizer):
    import mlflow
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from calibrated_rlhf.serving import log_reward_model

    model = AutoModelForSequenceClassification.from_pretrained(bundle["reward_model"])
    tokenizer = AutoTokenizer.from_pretrained(bundle["tokenizer"])
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run():
            info = log_reward_model(model, tokenizer, json.loads(open(bundle["reward_transform"]).read()))
        with pytest.raises(Exception, match=r"column 'response' rows 0"):
            mlflow.pyfunc.load_model(info.model_uri).predict(requests([60]))
        out = mlflow.pyfunc.load_model(info.model_uri, model_config={"overlength": "truncate"}).predict(requests([60]))
        assert len(out) == 1
    finally:
        mlflow.set_tracking_uri(None)


def test_requests_take_message_lists_and_name_a_malformed_one():
    from calibrated_rlhf.serving import check_request

    user = [{"role": "user", "content": "Describe the food in Paris."}]
    assert check_request(pd.DataFrame({"prompt": [user], "response": ["calm bright"]})) == "responses"
    assert check_request(pd.DataFrame({"prompt": [user], "chosen": [[{"role": "assistant", "content": "calm"}]],
                                       "rejected": ["noisy"]})) == "pairs"
    with pytest.raises(RequestError, match=r"column 'prompt' needs text; bad rows: 1 \(row 1: message 0 lacks"):
        check_request(pd.DataFrame({"prompt": [user, [{"content": "no role"}]], "response": ["a", "b"]}))
    with pytest.raises(RequestError, match=r"column 'chosen' needs non-empty text; bad rows: 0 \(row 0: message 0 "
                                           r"has empty content"):
        check_request(pd.DataFrame({"chosen": [[{"role": "assistant", "content": " "}]], "rejected": ["b"]}))

