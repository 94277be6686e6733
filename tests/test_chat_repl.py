"""``glmkit chat`` driven with scripted input on the bundled model (not chat-tuned: it continues the text typed so
far): the streamed answers are the engine's greedy continuations of exactly that text, /reset and /system do what
they say, and Ctrl-C during an answer returns to the prompt with the answer left out of the history."""

import io

import pytest

from glmkit.bundled import load_model_and_tokenizer
from glmkit.chat import LocalBackend, repl
from glmkit.cli import main
from glmkit.generate import generate
from glmkit.prompts import continuation_ids
from glmkit.serve.text import safe_decode

NEW = 4


@pytest.fixture(scope="module")
def bundled():
    model, tok = load_model_and_tokenizer(None)
    return model.eval(), tok


def continuation(model, tok, text: str) -> str:
    out = generate(model, continuation_ids(tok, text), max_new_tokens=NEW, tokenizer=tok)
    stops = {tok.special.eop, tok.special.eos}
    return safe_decode(tok, [t for t in out.new_tokens[0] if t not in stops])


def chat(backend, script: str, **kw) -> str:
    out = io.StringIO()
    assert repl(backend, io.StringIO(script), out, **kw) == 0
    return out.getvalue()


def test_bundled_model_continues_the_text_typed_so_far(bundled):
    model, tok = bundled
    backend = LocalBackend(model, tok, {"max_new_tokens": NEW}, name="glmkit-small")
    text = chat(backend, "The king said\nunto them\n/reset\nthe lord\n/quit\n")
    assert "glmkit-small is not chat-tuned: it continues the text" in text
    first = continuation(model, tok, "The king said")
    second = continuation(model, tok, "The king said" + first + "\nunto them")
    third = continuation(model, tok, "the lord")  # after /reset nothing earlier is in the prompt
    assert first and second and third
    answers = [line.removeprefix(">>> ") for line in text.splitlines() if line.startswith(">>> ")]
    assert answers[:2] == [first, second]
    assert "conversation cleared" in text
    assert answers[3] == third  # answers[2] is the /reset line


def test_system_and_unknown_commands(bundled):
    model, tok = bundled
    text = chat(LocalBackend(model, tok, {"max_new_tokens": NEW}), "/system be brief\n/system\n/frobnicate\n\n")
    assert "system message set (ignored: not chat-tuned)" in text and "system message cleared" in text
    assert "unknown command /frobnicate" in text
    assert text.rstrip().endswith(">>>")  # end of input leaves the session


class Interrupted(LocalBackend):
    """Ctrl-C arrives while the first answer streams (after its first piece)."""

    calls = 0

    def reply(self, messages):
        Interrupted.calls += 1
        for k, piece in enumerate(super().reply(messages)):
            if Interrupted.calls == 1 and k == 1:
                raise KeyboardInterrupt
            yield piece


def test_ctrl_c_cancels_the_answer_not_the_session(bundled):
    model, tok = bundled
    backend = Interrupted(model, tok, {"max_new_tokens": 8})
    text = chat(backend, "The king said\nunto them\n")
    assert "answer cancelled (left out of the history)" in text
    last = [line for line in text.splitlines() if line.startswith(">>> ")][-2]
    expected = generate(model, continuation_ids(tok, "unto them"), max_new_tokens=8, tokenizer=tok).new_tokens[0]
    stops = {tok.special.eop, tok.special.eos}
    # the cancelled exchange is not part of the second prompt: "unto them" is continued on its own
    assert last.removeprefix(">>> ") == safe_decode(tok, [t for t in expected if t not in stops])


