"""One client never breaks another: a request whose parameters fail fails alone, bad input gets a 4xx in the
protocol's error format, and a request is validated (and queued) whole or not at all."""

import json
import logging
import threading

import httpx
import pytest

from glmkit.serve.engine import LLMEngine
from glmkit.serve.scheduler import QueueFullError, SchedulerConfig
from tests.serve.conftest import LiveServer, make_state
from tests.serve.test_ops import wait_until


@pytest.fixture
def engine(model_and_tokenizer):
    model, tok = model_and_tokenizer
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=96, max_queue_size=6)
    return LLMEngine(model, tok, config)


def valid_requests(engine, tok):
    ids = [tok.special.cls] + tok.encode("the king said")
    return [
        engine.make_request("greedy", ids, max_new_tokens=12),
        engine.make_request(
            "sampled", [tok.special.cls] + tok.encode("what"), max_new_tokens=9, do_sample=True, seed=3
        ),
    ]


def run(engine, requests, during_step=None):
    """Queue ``requests`` together and step until done: {request id: (tokens, finish reason, error)}."""
    engine.add_requests(requests)
    tokens = {r.request_id: [] for r in requests}
    final = {}
    while engine.has_unfinished_requests():
        if during_step is not None:
            during_step()
            during_step = None
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                final[out.request_id] = (tokens[out.request_id], out.finish_reason, out.error)
    return final


def poisons(engine, tok):
    """Requests that fail inside a batched step: sampling (temperatures below any floor, built past the API's
    validation) and the forward pass (a token id outside the embedding)."""
    ids = [tok.special.cls] + tok.encode("a")
    return {
        "temperature=1e-300": engine.make_request("poison", ids, max_new_tokens=4, do_sample=True, temperature=1e-300),
        "temperature=5e-324": engine.make_request("poison", ids, max_new_tokens=4, do_sample=True, temperature=5e-324),
        "token id 999999": engine.make_request("poison", ids + [999_999], max_new_tokens=4),
    }


@pytest.mark.parametrize("kind", ["temperature=1e-300", "temperature=5e-324", "token id 999999"])
def test_a_failing_row_fails_alone(engine, model_and_tokenizer, kind, caplog):
    _, tok = model_and_tokenizer
    alone = run(engine, valid_requests(engine, tok))
    assert engine.stats.failures["BACKEND"] == 0
    with caplog.at_level(logging.WARNING, logger="glmkit.serve"):
        together = run(engine, [*valid_requests(engine, tok), poisons(engine, tok)[kind]])
    for rid in ("greedy", "sampled"):
        assert together[rid] == alone[rid] and together[rid][2] is None
    tokens, reason, error = together["poison"]
    assert reason == "abort" and error and ("sampling failed" in error or "model execution failed" in error)
    assert engine.stats.failures["BACKEND"] == 1
    assert engine.scheduler.num_free_slots == engine.config.max_num_seqs
    if kind.startswith("token"):  # the step was rewound and retried without the row
        assert "retrying in halves" in caplog.text and "failed for request poison" in caplog.text


def test_an_abort_during_a_step_leaves_the_others_alone(engine, model_and_tokenizer, caplog):
    """A client that goes away while a step is running (before the step reads its input) does not fail the step."""
    _, tok = model_and_tokenizer
    alone = run(engine, valid_requests(engine, tok)[:1])
    leaving = engine.make_request("leaving", [tok.special.cls] + tok.encode("go"), max_new_tokens=20)
    execute = engine.runner.execute

    def abort_first(scheduled):
        engine.runner.execute = execute
        engine.abort(["leaving"])
        return execute(scheduled)

    def arm():
        engine.runner.execute = abort_first

    with caplog.at_level(logging.WARNING, logger="glmkit.serve"):
        together = run(engine, [*valid_requests(engine, tok)[:1], leaving], during_step=arm)
    assert together["greedy"] == alone["greedy"] and "failed" not in caplog.text
    assert engine.stats.failures["BACKEND"] == 0 and engine.stats.failures["CANCELED"] == 1


def test_requests_are_queued_all_or_none(engine, model_and_tokenizer):
    _, tok = model_and_tokenizer
    ids = [tok.special.cls] + tok.encode("the land")
    good = [engine.make_request(f"g{i}", ids, max_new_tokens=4) for i in range(2)]
    too_long = engine.make_request("long", [3] * 60, max_new_tokens=40)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_requests([*good, too_long])
    assert not engine.has_unfinished_requests() and engine.scheduler.num_waiting == 0
    for i in range(5):
        engine.add_request(engine.make_request(f"q{i}", ids, max_new_tokens=4))
    good = [engine.make_request(f"g{i}", ids, max_new_tokens=4) for i in range(2)]  # refused ones stay finished
    with pytest.raises(QueueFullError):
        engine.add_requests(good)  # 5 waiting + 2 > 6: neither is queued
    assert engine.scheduler.num_waiting == 5 and engine.stats.failures["REJECTED"] == 1
    with pytest.raises(ValueError, match="max_queue_size"):
        engine.add_requests([engine.make_request(f"x{i}", ids, max_new_tokens=4) for i in range(7)])
    engine.abort([f"q{i}" for i in range(5)])
    good = [engine.make_request(f"g{i}", ids, max_new_tokens=4) for i in range(2)]
    assert run(engine, good).keys() == {"g0", "g1"}


@pytest.fixture(scope="module")
def slow_server(model_and_tokenizer):
    """5 ms per step, so a 40-token answer is still running when the poison requests arrive."""
    state = make_state(*model_and_tokenizer)
    runner = state.engine.engine.runner
    execute = runner.execute

    def slow(scheduled):
        threading.Event().wait(0.005)
        return execute(scheduled)

    runner.execute = slow
    server = LiveServer(state)
    yield server
    server.stop()


def openai_text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


POISONS = [
    ("/v1/completions", {"prompt": "a", "max_tokens": 4, "temperature": 1e-300}),
    ("/v1/completions", {"prompt": "a", "max_tokens": 4, "temperature": 5e-324, "n": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 4, "temperature": 1e-300}),
    ("/v2/models/llm/generate", {"text_input": "a", "parameters": {"max_tokens": 4, "temperature": 1e-40}}),
    ("/v2/models/llm/generate", {"text_input": "a", "sampling_parameters": '{"max_tokens": 4, "temperature": 1e-300}'}),
    ("/v1/completions", {"prompt": [[1, 2], [999_999]], "max_tokens": 4}),
]


