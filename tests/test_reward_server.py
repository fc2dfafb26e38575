"""The reward server (``calibrated_rlhf.serving.server``) as a real process on loopback, against the in-process
scorer: OpenRLHF's request shapes (chat and plain text), the plain endpoint, the TRL and verl clients, a bounded
load of concurrent clients, and the faults it must survive. Every request carries a timeout; every server
process is stopped."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.reward_server import TRAINED_LENGTH, WORDS, ServerProcess, call, free_port, log_chat_bundle

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """(tracking URI, model URI, the in-process bundle) of a logged tiny chat reward model."""
    import mlflow

    root = tmp_path_factory.mktemp("served")
    tracking, uri, run_id = log_chat_bundle(root)
    mlflow.set_tracking_uri(tracking)
    try:
        model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    finally:
        mlflow.set_tracking_uri(None)
    return tracking, uri, model, root, run_id


@pytest.fixture(scope="module")
def server(bundle):
    tracking, uri, _, root, _ = bundle
    proc = ServerProcess(tracking, uri, root / "server.log", "--max-wait-ms", "2").start()
    yield proc
    proc.stop()


def text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def examples(n: int, seed: int) -> list[dict]:
    """Half chat conversations (prompt messages, response text), half plain text (prompt, response)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            prompt = [{"role": "user", "content": text(rng, 1, 8)}]
            if rng.random() < 0.3:
                prompt = [{"role": "system", "content": text(rng, 1, 4)}] + prompt
            out.append({"prompt": prompt, "response": text(rng, 1, 12)})
        else:
            out.append({"prompt": text(rng, 1, 8) + "\n", "response": text(rng, 1, 12)})
    return out


def openrlhf_query(tokenizer, ex: dict, rng: random.Random) -> str:
    """What OpenRLHF sends: the prompt as the actor saw it (chat template applied, generation prompt added)
    followed by the sampled response, decoded with special tokens: EOS, and padding on either side."""
    if isinstance(ex["prompt"], list):
        prompt = tokenizer.apply_chat_template(ex["prompt"], tokenize=False, add_generation_prompt=True)
    else:
        prompt = ex["prompt"]
    pad, eos = tokenizer.pad_token, tokenizer.eos_token
    return pad * rng.randint(0, 3) + prompt + ex["response"] + (eos if rng.random() < 0.8 else "") + \
        pad * rng.randint(0, 3)


def in_process(model, exs: list[dict]):
    from calibrated_rlhf.core.scoring import RewardScorer

    return RewardScorer(model.model, model.tokenizer, model.transform).score(
        [e["prompt"] for e in exs], [e["response"] for e in exs])


def test_openrlhf_requests_get_the_in_process_rewards_for_chat_and_text(server, bundle):
    model = bundle[2]
    exs = examples(1000, seed=0)
    rng = random.Random(1)
    queries = [openrlhf_query(model.tokenizer, e, rng) for e in exs]
    expected = in_process(model, exs)
    # OpenRLHF's shape, as its remote_rm_fn posts it, split into requests of mixed sizes sent by 8 clients
    cuts = [0]
    while cuts[-1] < len(exs):
        cuts.append(min(len(exs), cuts[-1] + rng.randint(1, 64)))

    def post(span):
        a, b = span
        return a, call(server.url + "/get_reward", {"query": queries[a:b], "prompts": [""] * (b - a),
                                                     "labels": [None] * (b - a)})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, zip(cuts[:-1], cuts[1:]), timeout=300))
    rewards, raw, calibrated = np.empty(len(exs)), np.empty(len(exs)), np.empty(len(exs))
    for a, (status, _, out) in answers:
        assert status == 200, out
        assert set(out) == {"rewards", "scores", "extra_logs"} and out["scores"] == out["rewards"]
        b = a + len(out["rewards"])
        rewards[a:b], raw[a:b], calibrated[a:b] = out["rewards"], out["extra_logs"]["raw"], \
            out["extra_logs"]["calibrated"]
    np.testing.assert_allclose(rewards, expected.normalized, rtol=0, atol=1e-6)
    np.testing.assert_allclose(raw, expected.raw, rtol=0, atol=1e-6)
    np.testing.assert_allclose(calibrated, expected.calibrated, rtol=0, atol=1e-6)
    assert np.std(expected.raw[1::2]) > 0 and np.std(expected.raw[::2]) > 0  # the rewards differ, chat and text


