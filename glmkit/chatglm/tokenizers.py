"""The ChatGLM family's tokenizers, read from a hub folder: ChatGLM-6B, ChatGLM2-6B / ChatGLM3-6B and GLM-4-9B.

* ChatGLM-6B (``ice_text.model``, THUDM/chatglm-6b ``tokenization_chatglm.py`` ``SPTokenizer``): SentencePiece
  over a preprocessed text: ``"\\n"`` becomes ``<n>``, ``"\\t"`` ``<|tab|>`` and each run of 2..80 spaces
  ``<|blank_N|>`` (longest first); decoding reverses it. The special pieces ([MASK] 130000, [gMASK], [sMASK],
  <unused_0>, <sop>, <eop>, <ENC>, <dBLOCK>, then <|tab|>, the blanks and the byte pieces) live inside the model
  file, so their ids are looked up by name, as chatglm.cpp's ``ChatGLMTokenizer`` does. ``num_image_tokens`` in
  ``tokenizer_config.json`` shifts every id (0 in the final hub revision; the icetk image ids of March 2023).
* ChatGLM2 / ChatGLM3 (``tokenizer.model``, THUDM/chatglm2-6b and chatglm3-6b ``SPTokenizer``): plain
  SentencePiece; [MASK] [gMASK] [sMASK] sop eop are appended after the model's pieces (64789..), and ChatGLM3 adds
  <|system|> <|user|> <|assistant|> <|observation|> (64794..).
* GLM-4 (``tokenizer.model`` holding ``base64(token) rank`` lines, THUDM/glm-4-9b ``tokenization_chatglm.py``):
  tiktoken BPE with GLM-4's pre-tokenizer regex; 14 specials follow the ranks (<|endoftext|> 151329, ...).

Special strings written in text stay text by default, as in the ChatGLM2/3 hub tokenizers and chatglm.cpp, so a
chat message cannot forge a role token; ``encode(text, allow_special=True)`` turns them into their ids. ChatGLM-6B
is the exception the hub code makes too: its blank tokens and <sop>/<eop> in text are always ids (infilling).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import SpecialTokens, read_json_object

FAMILIES = ("chatglm6b", "chatglm2", "chatglm3", "glm4")
ICE_TEXT_FILE = "ice_text.model"  # ChatGLM-6B
TOKENIZER_FILE = "tokenizer.model"  # ChatGLM2/3 (SentencePiece) and GLM-4 (tiktoken ranks)

V1_CONTROL = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
V1_IN_TEXT = ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")  # the hub tokenizer splits these out of text
MAX_BLANK = 80
V2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLES = ("system", "user", "assistant", "observation")
V3_SPECIALS = V2_SPECIALS + tuple(f"<|{r}|>" for r in ROLES)
GLM4_SPECIALS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", *(f"<|{r}|>" for r in ROLES),
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip
# GLM-4's pre-tokenizer (its tokenization_chatglm.py ``pat_str``; chatglm.cpp ChatGLM4Tokenizer)
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_BLANKS = re.compile(f" {{2,{MAX_BLANK}}}")
_BLANK_TOKEN = re.compile(r"<\|blank_(\d+)\|>")
_ROLE_TOKEN = re.compile(r"<\|(system|user|assistant|observation|\{\{)")


@dataclass(frozen=True)
class ChatGLMSpecials:
    """The special ids of one ChatGLM vocabulary. ``roles`` maps system/user/assistant/observation to their tokens
    (ChatGLM3, GLM-4; empty before); ``stops`` are the ids that end a chat reply (the hub ``eos_token_id`` list)."""

    family: str
    mask: int
    gmask: int
    smask: int
    sop: int
    eop: int
    eos: int
    pad: int
    stops: tuple[int, ...]
    roles: dict[str, int] = field(default_factory=dict)

    def as_special_tokens(self) -> SpecialTokens:
        # ChatGLM has no [CLS]: its prompts start with [gMASK] (ChatGLM2 on) or carry it before <sop> (6B); the
        # GLM prompt code that prepends ``cls`` does not apply to this family (glmkit.prompts lays ChatGLM out)
        return SpecialTokens(
            eos=self.eos, pad=self.pad, cls=self.gmask, mask=self.mask, sop=self.sop, eop=self.eop,
            smask=self.smask, gmask=self.gmask,
        )  # fmt: skip


def _load_sentencepiece(path: Path):
    import sentencepiece as spm

    proto = path.read_bytes()
    try:
        return spm.SentencePieceProcessor(model_proto=proto), proto
    except RuntimeError as e:  # what sentencepiece raises for bytes that are not a model
        raise ValueError(f"{path}: not a SentencePiece model ({e})") from e


def _split_specials(text: str, specials: dict[str, int]) -> list[str | int]:
    """Text chunks and special ids in order, longest special string first."""
    pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
    out: list[str | int] = []
    pos = 0
    for m in re.finditer(pattern, text):
        if m.start() > pos:
            out.append(text[pos : m.start()])
        out.append(specials[m.group()])
        pos = m.end()
    return out + ([text[pos:]] if pos < len(text) else [])


class _ChatGLMTokenizerBase:
    """What the three vocabularies share: special ids spliced around the text tokenizer's runs."""

    family: str
    specials: ChatGLMSpecials
    vocab_size: int
    _special_of: dict[int, str]  # special id -> string
    _text_specials: dict[str, int]  # strings ``encode`` turns into ids with allow_special

    @property
    def special(self) -> SpecialTokens:
        """The ids under glmkit's ``SpecialTokens`` names (``TokenizerLike``); ``specials`` has them all."""
        return self.specials.as_special_tokens()

    @property
    def prompt_family(self) -> str:
        """The ``glmkit.prompts`` layout of this vocabulary's models: chatglm6b, or chatglm2 (ChatGLM2/3, GLM-4)."""
        return "chatglm6b" if self.family == "chatglm6b" else "chatglm2"

    @property
    def run_breaks(self) -> frozenset[int]:
        """Ids after which ``decode`` starts a new run of pieces (streaming detokenization needs to know)."""
        return frozenset(self._special_of)

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_text(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _is_text_id(self, i: int) -> bool:
        raise NotImplementedError

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text`` with no prefix added; special strings in it become ids only with ``allow_special``."""
        if not allow_special or not text:
            return self._encode_text(text) if text else []
        ids: list[int] = []
        for piece in _split_specials(text, self._text_specials):
            ids += [piece] if isinstance(piece, int) else self._encode_text(piece)
        return ids

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        out = [int(i) for i in ids]
        for i in out:
            if i not in self._special_of and not self._is_text_id(i):
                raise ValueError(f"id {i} is not assigned in this {self.family} vocabulary ({self.vocab_size} ids)")
        return out

    def assigned(self, ids: Sequence[int]) -> list[int]:
        """``ids`` without those the vocabulary does not assign (padded embedding rows a model may emit)."""
        return [i for i in map(int, ids) if i in self._special_of or self._is_text_id(i)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``: runs of text ids decoded, special strings spliced in (or left out)."""
        out, run = [], []
        for i in self._check_ids(ids):
            if i in self._special_of:
                out += [self._decode_text(run)] + ([] if skip_special_tokens else [self._special_of[i]])
                run = []
            else:
                run.append(i)
        return "".join(out + [self._decode_text(run)])

    def build_inputs(self, ids: Sequence[int]) -> list[int]:
        """``ids`` as the model input: ``[gMASK] <sop> ids`` (ChatGLM2 on; the hub ``get_prefix_tokens``)."""
        return [self.specials.gmask, self.specials.sop, *ids]

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, max_length: int | None = None
    ) -> list[int]:
        """The family's chat prompt as token ids (``glmkit.chatglm.chat``); with ``max_length`` the oldest turns
        are dropped to fit it."""
        from .chat import chat_prompt

        return chat_prompt(self, messages, add_generation_prompt=add_generation_prompt, max_length=max_length).ids

    def _config(self) -> dict[str, Any]:
        raise NotImplementedError


