"""``glmkit serve`` on the ChatGLM families: the continuous-batching engine runs ChatGLM2/3/GLM-4 (causal prefill, 1-D
positions, KV groups, the fused decode step) and ChatGLM-6B (its 2D positions, no [CLS]) and gives each request the
tokens ``generate()`` gives it alone, the reference fixtures' greedy tokens included; the OpenAI and KServe v2 routes
lay text out in the family's prompt, chat with its template and stop ids, and answer bad input with 4xx."""

import json

import httpx
import pytest
import torch

from glmkit import GLM, SpecialTokens, kernels
from glmkit.bundled import load_model_and_tokenizer
from glmkit.chatglm.chat import chat_prompt
from glmkit.generate import generate
from glmkit.prompts import continuation_ids, model_family
from glmkit.serve.engine import LLMEngine
from glmkit.serve.scheduler import SchedulerConfig
from glmkit.serve.text import safe_decode
from tests.conftest import FIXTURES
from tests.helpers.chatglm_folders import chatglm3_folder, chatglm6b_folder
from tests.serve.conftest import LiveServer, make_state

CHATGLM2_SPECIAL = SpecialTokens(eos=2, pad=0, cls=301, mask=300, sop=303, eop=304, smask=302, gmask=301)


def fixture_requests(family):
    """(prompts as the hub tokenizer builds them, expected greedy tokens, an id never generated, special ids)."""
    cases = {c["name"]: c for c in json.loads((FIXTURES / family / "cases.json").read_text())["cases"]}
    if family == "chatglm2":
        batch = cases["d_greedy_batch2_left_pad"]
        masks = batch["attention_mask"]["mask"]
        rows = [[t for t, m in zip(r, ms, strict=True) if m] for r, ms in zip(batch["input_ids"], masks, strict=True)]
        single = cases["c_greedy_single"]
        expected = single["expected_token_ids"] + batch["expected_token_ids"]
        return [single["input_ids"][0], *rows], expected, 319, CHATGLM2_SPECIAL
    batch = cases["b_batch2_left_pad"]
    rows = [r[p:] for r, p in zip(batch["input_ids"], batch["left_pad_lengths"], strict=True)]  # `text [gMASK] <sop>`
    expected = cases["d_greedy_single"]["expected_token_ids"] + cases["e_greedy_batch2_left_pad"]["expected_token_ids"]
    return [cases["a_gmask_sop_single"]["input_ids"][0], *rows], expected, 3, None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["chatglm2", "chatglm6b"])
def test_engine_rows_decode_as_generate_alone(family, dtype):
    """Three requests through two KV slots: the third joins when the short second one frees its slot, while the first
    is still decoding. Every request gets generate()'s tokens alone; in fp32 these are the hub's greedy tokens."""
    model = GLM.from_pretrained(FIXTURES / family, dtype=dtype)
    prompts, expected, no_stop, special = fixture_requests(family)
    lengths = [12, 5, 12]
    config = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=256, max_model_len=64)
    engine = LLMEngine(model, None, config, special_tokens=special)
    requests = [
        engine.make_request(f"r{i}", p, max_new_tokens=n, eos_token_id=no_stop)
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    outputs = engine.generate_blocking(requests)
    served = [[t for out in outputs[r.request_id] for t in out.token_ids] for r in requests]
    alone = [
        generate(model, [p], special_tokens=special, max_new_tokens=n, eos_token_id=no_stop).new_tokens[0]
        for p, n in zip(prompts, lengths, strict=True)
    ]
    assert served == alone
    if dtype == torch.float32:
        assert served == [e[:n] for e, n in zip(expected, lengths, strict=True)]
    elif family == "chatglm2" and kernels.available(torch.device("cpu")):
        assert engine.runner.decode.fused is not None  # decode steps ran in the fused C++ op


def test_engine_refuses_what_a_causal_model_cannot_run():
    model = GLM.from_pretrained(FIXTURES / "chatglm2")
    engine = LLMEngine(model, None, SchedulerConfig(max_num_seqs=2, max_model_len=64), special_tokens=CHATGLM2_SPECIAL)
    with pytest.raises(ValueError, match="more than max_model_len=64"):
        engine.add_request(engine.make_request("long", [301, 303] + [7] * 40, max_new_tokens=40))
    with pytest.raises(ValueError, match="exceed the model's context of 64"):
        engine.add_request(engine.make_request("longer", [7] * 70, max_new_tokens=1))
    request = engine.make_request("edge", [7] * 60, max_new_tokens=40)  # [gMASK] sop + 60 ids: 2 tokens of room
    assert request.prompt_ids[:2] == [301, 303] and request.max_new == 3


# ---- over HTTP ----------------------------------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "你好，今天天气很好"}]


@pytest.fixture(scope="module", params=["chatglm3", "chatglm6b"])
def served(request, tmp_path_factory):
    """A live server over a ChatGLM hub folder. The ChatGLM3 model's output row of ``<|user|>`` is moved so that it
    wins the first step of the ``CHAT`` answer: the template's stop ids must end that answer at once."""
    root = tmp_path_factory.mktemp(request.param)
    folder = (chatglm3_folder if request.param == "chatglm3" else chatglm6b_folder)(root / "model")
    model, tok = load_model_and_tokenizer(folder)
    if request.param == "chatglm3":
        ids = torch.tensor([chat_prompt(tok, CHAT).ids])
        with torch.no_grad():
            h = model(ids, return_hidden=True)[0, -1]
            w = model.lm_head.weight
            w[tok.specials.roles["user"]] = w[int(model.lm_head(h).argmax())] + h / h.dot(h)  # one logit ahead
    server = LiveServer(make_state(model.eval(), tok))
    yield server, model, tok
    server.stop()


def post(server, route, body):
    return httpx.post(f"http://{server.url}{route}", json=body, timeout=60)


def reference(model, tok, ids, n):
    out = generate(model, ids, tokenizer=tok, max_new_tokens=n)
    return out.new_tokens[0], safe_decode(tok, out.new_tokens[0])


@pytest.mark.parametrize("text", ["你好，世界", "hello world, the quick brown"])
def test_completions_continue_the_family_prompt(served, text):
    server, model, tok = served
    r = post(server, "/v1/completions", {"prompt": text, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    ids = continuation_ids(tok, text, model_family(model))
    if model_family(model) == "chatglm2":
        assert ids[:2] == [tok.specials.gmask, tok.specials.sop]
    else:
        assert ids[-1] == tok.specials.gmask  # `text [gMASK]`: no [CLS]; <sop> is fed by the engine
    tokens, expected = reference(model, tok, ids, 8)
    body = r.json()
    assert body["choices"][0]["text"] == expected
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == len(tokens)
    beams = {"prompt": text, "max_tokens": 4, "use_beam_search": True, "best_of": 2, "temperature": 0}
    r = post(server, "/v1/completions", beams)  # a one-shot generate() job beside the engine
    beam_tokens = generate(model, ids, tokenizer=tok, num_beams=2, max_new_tokens=4).new_tokens[0]
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == safe_decode(tok, beam_tokens)
    # KServe v2 / Triton generate: the prompt, then the same answer (vLLM backend semantics)
    gen = {"text_input": text, "parameters": {"max_tokens": 8, "temperature": 0}}
    r = post(server, "/v2/models/llm/generate", gen)
    assert r.status_code == 200 and r.json()["text_output"] == text + expected


def test_chat_uses_the_family_template_and_stop_ids(served):
    server, model, tok = served
    question = [{"role": "user", "content": "晚上睡不着应该怎么办"}]
    for messages in (CHAT, question):
        r = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        prompt = chat_prompt(tok, messages)
        tokens, expected = reference(model, tok, prompt.ids, 8)
        choice, usage = r.json()["choices"][0], r.json()["usage"]
        assert usage["prompt_tokens"] == len(prompt.ids) and choice["message"]["content"] == expected
        assert usage["completion_tokens"] == len(tokens)
        if tok.family == "chatglm3" and messages is CHAT:
            assert tokens == [tok.specials.roles["user"]] and choice["finish_reason"] == "stop"
            assert choice["message"]["content"] == ""


def test_one_shot_models_score_in_the_family_layout(served):
    server, model, tok = served
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": ["你好"]}]}
    score = {**body, "inputs": [*body["inputs"], {**body["inputs"][0], "name": "continuation", "data": ["世界"]}]}
    r = post(server, "/v2/models/glm_score/infer", score)
    assert r.status_code == 200, r.text
    logprob = next(o for o in r.json()["outputs"] if o["name"] == "logprob")["data"][0]
    context, cont = continuation_ids(tok, "你好", model_family(model)), tok.encode("世界")
    # causal: the continuation follows the prompt; 6B: `<sop> continuation` at the [gMASK], the hub forward deriving
    # its 2D positions and mask from the ids
    causal = model_family(model) == "chatglm2"
    row = context + cont[:-1] if causal else context + [tok.specials.sop] + cont[:-1]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([row]))[0].float(), -1)
    first = len(context) - 1 if causal else len(context)
    assert logprob == pytest.approx(sum(float(logp[first + i, t]) for i, t in enumerate(cont)), abs=1e-4)
    r = post(server, "/v1/embeddings", {"input": "你好"})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == model.config.n_embd


def test_bad_input_is_a_4xx_and_the_server_keeps_serving(served):
    server, model, tok = served
    vocab = model.config.vocab_size
    r = post(server, "/v1/completions", {"prompt": [1, 2, vocab + 5], "max_tokens": 4})
    assert r.status_code == 400 and f"[0, {vocab})" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"prompt": "你好 " * 200, "max_tokens": 4})
    assert r.status_code == 400 and "exceed the limit" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 400 and "unsupported role 'wizard'" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"prompt": "你好", "max_tokens": -1})
    assert r.status_code == 400
    r = post(server, "/v1/infill", {"prompt": "你好[MASK]世界", "max_tokens": 4})
    if model_family(model) == "chatglm2":
        assert r.status_code == 400 and "causal" in r.json()["error"]["message"]
    else:  # ChatGLM-6B fills a [MASK]
        assert r.status_code == 200 and len(r.json()["spans"]) == 1
    assert post(server, "/v1/completions", {"prompt": "你好", "max_tokens": 2}).status_code == 200


def test_serve_command_on_a_chatglm_folder(tmp_path, monkeypatch):
    """``glmkit serve --model FOLDER`` reads the ChatGLM config (a slot holds its context: prompt and answer share
    it), and what it starts (bf16: the kernels' packed weights and the fused step) answers."""
    from glmkit.cli import main
    from glmkit.serve import server

    folder = chatglm3_folder(tmp_path / "model", seq_length=96)
    seen = {}
    monkeypatch.setattr(server, "serve", lambda model, host, port, options, dtype: seen.update(options=options))
    assert main(["serve", "--model", str(folder), "--max-num-seqs", "2", "--dtype", "bfloat16"]) == 0
    options = seen["options"]
    assert options.scheduler.max_model_len == 96
    live = LiveServer(server.load_state(str(folder), options, "bfloat16"))
    try:
        r = post(live, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        live.stop()
        live.state.engine.shutdown()