def test_plain_endpoint_info_and_clients_give_the_in_process_rewards(server, bundle):
    from calibrated_rlhf.serving.clients import AsyncTRLReward, RemoteScorer, RewardClient, TRLReward
    from calibrated_rlhf.serving.verl_reward import compute_score

    model = bundle[2]
    exs = examples(40, seed=2)
    expected = in_process(model, exs)
    rows = [{"prompt": e["prompt"], "response": e["response"]} if i % 4 else
            {"messages": e["prompt"] + [{"role": "assistant", "content": e["response"]}]}
            for i, e in enumerate(exs) if isinstance(e["prompt"], list)]
    chat = [e for e in exs if isinstance(e["prompt"], list)]
    status, _, out = call(server.url + "/score", {"inputs": rows})
    assert status == 200, out
    np.testing.assert_allclose(out["normalized"], in_process(model, chat).normalized, rtol=0, atol=1e-6)
    assert "ensemble_std" not in out

    status, _, info = call(server.url + "/info")
    assert status == 200 and info["model_uri"] == bundle[1] and info["run_id"] == bundle[4]
    assert info["max_length"] == TRAINED_LENGTH and info["reward_transform"] == model.transform.to_dict()

    prompts, responses = [e["prompt"] for e in exs], [e["response"] for e in exs]
    trl = TRLReward(server.url, rows_per_request=7)
    np.testing.assert_allclose(trl(prompts, responses, completion_ids=None), expected.normalized, atol=1e-6, rtol=0)
    # TRL passes a conversational completion as the assistant's message list
    completions = [[{"role": "assistant", "content": r}] if isinstance(p, list) else r
                   for p, r in zip(prompts, responses)]
    np.testing.assert_allclose(asyncio.run(AsyncTRLReward(server.url)(prompts, completions)),
                               expected.normalized, atol=1e-6, rtol=0)
    scored = RemoteScorer(RewardClient(server.url)).score(prompts, responses)
    np.testing.assert_allclose(scored.calibrated, expected.calibrated, atol=1e-6, rtol=0)

    import os

    os.environ["CALIBRATED_RLHF_REWARD_URL"] = server.url
    try:
        one = compute_score("synthetic", responses[1], None, {"prompt": prompts[1]})
        batch = compute_score(data_sources=["s"] * 4, solution_strs=responses[:4], ground_truths=[None] * 4,
                              extra_infos=[{"prompt": p} for p in prompts[:4]])
    finally:
        del os.environ["CALIBRATED_RLHF_REWARD_URL"]
    assert one == pytest.approx(expected.normalized[1], abs=1e-6)
    np.testing.assert_allclose(batch, expected.normalized[:4], atol=1e-6, rtol=0)


def test_the_pyfunc_predicts_from_threads_as_it_does_alone(bundle):
    """`mlflow models serve` calls one loaded model's predict from a pool of threads (the comparison the benchmark
    makes): the reward readout hooks the shared model for a forward pass, so concurrent calls must not interleave."""
    import pandas as pd

    model = bundle[2]
    exs = examples(192, seed=10)
    batches = [pd.DataFrame(exs[i:i + 8]) for i in range(0, len(exs), 8)]
    expected = [model.predict(None, b)["raw"].tolist() for b in batches]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda b: model.predict(None, b)["raw"].tolist(), batches, timeout=120))
    assert got == expected


def test_32_clients_each_get_the_answer_to_their_own_request(server, bundle):
    """A bounded load (the 10,000-request one is bench/bench_serving.py --load): zero errors, and each answer
    is its own request's (every request scores a different slice, so a swapped answer shows)."""
    model = bundle[2]
    exs = examples(256, seed=3)
    expected = in_process(model, exs).normalized
    rng = random.Random(4)
    jobs = []
    for _ in range(32 * 12):
        a = rng.randrange(len(exs))
        jobs.append((a, min(len(exs), a + rng.randint(1, 8))))
    queries = [openrlhf_query(model.tokenizer, e, random.Random(5)) for e in exs]
    deadline = time.monotonic() + 240

    def client(k):
        bad = []
        for a, b in jobs[k::32]:
            assert time.monotonic() < deadline, "load test over its time bound"
            status, _, out = call(server.url + "/get_reward", {"query": queries[a:b]}, timeout_s=60)
            if status != 200 or not np.allclose(out["rewards"], expected[a:b], rtol=0, atol=1e-6):
                bad.append((a, b, status, out))
        return bad

    with ThreadPoolExecutor(32) as pool:
        bad = [x for part in pool.map(client, range(32), timeout=300) for x in part]
    assert not bad, bad[:3]
    status, _, health = call(server.url + "/health")
    assert status == 200 and health["queued_rows"] == 0


@pytest.fixture(scope="module")
def guarded(bundle):
    """A server with a token, small caps, and a batching wait far longer than any request's timeout here."""
    tracking, uri, _, root, _ = bundle
    proc = ServerProcess(tracking, uri, root / "guarded.log", "--token", TOKEN, "--max-body-bytes", "20000",
                         "--max-request-rows", "32", "--max-queue-rows", "40", "--max-wait-ms", "30000",
                         "--max-batch-tokens", "100000").start()
    yield proc
    proc.stop()