class ChatGLM6BTokenizer(_ChatGLMTokenizerBase):
    """ChatGLM-6B's ``ice_text.model`` with the hub preprocessing (``<n>``, ``<|tab|>``, ``<|blank_N|>``)."""

    family = "chatglm6b"

    def __init__(self, path: Path, num_image_tokens: int = 0) -> None:
        self.sp, self._proto = _load_sentencepiece(path)
        self.offset = num_image_tokens
        ids = {}
        for s in (*V1_CONTROL, "<pad>", "<n>", "<|tab|>", f"<|blank_{MAX_BLANK}|>"):
            i = self.sp.piece_to_id(s)
            if self.sp.id_to_piece(i) != s:
                raise ValueError(f"{path}: the ChatGLM-6B vocabulary has no {s!r} piece")
            ids[s] = i + num_image_tokens
        self.specials = ChatGLMSpecials(
            family=self.family, mask=ids["[MASK]"], gmask=ids["[gMASK]"], smask=ids["[sMASK]"], sop=ids["<sop>"],
            eop=ids["<eop>"], eos=ids["<eop>"], pad=ids["<pad>"], stops=(ids["<eop>"],),
        )  # fmt: skip
        self._special_of = {ids[s]: s for s in V1_CONTROL} | {ids["<pad>"]: "<pad>"}
        self._text_specials = {s: ids[s] for s in V1_IN_TEXT}
        self.vocab_size = self.sp.get_piece_size() + num_image_tokens

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``; its blank tokens and <sop>/<eop> are ids (the hub tokenizer's rule) unless
        ``allow_special`` is False."""
        return super().encode(text, allow_special)

    def _encode_text(self, text: str) -> list[int]:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        text = _BLANKS.sub(lambda m: f"<|blank_{len(m.group())}|>", text)
        return [i + self.offset for i in self.sp.encode(text)]

    def _decode_text(self, ids: list[int]) -> str:
        text = self.sp.decode([i - self.offset for i in ids])
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return _BLANK_TOKEN.sub(lambda m: " " * int(m.group(1)), text)

    def _is_text_id(self, i: int) -> bool:
        return self.offset <= i < self.vocab_size

    def build_inputs(self, ids: Sequence[int]) -> list[int]:
        """``ids [gMASK] <sop>``: ChatGLM-6B generates at a trailing [gMASK] (the final hub revision's
        ``build_inputs_with_special_tokens``)."""
        return [*ids, self.specials.gmask, self.specials.sop]

    def save(self, folder: Path) -> None:
        (folder / ICE_TEXT_FILE).write_bytes(self._proto)

    def _config(self) -> dict[str, Any]:
        return {
            "tokenizer_class": "ChatGLMTokenizer", "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
            "mask_token": "[MASK]", "gmask_token": "[gMASK]", "pad_token": "<pad>", "unk_token": "<unk>",
            "num_image_tokens": self.offset, "padding_side": "left",
        }  # fmt: skip


class ChatGLM2Tokenizer(_ChatGLMTokenizerBase):
    """ChatGLM2's / ChatGLM3's ``tokenizer.model``: plain SentencePiece, specials appended after its pieces."""

    def __init__(self, path: Path, family: str = "chatglm2") -> None:
        self.family = family
        self.sp, self._proto = _load_sentencepiece(path)
        n = self.sp.get_piece_size()
        names = V3_SPECIALS if family == "chatglm3" else V2_SPECIALS
        ids = {s: n + k for k, s in enumerate(names)}
        eos = self.sp.eos_id()
        roles = {r: ids[f"<|{r}|>"] for r in ROLES if f"<|{r}|>" in ids}
        stops = (eos, roles["user"], roles["observation"]) if roles else (eos,)
        self.specials = ChatGLMSpecials(
            family=family, mask=ids["[MASK]"], gmask=ids["[gMASK]"], smask=ids["[sMASK]"], sop=ids["sop"],
            eop=ids["eop"], eos=eos, pad=self.sp.unk_id(), stops=stops, roles=roles,
        )  # fmt: skip
        self._special_of = {i: s for s, i in ids.items()}
        self._text_specials = ids
        self.vocab_size = n + len(names)
        self._n = n

    def _encode_text(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _decode_text(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def _is_text_id(self, i: int) -> bool:
        return 0 <= i < self._n

    def save(self, folder: Path) -> None:
        (folder / TOKENIZER_FILE).write_bytes(self._proto)

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"tokenizer_class": "ChatGLMTokenizer", "padding_side": "left"}
        config |= {"eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}
        if self.family == "chatglm3":  # what tells a ChatGLM3 folder from a ChatGLM2 one (``_detect_family``)
            config["added_tokens_decoder"] = _added_tokens(self._special_of)
        return config


class GLM4Tokenizer(_ChatGLMTokenizerBase):
    """GLM-4's tiktoken vocabulary (``tokenizer.model``: one ``base64(token) rank`` per line)."""

    family = "glm4"

    def __init__(self, path: Path) -> None:
        import tiktoken

        self._text = path.read_text(encoding="ascii", errors="replace")
        ranks = _read_tiktoken_ranks(path, self._text)
        n = len(ranks)
        ids = {s: n + k for k, s in enumerate(GLM4_SPECIALS)}
        self.enc = tiktoken.Encoding(name="glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=ids)
        roles = {r: ids[f"<|{r}|>"] for r in ROLES}
        eot = ids["<|endoftext|>"]
        self.specials = ChatGLMSpecials(
            family=self.family, mask=ids["[MASK]"], gmask=ids["[gMASK]"], smask=ids["[sMASK]"], sop=ids["<sop>"],
            eop=ids["<eop>"], eos=eot, pad=eot, stops=(eot, roles["user"], roles["observation"]), roles=roles,
        )  # fmt: skip
        self._special_of = {i: s for s, i in ids.items()}
        self._text_specials = ids
        self.vocab_size = n + len(GLM4_SPECIALS)
        self._n = n

    def _encode_text(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def _decode_text(self, ids: list[int]) -> str:
        return self.enc.decode(ids, errors="replace")

    def _is_text_id(self, i: int) -> bool:
        return 0 <= i < self._n

    @property
    def run_breaks(self) -> frozenset[int]:
        return frozenset()  # byte-level: decoding never drops a space at a run's start

    def save(self, folder: Path) -> None:
        (folder / TOKENIZER_FILE).write_text(self._text, encoding="ascii")

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"tokenizer_class": "ChatGLM4Tokenizer", "padding_side": "left"}
        config |= {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        return config | {"added_tokens_decoder": _added_tokens(self._special_of)}


ChatGLMTokenizerLike = ChatGLM6BTokenizer | ChatGLM2Tokenizer | GLM4Tokenizer


def _added_tokens(special_of: dict[int, str]) -> dict[str, dict[str, Any]]:
    return {str(i): {"content": s, "special": True} for i, s in sorted(special_of.items())}


def _read_tiktoken_ranks(path: Path, text: str) -> dict[bytes, int]:
    # parsed here, not with tiktoken.load.load_tiktoken_bpe: that caches every file by its path under the temp
    # folder, so a tokenizer.model replaced at the same path would keep loading the old ranks
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (IndexError, ValueError, binascii.Error) as e:
            raise ValueError(f"{path}: line {n} is not 'base64-token rank' ({line[:60]!r})") from e
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path}: holds no tiktoken ranks")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def _is_tiktoken_file(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(200).split(b"\n", 1)[0]
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?", head) is not None


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path) if path.is_file() else {}


def _detect_family(folder: Path, config: dict[str, Any]) -> str:
    if (folder / ICE_TEXT_FILE).is_file():
        return "chatglm6b"
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        named = f" (tokenizer_config.json names {config['tokenizer_class']})" if "tokenizer_class" in config else ""
        raise FileNotFoundError(
            f"{folder}: no ChatGLM tokenizer file{named}: looked for {ICE_TEXT_FILE} (ChatGLM-6B) and "
            f"{TOKENIZER_FILE} (ChatGLM2/3, GLM-4)"
        )
    if _is_tiktoken_file(path):
        return "glm4"
    # ChatGLM2 and ChatGLM3 share the SentencePiece model; ChatGLM3's folder lists its role tokens (or writes
    # ``<|{{ message['role'] }}|>`` in its chat_template), or its config.json names the model
    if _ROLE_TOKEN.search(json.dumps(config, ensure_ascii=False)):
        return "chatglm3"
    model_name = str(_read_json(folder / "config.json").get("_name_or_path", ""))
    return "chatglm3" if "chatglm3" in model_name.lower() else "chatglm2"


def load_chatglm_tokenizer(folder: str | Path, family: str | None = None) -> ChatGLMTokenizerLike:
    """The ChatGLM tokenizer in a hub folder (``tokenizer_config.json`` + ``ice_text.model`` or ``tokenizer.model``).

    ``family`` (chatglm6b, chatglm2, chatglm3, glm4) overrides the detection from the files: ChatGLM2 and ChatGLM3
    ship the same ``tokenizer.model``, and a ChatGLM3 folder is recognised by the role tokens its
    ``tokenizer_config.json`` lists (or ``chatglm3`` in its config.json ``_name_or_path``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist or is not a folder")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family: unknown ChatGLM family {family!r}; known: {', '.join(FAMILIES)}")
    config = _read_json(folder / "tokenizer_config.json")
    detected = _detect_family(folder, config)
    family = family or detected
    wanted = ICE_TEXT_FILE if family == "chatglm6b" else TOKENIZER_FILE
    if not (folder / wanted).is_file():
        raise FileNotFoundError(f"{folder}: {wanted} is missing (the {family} tokenizer reads it)")
    if family == "chatglm6b":
        offset = config.get("num_image_tokens", 0)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ValueError(
                f"{folder / 'tokenizer_config.json'}: num_image_tokens must be an int >= 0, got {offset!r}"
            )
        tok: ChatGLMTokenizerLike = ChatGLM6BTokenizer(folder / wanted, offset)
    elif family == "glm4":
        if detected != "glm4":
            raise ValueError(f"{folder / wanted}: a SentencePiece model, but GLM-4 reads tiktoken ranks")
        tok = GLM4Tokenizer(folder / wanted)
    else:
        if detected == "glm4":
            raise ValueError(f"{folder / wanted}: tiktoken ranks (GLM-4), but {family} reads a SentencePiece model")
        tok = ChatGLM2Tokenizer(folder / wanted, family)
    _check_listed_ids(folder, config, tok)
    return tok


def _check_listed_ids(folder: Path, config: dict[str, Any], tok: ChatGLMTokenizerLike) -> None:
    """The hub ``added_tokens_decoder`` must agree with the ids the layout gives; one id off breaks every prompt."""
    listed = config.get("added_tokens_decoder") or {}
    if not isinstance(listed, dict):
        raise ValueError(f"{folder / 'tokenizer_config.json'}: added_tokens_decoder must be an object")
    by_string = {s: i for i, s in tok._special_of.items()}
    for key, entry in listed.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if content in by_string and str(by_string[content]) != str(key):
            raise ValueError(
                f"{folder / 'tokenizer_config.json'}: added_tokens_decoder puts {content!r} at {key}, "
                f"the {tok.family} layout at {by_string[content]}"
            )


def save_chatglm_tokenizer(tok: ChatGLMTokenizerLike, folder: str | Path) -> None:
    """Write the tokenizer in its hub layout (model file + ``tokenizer_config.json``), loadable again here."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(folder)
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps(tok._config(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
