"""The published reward model loads and scores where this project cannot be imported: after a tiny `kedro run`,
the run has registered exactly one version of the model, and a fresh interpreter with the project's editable
install taken off its import path loads that version from the MLflow registry by name and scores a DataFrame,
with only the code the model ships with; an input longer than the trained length (128 tokens, within the
backbone's 256 positions) is refused."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NAME = "calibrated-rlhf-reward-model"
# Runs in the child. It takes the project off every import route first (the editable install's .pth entry on
# sys.path, any editable finder on sys.meta_path, the working directory), proves the package is gone, then loads.
CHILD = textwrap.dedent(r'''
    import json, os, sys
    import importlib.util

    src = os.environ["PROJECT_SRC"]
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and not os.path.realpath(p).startswith(src)]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                        and "editable" not in getattr(f, "__name__", "").lower()]
    sys.path_importer_cache.clear()
    try:
        import calibrated_rlhf  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"calibrated_rlhf is still importable from {calibrated_rlhf.__file__}")

    import mlflow
    import pandas as pd

    uri = sys.argv[1]
    model = mlflow.pyfunc.load_model(uri)
    # the package the model imported is the copy it ships with, not the project's
    shipped = sys.modules["calibrated_rlhf"].__file__
    single = model.predict(pd.DataFrame({"prompt": ["Describe the food in Paris."] * 2,
                                         "response": [" calm bright", " noisy dirty broken"]}))
    pairs = model.predict(pd.DataFrame({"prompt": ["Describe the food in Paris."],
                                        "chosen": [" calm bright"], "rejected": [" noisy dirty broken"]}))
    # between the trained length and the backbone's positions: only the recorded trained length refuses it
    tokenizer = model.unwrap_python_model().tokenizer
    words = 1
    while len(tokenizer(" calm" * words)["input_ids"]) <= 160:
        words += 1
    try:
        model.predict(pd.DataFrame({"prompt": ["Q"], "response": [" calm" * words]}))
        overlong = "accepted"
    except Exception as e:  # noqa: BLE001 - the message is the subject
        overlong = str(e)
    print(json.dumps({"shipped": shipped, "single": single.to_dict("list"), "pairs": pairs.to_dict("list"),
                      "overlong": overlong}))
''')


@pytest.fixture(scope="module")
def published(tiny_run_project):
    project = tiny_run_project  # a finished `kedro run --env tiny`: the whole DAG, publication included
    record = json.loads(Path(glob.glob(str(project / "data/06_models/published_reward_model.json/*/published_reward_model.json"))[0])
                        .read_text())
    transform = json.loads(Path(glob.glob(str(project / "data/06_models/reward_transform.json/*/reward_transform.json"))[0])
                           .read_text())
    return project, record, transform


def test_the_finished_run_registered_one_version_and_tagged_its_run(published):
    from mlflow import MlflowClient

    project, record, _ = published
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (version,) = client.search_model_versions(f"name='{NAME}'")
    assert record["registered_model_name"] == NAME and int(version.version) == 1
    assert version.run_id == record["run_id"] and version.source == record["model_uri"]
    assert client.get_run(record["run_id"]).data.tags[f"registered/{NAME}"] == "1"


def test_registered_model_scores_where_the_project_is_not_importable(published, tmp_path):
    project, record, transform = published
    uri, how = f"models:/{NAME}/1", "registry"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}", PROJECT_SRC=os.path.realpath(src),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONNOUSERSITE="1")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run([sys.executable, str(script), uri], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (how, proc.stdout[-2000:], proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not os.path.realpath(out["shipped"]).startswith(os.path.realpath(src)), out["shipped"]

    single, pairs = out["single"], out["pairs"]
    assert {"raw", "calibrated", "normalized"} <= set(single)
    T, mean, std, clip = transform["temperature"], transform["mean"], transform["std"], transform["clip"]
    bound = math.inf if clip is None else clip
    for raw, cal, norm in zip(single["raw"], single["calibrated"], single["normalized"]):
        # the transform the pipeline computed, applied by the served model
        assert cal == pytest.approx(raw / T, rel=1e-5, abs=1e-6)
        assert norm == pytest.approx(min(max((raw / T - mean) / std, -bound), bound), rel=1e-5, abs=1e-6)
    assert single["raw"][0] != single["raw"][1]  # it reads the response
    # a pair is scored as its two sides: p = sigmoid(calibrated_chosen - calibrated_rejected)
    assert pairs["raw_chosen"][0] == pytest.approx(single["raw"][0], rel=1e-5, abs=1e-6)
    assert pairs["raw_rejected"][0] == pytest.approx(single["raw"][1], rel=1e-5, abs=1e-6)
    d = pairs["calibrated_chosen"][0] - pairs["calibrated_rejected"][0]
    assert pairs["p_chosen_preferred"][0] == pytest.approx(1 / (1 + math.exp(-d)), rel=1e-5)
    assert "longer than the model's 128 tokens" in out["overlong"], out["overlong"]
