"""The ChatGLM family's chat templates, as token ids, from OpenAI-style messages.

* ChatGLM-6B (THUDM/chatglm-6b ``chat``): ``[Round {i}]\\n问：{query}\\n答：{response}\\n`` per past turn, rounds
  from 0, then ``[Round {n}]\\n问：{query}\\n答：``; a first question alone is sent as it is. The text is encoded with
  the 6B preprocessing (``\\n`` -> ``<n>``) and ends ``[gMASK] <sop>``.
* ChatGLM2-6B (``build_prompt``): ``[Round {i}]\\n\\n问：{query}\\n\\n答：{response}\\n\\n``, rounds from 1, after the
  ``[gMASK] sop`` prefix.
* ChatGLM3-6B and GLM-4 (``build_chat_input`` / ``apply_chat_template``): ``[gMASK] <sop>``, then per message its
  role token, the encoded ``"\\n"`` and the encoded content; ``<|assistant|>`` asks for the reply. A reply ends at
  eos, ``<|user|>`` or ``<|observation|>`` (``stop_ids``).

The two round-based templates have no system role: a system message is left out, as chatglm.cpp does, and
``ChatPrompt.notice`` says so. Message content is always encoded as text, so it cannot forge a role token.

A conversation longer than ``max_length`` loses its oldest turns first (a turn = a user message and what answers
it; leading system messages stay), then, if the last question alone is still too long, its oldest tokens (after the
``[gMASK] sop`` prefix, as chatglm.cpp truncates); ``ChatPrompt.notice`` says what was left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .tokenizers import FAMILIES, ChatGLMTokenizerLike

ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "observation": "observation", "tool": "observation", "function": "observation"}  # fmt: skip
ROUND_FAMILIES = ("chatglm6b", "chatglm2")
MIN_PROMPT = 8  # below this not even the template's own tokens and a short question fit


@dataclass
class ChatPrompt:
    """A chat rendered for generation: ``ids`` (at most ``max_length``), the ``stop_ids`` that end the reply, and
    what trimming left out (``dropped_messages`` oldest messages, then ``cut_tokens``) with a ``notice`` for people."""

    ids: list[int]
    stop_ids: tuple[int, ...]
    dropped_messages: int = 0
    cut_tokens: int = 0
    notice: str | None = None


def message_text(message: Any, index: int) -> tuple[str, str]:
    """``(role, content)`` of one OpenAI-style message; content may be a string, null or a list of text parts."""
    if not isinstance(message, dict):
        raise ValueError(f"messages[{index}]: expected an object with role and content")
    role = ROLE_ALIASES.get(message.get("role")) if isinstance(message.get("role"), str) else None
    if role is None:
        raise ValueError(f"messages[{index}]: unsupported role {message.get('role')!r} (system, user, assistant, tool)")
    content = message.get("content")
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if any(not isinstance(p.get("text"), str) for p in parts):
            raise ValueError(f"messages[{index}]: a text part's text must be a string")
        content = "".join(p["text"] for p in parts)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise ValueError(f"messages[{index}]: content must be a string or a list of text parts")
    return role, content


def _rounds(family: str, turns: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    """The round-based prompt text of ChatGLM-6B / ChatGLM2 (user and assistant messages only, alternating)."""
    pairs: list[tuple[str, str | None]] = []
    for i, (role, content) in enumerate(turns):
        expected = "user" if not pairs or pairs[-1][1] is not None else "assistant"
        if role != expected:
            raise ValueError(f"messages: the {family} template alternates user and assistant; message {i + 1} of "
                             f"the conversation is {role}, expected {expected}")  # fmt: skip
        if role == "user":
            pairs.append((content, None))
        else:
            pairs[-1] = (pairs[-1][0], content)
    if not pairs:
        raise ValueError("messages: no user message")
    if add_generation_prompt and pairs[-1][1] is not None:
        raise ValueError(f"messages: the {family} template answers a user message; the last message is the assistant's")
    if family == "chatglm6b":
        if len(pairs) == 1 and pairs[0][1] is None:
            return pairs[0][0]  # the hub's chat() sends a first question with no round markup
        return "".join(
            f"[Round {i}]\n问：{q}\n答：" + ("" if a is None else f"{a}\n") for i, (q, a) in enumerate(pairs)
        )
    return "".join(
        f"[Round {i}]\n\n问：{q}\n\n答：" + ("" if a is None else f"{a}\n\n") for i, (q, a) in enumerate(pairs, 1)
    )


def render(
    tok: ChatGLMTokenizerLike, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True
) -> list[int]:
    """The token ids of normalized ``(role, content)`` messages in ``tok``'s family template (no trimming)."""
    s = tok.specials
    if tok.family in ROUND_FAMILIES:
        turns = [m for m in messages if m[0] != "system"]
        if any(role == "observation" for role, _ in turns):
            raise ValueError(f"messages: the {tok.family} template has no tool / observation role")
        return tok.build_inputs(tok.encode(_rounds(tok.family, turns, add_generation_prompt), allow_special=False))
    newline = tok.encode("\n")
    ids = [s.gmask, s.sop]
    for role, content in messages:
        ids += [s.roles[role], *newline, *tok.encode(content)]
    return ids + [s.roles["assistant"]] if add_generation_prompt else ids


