"""How a prompt is laid out, per model family: the one place that decides which ids surround a user's text.

Every entry point (``glmkit generate``, ``generate``/``fill_blanks``/``complete``, the HTTP server's completions,
infill, scoring and embeddings, the transformers wrapper) asks a ``PromptLayout`` instead of appending ids itself,
so the same text becomes the same ids everywhere. A family says four things (the ``PromptLayout`` protocol):

* ``continuation(body)``: a prompt the model continues;
* ``infilling(body)``: a prompt whose blanks are filled (``ValueError`` when it has none);
* ``model_input(ids)``: token ids a caller passed as the model input, completed the way the family needs;
* ``stop_ids()``: the ids that end a generation by default.

``body`` is the tokenizer's ``encode(text)``, without any special id added; ``prompt_ids`` and friends below do the
encoding. A family registers a factory from its special-token ids to its layout (``register``); ``layout`` looks
it up. The GLM family (THUDM/GLM, ``generate_samples.py`` ``read_context``): ``[CLS] text``; a text without a
blank gets the generation blank ([gMASK], or [MASK] in a vocabulary without task masks) appended; ``[eos]``
follows unless the text ends in a blank; generation stops at ``<eop>`` or ``<eos>``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .config import SpecialTokens
from .masks import find_blanks
from .tokenizer import TokenizerLike

DEFAULT_FAMILY = "glm"


class PromptLayout(Protocol):
    """The prompt rules of one model family over one vocabulary's special ids."""

    def blank_ids(self) -> tuple[int, ...]:
        """Ids that mark a blank to fill (empty for a family without blank infilling)."""
        ...

    def continuation(self, body: Sequence[int]) -> list[int]:
        """The prompt that asks the model to continue ``body`` (blanks inside it are context, filled first)."""
        ...

    def infilling(self, body: Sequence[int]) -> list[int]:
        """The prompt whose blanks are all filled; ``ValueError`` if ``body`` has no blank."""
        ...

    def model_input(self, ids: Sequence[int]) -> list[int]:
        """``ids`` given as the model input (token-id prompts), completed with what generation needs."""
        ...

    def stop_ids(self) -> list[int]:
        """The ids that end a generated span by default, first the one the family emits at a span's end."""
        ...


@dataclass(frozen=True)
class GLMPrompts:
    """GLM (BlockLM: glm-large/-2b/-10b and glmkit's own models): Part A is ``[CLS] text``, bidirectional; the
    engine feeds ``<sop>`` at each blank and decodes its span."""

    special: SpecialTokens

    @property
    def generation_blank(self) -> int:
        """The blank a continuation is generated at: [gMASK] (long, document-level spans), else [MASK]."""
        return self.special.gmask if self.special.gmask is not None else self.special.mask

    def blank_ids(self) -> tuple[int, ...]:
        return self.special.mask_ids()

    def continuation(self, body: Sequence[int]) -> list[int]:
        ids = [self.special.cls, *body]
        return ids if ids[-1] == self.generation_blank else [*ids, self.generation_blank]

    def infilling(self, body: Sequence[int]) -> list[int]:
        ids = [self.special.cls, *body]
        if not find_blanks(ids, self.blank_ids()):
            raise ValueError("no blank ([MASK], [sMASK] or [gMASK]) to fill")
        # read_context appends eos unless the raw text ends in "MASK]": after [MASK] and [sMASK] too, not only [gMASK]
        return ids if ids[-1] in self.blank_ids() else [*ids, self.special.eos]

    def model_input(self, ids: Sequence[int]) -> list[int]:
        row = [int(t) for t in ids]
        return row if find_blanks(row, self.blank_ids()) else [*row, self.generation_blank]

    def stop_ids(self) -> list[int]:
        return list(dict.fromkeys([self.special.eop, self.special.eos]))


@dataclass(frozen=True)
class ChatGLM6BPrompts:
    """ChatGLM-6B (THUDM/chatglm-6b ``tokenization_chatglm.py`` ``build_inputs_with_special_tokens``): ``text [gMASK]
    <sop>``, no [CLS]; the engine feeds ``<sop>`` itself, so a prompt here ends at the blank. The blank a span is
    generated at is the row's [gMASK], or its [MASK] when it has none ([sMASK] is no blank to the hub code,
    ``get_position_ids``); generation stops at ``<eop>``, the hub's ``eos_token_id``."""

    special: SpecialTokens

    def blank_ids(self) -> tuple[int, ...]:
        return tuple(i for i in (self.special.mask, self.special.gmask) if i is not None)

    def continuation(self, body: Sequence[int]) -> list[int]:
        ids = [int(t) for t in body]
        return ids if ids and ids[-1] == self.special.gmask else [*ids, self.special.gmask]

    def infilling(self, body: Sequence[int]) -> list[int]:
        ids = [int(t) for t in body]
        if not find_blanks(ids, self.blank_ids()):
            raise ValueError("no blank ([MASK] or [gMASK]) to fill")
        return ids

    def model_input(self, ids: Sequence[int]) -> list[int]:
        row = [int(t) for t in ids]
        if row and row[-1] == self.special.sop:  # the tokenizer's `text [gMASK] <sop>`
            row = row[:-1]
        return row if find_blanks(row, self.blank_ids()) else [*row, self.special.gmask]

    def stop_ids(self) -> list[int]:
        return list(dict.fromkeys([self.special.eop, self.special.eos]))


