import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from calibrated_rlhf.core.backbone import BackboneParams, build_reward_backbone
from calibrated_rlhf.core.normalization import RewardTransform
from calibrated_rlhf.pipelines.calibration.nodes import CalibrationParams, fit_calibration
from calibrated_rlhf.pipelines.normalization import nodes
from calibrated_rlhf.pipelines.pair_scores import score_pairs
from calibrated_rlhf.serving import RequestError, check_request, log_reward_model
from tests.conftest import TINY_BACKBONE
from tests.project import wait_until_up


class Affine(torch.nn.Module):
    """A reward model whose outputs are a * r + b: only its scale and offset differ."""

    def __init__(self, inner, a, b):
        super().__init__()
        self.inner, self.a, self.b = inner, a, b

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits = self.a * out.logits + self.b
        return out


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(0)
    m = build_reward_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer)
    with torch.no_grad():  # a random init scores everything alike; spread the head so rewards differ
        m.score.weight.mul_(50.0)
    return m.eval()


@pytest.fixture(scope="module")
def pairs(model, tiny_tokenizer, synthetic_pairs):
    """Pairs labelled by the model's own margins at temperature 0.5, so the fit has a finite answer."""
    df = synthetic_pairs.reset_index(names="pair_id")
    s = score_pairs(model, tiny_tokenizer, df)
    p = 1 / (1 + np.exp(-(s["reward_chosen"] - s["reward_rejected"]).to_numpy() / 0.5))
    swap = np.random.default_rng(0).random(len(df)) > p
    df.loc[swap, ["chosen", "rejected"]] = df.loc[swap, ["rejected", "chosen"]].to_numpy()
    return df


DATASET = nodes.NormalizationParams(reference="dataset_responses")


def transform_for(model, tokenizer, pairs, params=DATASET):
    fit = fit_calibration(score_pairs(model, tokenizer, pairs), CalibrationParams())
    responses = nodes.reference_responses(pairs)
    transform, metrics, figure = nodes.compute_reward_transform(model, tokenizer, responses, fit, params)
    return RewardTransform.from_dict(transform), metrics


@pytest.mark.parametrize("a,b", [(4.0, 0.0), (0.25, -3.0), (1.0, 10.0)])
def test_scale_and_offset_of_the_reward_model_do_not_reach_normalized_rewards(model, tiny_tokenizer, pairs, a, b):
    base, _ = transform_for(model, tiny_tokenizer, pairs)
    scaled_model = Affine(model, a, b)
    scaled, _ = transform_for(scaled_model, tiny_tokenizer, pairs)
    assert scaled.temperature == pytest.approx(a * base.temperature, rel=1e-6)
    raw = score_pairs(model, tiny_tokenizer, pairs)
    raw_scaled = score_pairs(scaled_model, tiny_tokenizer, pairs)
    np.testing.assert_allclose(scaled.normalize(raw_scaled["reward_chosen"].to_numpy()),
                               base.normalize(raw["reward_chosen"].to_numpy()), atol=1e-5)  # float32 logits
    np.testing.assert_allclose(
        scaled.preference_probability(raw_scaled["reward_chosen"].to_numpy(), raw_scaled["reward_rejected"].to_numpy()),
        base.preference_probability(raw["reward_chosen"].to_numpy(), raw["reward_rejected"].to_numpy()), atol=1e-5)


def test_transform_is_z_score_of_calibrated_rewards_on_the_reference(model, tiny_tokenizer, pairs):
    t, metrics = transform_for(model, tiny_tokenizer, pairs, nodes.NormalizationParams(reference="dataset_responses", clip=None))
    responses = nodes.reference_responses(pairs)
    assert len(responses) == t.n == metrics["normalization/n"]["value"]
    from calibrated_rlhf.core.preferences import render_ids
    from calibrated_rlhf.core.reward_model import score_sequences

    raw = score_sequences(model, [render_ids(tiny_tokenizer, p, r) for p, r in
                                  zip(responses["prompt"], responses["response"])], tiny_tokenizer.pad_token_id)
    normalized = t.normalize(raw)
    assert normalized.mean() == pytest.approx(0.0, abs=1e-9) and normalized.std() == pytest.approx(1.0, rel=1e-9)
    assert t.computed_on == "dataset_responses" and len(t.reward_model_version) == 64
    disabled, _ = transform_for(model, tiny_tokenizer, pairs, nodes.NormalizationParams(reference="dataset_responses", method="none"))
    assert (disabled.mean, disabled.std, disabled.computed_on) == (0.0, 1.0, "none")