def test_a_lone_request_is_scored_at_once_whatever_the_batching_wait(guarded):
    """The batching wait is for requests on their way or arriving while the inference thread is busy: with the
    thread idle and nothing else on its way, a lone request goes at once (well inside its timeout, a third of the
    30 s wait here), one after another."""
    for n in (1, 3, 32):
        status, _, out = call(guarded.url + "/get_reward", {"query": ["calm bright food"] * n}, token=TOKEN,
                              timeout_s=10)
        assert status == 200 and len(out["rewards"]) == n


def test_tokens_malformed_requests_and_caps_are_answered_and_the_server_keeps_serving(guarded):
    url = guarded.url
    ok = {"query": ["calm bright food"]}
    assert call(url + "/get_reward", ok)[0] == 401
    status, headers, out = call(url + "/get_reward", ok, token="wrong")
    assert status == 401 and "bearer token" in out["error"] and headers.get("www-authenticate") == "Bearer"
    assert call(url + "/info")[0] == 401
    assert call(url + "/health")[0] == 200  # for load balancers, without the token
    status, _, out = call(url + "/get_reward", raw=b'{"query": ["a", ', token=TOKEN)
    assert status == 400 and out["error"].startswith("malformed JSON")
    status, _, out = call(url + "/get_reward", {"query": "calm"}, token=TOKEN)
    assert status == 400 and "'query' must be a list" in out["error"]
    status, _, out = call(url + "/get_reward", {"query": ["calm", 3]}, token=TOKEN)
    assert status == 400 and "query[1]" in out["error"]
    status, _, out = call(url + "/score", {"inputs": [{"prompt": "a", "response": "b"}, {"prompt": "a"}]},
                          token=TOKEN)
    assert status == 400 and "inputs[1] needs 'response'" in out["error"]
    status, _, out = call(url + "/score", {"inputs": [{"prompt": "a", "response": "b"},
                                                      {"prompt": "a", "response": [{"role": "assistant",
                                                                                     "content": "b"}]}]}, token=TOKEN)
    assert status == 400 and "inputs[1]: a response given as messages" in out["error"]
    status, _, out = call(url + "/score", {"inputs": [{"prompt": [{"content": "x"}], "response": "b"}]}, token=TOKEN)
    assert status == 400 and "inputs[0].prompt needs text" in out["error"] and "message 0 lacks" in out["error"]
    # an over-long input is refused naming its row, and nothing of the request is scored
    long = " ".join(["calm"] * (2 * TRAINED_LENGTH))
    status, _, out = call(url + "/get_reward", {"query": ["calm", "calm", long]}, token=TOKEN)
    assert status == 400 and f"longer than the model's {TRAINED_LENGTH} tokens" in out["error"] \
        and "column 'query' rows 2 " in out["error"]
    status, _, out = call(url + "/get_reward", {"query": ["calm"] * 33}, token=TOKEN)
    assert status == 400 and "at most 32 per request" in out["error"]
    status, _, out = call(url + "/get_reward", {"query": ["calm " * 5000]}, token=TOKEN)
    assert status == 413 and "20000" in out["error"]
    status, _, out = call(url + "/get_reward", ok, token=TOKEN)
    assert status == 200 and len(out["rewards"]) == 1


def _raw_post(port: int, body: bytes, declared: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
              b"\r\nContent-Type: application/json\r\nContent-Length: " + str(declared).encode() + b"\r\n\r\n" + body)
    return s


def test_clients_that_go_away_leave_nothing_behind(guarded):
    body = b'{"query": ["calm bright", "food"]}'
    # mid-body: the client stops after half its bytes
    _raw_post(guarded.port, body[:10], len(body)).close()
    # mid-request: the whole request sent, the client gone while it waits in the queue
    for _ in range(3):
        _raw_post(guarded.port, body, len(body)).close()
    time.sleep(1.5)  # those requests were scored at once (the inference thread idle), their answers discarded
    status, _, health = call(guarded.url + "/health")
    assert status == 200 and health["queued_rows"] == 0
    status, _, out = call(guarded.url + "/get_reward", {"query": ["calm bright", "food"]}, token=TOKEN)
    assert status == 200 and len(out["rewards"]) == 2
    assert guarded.proc.poll() is None


