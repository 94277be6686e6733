"""The soak: thousands of random valid and invalid requests over both protocols from concurrent clients, some
streams cut mid-way. It ends with no 5xx, no leaked KV slot or stream, the same output for every valid request as
when it ran alone, and RSS that levelled off. ``pytest -s`` prints its figures (benchmarks/RESULTS.md)."""

import json
import math
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import httpx
import pytest

from glmkit.serve.app import ServerConfig
from glmkit.serve.batcher import DynamicBatchingConfig, QueuePolicy
from glmkit.serve.sampling import Limits
from glmkit.serve.scheduler import SchedulerConfig
from glmkit.serve.server import ServeOptions, build_state
from tests.serve.conftest import WORDS, LiveServer

REQUESTS = 2400
CLIENTS = 16


@dataclass
class Case:
    path: str
    body: Any  # a JSON value, or bytes sent as they are
    kind: str  # how to read the answer: "error" for a request that must get a 4xx
    statuses: frozenset[int] = field(default_factory=lambda: frozenset({200}))

    def send(self, c: httpx.Client) -> httpx.Response:
        if isinstance(self.body, bytes):
            return c.post(self.path, content=self.body)
        return c.post(self.path, json=self.body)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def valid_cases(rng: random.Random) -> list[Case]:
    """Requests whose answers are fixed: greedy, or seeded (temperatures below the floor included)."""
    cases = []
    for _ in range(12):
        body = {"prompt": words(rng, rng.randint(1, 6)), "max_tokens": rng.randint(1, 16), "temperature": 0}
        cases.append(Case("/v1/completions", body, "completion"))
    for temperature in (0.7, 1.0, 1e-300, 5e-324):
        body = {"prompt": words(rng, 3), "max_tokens": 8, "temperature": temperature, "seed": rng.randint(0, 99)}
        cases.append(Case("/v1/completions", body | {"top_k": 20, "n": 2}, "completion"))
    extras = [
        {"prompt": [words(rng, 2), words(rng, 3)], "max_tokens": 5, "temperature": 0, "logprobs": 2, "echo": True},
        {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 4, "temperature": 0},
        {"prompt": words(rng, 4), "max_tokens": 12, "temperature": 0, "stop": ["the"], "ignore_eos": True},
        {"prompt": words(rng, 2), "max_tokens": 6, "n": 2, "use_beam_search": True, "best_of": 2},
    ]
    cases += [Case("/v1/completions", body, "completion") for body in extras]
    for _ in range(4):
        body = {"prompt": words(rng, 3), "max_tokens": rng.randint(2, 12), "temperature": 0, "stream": True}
        cases.append(Case("/v1/completions", body | {"stream_options": {"include_usage": True}}, "stream"))
    for stream in (False, True):
        body = {"messages": [{"role": "user", "content": words(rng, 4)}], "max_tokens": 6, "temperature": 0}
        cases.append(Case("/v1/chat/completions", body | {"stream": stream}, "chat_stream" if stream else "chat"))
    cases.append(
        Case("/v1/infill", {"prompt": "the [MASK] said unto [MASK] go", "max_tokens": 4, "temperature": 0}, "infill")
    )
    cases.append(Case("/v1/embeddings", {"input": [words(rng, 3), words(rng, 2)]}, "embeddings"))
    for _ in range(4):
        params = {"max_tokens": rng.randint(1, 10), "temperature": 0}
        cases.append(Case("/v2/models/llm/generate", {"text_input": words(rng, 3), "parameters": params}, "v2"))
    sampling = json.dumps({"max_tokens": 5, "temperature": 1e-40, "seed": 4})
    cases.append(Case("/v2/models/llm/generate", {"text_input": words(rng, 2), "sampling_parameters": sampling}, "v2"))
    body = {"text_input": words(rng, 3), "stream": True, "parameters": {"max_tokens": 8, "temperature": 0}}
    cases.append(Case("/v2/models/llm/generate_stream", body, "v2_stream"))
    cases.append(Case("/v2/models/glm_score/generate", {"text_input": "the king", "continuation": "said"}, "v2"))
    tensor = {"name": "text_input", "datatype": "BYTES", "shape": [2, 1], "data": [words(rng, 2), words(rng, 4)]}
    cases.append(Case("/v2/models/glm_embed/infer", {"inputs": [tensor]}, "infer"))
    return cases