def test_requests_are_checked_with_clear_errors():
    assert check_request(pd.DataFrame({"prompt": ["p"], "response": ["r"]})) == "responses"
    assert check_request(pd.DataFrame({"chosen": ["a"], "rejected": ["b"]})) == "pairs"
    with pytest.raises(RequestError, match="expected columns"):
        check_request(pd.DataFrame({"text": ["x"]}))
    with pytest.raises(RequestError, match=r"column 'rejected' needs non-empty text; bad rows: 1"):
        check_request(pd.DataFrame({"chosen": ["a", "b"], "rejected": ["c", " "]}))
    with pytest.raises(RequestError, match=r"column 'response' needs non-empty text; bad rows: 0"):
        check_request(pd.DataFrame({"response": [3]}))
    with pytest.raises(RequestError, match="DataFrame"):
        check_request([["a"]])


@pytest.fixture(scope="module")
def logged(model, tiny_tokenizer, pairs, tmp_path_factory):
    """The pyfunc bundle logged and registered in a scratch tracking store."""
    import mlflow

    t, _ = transform_for(model, tiny_tokenizer, pairs)
    store = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run():
            info = log_reward_model(model, tiny_tokenizer, t.to_dict(), registered_model_name="rm-test",
                                    input_example=pairs[["prompt", "chosen", "rejected"]][:2])
    finally:
        mlflow.set_tracking_uri(None)
    return {"uri": uri, "transform": t, "info": info, "dir": store}


def clean_env(home) -> dict:
    import os

    return {"PATH": os.environ["PATH"], "HOME": str(home)}