def test_while_the_inference_thread_is_busy_requests_queue_and_a_full_queue_gets_503(bundle):
    """The app in this process, its scorer held on a gate so that the inference thread stays busy: a request
    arriving meanwhile waits for company (the batching wait is long), one that would pass --max-queue-rows gets
    503 with Retry-After, and both held requests get their rewards once the thread is free."""
    import uvicorn

    from calibrated_rlhf.serving.server import Limits, Served, create_app

    model = bundle[2]
    app = create_app(Served(model, {}), Limits(max_request_rows=32, max_queue_rows=40, max_batch_tokens=100000,
                                               max_wait_ms=30000))
    batcher = app.state.batcher
    score, gate, busy = batcher.score, threading.Event(), threading.Event()

    def held(ids):
        busy.set()
        gate.wait(60)
        return score(ids)

    batcher.score = held
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    pool = ThreadPoolExecutor(2)
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        first = pool.submit(call, url + "/get_reward", {"query": ["calm"]})
        assert busy.wait(30), "the lone request never reached the scorer"
        second = pool.submit(call, url + "/get_reward", {"query": ["food bright"] * 32})
        while call(url + "/health")[2]["queued_rows"] < 32 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert call(url + "/health")[2]["queued_rows"] == 32  # waiting while the thread is busy
        status, headers, out = call(url + "/get_reward", {"query": ["warm"] * 32})
        assert status == 503 and headers.get("retry-after") == "1" and "busy" in out["error"]
        gate.set()
        (s1, _, o1), (s2, _, o2) = first.result(timeout=60), second.result(timeout=60)
        assert s1 == 200 and s2 == 200 and len(o1["rewards"]) == 1 and len(o2["rewards"]) == 32
        expected = in_process(model, [{"prompt": "", "response": "food bright"}]).normalized[0]
        np.testing.assert_allclose(o2["rewards"], [expected] * 32, rtol=0, atol=1e-6)
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)
        pool.shutdown(wait=False, cancel_futures=True)
    assert not thread.is_alive()


@pytest.mark.slow
def test_a_server_killed_under_load_and_restarted_answers_again(bundle, tmp_path):
    """Clients see a refused connection, never a hang, while the server is down, and right answers after."""
    tracking, uri, model, _, _ = bundle
    proc = ServerProcess(tracking, uri, tmp_path / "server.log").start()
    exs = examples(64, seed=6)
    queries = [openrlhf_query(model.tokenizer, e, random.Random(7)) for e in exs]
    expected = in_process(model, exs).normalized
    stop, killed = threading.Event(), threading.Event()
    deadline = time.monotonic() + 180
    results: list[list[tuple[str, bool]]] = [[] for _ in range(8)]

    def client(k):
        rng = random.Random(k)
        while not stop.is_set() and time.monotonic() < deadline:
            a = rng.randrange(60)
            try:
                status, _, out = call(proc.url + "/get_reward", {"query": queries[a:a + 4]}, timeout_s=20)
            except OSError:  # refused or reset while the server is down
                results[k].append(("down", killed.is_set()))
                time.sleep(0.05)
                continue
            right = status == 200 and np.allclose(out["rewards"], expected[a:a + 4], rtol=0, atol=1e-6)
            results[k].append(("ok" if right else f"wrong {status}", killed.is_set()))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        proc.kill()
        killed.set()
        time.sleep(0.5)
        proc.start()
        after = sum(len(r) for r in results)
        while sum(len(r) for r in results) < after + 40 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        proc.stop()
    assert not any(t.is_alive() for t in threads), "a client hung"
    flat = [x for r in results for x in r]
    assert not [x for x in flat if x[0].startswith("wrong")], flat
    assert any(x == ("down", True) for x in flat), "the kill was not seen"
    assert sum(x == ("ok", False) for x in flat) > 0 and sum(x == ("ok", True) for x in flat) >= 40


@pytest.mark.slow
def test_an_ensemble_is_served_with_its_ensemble_std(tmp_path):
    import mlflow

    tracking, uri, _ = log_chat_bundle(tmp_path, ensemble=2)
    mlflow.set_tracking_uri(tracking)
    try:
        model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    finally:
        mlflow.set_tracking_uri(None)
    exs = examples(24, seed=8)
    expected = in_process(model, exs)
    assert expected.ensemble_std is not None and np.all(expected.ensemble_std > 0)
    proc = ServerProcess(tracking, uri, tmp_path / "server.log").start()
    try:
        status, _, out = call(proc.url + "/score", {"inputs": exs})
        queries = [openrlhf_query(model.tokenizer, e, random.Random(9)) for e in exs]
        q_status, _, q_out = call(proc.url + "/get_reward", {"query": queries})
        status_info, _, info = call(proc.url + "/info")
    finally:
        proc.stop()
    assert status == 200 and q_status == 200 and status_info == 200, (out, q_out)
    np.testing.assert_allclose(out["ensemble_std"], expected.ensemble_std, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["normalized"], expected.normalized, rtol=0, atol=1e-6)
    np.testing.assert_allclose(q_out["extra_logs"]["ensemble_std"], expected.ensemble_std, rtol=0, atol=1e-6)
    assert info["ensemble_size"] == 2
