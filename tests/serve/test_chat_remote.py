"""``glmkit chat --url`` against a real ``glmkit serve`` app (uvicorn in-process, tests/serve/conftest.py): the
streamed answers equal the server's non-streamed ones for the same conversation, /reset starts a new one, a history
the server finds too long loses its oldest turns with a notice, and Ctrl-C mid-answer returns to the prompt."""

import io

import httpx

from glmkit.chat import RemoteBackend, repl

NEW = 6


def answer(live_server, messages) -> str:
    body = {"messages": messages, "max_tokens": NEW, "temperature": 0.0}
    r = httpx.post(f"http://{live_server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def chat(backend, script: str) -> tuple[str, list[str]]:
    out = io.StringIO()
    assert repl(backend, io.StringIO(script), out) == 0
    text = out.getvalue()
    return text, [line.removeprefix(">>> ") for line in text.splitlines() if line.startswith(">>> ")]


def test_remote_chat_streams_the_servers_answers(live_server):
    backend = RemoteBackend(live_server.url, {"max_new_tokens": NEW})
    assert backend.name == live_server.state.config.served_model_name and backend.chat_tuned
    text, lines = chat(backend, "the king said\nwhat hath he done\n/reset\ngo and see\n")
    first = answer(live_server, [{"role": "user", "content": "the king said"}])
    history = [{"role": "user", "content": "the king said"}, {"role": "assistant", "content": first}]
    second = answer(live_server, [*history, {"role": "user", "content": "what hath he done"}])
    third = answer(live_server, [{"role": "user", "content": "go and see"}])
    assert first.strip() and lines[:2] == [first, second]
    assert lines[2] == "conversation cleared" and lines[3] == third


def test_a_history_too_long_for_the_server_loses_its_oldest_turns(live_server):
    long_line = " ".join(["the lord hath done in the land of egypt"] * 3)  # ~30 tokens; the server takes 96
    text, lines = chat(RemoteBackend(live_server.url, {"max_new_tokens": NEW}), f"{long_line}\n" * 5)
    assert "the conversation exceeds the server's context: left out the oldest" in text
    assert "error" not in text
    assert len([line for line in lines if line.strip()]) >= 5  # every question got an answer


class Interrupted(RemoteBackend):
    calls = 0

    def reply(self, messages):
        Interrupted.calls += 1
        for k, piece in enumerate(super().reply(messages)):
            if Interrupted.calls == 1 and k == 1:
                raise KeyboardInterrupt
            yield piece


def test_ctrl_c_cancels_a_remote_answer_and_the_session_goes_on(live_server):
    text, lines = chat(Interrupted(live_server.url, {"max_new_tokens": 24}), "the king said\ngo and see\n")
    assert "answer cancelled (left out of the history)" in text
    alone = [{"role": "user", "content": "go and see"}]
    body = {"messages": alone, "max_tokens": 24, "temperature": 0.0}
    expected = httpx.post(f"http://{live_server.url}/v1/chat/completions", json=body, timeout=60).json()
    assert lines[-2] == expected["choices"][0]["message"]["content"]  # asked without the cancelled exchange
