"""The real ``tritonclient.http`` (and raw HTTP for what it cannot send) against a live glmkit server."""

import asyncio
import gzip
import json
import weakref

import httpx
import numpy as np
import pytest
import tritonclient.http as th
import tritonclient.http.aio as tha
from tritonclient.utils import InferenceServerException

from glmkit.serve.batcher import BatchItem, DynamicBatcher, DynamicBatchingConfig, QueuePolicy
from glmkit.serve.scoring import ScoreRow


@pytest.fixture(scope="module")
def client(live_server):
    c = th.InferenceServerClient(live_server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http(live_server):
    with httpx.Client(base_url=f"http://{live_server.url}", timeout=30) as c:
        yield c


def texts(name, rows, binary=True):
    t = th.InferInput(name, [len(rows), 1], "BYTES")
    t.set_data_from_numpy(np.array([[r.encode()] for r in rows], dtype=object), binary_data=binary)
    return t


def test_health_metadata_config(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("llm") and client.is_model_ready("glm_score", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("llm", "7")
    meta = client.get_server_metadata()
    assert (
        meta["name"] == "glmkit" and "binary_tensor_data" in meta["extensions"] and "statistics" in meta["extensions"]
    )
    assert client.get_model_metadata("glm_score") == client.get_model_metadata("glm_score", "1")
    inputs = {t["name"]: t for t in client.get_model_metadata("glm_score")["inputs"]}
    assert inputs["continuation"] == {"name": "continuation", "datatype": "BYTES", "shape": [-1, 1]}
    llm = client.get_model_config("llm")
    assert llm["max_batch_size"] == 0 and llm["model_transaction_policy"]["decoupled"] is True
    assert [i["name"] for i in llm["input"]] == [
        "text_input",
        "stream",
        "sampling_parameters",
        "exclude_input_in_output",
    ]
    score = client.get_model_config("glm_score")
    assert score["max_batch_size"] == 8 and score["response_cache"]["enable"] is False and "dynamic_batching" in score
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert e.value.status() == "404" and "unknown model" in e.value.message()


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False, None])
def test_infer_json_and_binary(client, live_server, binary_in, binary_out):
    inputs = [texts("text_input", ["the king", "go and"], binary_in), texts("continuation", ["said", "see"], binary_in)]
    outputs = (
        None
        if binary_out is None
        else [th.InferRequestedOutput(n, binary_data=binary_out) for n in ("logprob", "is_greedy")]
    )
    res = client.infer("glm_score", inputs, outputs=outputs, request_id="r-1")
    assert res.get_response()["id"] == "r-1"
    lp = res.as_numpy("logprob")
    assert lp.shape == (2, 1) and lp.dtype == np.float32 and (lp < 0).all()
    assert res.as_numpy("is_greedy").dtype == np.bool_
    scorer = live_server.state.models["glm_score"].scorer
    tok = live_server.state.service.tok
    alone = scorer(
        [[scorer.check(ScoreRow("loglikelihood", [tok.special.cls] + tok.encode("go and"), tok.encode("see")))]]
    )
    assert abs(float(lp[1, 0]) - alone[0][0].logprob) < 1e-4


def test_embed_logits_and_compression(client, live_server):
    res = client.infer(
        "glm_embed",
        [texts("text_input", ["the land"])],
        request_compression_algorithm="gzip",
        response_compression_algorithm="deflate",
    )
    emb = res.as_numpy("embedding")
    assert emb.shape == (1, 32) and abs(np.linalg.norm(emb) - 1) < 1e-4
    res = client.infer(
        "glm_logits",
        [texts("text_input", ["the land"])],
        request_compression_algorithm="deflate",
        response_compression_algorithm="gzip",
    )
    assert res.as_numpy("logits").shape == (1, live_server.state.service.model.config.vocab_size)


def test_only_large_responses_are_compressed(http, live_server):
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": ["the land"]}]}
    headers = {"Accept-Encoding": "gzip"}
    small = http.post("/v2/models/glm_embed/infer", json=body, headers=headers)  # 32 floats
    large = http.post("/v2/models/glm_logits/infer", json=body, headers=headers)  # a vocabulary of floats
    assert small.status_code == large.status_code == 200
    assert "content-encoding" not in small.headers and large.headers["content-encoding"] == "gzip"
    vocab = live_server.state.service.model.config.vocab_size
    assert len(large.json()["outputs"][0]["data"]) == vocab  # httpx decompressed it


def test_infer_errors(client, http):
    def fails(model, inputs, match):
        with pytest.raises(InferenceServerException, match=match) as e:
            client.infer(model, inputs)
        assert e.value.status() in ("400", "404")

    fails("glm_score", [texts("text_input", ["a"]), texts("bogus", ["b"])], "unexpected inference input 'bogus'")
    fails("glm_score", [texts("text_input", ["a"])], "expected 2 inputs")
    wrong_type = th.InferInput("continuation", [1, 1], "INT32")
    wrong_type.set_data_from_numpy(np.array([[1]], dtype=np.int32))
    fails("glm_score", [texts("text_input", ["a"]), wrong_type], "data-type")
    fails("glm_score", [texts("text_input", ["a"] * 9), texts("continuation", ["b"] * 9)], "max_batch_size")
    flat = th.InferInput("text_input", [1], "BYTES")
    flat.set_data_from_numpy(np.array([b"a"], dtype=object))
    fails("glm_embed", [flat], "shape")
    fails("nope", [texts("text_input", ["a"])], "unknown model")
    fails("llm", [texts("text_input", ["a"])], "decoupled transaction policy")
    bad_utf8 = th.InferInput("text_input", [1, 1], "BYTES")
    bad_utf8.set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=object))
    fails("glm_embed", [bad_utf8], "UTF-8")
    for body, match in [
        (b"{not json", "failed to parse"),
        (b"[1, 2]", "JSON object"),
        (b'{"inputs": [{"name": "text_input", "datatype": "FP16", "shape": [1, 1], "data": [1.0]}]}', "data-type"),
        (b'{"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": [1]}]}', "strings"),
        (b'{"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1, 2], "data": ["a"]}]}', "elements"),
        (b'{"inputs": "x"}', "inputs"),
    ]:
        r = http.post("/v2/models/glm_embed/infer", content=body)
        assert r.status_code == 400 and match in r.json()["error"], (body, r.text)
    r = http.post(
        "/v2/models/glm_embed/infer", content=b'{"inputs": []}', headers={"Inference-Header-Content-Length": "99"}
    )
    assert r.status_code == 400
    assert http.get("/v2/nothing/here").json() == {"error": "Not Found"}
    assert http.delete("/v2/health/live").status_code == 405


def test_statistics_count_requests_and_batches(client):
    before = client.get_inference_statistics("glm_score")["model_stats"][0]
    for _ in range(3):
        client.infer("glm_score", [texts("text_input", ["a", "b"]), texts("continuation", ["c", "d"])])
    after = client.get_inference_statistics("glm_score")["model_stats"][0]
    s0, s1 = before["inference_stats"], after["inference_stats"]
    assert after["inference_count"] - before["inference_count"] == 6
    assert s1["success"]["count"] - s0["success"]["count"] == 3 and s1["queue"]["count"] - s0["queue"]["count"] == 3
    assert 1 <= after["execution_count"] - before["execution_count"] <= 3
    assert all(k in s1 for k in ("cache_hit", "cache_miss", "compute_input", "compute_infer", "compute_output"))
    assert after["version"] == "1" and after["last_inference"] > 0


def test_concurrent_requests_are_batched(live_server):
    async def main():
        c = tha.InferenceServerClient(live_server.url)
        try:
            before = (await c.get_inference_statistics("glm_embed"))["model_stats"][0]
            reqs = [c.infer("glm_embed", [texts("text_input", [f"word {i}"])]) for i in range(32)]
            results = await asyncio.gather(*reqs)
            after = (await c.get_inference_statistics("glm_embed"))["model_stats"][0]
        finally:
            await c.close()
        return results, before, after

    results, before, after = asyncio.run(main())
    assert all(r.as_numpy("embedding").shape == (1, 32) for r in results)
    assert after["inference_count"] - before["inference_count"] == 32
    assert after["execution_count"] - before["execution_count"] < 32  # batches were formed


def test_queue_full_is_503_with_retry_after(live_server, http):
    model = live_server.state.models["glm_logits"]
    real = model.batcher
    full = DynamicBatcher(
        DynamicBatchingConfig(max_batch_size=8, default_queue_policy=QueuePolicy(max_queue_size=1)), real.execute
    )
    full.queue.enqueue(BatchItem(None), 0)  # never started: the queue stays full
    model.batcher = full
    try:
        r = http.post("/v2/models/glm_logits/generate", json={"text_input": "x"})
    finally:
        model.batcher = real
    assert (
        r.status_code == 503 and r.json()["error"] == "Exceeds maximum queue size" and r.headers["retry-after"] == "1"
    )


def test_repository_unload_load_keeps_the_other_models(client):
    """On the shared server (built from a model object, so the GLM stays): unload frees glm_logits' batcher only."""
    names = {m["name"]: m["state"] for m in client.get_model_repository_index()}
    assert names == {"llm": "READY", "glm_score": "READY", "glm_embed": "READY", "glm_logits": "READY"}
    client.unload_model("glm_logits")
    assert not client.is_model_ready("glm_logits") and client.is_model_ready("glm_score")
    with pytest.raises(InferenceServerException) as e:
        client.infer("glm_logits", [texts("text_input", ["a"])])
    assert e.value.status() == "404" and "has no available versions" in e.value.message()
    assert client.infer("glm_embed", [texts("text_input", ["a"])]).as_numpy("embedding").shape == (1, 32)
    client.load_model("glm_logits")
    assert client.is_model_ready("glm_logits")
    assert client.infer("glm_logits", [texts("text_input", ["a"])]).as_numpy("logits").ndim == 2


def _answers(http):
    """What each model answers to a fixed request (greedy, so a rebuilt model must answer the same)."""
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": ["the land"]}]}
    score = {**body, "inputs": [*body["inputs"], {**body["inputs"][0], "name": "continuation", "data": ["of"]}]}
    gen = {"text_input": "the king said", "parameters": {"max_tokens": 12, "temperature": 0, "ignore_eos": True}}
    completion = {"prompt": "go and see", "max_tokens": 8, "temperature": 0}
    return {
        "glm_logits": http.post("/v2/models/glm_logits/infer", json=body),
        "glm_embed": http.post("/v2/models/glm_embed/infer", json=body),
        "glm_score": http.post("/v2/models/glm_score/infer", json=score),
        "llm": http.post("/v2/models/llm/generate", json=gen),
        "openai": http.post("/v1/completions", json=completion),
        "openai_embed": http.post("/v1/embeddings", json={"input": "the land"}),
    }