def invalid_cases(max_body_bytes: int) -> list[Case]:
    deep = ("[" * 50_000 + "]" * 50_000).encode()

    def bad(path: str, body: Any, *statuses: int) -> Case:
        return Case(path, body, "error", frozenset(statuses or (400,)))

    return [
        bad("/v1/completions", b"{"),
        bad("/v1/completions", b"\xff\xfe"),
        bad("/v1/completions", b"null"),
        bad("/v1/completions", deep),
        bad("/v2/models/llm/generate", deep),
        bad("/v2/models/glm_embed/infer", deep),
        bad("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}'),
        bad("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
        bad("/v2/models/llm/generate", b'{"text_input": "a", "parameters": {"stop": "\\udc00"}}'),
        bad("/v1/completions", {"prompt": "a", "stream": True, "stream_options": 5}),
        bad("/v1/completions", {"prompt": [[1, 2], [999_999]], "max_tokens": 2}),
        bad("/v1/completions", {"prompt": ["a"] * 1000, "max_tokens": 2}),
        bad("/v1/completions", {"prompt": "a", "max_tokens": -3}),
        bad("/v1/completions", {"prompt": "a", "top_p": "x"}),
        bad("/v1/completions", {"prompt": "a", "temperature": -1e-300}),
        bad("/v1/completions", {"prompt": "a", "n": 100}),
        bad("/v1/completions", {"prompt": "a", "logprobs": True}),
        bad("/v1/completions", {"model": "nope", "prompt": "a"}, 404),
        bad("/v1/chat/completions", {"messages": "hi"}),
        bad("/v1/infill", {"prompt": "no blank"}),
        bad("/v1/embeddings", {"input": []}),
        bad("/v2/models/llm/generate", {"text_input": ["a", "b"]}),
        bad("/v2/models/llm/generate", {"text_input": "a", "parameters": {"temperature": 1e9}}),
        bad("/v2/models/llm/infer", {"inputs": []}),
        bad("/v2/models/unknown/infer", {"inputs": []}, 404),
        bad(
            "/v2/models/glm_embed/infer", {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}
        ),
        bad(
            "/v2/models/glm_embed/infer",
            {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [9, 1], "data": ["a"] * 9}]},
        ),
        bad("/v1/nowhere", {}, 404),
        bad("/v1/completions", b" " * (max_body_bytes + 1), 413),
    ]