@pytest.mark.parametrize("path,body", POISONS)
def test_a_poison_request_beside_a_valid_one(slow_server, path, body):
    """The issue's reproduction: a long greedy completion, then a poison request while it runs; the greedy one
    gets its solo text, the poison an answer (its temperature raised to the floor) or a 400, never a 500."""
    base = f"http://{slow_server.url}"
    engine = slow_server.state.engine.engine
    valid = {"prompt": "the king said", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    alone = openai_text(httpx.post(f"{base}/v1/completions", json=valid, timeout=60))
    before = dict(engine.stats.failures)
    result = {}
    t = threading.Thread(
        target=lambda: result.update(r=httpx.post(f"{base}/v1/completions", json=valid, timeout=60)), daemon=True
    )
    t.start()
    wait_until(lambda: engine.scheduler.num_running == 1)
    r = httpx.post(base + path, json=body, timeout=60)
    assert r.status_code in (200, 400), r.text
    t.join(timeout=60)
    assert openai_text(result["r"]) == alone
    assert engine.stats.failures == before


def openai_error(r: httpx.Response, status: int, match: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert match in err["message"] and err["code"] == status and err["type"] == "BadRequestError", err


def kserve_error(r: httpx.Response, status: int, match: str) -> None:
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and match in r.json()["error"], r.text


DEEP = "[" * 50_000 + "]" * 50_000


@pytest.mark.parametrize(
    "path,content,match",
    [
        ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}', "surrogate"),
        ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "surrogate"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "surrogate"),
        ("/v1/completions", '{"prompt": "a", "stream": true, "stream_options": 5}', "stream_options"),
        ("/v1/completions", '{"prompt": "a", "stream": true, "stream_options": ["x"]}', "stream_options"),
        ("/v1/completions", DEEP, "nested too deeply"),
        ("/v1/chat/completions", '{"messages": ' + DEEP + "}", "nested too deeply"),
        ("/v1/embeddings", '{"input": ' + DEEP + "}", "nested too deeply"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', "text"),
    ],
)
def test_openai_bad_input_is_a_400_error_object(live_server, path, content, match):
    r = httpx.post(f"http://{live_server.url}{path}", content=content, timeout=30)
    openai_error(r, 400, match)


@pytest.mark.parametrize(
    "path,content,match",
    [
        ("/v2/models/llm/generate", '{"text_input": "a\\ud800b"}', "surrogate"),
        ("/v2/models/llm/generate", '{"text_input": "a", "parameters": {"stop": ["\\ud800"]}}', "surrogate"),
        (
            "/v2/models/llm/generate",
            '{"text_input": "a", "sampling_parameters": "{\\"stop\\": \\"\\\\ud800\\"}"}',
            "surr",
        ),
        ("/v2/models/llm/generate_stream", DEEP, "nested too deeply"),
        ("/v2/models/llm/generate", '{"text_input": "a", "sampling_parameters": "' + DEEP + '"}', "nested too deeply"),
        ("/v2/models/glm_embed/infer", DEEP, "nested too deeply"),
        ("/v2/repository/models/glm_embed/load", '{"parameters": 5}', "'parameters' must be an object"),
    ],
)
def test_kserve_bad_input_is_a_400_error(live_server, path, content, match):
    r = httpx.post(f"http://{live_server.url}{path}", content=content, timeout=30)
    kserve_error(r, 400, match)


def test_a_body_over_the_limit_is_a_413_client_error(live_server):
    big = b"x" * (live_server.state.config.max_body_bytes + 1)
    openai_error(httpx.post(f"http://{live_server.url}/v1/completions", content=big), 413, "exceeds")


def test_a_request_is_validated_whole_before_any_of_it_is_queued(live_server, caplog, monkeypatch):
    """``[[1,2],[999999]]``: the valid first prompt must not run (nor fail a model step) before the second is seen."""
    engine = live_server.state.engine.engine
    queued = []
    add = engine.scheduler.add_request
    monkeypatch.setattr(engine.scheduler, "add_request", lambda r: (queued.append(r.request_id), add(r)))
    before = dict(engine.stats.failures)
    base = f"http://{live_server.url}"
    with caplog.at_level(logging.INFO, logger="glmkit.serve"):
        r = httpx.post(f"{base}/v1/completions", json={"prompt": [[1, 2], [999_999]], "max_tokens": 2})
        openai_error(r, 400, "token ids must be in")
        r = httpx.post(f"{base}/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2, "logprobs": 99})
        openai_error(r, 400, "logprobs")
    assert queued == [] and engine.stats.failures == before
    assert "model step failed" not in caplog.text


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": ["a"] * 1000, "max_tokens": 2},
        {"prompt": [[5, 6]] * 300, "max_tokens": 2},
        {"prompt": ["a"] * 40, "max_tokens": 2, "n": 8},  # 320 sequences
        {"prompt": ["a"] * 40, "max_tokens": 2, "use_beam_search": True, "n": 2},  # 40 beam jobs for 8 job slots
    ],
)
def test_a_request_larger_than_the_queue_is_a_400_naming_the_limit(live_server, body):
    """Never a 429: a client that retries a 429 would retry a request that can never fit, forever."""
    r = httpx.post(f"http://{live_server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and "retry-after" not in r.headers, r.text
    message = r.json()["error"]["message"]
    assert "max_queue_size" in message or "one-shot jobs" in message
    assert json.dumps(r.json())  # an OpenAI error object
