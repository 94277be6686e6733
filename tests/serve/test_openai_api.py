"""The real ``openai`` client against a live glmkit server: completions, chat, streaming, logprobs, n, seeds,
beam search, vLLM extras, errors, backpressure and disconnects; plus GLM's /v1/infill."""

import time

import httpx
import openai
import pytest
from openai import OpenAI

from glmkit.generate import fill_blank_ids, generate
from glmkit.prompts import continuation_ids, infilling_ids
from glmkit.serve.text import safe_decode


@pytest.fixture(scope="module")
def cli(live_server):
    return OpenAI(base_url=f"http://{live_server.url}/v1", api_key="EMPTY", max_retries=0)


@pytest.fixture(scope="module")
def http(live_server):
    with httpx.Client(base_url=f"http://{live_server.url}", timeout=30) as c:
        yield c


def reference(model_and_tokenizer, prompt, **kw):
    model, tok = model_and_tokenizer
    out = generate(model, continuation_ids(tok, prompt), tokenizer=tok, **kw)
    return safe_decode(tok, out.new_tokens[0]), out.new_tokens[0]


def test_models_and_greedy_completion(cli, model_and_tokenizer):
    assert [m.id for m in cli.models.list().data] == ["llm"]
    res = cli.completions.create(model="llm", prompt="the king said", max_tokens=8, temperature=0)
    text, ids = reference(model_and_tokenizer, "the king said", max_new_tokens=8)
    c = res.choices[0]
    assert c.text == text and c.finish_reason in ("length", "stop")
    assert res.usage.completion_tokens == len(ids) <= 8
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens


def test_n_stop_logprobs_echo_seed_top_k(cli, model_and_tokenizer):
    res = cli.completions.create(
        model="llm", prompt="go and see", max_tokens=6, n=2, temperature=0, logprobs=2, echo=True
    )
    assert [c.index for c in res.choices] == [0, 1] and res.choices[0].text == res.choices[1].text
    assert res.choices[0].text.startswith("go and see")
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) and all(
        len(t) <= 2 for t in lp.top_logprobs
    )
    text, _ = reference(model_and_tokenizer, "in the land", max_new_tokens=10)
    stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if not text[i : i + 2].isspace())
    res = cli.completions.create(model="llm", prompt="in the land", max_tokens=10, temperature=0, stop=[stop])
    assert res.choices[0].text == text[: text.index(stop)] and res.choices[0].finish_reason == "stop"
    kw = dict(model="llm", prompt="the lord", max_tokens=8, temperature=1.0, seed=7, extra_body={"top_k": 5})
    a, b = cli.completions.create(**kw), cli.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    sampled, _ = reference(model_and_tokenizer, "the lord", max_new_tokens=8, do_sample=True, top_k=5, seed=7)
    assert a.choices[0].text == sampled
    res = cli.completions.create(model="llm", prompt=["a", "b"], max_tokens=3, temperature=0)
    assert [c.index for c in res.choices] == [0, 1]


def test_vllm_extras_and_beam_search(cli, model_and_tokenizer):
    res = cli.completions.create(
        model="llm", prompt="x", max_tokens=5, temperature=0, extra_body={"ignore_eos": True, "min_tokens": 5}
    )
    assert res.usage.completion_tokens == 5
    res = cli.completions.create(
        model="llm", prompt="the king", max_tokens=6, n=2, extra_body={"use_beam_search": True, "best_of": 3}
    )
    model, tok = model_and_tokenizer
    beams = generate(model, continuation_ids(tok, "the king"), max_new_tokens=6, num_beams=3, num_return_sequences=2)
    assert [c.text for c in res.choices] == [safe_decode(tok, s) for s in beams.new_tokens]
    res = cli.completions.create(model="llm", prompt="the king", max_tokens=6, extra_body={"num_beams": 3})
    assert res.choices[0].text == safe_decode(tok, beams.new_tokens[0])


def test_chat_and_streaming(cli, http):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    full = cli.chat.completions.create(
        model="llm", messages=msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    chunks = list(
        cli.chat.completions.create(
            model="llm", messages=msgs, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    raw = http.post("/v1/completions", json={"model": "llm", "prompt": "a", "max_tokens": 3, "stream": True, "n": 2})
    assert raw.text.endswith("data: [DONE]\n\n")
    streamed = list(cli.completions.create(model="llm", prompt="the land", max_tokens=8, temperature=0, stream=True))
    whole = cli.completions.create(model="llm", prompt="the land", max_tokens=8, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_errors(cli, http):
    with pytest.raises(openai.NotFoundError):
        cli.completions.create(model="other", prompt="a", max_tokens=2)
    for kw in (dict(max_tokens=-1), dict(max_tokens=10_000), dict(temperature=-0.5), dict(top_p=0), dict(n=100)):
        with pytest.raises(openai.BadRequestError):
            cli.completions.create(model="llm", prompt="a", **{"max_tokens": 2, **kw})
    with pytest.raises(openai.BadRequestError, match="stop"):
        cli.completions.create(model="llm", prompt="a", max_tokens=2, stop=[""])
    with pytest.raises(openai.BadRequestError, match="role"):
        cli.chat.completions.create(model="llm", messages=[{"role": "robot", "content": "x"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        cli.completions.create(model="llm", prompt="word " * 200, max_tokens=2)
    for body in (b"{", b"[]", b'{"prompt": "\xff"}', b'{"model": "llm", "prompt": 3}'):
        r = http.post("/v1/completions", content=body)
        assert r.status_code == 400 and "message" in r.json()["error"], body


def test_infill_and_embeddings(cli, http, model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = "the [MASK] said unto [MASK] go"
    r = http.post("/v1/infill", json={"model": "llm", "prompt": prompt, "max_tokens": 5, "temperature": 0}).json()
    ref = fill_blank_ids(model, infilling_ids(tok, prompt), tokenizer=tok, max_new_tokens=5)
    assert r["spans"] == [safe_decode(tok, s) for s in ref.spans] and r["text"] == safe_decode(tok, ref.ids)
    assert http.post("/v1/infill", json={"prompt": "no blank"}).status_code == 400
    emb = cli.embeddings.create(model="llm", input=["the king", "go"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == model.config.n_embd


def test_disconnect_mid_stream_aborts(live_server):
    engine = live_server.state.engine.engine
    before = engine.stats.failures["CANCELED"]
    body = {"model": "llm", "prompt": "a", "max_tokens": 48, "stream": True, "extra": 1}
    with httpx.Client(base_url=f"http://{live_server.url}") as c, c.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines), next(lines)  # two events, then the client goes away
    for _ in range(500):  # up to 10 s: a loaded machine may take a while to abort
        if engine.stats.failures["CANCELED"] > before and not engine.has_unfinished_requests():
            break
        time.sleep(0.02)
    assert engine.stats.failures["CANCELED"] == before + 1
    assert engine.scheduler.num_free_slots == engine.config.max_num_seqs
