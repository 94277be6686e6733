"""``/v1/chat/completions`` picks the prompt by the served tokenizer: a ChatGLM tokenizer gets its family's template
(glmkit/chatglm/chat.py) trimmed to the server's limits from the oldest turn, glmkit's own tokenizers the plain
``User:``/``Assistant:`` format. Here a small random GLM is served over a ChatGLM3-layout vocabulary, so what is
checked is the wiring (the prompt the server builds, its trimming and errors); ChatGLM models' own answers are
checked in test_chatglm_serve.py."""

import httpx
import pytest
import torch

from glmkit import GLM, GLMConfig
from glmkit.chatglm.chat import chat_prompt, served_chat_prompt
from glmkit.chatglm.tokenizers import load_chatglm_tokenizer
from glmkit.prompts import continuation_ids
from glmkit.serve.text import chat_prompt as plain_chat_prompt
from tests.helpers.chatglm_vocab import build_chatglm2_tokenizer
from tests.serve.conftest import LiveServer, make_state

TURN = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好👋！很高兴见到你。"}]
QUESTION = {"role": "user", "content": "晚上睡不着应该怎么办"}


@pytest.fixture(scope="module")
def chatglm_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chatglm3-vocab")
    build_chatglm2_tokenizer(folder, chatglm3=True)
    tok = load_chatglm_tokenizer(folder)
    config = GLMConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=tok.vocab_size, max_sequence_length=160,
                       special_tokens=tok.special)  # fmt: skip
    torch.manual_seed(0)
    server = LiveServer(make_state(GLM(config).eval(), tok))
    yield server, tok
    server.stop()


def post(server, messages, **body):
    body = {"messages": messages, "max_tokens": 4, "temperature": 0.0} | body
    return httpx.post(f"http://{server.url}/v1/chat/completions", json=body, timeout=60)


def test_a_chatglm_tokenizer_gets_its_template(chatglm_server):
    server, tok = chatglm_server
    messages = [{"role": "system", "content": "Answer briefly."}, *TURN, QUESTION]
    r = post(server, messages)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(chat_prompt(tok, messages).ids)
    body = {"messages": messages, "max_tokens": 4, "temperature": 0.0, "stream": True}
    with httpx.stream("POST", f"http://{server.url}/v1/chat/completions", json=body, timeout=60) as s:
        assert s.status_code == 200 and "data: [DONE]" in s.read().decode()


def test_a_long_chatglm_history_is_trimmed_not_refused(chatglm_server):
    server, tok = chatglm_server
    messages = [*TURN * 12, QUESTION]
    limits = server.state.config.limits
    assert len(chat_prompt(tok, messages).ids) > limits.max_prompt_tokens  # the server would refuse it whole
    r = post(server, messages, max_tokens=8)
    assert r.status_code == 200, r.text
    fitted = served_chat_prompt(tok, messages, limits.max_prompt_tokens, 160, 8)
    assert fitted.dropped_messages > 0
    assert r.json()["usage"]["prompt_tokens"] == len(fitted.ids) <= limits.max_prompt_tokens


def test_bad_chatglm_messages_are_400s(chatglm_server):
    server, _ = chatglm_server
    r = post(server, [{"role": "wizard", "content": "x"}])
    assert r.status_code == 400 and "messages[0]: unsupported role 'wizard'" in r.json()["error"]["message"]
    r = post(server, [{"role": "user", "content": [{"type": "text", "text": 5}]}])
    assert r.status_code == 400 and "text must be a string" in r.json()["error"]["message"]
    assert post(server, [QUESTION]).status_code == 200  # and it keeps serving


def test_glmkit_tokenizers_keep_the_plain_chat_format(live_server, model_and_tokenizer):
    _, tok = model_and_tokenizer
    messages = [{"role": "user", "content": "the king said"}]
    r = post(live_server, messages)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(continuation_ids(tok, plain_chat_prompt(messages)))