def test_too_long_text_is_trimmed_from_the_left_with_a_notice(bundled):
    model, tok = bundled
    context = model.config.n_positions
    backend = LocalBackend(model, tok, {"max_new_tokens": NEW})
    text = chat(backend, " ".join(["the king said unto them"] * (context // 2)) + "\n")
    assert f"the text exceeds the context of {context - NEW} tokens: left out its first" in text
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        LocalBackend(model, tok, {"max_new_tokens": context})


def test_command_line_errors_are_one_line(capsys):
    assert main(["chat", "--url", "127.0.0.1:1", "--model", "x"]) == 2
    assert "glmkit chat: error: --url: give --url or --model, not both" in capsys.readouterr().err
    assert main(["chat", "--num-beams", "2"]) == 2
    assert "a chat streams one answer" in capsys.readouterr().err
    assert main(["chat", "--url", "127.0.0.1:1"]) == 2
    assert "no glmkit serve answers at http://127.0.0.1:1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def chatglm3_folder(tmp_path_factory):
    """A tiny random ChatGLM2-architecture model with a ChatGLM3 tokenizer, saved in the hub layout."""
    import torch

    from glmkit.chatglm import ChatGLM2, ChatGLM2Config
    from glmkit.chatglm.tokenizers import load_chatglm_tokenizer
    from tests.helpers.chatglm_vocab import build_chatglm2_tokenizer

    folder = tmp_path_factory.mktemp("chatglm3")
    build_chatglm2_tokenizer(folder, chatglm3=True)
    tok = load_chatglm_tokenizer(folder)
    config = ChatGLM2Config(vocab_size=tok.vocab_size + 3, seq_length=96, eos_token_id=list(tok.specials.stops))
    torch.manual_seed(0)
    model = ChatGLM2(config)
    model.reset_parameters()
    model.eval().save_pretrained(folder)
    return folder


def test_a_chatglm_checkpoint_is_chatted_with_its_template(chatglm3_folder):
    import argparse

    from glmkit.chat import configure, load_backend
    from glmkit.chatglm.chat import chat_prompt

    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--model", str(chatglm3_folder), "--max-new-tokens", "16"])
    backend = load_backend(args)
    assert backend.chat_tuned and backend.tok.family == "chatglm3" and backend.context == 96
    messages = [{"role": "system", "content": "Answer briefly."}]
    for k in range(6):
        messages += [
            {"role": "user", "content": f"第{k}个问题：晚上睡不着应该怎么办"},
            {"role": "assistant", "content": "听音乐。"},
        ]
    messages.append({"role": "user", "content": "你好"})
    ids, stops = backend._prompt(messages)
    assert ids == chat_prompt(backend.tok, messages, max_length=96 - 16).ids and len(ids) <= 80
    assert stops == set(backend.tok.specials.stops)
    assert "left out the oldest" in backend.notice
    assert ids[-1] == backend.tok.specials.roles["assistant"]


def test_chat_with_a_chatglm_model_streams_its_templated_answers(chatglm3_folder):
    from glmkit.chatglm.chat import chat_prompt
    from glmkit.chatglm.hub import load_pretrained
    from glmkit.chatglm.tokenizers import load_chatglm_tokenizer

    model, tok = load_pretrained(chatglm3_folder), load_chatglm_tokenizer(chatglm3_folder)
    stops = list(tok.specials.stops)
    backend = LocalBackend(model, tok, {"max_new_tokens": 12}, name="tiny-chatglm3")
    text = chat(backend, "/system Answer briefly.\n你好\nhello world\n", system=None)
    assert "not chat-tuned" not in text and "system message set" in text

    def answer(messages):
        ids = chat_prompt(tok, messages).ids
        out = generate(model, ids, max_new_tokens=12, tokenizer=tok, eos_token_id=stops).new_tokens[0]
        return safe_decode(tok, [t for t in out if t not in stops])

    system = {"role": "system", "content": "Answer briefly."}
    first = answer([system, {"role": "user", "content": "你好"}])
    history = [system, {"role": "user", "content": "你好"}, {"role": "assistant", "content": first}]
    second = answer([*history, {"role": "user", "content": "hello world"}])
    lines = [line.removeprefix(">>> ") for line in text.splitlines() if line.startswith(">>> ")]
    assert first and lines[1:3] == [first, second]  # lines[0] is the /system notice
