"""Operations: auth, body limits, metrics, access logs, backpressure, graceful drain, the CLI, and a soak test."""

import json
import logging
import random
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI

from glmkit.cli import main
from glmkit.serve.scheduler import SchedulerConfig
from tests.serve.conftest import LiveServer, make_state


@pytest.fixture(scope="module")
def auth_server(model_and_tokenizer):
    server = LiveServer(make_state(*model_and_tokenizer, api_key="sekret"))
    yield server
    server.stop()


def test_bearer_auth_on_every_route_but_health(auth_server):
    base = f"http://{auth_server.url}"
    assert httpx.get(f"{base}/v2/health/live").status_code == 200
    assert httpx.get(f"{base}/v2/health/ready").status_code == 200
    for path in ("/v2", "/v2/models/llm", "/metrics", "/v1/models"):
        r = httpx.get(base + path)
        assert r.status_code == 401 and "API key" in json.dumps(r.json())
    assert httpx.get(f"{base}/v2", headers={"Authorization": "Bearer sekret"}).status_code == 200
    good = OpenAI(base_url=f"{base}/v1", api_key="sekret", max_retries=0)
    assert good.completions.create(model="llm", prompt="a", max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()


def test_body_limit(live_server):
    base = f"http://{live_server.url}"
    big = b"x" * (live_server.state.config.max_body_bytes + 1)
    r = httpx.post(f"{base}/v1/completions", content=big)
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(5):
            yield big[: len(big) // 4]

    r = httpx.post(f"{base}/v2/models/glm_embed/infer", content=chunks())
    assert r.status_code == 413 and "exceeds" in r.json()["error"]
    assert httpx.get(f"{base}/v2/health/live").status_code == 200


def test_metrics_and_access_log(live_server, caplog):
    base = f"http://{live_server.url}"
    with caplog.at_level(logging.INFO, logger="glmkit.access"):
        httpx.post(
            f"{base}/v1/completions",
            json={"model": "llm", "prompt": "a", "max_tokens": 3},
            headers={"x-request-id": "abc"},
        )
        httpx.post(f"{base}/v2/models/glm_embed/generate", json={"text_input": "a"})
    logs = [json.loads(r.message) for r in caplog.records if r.name == "glmkit.access"]
    mine = next(entry for entry in logs if entry["request_id"] == "abc")
    assert mine["path"] == "/v1/completions" and mine["status"] == 200 and mine["ms"] > 0
    text = httpx.get(f"{base}/metrics").text
    for name in (
        'nv_inference_request_success{model="llm",version="1"}',
        'nv_inference_request_failure{model="llm",reason="REJECTED",version="1"}',
        'nv_inference_count{model="glm_embed",version="1"}',
        "nv_inference_exec_count{",
        "nv_inference_queue_duration_us{",
        "nv_inference_compute_infer_duration_us{",
        "nv_inference_pending_request_count{",
        "nv_inference_first_response_histogram_ms_bucket{",
        "glmkit_time_to_first_token_seconds_bucket{",
        "glmkit_batch_size_bucket{",
        "glmkit_generation_tokens_per_second{",
        "glmkit_generation_tokens{",
        "glmkit_kv_cache_usage_perc{",
    ):
        assert name in text, name
    success = next(line for line in text.splitlines() if line.startswith('nv_inference_request_success{model="llm"'))
    assert float(success.split()[-1]) >= 1


@pytest.fixture
def slow_server(model_and_tokenizer):
    """One slot, a queue of one, 20 ms per step: easy to fill."""
    state = make_state(
        *model_and_tokenizer,
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=96, max_queue_size=1),
    )
    runner = state.engine.engine.runner
    execute = runner.execute

    def slow(scheduled):
        time.sleep(0.02)
        return execute(scheduled)

    runner.execute = slow
    server = LiveServer(state)
    yield server
    server.stop()


def wait_until(reached) -> None:
    """Poll the server's state (a loaded machine may take a while to deliver a request) for up to 10 s."""
    for _ in range(1000):
        if reached():
            return
        time.sleep(0.01)
    assert reached()


def test_backpressure_429_and_503_with_retry_after(slow_server):
    base = f"http://{slow_server.url}"
    body = {"model": "llm", "prompt": "a", "max_tokens": 40, "ignore_eos": True}  # >= 0.8 s each at 20 ms a step
    threads = [
        threading.Thread(target=httpx.post, args=(f"{base}/v1/completions",), kwargs={"json": body, "timeout": 30})
        for _ in range(2)
    ]
    scheduler = slow_server.state.engine.engine.scheduler
    waits = (lambda: len(scheduler.running) == 1, lambda: scheduler.num_waiting == 1)
    for t, reached in zip(threads, waits, strict=True):
        t.start()  # the first runs, the second waits
        wait_until(reached)
    cli = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        cli.completions.create(model="llm", prompt="a", max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
    r = httpx.post(f"{base}/v2/models/llm/generate", json={"text_input": "a", "parameters": {"max_tokens": 2}})
    assert r.status_code == 503 and "Exceeds maximum queue size" in r.json()["error"] and r.headers["retry-after"]
    for t in threads:
        t.join()
    engine = slow_server.state.engine.engine
    assert engine.stats.failures["REJECTED"] >= 2 and engine.scheduler.num_free_slots == 1


def test_disconnect_while_waiting_for_a_whole_answer_aborts(slow_server):
    engine = slow_server.state.engine.engine
    for path, body in (
        ("/v1/completions", {"model": "llm", "prompt": "a", "max_tokens": 30}),
        ("/v2/models/llm/generate", {"text_input": "a", "parameters": {"max_tokens": 30}}),
    ):
        before = engine.stats.failures["CANCELED"]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"http://{slow_server.url}{path}", json=body, timeout=0.15)
        for _ in range(500):  # up to 10 s, as wait_until
            if engine.stats.failures["CANCELED"] > before and not engine.has_unfinished_requests():
                break
            time.sleep(0.02)
        assert engine.stats.failures["CANCELED"] == before + 1 and engine.scheduler.num_free_slots == 1


def test_graceful_shutdown_drains_in_flight(slow_server):
    base = f"http://{slow_server.url}"
    result = {}

    def stream():
        body = {"model": "llm", "prompt": "a", "max_tokens": 15, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
            result["text"] = r.read().decode()

    t = threading.Thread(target=stream)
    t.start()
    wait_until(lambda: len(slow_server.state.engine.engine.scheduler.running) == 1)
    slow_server.state.draining = True  # what SIGTERM sets before uvicorn stops listening
    assert httpx.get(f"{base}/v2/health/ready").status_code == 400
    r = httpx.post(f"{base}/v1/completions", json={"model": "llm", "prompt": "a", "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"]
    slow_server.stop()  # uvicorn waits for the open stream, then the lifespan drains the engine
    t.join(timeout=30)
    assert result["text"].endswith("data: [DONE]\n\n") and '"finish_reason": "length"' in result["text"]
    assert result["text"].count("data: ") > 5  # 20 ms steps: tokens arrive one event at a time
    assert not slow_server.state.engine._thread.is_alive()


def test_cli_serve_help(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--api-key" in out and "--max-num-seqs" in out and "127.0.0.1" in out


def test_soak_random_requests(live_server):
    """Hundreds of random valid and invalid requests: no 5xx, no leaked KV slots, memory stable."""
    rng = random.Random(0)
    base = f"http://{live_server.url}"
    bodies = [
        ("/v1/completions", {"model": "llm", "prompt": "the king", "max_tokens": 4}),
        (
            "/v1/completions",
            {"model": "llm", "prompt": ["a", "b"], "max_tokens": 3, "n": 2, "temperature": 0.7, "seed": 1},
        ),
        ("/v1/completions", {"model": "llm", "prompt": "a", "max_tokens": 4, "stream": True}),
        ("/v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
        ("/v1/completions", {"model": "llm", "prompt": "a", "max_tokens": -3}),
        ("/v1/completions", {"model": "llm", "prompt": "a", "top_p": "x"}),
        ("/v1/completions", {"model": "nope", "prompt": "a"}),
        ("/v1/chat/completions", {"model": "llm", "messages": "hi"}),
        ("/v1/infill", {"prompt": "a [MASK] b", "max_tokens": 3}),
        ("/v2/models/llm/generate", {"text_input": "a", "parameters": {"max_tokens": 3}}),
        ("/v2/models/llm/generate_stream", {"text_input": "a", "stream": True, "parameters": {"max_tokens": 3}}),
        ("/v2/models/llm/generate", {"text_input": ["a", "b"]}),
        ("/v2/models/glm_score/generate", {"text_input": "a", "continuation": "b"}),
        (
            "/v2/models/glm_embed/infer",
            {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": ["a"]}]},
        ),
        (
            "/v2/models/glm_embed/infer",
            {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [9, 1], "data": ["a"] * 9}]},
        ),
        ("/v2/models/glm_embed/infer", {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}),
        ("/v2/models/unknown/infer", {"inputs": []}),
    ]
    raw = [b"{", b"\xff\xfe", b"null", b'{"inputs": [{"name": "text_input"}]}']

    def rss_kb() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))

    statuses = []
    with httpx.Client(base_url=base, timeout=30) as c:
        for i in range(300):
            if i == 100:
                rss_before = rss_kb()
            if rng.random() < 0.15:
                path = rng.choice(["/v1/completions", "/v2/models/glm_score/infer", "/v2/models/llm/generate"])
                r = c.post(path, content=rng.choice(raw))
            else:
                path, body = rng.choice(bodies)
                r = c.post(path, json=body)
            statuses.append(r.status_code)
    assert all(s < 500 for s in statuses), sorted(set(statuses))
    assert {200, 400, 404} <= set(statuses)
    engine = live_server.state.engine.engine
    for _ in range(500):  # up to 10 s, as wait_until
        if not engine.has_unfinished_requests():
            break
        time.sleep(0.02)
    assert engine.scheduler.num_free_slots == engine.config.max_num_seqs and not engine.scheduler.running
    assert rss_kb() - rss_before < 50_000
