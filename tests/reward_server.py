"""The reward server as tests (and bench/) meet it: a chat reward model logged as the pyfunc bundle in a scratch
MLflow store, a server process on loopback on a free port, and small HTTP helpers with bounded timeouts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.chat_checkpoint import save_chat_checkpoint

TRAINED_LENGTH = 96
WORDS = ("calm bright noisy food Paris river quiet broken warm old city garden slow fast green blue the a of "
         "and is was very").split()


def log_chat_bundle(root: Path, ensemble: int = 1, seed: int = 0, spec: Any = None) -> tuple[str, str, str]:
    """(tracking URI, model URI, run id) of a tiny chat reward model (Qwen2 trunk, ChatML template, pad = EOS =
    ``<|im_end|>``) or ensemble, logged with ``log_reward_model`` into a store under ``root``; ``spec``: another
    ``ChatModelSpec`` (the benchmark's larger one)."""
    import mlflow
    from transformers import AutoTokenizer

    from calibrated_rlhf.core.backbone import BackboneParams, build_reward_backbone
    from calibrated_rlhf.core.ensemble import EnsembleSpec, RewardEnsemble
    from calibrated_rlhf.core.normalization import RewardTransform
    from calibrated_rlhf.serving import log_reward_model

    if spec is None:
        checkpoint = save_chat_checkpoint(root / "chat", seed=seed)
    else:
        from calibrated_rlhf.runtime.chat_model import save_chat_model

        checkpoint = save_chat_model(root / "chat", spec.model_copy(update={"seed": seed}))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    members = [build_reward_backbone(BackboneParams(name_or_path=str(checkpoint), seed=seed + i), tokenizer)
               for i in range(ensemble)]
    tokenizer.model_max_length = TRAINED_LENGTH
    ensemble_spec = None
    if ensemble > 1:
        ensemble_spec = EnsembleSpec("mean", tuple(1.0 + 0.1 * i for i in range(ensemble)))
        model: Any = RewardEnsemble(members, ensemble_spec)
    else:
        model = members[0]
    transform = RewardTransform(temperature=1.7, mean=0.3, std=0.8, clip=5.0, computed_on="test",
                                reward_model_version=None, n=10,
                                ensemble=None if ensemble_spec is None else ensemble_spec.to_dict())
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking)
    experiment = client.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking)
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            info = log_reward_model(model, tokenizer, transform.to_dict())
    finally:
        mlflow.set_tracking_uri(previous)
    return tracking, info.model_uri, run.info.run_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m calibrated_rlhf.serving.server`` on 127.0.0.1, logging to a file; :meth:`stop` always ends it."""

    def __init__(self, tracking: str, model_uri: str, log: Path, *args: str, port: int | None = None,
                 env: dict[str, str] | None = None, threads: int | None = 1) -> None:
        self.tracking, self.model_uri, self.log = tracking, model_uri, log
        self.args = (*args, *(("--threads", str(threads)) if threads else ()))
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> "ServerProcess":
        from tests.project import wait_until_up

        cmd = [sys.executable, "-m", "calibrated_rlhf.serving.server", "--model-uri", self.model_uri,
               "--tracking-uri", self.tracking, "--port", str(self.port), *self.args]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        wait_until_up(self.url + "/health", self.proc, lambda: self.log.read_text()[-3000:], timeout_s)
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, no shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def call(url: str, body: Any = None, token: str | None = None, raw: bytes | None = None,
         timeout_s: float = 60.0) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON answer) of a GET (no body) or POST; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")