def events(text: str) -> list[Any]:
    return [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: ") and e != "data: [DONE]"]


def answer(case: Case, r: httpx.Response) -> Any:
    """What must not change between a run alone and a run under load (ids and timestamps aside)."""
    if case.kind in ("stream", "chat_stream"):
        assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text, r.text[-300:]
        texts: dict[int, str] = {}
        finish: dict[int, str] = {}
        for e in events(r.text):
            for ch in e["choices"]:
                part = ch.get("text") if case.kind == "stream" else ch["delta"].get("content")
                texts[ch["index"]] = texts.get(ch["index"], "") + (part or "")
                if ch["finish_reason"]:
                    finish[ch["index"]] = ch["finish_reason"]
        return texts, finish
    if case.kind == "v2_stream":
        es = events(r.text)
        assert es and all("error" not in e for e in es), r.text[-300:]
        return "".join(e["text_output"] for e in es), es[-1]["finish_reason"]
    body = r.json()
    if case.kind == "completion":
        return [(c["index"], c["text"], c["finish_reason"], c["logprobs"]) for c in body["choices"]]
    if case.kind == "chat":
        return [(c["message"]["content"], c["finish_reason"]) for c in body["choices"]]
    if case.kind == "infill":
        return body["text"], body["spans"]
    if case.kind == "embeddings":
        return [d["embedding"] for d in body["data"]]
    if case.kind == "v2":
        return {k: v for k, v in body.items() if k != "id"}
    return body["outputs"]  # infer


def same(a: Any, b: Any) -> bool:
    """Equal, floats within 1e-4 (the dynamic batcher pads one-shot rows to different batch widths)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.fixture(scope="module")
def server(model_and_tokenizer):
    options = ServeOptions(
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=160),
        batching=DynamicBatchingConfig(
            max_batch_size=8, max_queue_delay_microseconds=2000, default_queue_policy=QueuePolicy(max_queue_size=256)
        ),
        server=ServerConfig(limits=Limits(max_tokens=48, max_prompt_tokens=96)),
        max_jobs=CLIENTS,  # a beam-search request of each client fits: valid requests are never refused for load
    )
    s = LiveServer(build_state(*model_and_tokenizer, options))
    yield s
    s.stop()


@pytest.mark.slow
def test_soak_both_protocols_concurrently(server):
    rng = random.Random(0)
    valid = valid_cases(rng)
    invalid = invalid_cases(server.state.config.max_body_bytes)
    base = f"http://{server.url}"
    with httpx.Client(base_url=base, timeout=60) as c:
        alone = [answer(case, case.send(c)) for case in valid]
    # 70 % valid, 25 % invalid, 5 % streams the client cuts after the first event
    plan = [rng.choices(["valid", "invalid", "cut"], [70, 25, 5])[0] for _ in range(REQUESTS)]
    picks = [rng.randrange(len(valid) if p != "invalid" else len(invalid)) for p in plan]
    local = threading.local()
    statuses: Counter[int] = Counter()
    mismatches: list[tuple[Case, Any, Any]] = []
    rss: dict[str, float] = {}

    def one(i: int) -> None:
        c = getattr(local, "client", None) or httpx.Client(base_url=base, timeout=60)
        local.client = c
        if i == REQUESTS // 4:
            rss["warm"] = rss_mib()
        kind, pick = plan[i], picks[i]
        if kind == "cut":
            body = {"prompt": words(random.Random(i), 3), "max_tokens": 40, "stream": True, "ignore_eos": True}
            with c.stream("POST", "/v1/completions", json=body) as r:
                statuses[r.status_code] += 1
                next(r.iter_lines())
            return
        case = (valid if kind == "valid" else invalid)[pick]
        r = case.send(c)
        statuses[r.status_code] += 1
        if kind == "invalid":
            assert r.status_code in case.statuses, (case.path, case.body[:200], r.status_code, r.text[:300])
            err = r.json()["error"]
            assert (isinstance(err, dict) and err["type"] != "InternalServerError") or isinstance(err, str), err
        else:
            assert r.status_code == 200, (case.path, case.body, r.text[:300])
            got = answer(case, r)
            if not same(got, alone[pick]):
                mismatches.append((case, got, alone[pick]))

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        for f in [pool.submit(one, i) for i in range(REQUESTS)]:
            f.result()
    duration = time.perf_counter() - start
    engine = server.state.engine
    deadline = time.monotonic() + 10  # cut streams are aborted when the server notices the closed connection
    while engine.busy() and time.monotonic() < deadline:
        time.sleep(0.02)
    rss["end"] = rss_mib()
    figures = {
        "requests": REQUESTS,
        "clients": CLIENTS,
        "statuses": dict(sorted(statuses.items())),
        "duration_s": round(duration, 1),
        "rss_mib": {k: round(v, 1) for k, v in rss.items()},
        "date": str(date.today()),
    }
    print("\nsoak:", json.dumps(figures))
    assert not mismatches, mismatches[:3]
    assert sum(n for s, n in statuses.items() if s >= 500) == 0 and sum(statuses.values()) == REQUESTS
    assert {200, 400, 404, 413} <= statuses.keys()
    sched = engine.engine.scheduler
    assert not engine.busy() and not sched.running and sched.num_waiting == 0
    assert sched.num_free_slots == engine.engine.config.max_num_seqs
    assert engine.engine.stats.failures["BACKEND"] == 0
    assert rss["end"] - rss["warm"] < 50