@pytest.mark.slow
def test_pyfunc_predicts_in_a_fresh_process_from_logged_artifacts(model, tiny_tokenizer, pairs, logged):
    t = logged["transform"]
    rows = pairs[["prompt", "chosen", "rejected"]][:5]
    code = f"""
import json, mlflow, pandas as pd
m = mlflow.pyfunc.load_model("models:/rm-test/1")
rows = pd.DataFrame(json.loads({rows.to_json(orient="records")!r}))
out = m.predict(rows)
single = m.predict(pd.DataFrame({{"prompt": rows["prompt"], "response": rows["chosen"]}}))
print("RESULT=" + json.dumps({{"pairs": out.to_dict("list"), "single": single.to_dict("list"),
                               "has_signature": m.metadata.signature is not None}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=logged["dir"],
                          env={**clean_env(logged["dir"]), "MLFLOW_TRACKING_URI": logged["uri"]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT=")[-1])
    raw_c = score_pairs(model, tiny_tokenizer, pairs[:5])["reward_chosen"].to_numpy()
    np.testing.assert_allclose(result["pairs"]["raw_chosen"], raw_c, atol=1e-5)
    np.testing.assert_allclose(result["single"]["normalized"], t.normalize(raw_c), atol=1e-5)
    np.testing.assert_allclose(result["pairs"]["p_chosen_preferred"],
                               t.preference_probability(np.array(result["pairs"]["raw_chosen"]),
                                                        np.array(result["pairs"]["raw_rejected"])), atol=1e-9)
    assert result["has_signature"]
    assert logged["info"].model_uri.startswith("models:/")


@pytest.mark.slow
def test_mlflow_models_serve_scores_on_loopback(model, tiny_tokenizer, pairs, logged):
    import os
    import signal
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/rm-test/1", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env={**clean_env(logged["dir"]), "MLFLOW_TRACKING_URI": logged["uri"]}, cwd=logged["dir"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def post(payload: dict) -> tuple[int, dict]:
        req = urllib.request.Request(f"{base}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    try:
        wait_until_up(f"{base}/ping", server, lambda: server.stdout.read().decode()[-3000:])
        rows = pairs[["prompt", "chosen"]][:3].rename(columns={"chosen": "response"})
        status, body = post({"dataframe_records": rows.to_dict("records")})
        assert status == 200, body
        normalized = [row["normalized"] for row in body["predictions"]]
        raw = score_pairs(model, tiny_tokenizer, pairs[:3])["reward_chosen"].to_numpy()
        np.testing.assert_allclose(normalized, logged["transform"].normalize(raw), atol=1e-5)
        status, body = post({"dataframe_records": [{"prompt": "x", "response": "  "}]})
        assert status >= 400 and "needs non-empty text" in json.dumps(body)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def ensemble(model, tiny_tokenizer):
    from calibrated_rlhf.core.ensemble import EnsembleSpec, RewardEnsemble

    torch.manual_seed(1)
    other = build_reward_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer)
    with torch.no_grad():
        other.score.weight.mul_(30.0)
    return RewardEnsemble([model, other.eval()], EnsembleSpec("mean_minus_std", (0.5, 2.0), std_penalty=0.5))


def ensemble_transform(ensemble, tokenizer, pairs):
    """The transform of an ensemble whose aggregate has temperature 0.8 (calibration is tested elsewhere)."""
    transform, metrics, _ = nodes.compute_reward_transform(ensemble, tokenizer, nodes.reference_responses(pairs),
                                                           {"temperature": 0.8}, DATASET)
    return RewardTransform.from_dict(transform), metrics


def test_an_ensembles_transform_normalizes_its_aggregate_and_carries_the_members(ensemble, tiny_tokenizer, pairs):
    from calibrated_rlhf.core.scoring import score_rewards
    from calibrated_rlhf.core.preferences import render_ids

    t, metrics = ensemble_transform(ensemble, tiny_tokenizer, pairs)
    responses = nodes.reference_responses(pairs)
    ids = [render_ids(tiny_tokenizer, p, r) for p, r in zip(responses["prompt"], responses["response"])]
    reward, ensemble_std = score_rewards(ensemble, ids, tiny_tokenizer.pad_token_id)
    z = (reward / t.temperature - t.mean) / t.std
    assert abs(z.mean()) < 1e-9 and abs(z.std() - 1.0) < 1e-9
    assert t.ensemble["member_temperatures"] == [0.5, 2.0] and t.ensemble["aggregation"] == "mean_minus_std"
    assert t.ensemble["reference_ensemble_std"] == pytest.approx(ensemble_std.mean())
    assert metrics["normalization/ensemble_std"]["value"] == pytest.approx(ensemble_std.mean())
    assert t.reward_model_version == ensemble.fingerprint()


@pytest.mark.slow
def test_an_ensembles_pyfunc_carries_every_member_and_returns_their_spread(ensemble, tiny_tokenizer, pairs,
                                                                          tmp_path):
    import mlflow

    from calibrated_rlhf.core.scoring import score_rewards
    from calibrated_rlhf.core.preferences import render_ids

    t, _ = ensemble_transform(ensemble, tiny_tokenizer, pairs)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run():
            info = log_reward_model(ensemble, tiny_tokenizer, t.to_dict())
        loaded = mlflow.pyfunc.load_model(info.model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    rows = pairs[["prompt", "chosen", "rejected"]][:6].reset_index(drop=True)
    out = loaded.predict(rows)
    ids = [render_ids(tiny_tokenizer, p, r) for p, r in zip(rows["prompt"], rows["chosen"])]
    reward, ensemble_std = score_rewards(ensemble, ids, tiny_tokenizer.pad_token_id)
    np.testing.assert_allclose(out["raw_chosen"], reward, atol=1e-5)
    np.testing.assert_allclose(out["ensemble_std_chosen"], ensemble_std, atol=1e-5)
    np.testing.assert_allclose(out["normalized_chosen"], t.normalize(reward), atol=1e-5)
    single = loaded.predict(pd.DataFrame({"prompt": rows["prompt"], "response": rows["chosen"]}))
    np.testing.assert_allclose(single["ensemble_std"], ensemble_std, atol=1e-5)
