"""The reward server against ``mlflow models serve`` of the same bundle, on the same inputs, in one invocation.

    PYTHONPATH=src:. python bench/bench_serving.py                       # 1, 8, 32 clients, 20 s a cell
    PYTHONPATH=src:. python bench/bench_serving.py --seconds 10 --load 10000   # + the long run
    PYTHONPATH=src:. python bench/bench_serving.py --hidden 128 --layers 2    # a model whose forward dominates
    PYTHONPATH=src:. python bench/bench_serving.py --model-uri models:/NAME/3 --tracking-uri sqlite:///mlflow.db

Without ``--model-uri`` it logs a chat reward model (Qwen2 trunk of ``--hidden`` x ``--layers``, default 64 x 1,
ChatML template) into a scratch MLflow store. Both servers run as processes on loopback with ``--torch-threads``
(OMP_NUM_THREADS, default 1): ``mlflow models serve`` with ``--env-manager local`` (the same interpreter and
packages) and its default single worker, the reward server with its defaults. Each client sends requests of
``--rows`` (prompt, response) rows, half chat and half text, back to back over a kept-alive connection:
``/score`` to the reward server, ``/invocations`` (``dataframe_records``) to MLflow's. Prints rows/s and
per-request p50/p99 latency per server and client count, and the throughput ratio.

On CPU a forward pass costs about its rows x tokens, so merging requests saves the per-request work (HTTP, JSON,
pandas, a forward's fixed cost) rather than the forward itself: the larger the model, the closer the ratio is to
what that overhead is worth. On a GPU a batch costs little more than one row.

``--load N``: N requests from 32 clients against the reward server, each answer compared (1e-6) with the
in-process scorer's rewards of its own request's rows; the server's resident memory sampled every second. It
reports errors, mismatches, and memory at the first and last tenth of the run. All requests are bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.reward_server: the bundle and the process

from tests.reward_server import WORDS, ServerProcess, free_port, log_chat_bundle  # noqa: E402


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
        prompt = [{"role": "user", "content": words(2, 12)}] if i % 2 else words(2, 12) + "\n"
        out.append({"prompt": prompt, "response": words(4, 30)})
    return out


class MlflowServe:
    def __init__(self, tracking: str, uri: str, log: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "TOKENIZERS_PARALLELISM": "false", **env,
               # it execs `uvicorn`: this interpreter's, as a virtual environment not activated leaves it off PATH
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
                                      "local", "-h", "127.0.0.1", "-p", str(self.port)],
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        import requests

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"mlflow models serve exited: {log.read_text()[-2000:]}")
            try:
                if requests.get(self.url + "/ping", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise SystemExit("mlflow models serve did not come up in 180 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def cell(url: str, path: str, body_of, n_rows: int, clients: int, seconds: float, rows: int) -> dict:
    """``clients`` threads sending back to back for ``seconds``: rows/s, p50 and p99 latency (ms), errors."""
    import requests

    stop_at = time.monotonic() + seconds
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        rng = random.Random(k)
        with requests.Session() as s:
            while time.monotonic() < stop_at:
                a = rng.randrange(n_rows - rows)
                t0 = time.perf_counter()
                try:
                    r = s.post(url + path, data=body_of(a, a + rows), headers={"Content-Type": "application/json"},
                               timeout=120)
                    why = None if r.status_code == 200 else f"{r.status_code} {r.text[:160]}"
                except requests.RequestException as e:
                    why = repr(e)[:160]
                dt = time.perf_counter() - t0
                with lock:
                    if why is None:
                        lat.append(dt)
                    else:
                        errors.append(why)

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 180)
    wall = time.monotonic() - start
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "rows_per_s": len(lat) * rows / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "errors": len(errors), "first_error": errors[0] if errors else None}


def load_run(server: ServerProcess, exs: list[dict], expected: np.ndarray, n_requests: int, rows: int) -> dict:
    import psutil
    import requests

    proc = psutil.Process(server.proc.pid)
    rss: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            rss.append((time.monotonic(), proc.memory_info().rss / 2**20))

    rng = random.Random(11)
    jobs = [(a, a + rng.randint(1, rows)) for a in (rng.randrange(len(exs) - rows) for _ in range(n_requests))]
    bad, errors = [], []

    def client(k: int) -> None:
        with requests.Session() as s:
            for a, b in jobs[k::32]:
                try:
                    r = s.post(server.url + "/score", json={"inputs": exs[a:b]}, timeout=120)
                except requests.RequestException as e:
                    errors.append(repr(e))
                    continue
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                elif not np.allclose(r.json()["normalized"], expected[a:b], rtol=0, atol=1e-6):
                    bad.append((a, b))

    threading.Thread(target=sample, daemon=True).start()
    start = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(client, range(32), timeout=3600))
    wall = time.monotonic() - start
    done.set()
    tenth = max(1, len(rss) // 10)
    return {"requests": n_requests, "seconds": wall, "errors": len(errors), "first_errors": errors[:3],
            "mismatched": len(bad), "rss_mib_first_tenth": float(np.mean([m for _, m in rss[:tenth]])),
            "rss_mib_last_tenth": float(np.mean([m for _, m in rss[-tenth:]])),
            "rss_mib_max": max(m for _, m in rss)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-uri"), p.add_argument("--tracking-uri")
    p.add_argument("--hidden", type=int, default=64), p.add_argument("--layers", type=int, default=1)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=20.0, help="per cell")
    p.add_argument("--rows", type=int, default=8, help="rows per request")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--load", type=int, default=0, help="requests of the long run (0: none)")
    p.add_argument("--server-args", default="", help="extra options of the reward server")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads of both servers (OMP_NUM_THREADS): 1 suits a shared host")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    if args.model_uri:
        tracking, uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""), args.model_uri
    else:
        from calibrated_rlhf.runtime.chat_model import ChatModelSpec

        spec = ChatModelSpec(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                             num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=1,
                             max_position_embeddings=256)
        tracking, uri, _ = log_chat_bundle(work, spec=spec)
    exs = examples(args.examples)
    threads = {"OMP_NUM_THREADS": str(args.torch_threads), "MKL_NUM_THREADS": str(args.torch_threads)}
    print(f"model {uri}; {args.rows} rows a request; {args.seconds:.0f} s a cell; torch threads "
          f"{args.torch_threads}; load average {load_average()}", flush=True)
    ours = ServerProcess(tracking, uri, work / "server.log", *args.server_args.split(), threads=None, env=threads)
    results: dict[str, dict[int, dict]] = {"reward_server": {}, "mlflow_models_serve": {}}
    score_body = lambda a, b: json.dumps({"inputs": exs[a:b]})  # noqa: E731
    mlflow_body = lambda a, b: json.dumps({"dataframe_records": exs[a:b]})  # noqa: E731
    try:
        ours.start()
        for c in args.clients:
            results["reward_server"][c] = cell(ours.url, "/score", score_body, len(exs), c, args.seconds, args.rows)
            print("reward_server", c, results["reward_server"][c], flush=True)
        if args.load:
            import mlflow

            mlflow.set_tracking_uri(tracking)
            model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
            from calibrated_rlhf.core.scoring import RewardScorer

            expected = RewardScorer(model.model, model.tokenizer, model.transform).score(
                [e["prompt"] for e in exs], [e["response"] for e in exs]).normalized
            print("load", json.dumps(load_run(ours, exs, expected, args.load, args.rows)), flush=True)
    finally:
        ours.stop()
    theirs = MlflowServe(tracking, uri, work / "mlflow_serve.log", threads)
    try:
        for c in args.clients:
            results["mlflow_models_serve"][c] = cell(theirs.url, "/invocations", mlflow_body, len(exs), c,
                                                     args.seconds, args.rows)
            print("mlflow_models_serve", c, results["mlflow_models_serve"][c], flush=True)
    finally:
        theirs.stop()
    print(f"\n{'clients':>7} | {'server':<20} | {'rows/s':>8} | {'p50 ms':>8} | {'p99 ms':>8} | errors")
    for c in args.clients:
        for name in results:
            r = results[name][c]
            print(f"{c:>7} | {name:<20} | {r['rows_per_s']:8.1f} | {r['p50_ms']:8.1f} | {r['p99_ms']:8.1f} | "
                  f"{r['errors']}")
        ratio = results["reward_server"][c]["rows_per_s"] / max(results["mlflow_models_serve"][c]["rows_per_s"], 1e-9)
        print(f"{c:>7} | throughput ratio reward_server / mlflow_models_serve: {ratio:.2f}x")
    print(f"load average at the end {load_average()} (both servers share the host with its other work)")


if __name__ == "__main__":
    main()
