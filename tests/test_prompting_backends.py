"""The prompting backends are real and agree: the bundled model in process (glmkit's Scorer and generate), through
transformers' Auto classes, and behind a live ``glmkit serve`` (uvicorn in-process; /v1/completions and the KServe
``glm_score`` model) give the same log-likelihoods and greedy texts; any transformers causal LM (a random GPT-2)
scores batched rows as it scores each alone; a failing or slow endpoint is retried a bounded number of times and
then raises ``BackendError``; an endpoint without ``glm_score`` says it cannot score."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from glmkit.bundled import BUNDLED_MODEL
from glmkit.prompting.backends import CannotScore, GlmkitModel, OpenAIModel, PromptTooLong, TransformersModel
from glmkit.prompting.types import BackendError

REQUESTS = [
    ("And God said, Let there be", " light"),
    ("In the beginning God created the", " heaven and the earth"),
    ("Question: Who built the ark?\n(A) Noah (B) Moses\nAnswer: (", "A)"),
]
PROMPTS = ["And God said, Let there be", "In the beginning"]


@pytest.fixture(scope="module")
def bundled():
    from glmkit.bundled import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer()
    return GlmkitModel(model.eval(), tok)


@pytest.fixture(scope="module")
def served(bundled):
    from tests.serve.conftest import LiveServer, make_state

    server = LiveServer(make_state(bundled.model, bundled.tok))
    yield OpenAIModel(server.url, retries=0)
    server.stop()


def test_in_process_transformers_and_served_log_likelihoods_agree(bundled, served):
    local = bundled.loglikelihood(REQUESTS)
    hf = TransformersModel.load(BUNDLED_MODEL).loglikelihood(REQUESTS)
    remote = served.loglikelihood(REQUESTS)
    assert [n for _, n in local] == [n for _, n in hf] == [n for _, n in remote] == [1, 4, 2]
    for (a, _), (b, _), (c, _) in zip(local, hf, remote, strict=True):
        assert a < 0 and abs(a - b) < 1e-3 and abs(a - c) < 1e-3  # remote: float32 on the wire
    # batching never changes a row's score
    assert [bundled.loglikelihood([r])[0][0] for r in REQUESTS] == pytest.approx([lp for lp, _ in local], abs=1e-4)


def test_greedy_texts_agree_in_process_and_served_and_stop_strings_cut(bundled, served):
    local = bundled.generate(PROMPTS, max_tokens=10, stop=["."])
    remote = served.generate(PROMPTS, max_tokens=10, stop=["."])
    assert local == remote and all(len(t) == 1 and t[0] and "." not in t[0] for t in local)
    hf = TransformersModel.load(BUNDLED_MODEL).generate(PROMPTS[:1], max_tokens=10, stop=["."])
    assert hf == local[:1]
    assert bundled.generate(PROMPTS[:1], max_tokens=10, n=3) == [local[0] * 3]  # greedy: n copies


def test_sampling_is_seeded_and_n_is_split_over_the_servers_max_n(bundled, served):
    a = bundled.generate(PROMPTS[:1], max_tokens=8, temperature=1.0, n=4, seed=3)
    assert a == bundled.generate(PROMPTS[:1], max_tokens=8, temperature=1.0, n=4, seed=3)
    assert len(a[0]) == 4 and len(set(a[0])) > 1
    served.max_n = 2  # two requests of 2: seeds 3, 4 then 5, 6 (choice i uses seed + i), as one request of 4
    split = served.generate(PROMPTS[:1], max_tokens=8, temperature=1.0, n=4, seed=3)
    served.max_n = 8
    assert split == served.generate(PROMPTS[:1], max_tokens=8, temperature=1.0, n=4, seed=3)


def test_a_prompt_longer_than_the_context_is_named_or_cut_from_the_left(bundled):
    long = "and it came to pass " * 200
    with pytest.raises(PromptTooLong, match="request 1: .* do not fit"):
        bundled.loglikelihood([REQUESTS[0], (long, " light")])
    cut = GlmkitModel(bundled.model, bundled.tok, truncate="left")
    ((lp, n),) = cut.loglikelihood([(long, " light")])
    assert n == 1 and lp < 0
    assert cut.generate([long], max_tokens=4)[0][0]


def test_a_soft_prompt_loads_with_the_model(bundled, tmp_path):
    from glmkit.bundled import load_model_and_tokenizer
    from glmkit.finetune.peft import add_prefix, save_prefix

    prefixed = add_prefix(load_model_and_tokenizer()[0], 4)
    torch.nn.init.normal_(prefixed.prefix_encoder.embedding.weight, std=0.5)
    save_prefix(prefixed, tmp_path / "prefix")
    lm = GlmkitModel.load(prefix=tmp_path / "prefix")
    assert lm.name.endswith("+prefix") and type(lm.model).__name__ == type(prefixed).__name__
    ((with_prefix, n),) = lm.loglikelihood(REQUESTS[:1])
    assert n == 1 and abs(with_prefix - bundled.loglikelihood(REQUESTS[:1])[0][0]) > 1e-3


def test_any_causal_lm_scores_batched_rows_as_each_alone():
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_MODEL / "tokenizer.json"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    lm = TransformersModel(model, tok, batch_size=4)
    got = lm.loglikelihood(REQUESTS)
    for (context, continuation), (lp, n) in zip(REQUESTS, got, strict=True):
        ctx, cont = tok(context)["input_ids"], tok(continuation)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
        expected = sum(float(logits[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert n == len(cont) and lp == pytest.approx(expected, abs=1e-4)
    texts = lm.generate(PROMPTS, max_tokens=5)
    alone = [lm.generate([p], max_tokens=5)[0] for p in PROMPTS]
    assert texts == alone and all(len(t) == 1 for t in texts)
    with pytest.raises(PromptTooLong, match="prompt 0"):
        lm.generate(["word " * 100], max_tokens=5)


class Failing(BaseHTTPRequestHandler):
    """500 for every POST (or a slow answer when ``delay``); 404 for glm_score: an endpoint that is not glmkit."""

    hits = 0
    delay = 0.0
    status = 500

    def do_POST(self):
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("content-length", 0)))
        time.sleep(self.delay)
        self._send(self.status, {"error": {"message": "boom"}})

    def do_GET(self):
        self._send(404, {"error": "not found"})

    def _send(self, status, body):
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def failing():
    Failing.hits, Failing.delay, Failing.status = 0, 0.0, 500
    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_server_errors_are_retried_a_bounded_number_of_times(failing):
    lm = OpenAIModel(failing, retries=2, backoff=0.01)
    with pytest.raises(BackendError, match=r"HTTP 500.*after 3 attempts"):
        lm.generate(["hi"], max_tokens=4)
    assert Failing.hits == 3 and lm.attempts == 3


def test_timeouts_are_retried_then_fail(failing):
    Failing.delay = 1.0
    lm = OpenAIModel(failing, retries=1, backoff=0.01, timeout=0.2)
    with pytest.raises(BackendError, match=r"timed out.*after 2 attempts"):
        lm.generate(["hi"], max_tokens=4)
    assert lm.attempts == 2


def test_a_client_error_is_not_retried_and_a_non_glmkit_endpoint_cannot_score(failing):
    Failing.status = 400
    lm = OpenAIModel(failing, retries=3, backoff=0.01)
    with pytest.raises(BackendError, match="HTTP 400"):
        lm.generate(["hi"], max_tokens=4)
    assert Failing.hits == 1
    with pytest.raises(CannotScore, match="serves no 'glm_score' model"):
        lm.loglikelihood(REQUESTS)


def test_an_endpoint_nobody_listens_on_fails_after_its_retries():
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    lm = OpenAIModel(f"http://127.0.0.1:{port}", retries=1, backoff=0.01)
    with pytest.raises(BackendError, match="ConnectError.*after 2 attempts"):
        lm.generate(["hi"], max_tokens=4)