def _turns(messages: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[list[tuple[str, str]]]]:
    """Leading system messages, and the rest grouped in turns that each start at a user message."""
    k = 0
    while k < len(messages) and messages[k][0] == "system":
        k += 1
    groups: list[list[tuple[str, str]]] = []
    for m in messages[k:]:
        if m[0] == "user" or not groups:
            groups.append([])
        groups[-1].append(m)
    return messages[:k], groups


def chat_prompt(
    tok: ChatGLMTokenizerLike,
    messages: Sequence[Any],
    add_generation_prompt: bool = True,
    max_length: int | None = None,
) -> ChatPrompt:
    """Render OpenAI-style ``messages`` for ``tok``'s family, trimmed to ``max_length`` tokens from the oldest turn.

    Bad messages raise ``ValueError`` naming the problem; a conversation too long never does (see the module doc).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages: expected a non-empty list of message objects")
    if max_length is not None and max_length < MIN_PROMPT:
        raise ValueError(f"max_length: a chat prompt needs at least {MIN_PROMPT} tokens, got {max_length}")
    normalized = [message_text(m, i) for i, m in enumerate(messages)]
    notes = []
    if tok.family in ROUND_FAMILIES and any(role == "system" for role, _ in normalized):
        notes.append(f"the {tok.family} template has no system role: the system message was left out")
    pinned, groups = _turns(normalized)
    stops = tok.specials.stops
    dropped = 0
    ids = render(tok, pinned + [m for g in groups for m in g], add_generation_prompt)
    while max_length is not None and len(ids) > max_length and len(groups) > 1:
        dropped += len(groups.pop(0))
        ids = render(tok, pinned + [m for g in groups for m in g], add_generation_prompt)
    if dropped:
        notes.append(f"the conversation exceeds the context of {max_length} tokens: left out the oldest "
                     f"{dropped} message(s)")  # fmt: skip
    cut = 0
    if max_length is not None and len(ids) > max_length:
        cut = len(ids) - max_length
        # ChatGLM-6B's prompt ends in [gMASK] <sop>: keep its last tokens; the others start with [gMASK] sop
        ids = ids[cut:] if tok.family == "chatglm6b" else ids[:2] + ids[2 + cut :]
        notes.append(f"the last message alone exceeds the context of {max_length} tokens: cut its first {cut} tokens")
    return ChatPrompt(ids, stops, dropped, cut, "; ".join(notes) or None)


def is_chat_tokenizer(tok: Any) -> bool:
    """Whether ``tok`` is a ChatGLM tokenizer, i.e. the model has a chat template here."""
    return getattr(tok, "family", None) in FAMILIES and hasattr(tok, "specials")


def served_chat_prompt(
    tok: Any, messages: Sequence[Any], max_prompt_tokens: int, max_model_len: int, max_tokens: int
) -> ChatPrompt | None:
    """A chat request's prompt for ``glmkit serve``: the ChatGLM template of ``messages``, trimmed to what the server
    takes (its prompt limit, and its context less the ``max_tokens`` of the answer), or ``None`` when ``tok`` is not
    a ChatGLM tokenizer (the server's plain-text chat format applies). Bad messages raise ``ValueError``."""
    if not is_chat_tokenizer(tok):
        return None
    return chat_prompt(tok, messages, max_length=min(max_prompt_tokens, max_model_len - max_tokens))
