"""Every entry point lays out the same text as the same ids (``glmkit.prompts``): ``glmkit generate``'s
``prompt_ids``, ``fill_blanks``, ``complete``, ``generate`` on token ids, the OpenAI completions / chat / infill /
embeddings routes, Triton's generate and glm_score, and the transformers wrapper's stop ids; for a vocabulary with
[gMASK] and for one with only [MASK] (where a text ending in [MASK] once got an eos from some and not others)."""

import dataclasses

import httpx
import pytest
import torch

from glmkit import GLM, GLMConfig
from glmkit.generate import blanks, complete, fill_blanks, generate
from glmkit.generate.cli import prompt_ids as cli_prompt_ids
from glmkit.hf_adapter import GLMForHFGeneration
from glmkit.prompts import continuation_ids, infilling_ids, layout, prompt_ids
from glmkit.serve.engine import LLMEngine
from glmkit.serve.request import Request
from glmkit.serve.sampling import SamplingParams
from glmkit.serve.scoring import Scorer, ScoreRow
from glmkit.serve.text import chat_prompt
from glmkit.tokenizer import WhitespaceTokenizer
from tests.serve.conftest import WORDS, LiveServer, make_state

BLANK_TEXTS = ["the [MASK] said unto [MASK] go", "the king said [MASK]", "go and see [sMASK]"]
PLAIN_TEXTS = ["the king said unto them", "go and [gMASK]"]


def vocabulary(task_masks: bool) -> tuple[GLM, WhitespaceTokenizer]:
    tok = WhitespaceTokenizer(WORDS)
    if not task_masks:  # glm-large's BERT vocabulary: [MASK] only
        tok.special = dataclasses.replace(tok.special, gmask=None, smask=None)
    torch.manual_seed(0)
    config = GLMConfig(
        n_layer=1, n_embd=16, n_head=2, vocab_size=64, max_sequence_length=64, special_tokens=tok.special
    )
    return GLM(config).eval(), tok


@pytest.fixture(scope="module", params=[True, False], ids=["task-masks", "mask-only"])
def served(request):
    model, tok = vocabulary(request.param)
    server = LiveServer(make_state(model, tok))
    with httpx.Client(base_url=f"http://{server.url}", timeout=60) as http:
        yield model, tok, http
    server.stop()


@pytest.fixture
def seen(monkeypatch):
    """Ids that reach the model: engine requests (after their layout) and scoring rows."""
    got: list[list[int]] = []
    make = LLMEngine.make_request

    def make_request(self, request_id, prompt_ids, *a, **kw):
        req = make(self, request_id, prompt_ids, *a, **kw)
        got.append(req.prompt_ids)
        return req

    call = Scorer.__call__

    def score(self, requests):
        got.extend(row.context for req in requests for row in req)
        return call(self, requests)

    monkeypatch.setattr(LLMEngine, "make_request", make_request)
    monkeypatch.setattr(Scorer, "__call__", score)
    return got


def library_ids(model, tok, monkeypatch, fn, text) -> list[int]:
    """The ids ``fill_blanks`` / ``complete`` hand to ``fill_blank_ids``."""
    got = []
    real = blanks.fill_blank_ids
    monkeypatch.setattr(blanks, "fill_blank_ids", lambda m, ids, **kw: got.append(list(ids)) or real(m, ids, **kw))
    fn(model, tok, text, max_new_tokens=1)
    monkeypatch.setattr(blanks, "fill_blank_ids", real)
    return got[0]


def test_every_entry_point_lays_out_a_text_the_same(served, seen, monkeypatch):
    model, tok, http = served
    s = tok.special
    one = {"max_tokens": 1, "temperature": 0}
    blank_texts = [t for t in BLANK_TEXTS if s.smask is not None or "[sMASK]" not in t]
    for text in blank_texts:
        want = infilling_ids(tok, text)
        assert want[-1] == (s.eos if text.endswith("go") else tok.encode(text)[-1])  # eos unless a blank ends it
        assert cli_prompt_ids(tok, text, model.config.n_positions) == (prompt_ids(tok, text), 0)
        assert prompt_ids(tok, text) == library_ids(model, tok, monkeypatch, fill_blanks, text) == want
        seen.clear()
        r = http.post("/v1/infill", json={"prompt": text, **one})
        assert r.status_code == 200 and seen == [want] and r.json()["usage"]["prompt_tokens"] == len(want)
    for text in PLAIN_TEXTS + blank_texts:
        want = continuation_ids(tok, text)
        assert library_ids(model, tok, monkeypatch, complete, text) == want
        if text in PLAIN_TEXTS:
            assert cli_prompt_ids(tok, text, model.config.n_positions)[0] == want
        seen.clear()
        assert http.post("/v1/completions", json={"prompt": text, **one}).status_code == 200
        assert http.post("/v1/embeddings", json={"input": text}).status_code == 200
        triton = {"text_input": text, "parameters": {"max_tokens": 1}}
        assert http.post("/v2/models/llm/generate", json=triton).status_code == 200
        inputs = [
            {"name": n, "datatype": "BYTES", "shape": [1, 1], "data": [d]}
            for n, d in (("text_input", text), ("continuation", "go"))
        ]
        assert http.post("/v2/models/glm_score/infer", json={"inputs": inputs}).status_code == 200
        assert seen == [want] * 4, text
    messages = [{"role": "user", "content": "go and see"}]
    seen.clear()
    assert http.post("/v1/chat/completions", json={"messages": messages, **one}).status_code == 200
    assert seen == [continuation_ids(tok, chat_prompt(messages))]


def test_token_id_prompts_and_stop_ids_agree(served, seen):
    model, tok, http = served
    s, glm = tok.special, layout(tok.special)
    ids = [s.cls, *tok.encode("the king said")]
    want = glm.model_input(ids)
    assert want == [*ids, glm.generation_blank]
    out = generate(model, ids, max_new_tokens=1)
    assert out.sequences[0, : out.prompt_length].tolist() == [*want, s.sop]
    seen.clear()
    assert http.post("/v1/completions", json={"prompt": ids, "max_tokens": 1}).status_code == 200
    assert seen == [want]
    request = Request("r", ids, SamplingParams().generation_config(s), special=s, max_sequence_length=64)
    scorer = Scorer(model, s)
    assert request.prompt_ids == scorer.check(ScoreRow("logits", ids)).context == want
    stops = [s.eop, s.eos]
    assert glm.stop_ids() == stops == request.eos_ids
    assert GLMForHFGeneration.from_glm(model, s).generation_config.eos_token_id == stops
