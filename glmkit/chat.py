"""``glmkit chat``: a terminal chat with a model, streamed token by token.

A ChatGLM-family checkpoint is prompted with its own chat template (glmkit/chatglm/chat.py); the history is trimmed
to the model's context from the oldest turn, with a notice. A model that is not chat-tuned (glmkit's own GLMs, the
bundled one included) is told so and continues the text typed so far instead. ``--url`` chats with a running
``glmkit serve`` over its OpenAI ``/v1/chat/completions`` stream; the server applies the template there.

In the session: ``/reset`` forgets the conversation, ``/system TEXT`` sets the system message (``/system`` alone
clears it), ``/quit`` or Ctrl-D leaves. Ctrl-C during an answer cancels that answer only: it is left out of the
history, and the prompt comes back.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from rich.console import Console
from rich.markup import escape

from .generate.cli import DTYPES, add_generation_flags, add_prefix_flag, generation_kwargs, with_prefix

HELP = "/reset forgets the conversation · /system TEXT sets the system message · /quit leaves · Ctrl-C stops an answer"


class ChatBackend(Protocol):
    """Where answers come from: ``reply`` yields the answer's text in pieces; ``notice`` says what the last
    ``reply`` left out of the prompt (``None``: nothing)."""

    name: str
    chat_tuned: bool
    notice: str | None

    def reply(self, messages: list[dict[str, str]]) -> Iterator[str]: ...


def _stream_text(tok: Any, ids: Iterator[int], skip: set[int]) -> Iterator[str]:
    """Text pieces of a stream of generated ids (stop ids left out), decoded as the server decodes its streams."""
    from .serve.text import IncrementalText

    text = IncrementalText(tok)
    for t in ids:
        if t in skip:
            continue
        piece = text.push([t])
        if piece:
            yield piece
    tail = text.push([], final=True)
    if tail:
        yield tail


@dataclass
class LocalBackend:
    """A model and tokenizer on this machine; ChatGLM tokenizers mean a chat-tuned model."""

    model: Any
    tok: Any
    generation: dict[str, Any] = field(default_factory=dict)
    name: str = "model"
    notice: str | None = None

    def __post_init__(self) -> None:
        from .chatglm.chat import is_chat_tokenizer

        self.chat_tuned = is_chat_tokenizer(self.tok)
        self.context = int(self.model.config.n_positions)
        self.max_new_tokens = int(self.generation.get("max_new_tokens") or min(512, self.context // 2))
        if self.max_new_tokens >= self.context - 8:
            raise ValueError(
                f"--max-new-tokens: {self.max_new_tokens} leaves no room for a prompt in the model's context of "
                f"{self.context} tokens"
            )
        self.generation = {**self.generation, "max_new_tokens": self.max_new_tokens}

    def _prompt(self, messages: list[dict[str, str]]) -> tuple[list[int], set[int]]:
        budget = self.context - self.max_new_tokens
        if self.chat_tuned:
            from .chatglm.chat import chat_prompt

            prompt = chat_prompt(self.tok, messages, max_length=budget)
            self.notice = prompt.notice
            return prompt.ids, set(prompt.stop_ids)
        from .prompts import layout

        prompts = layout(self.tok.special)
        body = self.tok.encode(continued_text(messages))
        ids = prompts.continuation(body)
        cut = len(ids) - budget
        self.notice = None
        if cut > 0:
            ids = prompts.continuation(body[cut:])
            self.notice = f"the text exceeds the context of {budget} tokens: left out its first {cut} tokens"
        return ids, set(prompts.stop_ids())

    def reply(self, messages: list[dict[str, str]]) -> Iterator[str]:
        from .generate import stream

        ids, stops = self._prompt(messages)
        kwargs = dict(self.generation)
        if self.chat_tuned:
            kwargs["eos_token_id"] = sorted(stops)
        return _stream_text(self.tok, stream(self.model, ids, tokenizer=self.tok, **kwargs), stops)


def continued_text(messages: list[dict[str, str]]) -> str:
    """The document a model that is not chat-tuned continues: what was typed and answered, in order."""
    return "".join(m["content"] for m in messages if m["role"] != "system")


class PromptTooLong(Exception):
    """The server refused the prompt for its length (a 400 naming ``prompt:`` and its limit)."""


@dataclass
class RemoteBackend:
    """A running ``glmkit serve``: its OpenAI chat completions, streamed (server-sent events)."""

    url: str
    generation: dict[str, Any] = field(default_factory=dict)
    chat_tuned: bool = True
    notice: str | None = None
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        try:
            import httpx
        except ImportError as e:  # the serve extra brings it
            raise ValueError("--url: chatting with a server needs httpx (pip install 'glmkit[serve]')") from e
        self.base = self.url if "://" in self.url else f"http://{self.url}"
        self.base = self.base.rstrip("/").removesuffix("/v1")
        self.client = httpx.Client(timeout=self.timeout_s)
        try:
            models = self.client.get(f"{self.base}/v1/models").json()["data"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--url: no glmkit serve answers at {self.base} ({e})") from e
        self.name = str(models[0]["id"]) if models else "server"
        g = self.generation
        self.body: dict[str, Any] = {"model": self.name, "stream": True}
        self.body |= {
            k: g[k] for k in ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty") if k in g
        }
        if "max_new_tokens" in g:
            self.body["max_tokens"] = g["max_new_tokens"]
        if "stop_strings" in g:
            self.body["stop"] = g["stop_strings"]
        if not g.get("do_sample"):
            self.body["temperature"] = 0.0  # greedy, as a local model decodes without --do-sample

    def _events(self, messages: list[dict[str, str]]) -> Iterator[str]:
        import httpx

        try:
            yield from self._stream(messages)
        except httpx.HTTPError as e:
            raise ValueError(f"the server at {self.base} failed: {e}") from e

    def _stream(self, messages: list[dict[str, str]]) -> Iterator[str]:
        with self.client.stream(
            "POST", f"{self.base}/v1/chat/completions", json=self.body | {"messages": messages}
        ) as r:
            if r.status_code != 200:
                r.read()
                try:
                    message = str(r.json()["error"]["message"])
                except (ValueError, KeyError, TypeError):
                    message = r.text[:200]
                if r.status_code == 400 and message.startswith("prompt:"):
                    raise PromptTooLong(message)
                raise ValueError(f"the server answered {r.status_code}: {message}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise ValueError(f"the server stopped the answer: {chunk['error'].get('message')}")
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece

    def reply(self, messages: list[dict[str, str]]) -> Iterator[str]:
        """Stream the answer; a prompt the server finds too long loses its oldest turns until it fits."""
        system = [m for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"]
        dropped = 0
        self.notice = None
        while True:
            events = self._events(system + rest)
            try:
                first = next(events, None)
            except PromptTooLong:
                if sum(m["role"] == "user" for m in rest) <= 1:
                    raise
                cut = next(i for i, m in enumerate(rest) if i > 0 and m["role"] == "user")
                rest, dropped = rest[cut:], dropped + cut
                self.notice = f"the conversation exceeds the server's context: left out the oldest {dropped} message(s)"
                continue
            break
        if first is not None:
            yield first
        yield from events


def _read(stdin: TextIO, out: TextIO, prompt: str) -> str | None:
    if stdin is sys.stdin and stdin.isatty():
        try:
            return input(prompt)
        except EOFError:
            return None
    out.write(prompt)
    out.flush()
    line = stdin.readline()
    return None if line == "" else line.rstrip("\n")


def repl(backend: ChatBackend, stdin: TextIO, out: TextIO, system: str | None = None) -> int:
    """Run the chat until end of input or ``/quit``; returns 0. See the module doc for the commands."""
    console = Console(file=out, highlight=False, soft_wrap=True)

    def note(text: str) -> None:
        console.print(f"[dim]{escape(text)}[/dim]")

    history: list[dict[str, str]] = []
    note(f"chatting with {backend.name}; {HELP}")
    if not backend.chat_tuned:
        note(f"{backend.name} is not chat-tuned: it continues the text typed so far (no chat template, no system role)")
    while True:
        try:
            line = _read(stdin, out, ">>> ")
        except KeyboardInterrupt:
            out.write("\n")
            note("(Ctrl-D or /quit leaves)")
            continue
        if line is None or line.strip() in ("/quit", "/exit"):
            out.write("\n" if line is None else "")
            return 0
        command, _, arg = line.strip().partition(" ")
        if command == "/reset":
            history = []
            note("conversation cleared")
            continue
        if command == "/system":
            system = arg.strip() or None
            note(
                f"system message {'set' if system else 'cleared'}"
                + ("" if backend.chat_tuned else " (ignored: not chat-tuned)")
            )
            continue
        if command in ("/help", "/?"):
            note(HELP)
            continue
        if command.startswith("/") and command[1:].isalpha():
            note(f"unknown command {command}; {HELP}")
            continue
        if not line.strip():
            continue
        user = {"role": "user", "content": line if backend.chat_tuned else ("\n" if history else "") + line}
        messages = ([{"role": "system", "content": system}] if system else []) + history + [user]
        answer: list[str] = []
        pieces: Iterator[str] = iter(())
        try:
            pieces = backend.reply(messages)
            for piece in pieces:
                if not answer and backend.notice:
                    note(backend.notice)
                answer.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            getattr(pieces, "close", lambda: None)()  # stops the generation (a server sees the stream closed)
            out.write("\n")
            note("answer cancelled (left out of the history)")
            continue
        except ValueError as e:
            out.write("\n")
            console.print(f"[red]error:[/red] {escape(str(e))}")
            continue
        out.write("\n")
        if not answer and backend.notice:
            note(backend.notice)
        history += [user, {"role": "assistant", "content": "".join(answer)}]


def load_backend(args: argparse.Namespace) -> ChatBackend:
    """The backend the command line asks for: ``--url``, or ``--model`` (default: the bundled model)."""
    kwargs = generation_kwargs(args)
    for name in ("num_beams", "num_return_sequences"):
        if kwargs.get(name, 1) > 1:
            raise ValueError(f"--{name.replace('_', '-')}: a chat streams one answer; use 1")
    if args.url is not None:
        if args.model is not None:
            raise ValueError("--url: give --url or --model, not both")
        if args.prefix is not None:
            raise ValueError("--prefix: a served model's prefix is the server's (glmkit serve --prefix DIR)")
        return RemoteBackend(args.url, kwargs)
    from .bundled import model_path

    folder = model_path(args.model)
    config = folder / "config.json"
    if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("model_type") == "chatglm":
        from .chatglm.hub import load_pretrained
        from .chatglm.tokenizers import load_chatglm_tokenizer

        model, tok = load_pretrained(folder, dtype=DTYPES[args.dtype]), load_chatglm_tokenizer(folder)
    else:
        from .bundled import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(folder, dtype=DTYPES[args.dtype])
    from .generate.fast import optimize_for_decode

    model = with_prefix(model, args.prefix)
    optimize_for_decode(model)
    return LocalBackend(model.eval(), tok, kwargs, name=Path(folder).name)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint folder with its tokenizer (default: bundled)")
    parser.add_argument("--url", default=None, help="chat with a running glmkit serve, e.g. http://127.0.0.1:8000")
    parser.add_argument("--system", default=None, metavar="TEXT", help="the system message to start with")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    add_prefix_flag(parser)
    add_generation_flags(parser)


def run(args: argparse.Namespace) -> int:
    backend = load_backend(args)
    if sys.stdin.isatty():
        try:  # gives input() line editing and a history of what was typed
            import readline  # noqa: F401
        except ImportError:  # not on every platform
            pass
    return repl(backend, sys.stdin, sys.stdout, system=args.system)
