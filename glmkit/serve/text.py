"""Text at the server's edge: the chat format, and streamed text that always equals the final text.

GLM generates by filling a blank, so every text API maps onto blank filling, laid out by ``glmkit.prompts``: a
completion prompt is ``continuation_ids`` (``[CLS] text [gMASK]``) and the completion is the span of that last
blank (``glmkit.generate.complete``; blanks written in the prompt are filled first and serve as context);
infilling is ``infilling_ids`` with every blank filled (``fill_blanks``). The chat format below is a plain-text
convention, since GLM was not chat-tuned.

Streaming decodes the whole span each time and sends only what can no longer change: a trailing incomplete UTF-8
sequence (U+FFFD) and any tail that could still become a stop string are held back, so the concatenated deltas
equal the non-streamed text exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..tokenizer import TokenizerLike

USER, ASSISTANT, SYSTEM = "User:", "Assistant:", "System:"
CHAT_STOP = "\n" + USER


def chat_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """The glmkit chat format (docs/serving.md): ``System: ...`` then ``User: ...`` / ``Assistant: ...`` lines,
    ending with ``Assistant:`` for the reply. Content may be a string or a list of ``{"type": "text"}`` parts."""
    lines = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ValueError("messages: content must be a string or a list of text parts")
        prefix = {"system": SYSTEM, "developer": SYSTEM, "user": USER, "assistant": ASSISTANT}.get(str(role))
        if prefix is None:
            raise ValueError(f"messages: unsupported role {role!r} (system, user, assistant)")
        lines.append(f"{prefix} {content.strip()}")
    if not lines:
        raise ValueError("messages: at least one message is required")
    return "\n".join(lines) + "\n" + ASSISTANT


def safe_decode(tok: TokenizerLike, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Decode, dropping ids the vocabulary does not assign (padded embedding rows a model may still emit)."""
    try:
        return tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
    except ValueError:
        if hasattr(tok, "assigned"):
            return tok.decode(tok.assigned(ids), skip_special_tokens=skip_special_tokens)
        kept = []
        for i in ids:
            try:
                tok.decode([i], skip_special_tokens=False)
                kept.append(i)
            except ValueError:
                continue
        return tok.decode(kept, skip_special_tokens=skip_special_tokens)


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string starts in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


class IncrementalText:
    """Text deltas of a growing token list, cut at the first stop string (kept if ``include_stop``).

    New tokens are decoded in a window that starts a few tokens back (``prefix``): decoding the whole list on every
    token costs O(n) per token, O(n^2) per answer. The window's text minus that of its first part (the context a
    tokenizer needs to place spaces) is what the new tokens add; tokens that end inside a UTF-8 character wait.
    A tokenizer drops leading spaces at the start of a run of pieces (the text's start; with SentencePiece also
    after a special token, ``run_breaks``): the window stays at its run's start until the run shows text, and past
    it a fixed piece leads the window."""

    def __init__(self, tok: TokenizerLike, stops: Sequence[str] = (), include_stop: bool = False) -> None:
        self.tok, self.stops, self.include_stop = tok, [s for s in stops if s], include_stop
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is the window's context, ids[read:] not yet decoded
        self.run, self.run_shown = 0, False  # where the run of pieces the window is in starts; whether it has text
        self.decoded = ""  # the text of ids[:read]
        self.anchor = tok.encode("a")[-1:]  # a piece without a leading space marker
        self.breaks = getattr(tok, "run_breaks", frozenset())
        self.sent = 0
        self.stopped = False
        self.text = ""

    def _decode_new(self, final: bool) -> str:
        """The text of ``ids[:read]`` plus what the tokens after ``read`` add (pending ones too when ``final``)."""
        if self.read == len(self.ids):
            return self.decoded
        lead = self.anchor if self.prefix > self.run else []
        before = safe_decode(self.tok, lead + self.ids[self.prefix : self.read])
        window = safe_decode(self.tok, lead + self.ids[self.prefix :])
        if not window.startswith(before):  # a tokenizer that rewrites its context: decode everything once
            before, window = self.decoded, safe_decode(self.tok, self.ids)
        added = window[len(before) :]
        if added.endswith("\ufffd") and not final:
            return self.decoded + added.rstrip("\ufffd")
        self.decoded += added
        new = range(self.read, len(self.ids))
        last_break = max((j for j in new if self.ids[j] in self.breaks), default=None)
        if last_break is not None:
            self.run, self.run_shown, self.prefix = last_break + 1, False, last_break + 1
        elif self.run_shown or added:
            self.run_shown, self.prefix = True, self.read
        self.read = len(self.ids)
        return self.decoded

    def _visible(self, final: bool) -> str:
        full = self._decode_new(final)
        cut = find_stop(full, self.stops)
        if cut >= 0:
            self.stopped = True
            end = cut
            if self.include_stop:
                end += next(len(s) for s in self.stops if full.startswith(s, cut))
            return full[:end]
        if final:
            return full
        hold = 0
        for s in self.stops:  # a tail that may grow into a stop string
            for k in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return full[: len(full) - hold]

    def push(self, ids: Sequence[int], final: bool = False) -> str:
        """Add tokens; return the text that became certain."""
        if not self.stopped:
            self.ids.extend(ids)
            self.text = self._visible(final)
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta
