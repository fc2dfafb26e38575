"""The calibrated reward over HTTP, for RL engines: ``python -m calibrated_rlhf.serving.server --model-uri URI``.

It loads the bundle ``mlflow models serve`` serves (a registered version ``models:/NAME/VERSION`` or a run's
logged model ``runs:/RUN_ID/calibrated_reward_model``) and answers, on FastAPI/uvicorn:

- ``POST /get_reward``: OpenRLHF's remote reward model (``--remote_rm_url``), ``{"query": [...]}`` ->
  ``{"rewards": [...], "scores": [...], "extra_logs": {"raw": [...], "calibrated": [...], ...}}``;
- ``POST /score``: ``{"inputs": [{"prompt", "response"} | {"messages"}]}`` -> ``{"normalized": [...],
  "calibrated": [...], "raw": [...]}`` (plus ``ensemble_std`` for an ensemble);
- ``GET /info``: the model URI, version and run id, the reward transform, the trained length;
- ``GET /health``.

``rewards`` and ``normalized`` are the frozen z-score RL optimizes (``normalization.method: zscore``): the
same numbers as the in-process scorer's, whatever the batching (``serving.batcher``). Request shapes:
``serving.wire``.

Safe by default: it binds loopback; any other address needs a bearer token (``--token`` or
``CALIBRATED_RLHF_REWARD_TOKEN``), which every endpoint but ``/health`` then requires. Bodies, rows per request
and queued rows are capped (413, 503 with ``Retry-After``); a malformed request gets a 400 that says what is
wrong; an input longer than the trained length is refused naming its row (``--overlength truncate`` cuts it).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from calibrated_rlhf.serving.batcher import Batcher, QueueFull
from calibrated_rlhf.serving.model import OVERLENGTH, RequestError
from calibrated_rlhf.serving.wire import Renderer, parse_inputs, parse_queries

log = logging.getLogger(__name__)

TOKEN_ENV = "CALIBRATED_RLHF_REWARD_TOKEN"
RETRY_AFTER_S = 1


@dataclass
class Limits:
    """What one request and the queue may hold."""

    max_body_bytes: int = 8 * 2**20
    max_request_rows: int = 1024
    max_queue_rows: int = 8192
    max_batch_tokens: int = 16384
    max_wait_ms: float = 5.0


@dataclass
class Served:
    """A loaded bundle: what scores, what renders, and what ``/info`` says."""

    model: Any  # CalibratedRewardModel, loaded
    info: dict[str, Any]

    @property
    def transform(self) -> Any:
        return self.model.transform


def load_served(model_uri: str, overlength: str = "reject") -> Served:
    """The pyfunc bundle at ``model_uri``, loaded as ``mlflow models serve`` loads it, with its provenance."""
    import mlflow

    pyfunc = mlflow.pyfunc.load_model(model_uri, model_config={"overlength": overlength})
    model = pyfunc.unwrap_python_model()
    meta = pyfunc.metadata
    name = version = None
    path = model_uri[len("models:/"):] if model_uri.startswith("models:/") else ""
    if "/" in path or "@" in path:  # a registered model's version or alias (models:/m-<id> is a logged model)
        name, version = path.split("@", 1) if "@" in path else path.split("/", 1)
        if not version.isdigit():  # an alias or stage: the version it points at now
            try:
                version = mlflow.MlflowClient().get_model_version_by_alias(name, version).version
            except Exception:
                pass
    t = model.transform
    info = {
        "model_uri": model_uri, "registered_model": name, "model_version": version, "run_id": meta.run_id,
        "model_id": getattr(meta, "model_id", None),
        "reward_transform": t.to_dict(),
        "rewards": "normalized: clip((raw / temperature - mean) / std, +-clip), the frozen z-score "
                   "(normalization.method zscore)",
        "max_length": model.max_length, "overlength": model.overlength,
        "ensemble_size": None if t.ensemble is None else len(model.model.members),
    }
    return Served(model, info)


def score_ids(model: Any):
    """``ids -> (raw, ensemble_std)`` of the loaded bundle: the in-process scorer's forward pass
    (``core.scoring.score_rewards``: each member's ``readout_logits`` on the rows padded to the longest, an
    ensemble's members aggregated by its spec) on one batch the batcher has already sorted and cut.

    The padded ids and mask are built in numpy, one tensor each: filling them row by row in torch costs a few
    small tensor operations per row, and each drops the GIL and waits to take it back from the event loop or the
    render thread."""
    import torch

    from calibrated_rlhf.core.ensemble import RewardEnsemble
    from calibrated_rlhf.core.speed.readout import readout_logits

    pad = model.tokenizer.pad_token_id
    ensemble = model.model if isinstance(model.model, RewardEnsemble) else None
    members = list(ensemble.members) if ensemble is not None else [model.model]
    device = next(members[0].parameters()).device

    def score(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray | None]:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        real = np.arange(lengths.max(initial=0))[None, :] < lengths[:, None]
        padded = np.full(real.shape, pad, dtype=np.int64)
        padded[real] = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))  # row by row
        input_ids = torch.from_numpy(padded).to(device)
        attention_mask = torch.from_numpy(real.astype(np.int64)).to(device)
        with torch.inference_mode():
            raws = [readout_logits(m, input_ids, attention_mask).squeeze(-1).float().cpu().numpy().astype(np.float64)
                    for m in members]
        if ensemble is None:
            return raws[0], None
        return ensemble.spec.aggregate(np.stack(raws, axis=1))

    return score


def _floats(x: np.ndarray | None) -> list[float] | None:
    return None if x is None else [float(v) for v in x]


def rewards_of(transform: Any, raw: np.ndarray, ensemble_std: np.ndarray | None) -> dict[str, list[float]]:
    out = {"normalized": _floats(transform.normalize(raw)), "calibrated": _floats(transform.calibrate(raw)),
           "raw": _floats(raw)}
    if ensemble_std is not None:
        out["ensemble_std"] = _floats(ensemble_std)
    return out


def create_app(served: Served, limits: Limits = Limits(), token: str | None = None) -> Any:
    """The FastAPI app over a loaded bundle (tests and the benchmark start it through :func:`main`)."""
    renderer = Renderer(served.model.tokenizer, served.model.max_length, served.model.overlength)
    batcher = Batcher(score_ids(served.model), limits.max_batch_tokens, limits.max_wait_ms / 1000,
                      limits.max_queue_rows)
    # Requests are parsed and rendered on one thread of their own: rendering is serial anyway (the tokenizer is
    # not shared between threads), and a pool of threads queuing on its lock costs the event loop more than one.
    render_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-render")

    @asynccontextmanager
    async def lifespan(app: Any):
        batcher.start()
        yield
        await batcher.stop()
        render_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="calibrated reward", lifespan=lifespan)
    app.state.batcher = batcher

    def error(status: int, message: str, **headers: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)

    def refused(request: Request) -> JSONResponse | None:
        """401 unless the request carries the bearer token (when the server has one)."""
        if token is None:
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return None
        return error(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                     **{"WWW-Authenticate": "Bearer"})

    async def body_of(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise _TooLarge(f"body of {declared} bytes; this server takes at most {limits.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise _TooLarge(f"body over {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def scored(request: Request, render: Any) -> dict[str, list[float]] | JSONResponse:
        if (no := refused(request)) is not None:
            return no
        try:
            with batcher.arriving():
                body = await body_of(request)
                ids = await asyncio.get_running_loop().run_in_executor(render_thread, lambda: render(json_of(body)))
                scores = batcher.submit(ids)
            raw, ensemble_std = await scores
        except _TooLarge as e:
            return error(413, str(e))
        except RequestError as e:
            return error(400, str(e))
        except QueueFull as e:
            return error(503, f"busy: {e}; retry after {RETRY_AFTER_S} s", **{"Retry-After": str(RETRY_AFTER_S)})
        except Exception as e:  # a failure fails this request only, never the server
            log.exception("scoring failed")
            return error(500, f"{type(e).__name__}: {e}")
        return rewards_of(served.transform, raw, ensemble_std)

    # plain Starlette routes: the handlers read the request and build the response themselves, and FastAPI's
    # per-request machinery (dependencies, response validation) would cost more than the scoring of a small request
    async def get_reward(request: Request) -> Any:
        out = await scored(request, lambda body: renderer.query_ids(parse_queries(body, limits.max_request_rows)))
        if isinstance(out, JSONResponse):
            return out
        extra = {k: v for k, v in out.items() if k != "normalized"}
        # JSONResponse directly: FastAPI's encoder walks every float again
        return JSONResponse({"rewards": out["normalized"], "scores": out["normalized"], "extra_logs": extra})

    async def score(request: Request) -> Any:
        out = await scored(request, lambda body: renderer.row_ids(*parse_inputs(body, limits.max_request_rows)))
        return out if isinstance(out, JSONResponse) else JSONResponse(out)

    app.add_route("/get_reward", get_reward, methods=["POST"])
    app.add_route("/score", score, methods=["POST"])

    @app.get("/info")
    async def info(request: Request) -> Any:
        return refused(request) or {**served.info, "limits": limits.__dict__}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queued_rows": batcher.queued_rows, "rows_scored": batcher.rows_scored,
                "batches_run": batcher.batches_run}

    return app


class _TooLarge(ValueError):
    pass


def json_of(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RequestError(f"malformed JSON: {type(e).__name__ if isinstance(e, RecursionError) else e}") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def keep_freed_blocks() -> None:
    """Let glibc's malloc keep the blocks a forward pass frees, to serve the next one.

    A batch's tensors are a few MB each. glibc serves blocks that large with mmap and unmaps them when freed, so
    every forward pass faults in fresh zeroed pages: the inference thread spent as long in the kernel as in
    the forward itself. Blocks up to 32 MB (glibc's largest mmap threshold) now come from the heap, and the
    heap keeps up to 256 MB free rather than hand it back at once. Other C libraries: nothing changes."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 2**20)
    mallopt(m_trim_threshold, 256 * 2**20)


def parser() -> argparse.ArgumentParser:
    d = Limits()
    p = argparse.ArgumentParser(prog="calibrated-rlhf-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-uri", required=True, help="models:/NAME/VERSION or runs:/RUN_ID/calibrated_reward_model")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking (and registry) URI; default: "
                   "MLFLOW_TRACKING_URI")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs a token")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--token", default=None, help=f"bearer token clients must send (default: ${TOKEN_ENV})")
    p.add_argument("--overlength", choices=OVERLENGTH, default="reject",
                   help="inputs longer than the trained length: refuse naming the row, or truncate them")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-request-rows", type=int, default=d.max_request_rows, help="rows (queries) per request")
    p.add_argument("--max-queue-rows", type=int, default=d.max_queue_rows,
                   help="rows waiting to be scored; past it requests get 503 with Retry-After")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help="padded tokens (rows x longest row) per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="how long the oldest queued request waits for others to join its batch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and token is None:
        sys.exit(f"--host {args.host} is not loopback: give a bearer token (--token or ${TOKEN_ENV}) so the "
                 "reward is not open to the network")
    if args.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(args.tracking_uri)
    keep_freed_blocks()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    served = load_served(args.model_uri, args.overlength)
    limits = Limits(args.max_body_bytes, args.max_request_rows, args.max_queue_rows, args.max_batch_tokens,
                    args.max_wait_ms)
    if limits.max_request_rows > limits.max_queue_rows:
        sys.exit(f"--max-request-rows {limits.max_request_rows} > --max-queue-rows {limits.max_queue_rows}: such a "
                 "request could never be queued")
    if served.model.max_length is not None and limits.max_batch_tokens < served.model.max_length:
        sys.exit(f"--max-batch-tokens {limits.max_batch_tokens} < the trained length {served.model.max_length}")
    log.info("serving %s (run %s) on %s:%d", args.model_uri, served.info["run_id"], args.host, args.port)
    uvicorn.run(create_app(served, limits, token), host=args.host, port=args.port, log_level="warning",
                access_log=False, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