@dataclass(frozen=True)
class ChatGLM2Prompts:
    """ChatGLM2-6B, ChatGLM3-6B and GLM-4 (THUDM hub ``tokenization_chatglm.py``, ``build_inputs_with_special_tokens``
    / ``get_prefix_tokens``): ``[gMASK] sop text``, the prompt of a causal LM, continued as it is; there is no blank
    infilling. Generation stops at the vocabulary's stop ids: ``</s>`` (ChatGLM2), also ``<|user|>`` and
    ``<|observation|>`` (ChatGLM3; GLM-4 with its ``<|endoftext|>``) when ``special`` lists them as ``stops``."""

    special: Any  # SpecialTokens, or the ChatGLM tokenizers' ChatGLMSpecials (with the chat stop ids)

    def blank_ids(self) -> tuple[int, ...]:
        return ()

    def continuation(self, body: Sequence[int]) -> list[int]:
        return self.model_input(body)

    def infilling(self, body: Sequence[int]) -> list[int]:
        raise ValueError("ChatGLM2/3 and GLM-4 are causal LMs: they continue a prompt and fill no blanks")

    def model_input(self, ids: Sequence[int]) -> list[int]:
        row = [int(t) for t in ids]
        prefix = [self.special.gmask, self.special.sop]
        return row if row[:2] == prefix else [*prefix, *row]

    def stop_ids(self) -> list[int]:
        return list(dict.fromkeys(getattr(self.special, "stops", None) or [self.special.eos]))


_FAMILIES: dict[str, Callable[[Any], PromptLayout]] = {
    DEFAULT_FAMILY: GLMPrompts,
    "chatglm6b": ChatGLM6BPrompts,
    "chatglm2": ChatGLM2Prompts,
}


def register(family: str, factory: Callable[[Any], PromptLayout]) -> None:
    """Add a model family: ``factory(special_ids)`` builds its layout. Re-registering a name replaces it."""
    _FAMILIES[family] = factory


def families() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def layout(special: Any, family: str = DEFAULT_FAMILY) -> PromptLayout:
    """The prompt layout of ``family`` over the special-token ids ``special`` (``SpecialTokens`` for GLM)."""
    factory = _FAMILIES.get(family)
    if factory is None:
        raise ValueError(f"family: unknown model family {family!r}; known: {sorted(_FAMILIES)}")
    return factory(special)


def model_family(model: Any) -> str:
    """The prompt family of ``model``: its config's ``family`` (ChatGLM-6B ``chatglm6b``; ChatGLM2/3 and GLM-4
    ``chatglm2``), else GLM's. Entry points that lay out a prompt for a model ask this rather than assume GLM: a
    ChatGLM-6B prompt under the GLM layout keeps ``<sop>`` in its bidirectional prefix and silently decodes wrong."""
    family = getattr(getattr(model, "config", None), "family", None)
    return family if isinstance(family, str) else DEFAULT_FAMILY


def model_layout(model: Any, special: Any, tokenizer: Any = None) -> PromptLayout:
    """The layout of ``model``'s family over ``special``. A ChatGLM2/3/GLM-4 model takes a ChatGLM tokenizer's own
    ids when it has them (``specials``, which list the chat stop ids ``SpecialTokens`` has no field for)."""
    family = model_family(model)
    if family == "chatglm2":
        special = getattr(tokenizer, "specials", None) or special
    return layout(special, family)


def model_stop_ids(model: Any, prompts: PromptLayout) -> list[int]:
    """The ids that end a generation of ``model`` by default: its config's eos ids where it lists them (ChatGLM2/3,
    GLM-4), then its layout's."""
    eos = getattr(getattr(model, "config", None), "eos_ids", None)
    return list(dict.fromkeys([*(eos if isinstance(eos, list) else []), *prompts.stop_ids()]))


def has_blank(prompts: PromptLayout, ids: Sequence[int]) -> bool:
    return bool(find_blanks(ids, prompts.blank_ids()))


def text_prompt(prompts: PromptLayout, body: Sequence[int]) -> list[int]:
    """A text as typed: its blanks are filled when it has any (``infilling``), else it is continued."""
    return prompts.infilling(body) if has_blank(prompts, body) else prompts.continuation(body)


def prompt_ids(tok: TokenizerLike, text: str, family: str = DEFAULT_FAMILY) -> list[int]:
    """``text_prompt`` of ``text``: what ``glmkit generate`` runs for it."""
    return text_prompt(layout(tok.special, family), tok.encode(text))


def continuation_ids(tok: TokenizerLike, text: str, family: str = DEFAULT_FAMILY) -> list[int]:
    """``text`` as a prompt to continue (GLM: ``[CLS] text [gMASK]``)."""
    return layout(tok.special, family).continuation(tok.encode(text))


def infilling_ids(tok: TokenizerLike, text: str, family: str = DEFAULT_FAMILY) -> list[int]:
    """``text`` as a prompt whose blanks are filled (GLM: ``[CLS] text [eos]``, no eos after a final blank)."""
    return layout(tok.special, family).infilling(tok.encode(text))
