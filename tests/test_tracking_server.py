"""`kedro run` against a real `mlflow server` on loopback, and a fast, clear failure when it is down."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from calibrated_rlhf.runtime.tracking_check import TrackingServerUnreachable, check_tracking_server

from tests.harness import kedro_run, preload
from tests.project import empty_store, make_project, wait_until_up

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"




def kedro(project: Path, tracking_uri: str, *args: str, name: str) -> tuple[int, str]:
    """`kedro run ARGS` in ``project`` logging to ``tracking_uri``, forked (tests/harness.py): the exit code and
    everything the run printed."""
    preload()
    return kedro_run(project, *args, name=name, env={"MLFLOW_TRACKING_URI": tracking_uri})


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def squash(text: str) -> str:
    """Without whitespace: the CLI's rich output wraps long lines."""
    return "".join(text.split())


# ---- the check itself, against stand-in servers (fast) ----------------------------------------------


JSON = ("application/json", b'{"experiments": []}')
HTML = ("text/html; charset=utf-8", b"<!doctype html><html><body>Directory listing</body></html>")


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, tuple[str, bytes] | None]] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        status, answer = next((v for prefix, v in self.routes.items() if self.path.startswith(prefix)), (404, None))
        self.send_response(status)
        if answer:
            self.send_header("Content-Type", answer[0])
            self.send_header("Content-Length", str(len(answer[1])))
        self.end_headers()
        if answer:
            self.wfile.write(answer[1])

    def log_message(self, *args) -> None:
        pass


def _serve(routes: dict[str, tuple[int, tuple[str, bytes] | None]]) -> tuple[http.server.HTTPServer, str]:
    handler = type("Handler", (_Handler,), {"routes": routes})
    server = http.server.HTTPServer((LOOPBACK, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{LOOPBACK}:{server.server_port}"


@pytest.mark.parametrize("routes", [
    {"/health": (200, ("text/plain", b"OK")), "/api/2.0/mlflow/": (200, JSON)},
    {"/api/2.0/mlflow/": (200, JSON)},  # an older server without /health
    {"/api/2.0/mlflow/": (404, ("application/json", b'{"error_code": "ENDPOINT_NOT_FOUND"}'))},
    {"/api/2.0/mlflow/": (401, None)},  # behind authentication
    {"/api/2.0/mlflow/": (403, HTML)},
])
def test_check_accepts_a_server_that_answers(routes):
    server, uri = _serve(routes)
    try:
        check_tracking_server(uri, timeout=2)
    finally:
        server.shutdown()


@pytest.mark.parametrize("routes", [
    {"/": (200, HTML)},  # any web server: /health and the REST path answer its HTML
    {"/health": (200, ("text/plain", b"OK")), "/api/": (404, HTML)},
    {"/health": (200, None), "/api/2.0/mlflow/": (200, None)},
    {"/api/2.0/mlflow/": (200, ("application/json", b"<html>"))},  # says JSON, is not
])
def test_check_refuses_a_web_server_that_is_not_mlflow(routes):
    server, uri = _serve(routes)
    try:
        with pytest.raises(TrackingServerUnreachable, match=rf"{uri} is not an MLflow tracking server: "
                                                            r"/api/2.0/mlflow/experiments/search answered HTTP \d+"):
            check_tracking_server(uri, timeout=2)
    finally:
        server.shutdown()


def test_check_refuses_a_plain_python_http_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", LOOPBACK],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://{LOOPBACK}:{port}"
    try:
        wait_until_up(uri + "/", proc, lambda: "python -m http.server", timeout_s=30)
        with pytest.raises(TrackingServerUnreachable, match=rf"{uri} is not an MLflow tracking server"):
            check_tracking_server(uri, timeout=2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_check_rejects_a_failing_proxy_and_a_silent_port():
    server, uri = _serve({"/": (502, None)})
    try:
        with pytest.raises(TrackingServerUnreachable, match=r"HTTP 502"):
            check_tracking_server(uri + "/", timeout=2)
    finally:
        server.shutdown()
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind((LOOPBACK, 0))
        silent.listen(4)
        uri = f"http://user:secret@{LOOPBACK}:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TrackingServerUnreachable) as err:
            check_tracking_server(uri, timeout=0.5)
        assert time.monotonic() - start < 5
    assert f"at http://{LOOPBACK}:" in str(err.value) and "secret" not in str(err.value)


def test_check_skips_non_http_uris():
    for uri in (None, "", "sqlite:///mlflow.db", "file:///tmp/mlruns", "databricks"):
        check_tracking_server(uri, timeout=0.1)


# ---- a real server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """`mlflow server` with a sqlite backend and a proxied artifact store, on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow_server")
    empty_store(root / "mlflow.db")  # the server's own store, its tables made beforehand
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
         "--host", LOOPBACK, "--port", str(port), "--workers", "1"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # own process group
    )
    uri = f"http://{LOOPBACK}:{port}"
    try:
        wait_until_up(f"{uri}/health", proc, lambda: (root / "server.log").read_text()[-2000:])
        yield uri, root / "artifacts"
    finally:
        # The server forks workers: end the whole group, then make sure.
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group
        except ProcessLookupError:
            pass
        log.close()


@pytest.mark.slow
def test_kedro_run_against_a_tracking_server(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    uri, artifact_store = mlflow_server
    project = make_project(tmp_path / "project")
    code, out = kedro(project, uri, "--env", "tiny", "--pipelines", "data_prep,reward_model", name="server")
    assert code == 0, out[-3000:]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("calibrated_rlhf")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone.hidden_size"] == "32"
    assert run.data.params["reward_model.training.center_rewards_coefficient"] == "0.01"
    assert 0 <= run.data.metrics["rm/test_accuracy"] <= 1
    assert len(client.get_metric_history(run.info.run_id, "rm/train/loss")) >= 3
    assert run.data.tags["provenance/env"] == "tiny"
    assert len(run.data.tags["data/content_hash/train"]) == 64

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"reward_model", "tokenizer", "run_config"} <= top
    model_dir = Path(client.download_artifacts(run.info.run_id, "reward_model", str(tmp_path)))
    assert (model_dir / "model.safetensors").stat().st_size > 0
    params = client.download_artifacts(run.info.run_id, "run_config/parameters.json", str(tmp_path))
    assert '"hidden_size": 32' in Path(params).read_text()
    # The files went through the server to its artifact store, not to a path of the client's.
    stored = {p.name for p in artifact_store.rglob("*") if p.is_file()}
    assert {"model.safetensors", "tokenizer.json", "parameters.json", "run_params.json"} <= stored


@pytest.mark.slow
def test_unreachable_server_fails_fast_naming_it(tmp_path):
    project = make_project(tmp_path / "project")
    uri = f"http://{LOOPBACK}:{free_port()}"  # nothing listens there
    preload()  # imports are not the run's: time the run alone
    start = time.monotonic()
    code, out = kedro(project, uri, "--env", "tiny", "--pipelines", "data_prep,reward_model", name="unreachable")
    elapsed = time.monotonic() - start
    assert code != 0
    assert elapsed < 30, f"took {elapsed:.0f} s"
    assert squash(f"MLflow tracking server at {uri} is unreachable") in squash(out)
    assert squash("start it or unset MLFLOW_TRACKING_URI") in squash(out)
    assert not (project / "data").exists() or not any(p.is_file() for p in (project / "data").rglob("*"))
