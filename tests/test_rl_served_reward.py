"""The project's RL takes its reward from a reward server: `kedro run --pipelines rl` of a copy of the shared tiny
run, once in process and once with ``rl.reward_url`` pointing at a server process on loopback that serves the
run's published model; both runs log the same rewards and metrics, step by step."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest

from tests.harness import kedro_run, latest_run, preload
from tests.reward_server import ServerProcess, call

pytestmark = pytest.mark.slow


def published_uri(project: Path) -> str:
    record = json.loads(Path(glob.glob(str(
        project / "data/06_models/published_reward_model.json/*/published_reward_model.json"))[0]).read_text())
    assert record.get("model_uri"), record
    return record["model_uri"]


def test_rl_against_a_reward_server_logs_the_in_process_metrics(tiny_run_project, tmp_path):
    from mlflow import MlflowClient

    project = tiny_run_project
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    server = ServerProcess(f"sqlite:///{project / 'mlflow.db'}", published_uri(project), tmp_path / "server.log")
    preload()
    try:
        server.start()
        code, out = kedro_run(project, "--env", "tiny", "--pipelines", "rl", name="in_process")
        assert code == 0, out[-4000:]
        local = latest_run(project)
        assert call(server.url + "/health")[2]["rows_scored"] == 0
        code, out = kedro_run(project, "--env", "tiny", "--pipelines", "rl", "--params",
                              f"rl.reward_url={server.url}", name="served")
        assert code == 0, out[-4000:]
        served = latest_run(project)
        scored = call(server.url + "/health")[2]["rows_scored"]
    finally:
        server.stop()
    assert served.info.run_id != local.info.run_id and served.data.params["rl.reward_url"] == server.url
    # RLOO's curves and its training summary (the KL tracking, filed under eval/ as every method's)
    tracking = {"eval/kl_second_half_mean", "eval/kl_tracking_error", "eval/final_beta", "eval/updates", "eval/runtime_s"}
    rl_keys = sorted(k for k in local.data.metrics if k.startswith("rl/") or k in tracking)
    assert any("rewards/normalized" in k for k in rl_keys) and any("gold_gap" in k for k in rl_keys), rl_keys
    assert sorted(k for k in served.data.metrics if k.startswith("rl/") or k in tracking) == rl_keys
    for key in rl_keys:
        if key.endswith("runtime_s"):
            continue
        a = [m.value for m in sorted(client.get_metric_history(local.info.run_id, key), key=lambda m: m.step)]
        b = [m.value for m in sorted(client.get_metric_history(served.info.run_id, key), key=lambda m: m.step)]
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), key
    # the server scored them: the reference set (gold offset) and every update's completions
    assert scored >= 3 * 8, scored


def test_a_server_of_another_reward_is_refused(tiny_run_project, tmp_path):
    from tests.reward_server import log_chat_bundle

    tracking, uri, _ = log_chat_bundle(tmp_path / "other")
    server = ServerProcess(tracking, uri, tmp_path / "server.log")
    preload()
    try:
        server.start()
        code, out = kedro_run(tiny_run_project, "--env", "tiny", "--pipelines", "rl", "--params",
                              f"rl.reward_url={server.url}", name="other_reward")
    finally:
        server.stop()
    assert code != 0 and "reward transform differs from this project's" in out, out[-3000:]