def test_unload_frees_the_model_and_load_rebuilds_it_from_its_source(model_dir):
    """A server with a source (as ``glmkit serve`` has: its checkpoint folder): unloading every model drops the GLM
    (a weak reference to it dies), its KV pool and its threads; inference answers Triton's 404 meanwhile (OpenAI:
    404); loading reads the checkpoint again and every model answers exactly as before."""
    from glmkit.bundled import load_model_and_tokenizer
    from glmkit.serve.app import ServerConfig
    from glmkit.serve.sampling import Limits
    from glmkit.serve.scheduler import SchedulerConfig
    from glmkit.serve.server import ServeOptions, build_state

    from .conftest import LiveServer

    model, tok = load_model_and_tokenizer(model_dir)
    first = weakref.ref(model)
    options = ServeOptions(
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=160),
        server=ServerConfig(limits=Limits(max_tokens=48, max_prompt_tokens=96)),
    )
    server = LiveServer(build_state(model, tok, options, source=lambda: load_model_and_tokenizer(model_dir)[0]))
    del model
    names = ["glm_logits", "llm", "glm_score", "glm_embed"]
    try:
        with httpx.Client(base_url=f"http://{server.url}", timeout=60) as http:
            before = _answers(http)
            assert all(r.status_code == 200 for r in before.values()), {k: r.text for k, r in before.items()}
            # a finished thread lets go of its target, so holding the threads keeps no engine alive
            threads = [server.state.engine._thread, *(b._thread for b in server.state.batchers)]
            for i, name in enumerate(names):
                assert http.post(f"/v2/repository/models/{name}/unload", json={}).status_code == 200
                assert http.get(f"/v2/models/{name}/ready").status_code == 400
                assert (first() is None) == (i == len(names) - 1)  # the others still use the GLM
            assert http.post("/v2/repository/models/llm/unload").status_code == 200  # unloading twice is fine
            assert server.state.engine is None and server.state.batchers == []
            assert not any(t.is_alive() for t in threads)
            states = {m["name"]: m["state"] for m in http.post("/v2/repository/index").json()}
            assert states == dict.fromkeys(names, "UNAVAILABLE")
            assert http.get("/v2/models/llm").status_code == 200  # metadata stays
            assert http.get("/v1/models").json()["data"] == []
            unloaded = _answers(http)
            for name, r in unloaded.items():
                assert r.status_code == 404, (name, r.text)
                error = r.json()["error"]
                assert "not loaded" in error["message"] if name.startswith("openai") else "no available" in error
            assert http.post("/v2/repository/models/nope/load").status_code == 404
            for name in names:
                assert http.post(f"/v2/repository/models/{name}/load", json={}).status_code == 200
                assert http.get(f"/v2/models/{name}/ready").status_code == 200
            after = _answers(http)
        for name, r in after.items():
            same = (lambda j: j["choices"]) if name == "openai" else (lambda j: j)  # ids and times differ
            assert r.status_code == 200 and same(r.json()) == same(before[name].json()), name
        assert server.state.service.model is not None and first() is None  # a new GLM from the checkpoint
    finally:
        server.stop()


def test_generate_and_stream_agree(http):
    body = {"text_input": "the king said", "parameters": {"max_tokens": 10, "temperature": 0}}
    r = http.post("/v2/models/llm/generate", json=body)
    assert r.status_code == 200
    full = r.json()
    assert full["model_name"] == "llm" and full["model_version"] == "1" and full["finish_reason"] in ("length", "stop")
    assert full["text_output"].startswith("the king said")
    r = http.post("/v2/models/llm/generate_stream", json={**body, "stream": True, "id": "7"})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events and all(e["id"] == "7" for e in events)  # steps a slow reader missed arrive joined
    assert "".join(e["text_output"] for e in events) == full["text_output"]
    r = http.post(
        "/v2/models/llm/generate",
        json={"text_input": "x", "exclude_input_in_output": True, "parameters": {"max_tokens": 3, "temperature": 0}},
    )
    assert not r.json()["text_output"].startswith("x")
    sp = json.dumps({"max_tokens": 4, "temperature": 0})
    r = http.post("/v2/models/llm/generate", json={"text_input": "the king said", "sampling_parameters": sp})
    assert r.json()["text_output"] == full["text_output"][: len(r.json()["text_output"])]
    score = http.post("/v2/models/glm_score/generate", json={"text_input": "the king", "continuation": "said"}).json()
    assert score["num_tokens"] >= 1 and score["logprob"] < 0


@pytest.mark.parametrize(
    "body,match",
    [
        ({"text_input": "x", "parameters": {"temperature": -1}}, "temperature"),
        ({"text_input": "x", "parameters": {"max_tokens": 10_000}}, "max_tokens"),
        ({"text_input": 5}, "text_input"),
        ({"parameters": {}}, "missing"),
        ({"text_input": "x", "sampling_parameters": "{bad"}, "sampling_parameters"),
        ({"text_input": "x", "parameters": {"text_input": "y"}}, "both"),
    ],
)
def test_generate_errors_are_400(http, body, match):
    for path in ("/v2/models/llm/generate", "/v2/models/llm/generate_stream"):
        r = http.post(path, json=body)
        assert r.status_code == 400 and match in r.json()["error"]


def test_gzip_body_bomb_is_refused(http, live_server):
    limit = live_server.state.config.max_body_bytes
    bomb = gzip.compress(b" " * (limit + 10))
    r = http.post("/v2/models/glm_embed/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413
