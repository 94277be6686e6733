"""GLM tokenizers: the released vocabularies and glmkit's own BPE, with the GLM special tokens at their trained ids.

A GLM checkpoint's embedding rows were trained against fixed ids for [MASK], [sMASK], [gMASK], sop, eop, [CLS] and
eos (docs/glm-notes.md, "Special tokens" and TV10); one id off and blank infilling silently degrades. The original code
(THUDM/GLM data_utils/tokenization.py) places every special token it adds at "size of the base vocabulary + a fixed
offset", and ``_LAYOUTS`` below is that rule, token by token, so the released files give exactly the TV10 ids. When a
folder carries the hub's ``added_tokens.json`` its ids are checked against the rule rather than trusted blindly.

Why not the hub ``tokenization_glm.py``: it no longer imports on current transformers (THUDM/GLM#86), it needs remote
code, and its BERT variant ends text with [SEP] although the BERT-vocabulary models ended documents with [PAD]=0
(THUDM/GLM#130; here ``special.eos`` is 0 for them). Adding eos/[CLS] is left to the caller, as in the original.

Blanks written in text ([MASK], [sMASK], [gMASK], and every other special string) are split off before the text
tokenizer runs, as the original ``EncodeAsIds`` does, and the three blank tokens strip the whitespace to their left
(lstrip). BERT, GPT-2, RoBERTa and the trained BPE then run on Hugging Face ``tokenizers``; the Chinese model runs on
``sentencepiece`` itself, like the original and the hub code, so its pieces are the ones the checkpoints saw: that
includes mapping characters the model never saw to ``<unk>`` = 0 (decoded " ⁇ ", THUDM/GLM#140), not to [UNK] = 50004.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from .config import SpecialTokens, read_json_object

EOT, SOP, EOP = "<|endoftext|>", "<|startofpiece|>", "<|endofpiece|>"
SP_MODEL_FILE = "cog-pretrain.model"
# glmkit's trained byte-level BPE and the whitespace tokenizer: these strings at ids 0..8 (see train_tokenizer.py)
BPE_SPECIAL_TOKENS = (EOT, SOP, EOP, "[CLS]", "[MASK]", "[SEP]", "[UNK]", "[gMASK]", "[sMASK]")
_TASK_MASKS = ("[gMASK]", "[sMASK]")

# The SpecialTokens fields each special string fills.
_FIELDS: dict[str, tuple[str, ...]] = {
    EOT: ("eos", "pad"), SOP: ("sop",), EOP: ("eop",), "[CLS]": ("cls",), "[MASK]": ("mask",), "[SEP]": ("sep",),
    "[UNK]": ("unk",), "[gMASK]": ("gmask",), "[sMASK]": ("smask",), "[PAD]": ("eos", "pad"),
    "</s>": ("eos", "pad", "sep"), "<s>": ("cls",), "<unk>": ("unk",), "<mask>": ("mask",),
}  # fmt: skip
# Per kind: (special string, id offset past the base vocabulary, or None = the base vocabulary already has it).
# Offsets follow the order data_utils/tokenization.py adds them; task-mask tokens exist only with task_mask.
_LAYOUTS: dict[str, list[tuple[str, int | None]]] = {
    "bert": [("[PAD]", None), ("[UNK]", None), ("[CLS]", None), ("[SEP]", None), ("[MASK]", None),
             (SOP, 0), (EOP, 1), ("[gMASK]", 2), ("[sMASK]", 3)],
    "gpt2": [(EOT, None), (SOP, 0), (EOP, 1), ("[CLS]", 2), ("[MASK]", 3), ("[SEP]", 4), ("[UNK]", 5),
             ("[gMASK]", 6), ("[sMASK]", 7)],
    "roberta": [("</s>", None), ("<s>", None), ("<unk>", None), ("<mask>", None), (SOP, 0), (EOP, 1),
                ("[gMASK]", 2), ("[sMASK]", 3)],
    # id 50005 (offset 5) is never assigned; gMASK/sMASK follow the HF / --fix-command-token order (docs/glm-notes.md)
    "sentencepiece": [(EOT, 0), ("[SEP]", 1), ("[CLS]", 2), ("[MASK]", 3), ("[UNK]", 4), (SOP, 6), (EOP, 7),
                      ("[sMASK]", 8), ("[gMASK]", 9)],
    "bpe": [(s, i) for i, s in enumerate(BPE_SPECIAL_TOKENS)],  # base 0: the specials come first
}  # fmt: skip
# The original RoBERTa command tokens are GLM strings naming existing RoBERTa entries; text may use either.
_ALIASES = {"roberta": {"[MASK]": "<mask>", "[CLS]": "<s>", "[SEP]": "</s>", "[UNK]": "<unk>", EOT: "</s>"}}
_TASK_MASK_DEFAULT = {"bert": False, "gpt2": True, "roberta": False, "sentencepiece": True, "bpe": True}
# tokenizer_config.json "tokenizer_class" -> kind; the trained BPE's tokenizer.json loads in transformers as is, and
# as glmkit.hf's GLMTokenizerFast (GLM's [CLS] text <eos> template) where glmkit is imported: what glmkit writes
_HUB_CLASSES = {"GLMBertTokenizer": "bert", "GLMGPT2Tokenizer": "gpt2", "GLMRobertaTokenizer": "roberta",
                "GLMChineseTokenizer": "sentencepiece", "PreTrainedTokenizerFast": "bpe",
                "GLMTokenizerFast": "bpe"}  # fmt: skip
_HUB_CLASS_OF = {kind: name for name, kind in _HUB_CLASSES.items()}
_FILES = {"sentencepiece": (SP_MODEL_FILE,), "bert": ("vocab.txt",), "gpt2": ("vocab.json", "merges.txt"),
          "roberta": ("vocab.json", "merges.txt"), "bpe": ("tokenizer.json",)}  # fmt: skip
_LOOKED_FOR = (
    f"{SP_MODEL_FILE} (Chinese SentencePiece), vocab.txt (BERT WordPiece), vocab.json + merges.txt "
    "(GPT-2 / RoBERTa BPE) or tokenizer.json (glmkit byte-level BPE)"
)
WHITESPACE_VOCAB_FILE = "whitespace_vocab.json"


def _special_tokens(ids: dict[str, int]) -> SpecialTokens:
    return SpecialTokens(**{f: i for s, i in ids.items() for f in _FIELDS[s]})


def _specials_pattern(strings: Sequence[str]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))


def _split_on_specials(
    text: str, pattern: re.Pattern[str], text_to_id: dict[str, int], lstrip_ids: set[int]
) -> list[str | int]:
    """Text chunks and special ids in order; a blank id removes the whitespace left of it (lstrip)."""
    out: list[str | int] = []
    pos = 0
    for m in pattern.finditer(text):
        chunk, tid = text[pos : m.start()], text_to_id[m.group()]
        if tid in lstrip_ids:
            chunk = chunk.rstrip()
        out += [chunk, tid] if chunk else [tid]
        pos = m.end()
    return out + ([text[pos:]] if text[pos:] else [])


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path) if path.is_file() else {}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class _HFBackend:
    """A ``tokenizers.Tokenizer`` with the GLM specials registered as its (special) added tokens."""

    def __init__(self, folder: Path, kind: str) -> None:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

        try:
            if kind == "bpe":
                self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            elif kind == "bert":
                self.tok = Tokenizer(models.WordPiece.from_file(str(folder / "vocab.txt"), unk_token="[UNK]"))
                self.tok.normalizer = normalizers.BertNormalizer(lowercase=True)  # uncased, as every GLM BERT vocab
                self.tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
                self.tok.decoder = decoders.WordPiece()
            else:
                vocab, merges = models.BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
                self.tok = Tokenizer(models.BPE(vocab, merges))
                self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                self.tok.decoder = decoders.ByteLevel()
        except Exception as e:  # tokenizers reports an unreadable or malformed file as a bare Exception, nothing finer
            if type(e) is not Exception:
                raise
            raise ValueError(f"{folder}: cannot read its {kind} tokenizer files ({e})") from e
        self.size = self.tok.get_vocab_size(with_added_tokens=False)
        self.base = 0 if kind == "bpe" else self.size
        self.kind = kind

    def register(self, ids: dict[str, int], lstrip_ids: set[int], folder: Path) -> None:
        from tokenizers import AddedToken

        ordered = sorted(ids, key=ids.__getitem__)  # new tokens are appended in id order
        self.tok.add_special_tokens([AddedToken(s, special=True, normalized=False, lstrip=ids[s] in lstrip_ids)
                                     for s in ordered])  # fmt: skip
        for s in ordered:
            if self.tok.token_to_id(s) != ids[s]:
                raise ValueError(f"{folder}: {s!r} has id {self.tok.token_to_id(s)}, the GLM layout needs {ids[s]}")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def save(self, folder: Path) -> None:
        if self.kind == "bpe":
            self.tok.save(str(folder / "tokenizer.json"))
        else:
            self.tok.model.save(str(folder))  # vocab.txt, or vocab.json + merges.txt


class _SentencePieceBackend:
    """``sentencepiece`` itself; the GLM specials live outside its pieces, at piece count + offset."""

    def __init__(self, folder: Path) -> None:
        import sentencepiece as spm

        self.proto = (folder / SP_MODEL_FILE).read_bytes()
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.proto)
        except RuntimeError as e:  # what sentencepiece raises for bytes that are not a model
            raise ValueError(f"{folder / SP_MODEL_FILE}: not a SentencePiece model ({e})") from e
        self.size = self.base = self.sp.get_piece_size()
        self.specials: dict[int, str] = {}

    def register(self, ids: dict[str, int], lstrip_ids: set[int], folder: Path) -> None:
        self.specials = {i: s for s, i in ids.items()}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # like the original DecodeIds: decode runs of pieces, splice special strings in, no added spaces
        out, run = [], []
        for i in ids:
            if i in self.specials:
                out += [self.sp.decode(run)] + ([] if skip_special_tokens else [self.specials[i]])
                run = []
            else:
                run.append(i)
        return "".join(out + [self.sp.decode(run)])

    def id_to_token(self, i: int) -> str | None:
        return self.specials.get(i) or (self.sp.id_to_piece(i) if 0 <= i < self.base else None)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)  # unknown pieces come back as <unk>'s id
        return i if self.sp.id_to_piece(i) == token else None

    def save(self, folder: Path) -> None:
        (folder / SP_MODEL_FILE).write_bytes(self.proto)


def _detect_kind(folder: Path, config: dict[str, Any]) -> str:
    present = {p.name for p in folder.iterdir()}
    declared = _HUB_CLASSES.get(config.get("tokenizer_class", ""))
    if declared is not None:
        missing = [f for f in _FILES[declared] if f not in present]
        if missing:
            raise FileNotFoundError(f"{folder}: tokenizer_config.json names {config['tokenizer_class']}, "
                                    f"but {' and '.join(missing)} is missing")  # fmt: skip
        return declared
    for kind in ("sentencepiece", "bert", "gpt2", "bpe"):
        if all(f in present for f in _FILES[kind]):
            if kind == "gpt2" and {"<s>", "<mask>"} <= read_json_object(folder / "vocab.json").keys():
                return "roberta"
            return kind
    raise FileNotFoundError(f"{folder}: no tokenizer files found; looked for {_LOOKED_FOR}; "
                            f"the folder has {sorted(present) or 'no files'}")  # fmt: skip


def _listed_tokens(config: dict[str, Any], added: dict[str, Any]) -> set[str]:
    extra = config.get("additional_special_tokens") or []
    return set(added) | {t["content"] if isinstance(t, dict) else t for t in extra}


class TokenizerLike(Protocol):
    """What glmkit's data, generation and serving code needs of a tokenizer: ``GLMTokenizer`` and
    ``WhitespaceTokenizer`` provide it, and so can any object with these members."""

    special: SpecialTokens
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class GLMTokenizer:
    """A GLM tokenizer for one of the released vocabularies or glmkit's trained BPE (``kind``).

    ``special`` holds the special-token ids, ``vocab_size`` the number of ids this tokenizer can produce (the model's
    embedding table is usually padded larger: 30592 / 50304 / 50048).
    """

    def __init__(self, kind: str, backend: _HFBackend | _SentencePieceBackend, task_mask: bool, folder: Path) -> None:
        ids = {s: (backend.base + off if off is not None else backend.token_to_id(s))
               for s, off in _LAYOUTS[kind] if task_mask or s not in _TASK_MASKS}  # fmt: skip
        absent = [s for s, i in ids.items() if i is None]
        if absent:
            raise ValueError(f"{folder}: the {kind} vocabulary has no {', '.join(absent)} entry")
        self.kind = kind
        self.special = _special_tokens(ids)
        self._backend = backend
        self._lstrip = set(self.special.mask_ids())
        self._special_ids = set(ids.values())
        backend.register(ids, self._lstrip, folder)
        self._ids = ids
        self._text_to_id = ids | {a: ids[s] for a, s in _ALIASES.get(kind, {}).items()}
        self._pattern = _specials_pattern(list(self._text_to_id))
        self._appended = {s: ids[s] for s, off in _LAYOUTS[kind] if s in ids and off is not None}
        self.vocab_size = max(backend.size, max(ids.values()) + 1)

    @classmethod
    def from_pretrained(cls, folder: str | Path, task_mask: bool | None = None) -> GLMTokenizer:
        """Load the tokenizer files in ``folder`` (hub layout or what ``save_pretrained`` wrote).

        ``task_mask``: give [gMASK]/[sMASK] ids. ``None`` = what the folder's added_tokens.json /
        tokenizer_config.json list, else the release default (GPT-2 and Chinese yes, BERT and RoBERTa no).
        """
        folder = Path(folder)
        if folder.is_file():
            raise NotADirectoryError(f"{folder} is a file; give the tokenizer's folder (holding {_LOOKED_FOR})")
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist (looked for {_LOOKED_FOR})")
        config = _read_json(folder / "tokenizer_config.json")
        added = _read_json(folder / "added_tokens.json")
        kind = _detect_kind(folder, config)
        if kind == "bpe" and task_mask is False:
            raise ValueError(f"{folder}: glmkit BPE tokenizers always have [gMASK]/[sMASK]; task_mask=False is invalid")
        if task_mask is None:
            listed = _listed_tokens(config, added)
            task_mask = bool(listed & set(_TASK_MASKS)) if listed and kind != "bpe" else _TASK_MASK_DEFAULT[kind]
        backend = _SentencePieceBackend(folder) if kind == "sentencepiece" else _HFBackend(folder, kind)
        tok = cls(kind, backend, task_mask, folder)
        for s, i in added.items():
            if tok._text_to_id.get(s, i) != i:
                raise ValueError(f"{folder / 'added_tokens.json'}: {s!r} is id {i}, the GLM layout gives "
                                 f"{tok._text_to_id[s]} for this {kind} vocabulary")  # fmt: skip
        return tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no [CLS]/eos added. Special strings in the text become their ids."""
        ids: list[int] = []
        for piece in _split_on_specials(text, self._pattern, self._text_to_id, self._lstrip):
            ids += [piece] if isinstance(piece, int) else self._backend.encode(piece)
        return ids

    def _is_assigned(self, i: int) -> bool:
        return 0 <= i < self._backend.size or i in self._special_ids

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        out = [int(i) for i in ids]
        for i in out:
            if not self._is_assigned(i):
                raise ValueError(f"id {i} is not assigned in this {self.kind} vocabulary ({self.vocab_size} ids)")
        return out

    def assigned(self, ids: Sequence[int]) -> list[int]:
        """``ids`` without those this vocabulary does not assign (rows of a padded embedding a model may emit)."""
        return [i for i in map(int, ids) if self._is_assigned(i)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; an id this vocabulary does not assign (e.g. a padded-vocab row) raises ValueError."""
        return self._backend.decode(self._check_ids(ids), skip_special_tokens)

    @property
    def run_breaks(self) -> frozenset[int]:
        """Ids after which ``decode`` starts a new run of pieces, dropping its leading space as at the start of the
        text: the special tokens of a SentencePiece vocabulary (decoded like the original ``DecodeIds``); none for
        the others, whose decoders join every token (streaming detokenization needs to know)."""
        specials = getattr(self._backend, "specials", None)
        return frozenset(specials) if specials else frozenset()

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Vocabulary strings (byte-level forms such as "Ġthe" for the BPE kinds, "▁" pieces for SentencePiece)."""
        return [str(self._backend.id_to_token(i)) for i in self._check_ids(ids)]

    def token_to_id(self, token: str) -> int | None:
        if token in self._text_to_id:
            return self._text_to_id[token]
        return self._backend.token_to_id(token)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the vocabulary files plus hub-style added_tokens.json and tokenizer_config.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(folder)
        _write_json(folder / "added_tokens.json", self._appended)
        by_field = {f: s for s in self._ids for f in _FIELDS[s]}
        config: dict[str, Any] = {"tokenizer_class": _HUB_CLASS_OF[self.kind]}
        config |= {f"{f}_token": by_field[f] for f in ("eos", "pad", "cls", "mask", "sep", "unk")}
        config["additional_special_tokens"] = [s for s in (SOP, EOP, *_TASK_MASKS) if s in self._ids]
        _write_json(folder / "tokenizer_config.json", config)


class WhitespaceTokenizer:
    """Splits text on whitespace and numbers words in order of first sight; needs no files.

    It lets ``glmkit explain`` show GLM's layout right after install. Special strings sit at the same ids as in
    glmkit's trained BPE (``BPE_SPECIAL_TOKENS``, ids 0..8); words follow from id 9. ``encode`` grows the vocabulary.
    """

    kind = "whitespace"

    def __init__(self, words: Sequence[str] = ()) -> None:
        self._tokens = list(BPE_SPECIAL_TOKENS)
        self._specials = {s: i for i, s in enumerate(BPE_SPECIAL_TOKENS)}
        self._ids = dict(self._specials)
        self.special = _special_tokens(self._specials)
        self._pattern = _specials_pattern(BPE_SPECIAL_TOKENS)
        for w in words:
            self._add(w)

    def _add(self, word: str) -> int:
        if word not in self._ids:
            self._ids[word] = len(self._tokens)
            self._tokens.append(word)
        return self._ids[word]

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @classmethod
    def from_pretrained(cls, folder: str | Path, task_mask: bool | None = None) -> WhitespaceTokenizer:
        """Load what ``save_pretrained`` wrote; ``task_mask`` is accepted for parity (both task masks always exist)."""
        path = Path(folder) / WHITESPACE_VOCAB_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no {WHITESPACE_VOCAB_FILE}")
        words = read_json_object(path).get("words")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError(f'{path}: expected {{"words": [...]}}, a list of the vocabulary\'s words')
        return cls(words)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _split_on_specials(text, self._pattern, self._specials, set()):
            ids += [piece] if isinstance(piece, int) else [self._add(w) for w in piece.split()]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        toks = self.convert_ids_to_tokens(ids)
        return " ".join(t for t in toks if not (skip_special_tokens and t in self._specials))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        bad = [i for i in ids if not 0 <= i < len(self._tokens)]
        if bad:
            raise ValueError(f"id {bad[0]} is not assigned (the whitespace vocabulary has {len(self._tokens)} ids)")
        return [self._tokens[i] for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        words = self._tokens[len(BPE_SPECIAL_TOKENS) :]
        _write_json(Path(folder) / WHITESPACE_VOCAB_FILE, {"words": words})


def load_tokenizer(path: str | Path | None) -> GLMTokenizer | WhitespaceTokenizer:
    """The tokenizer in folder ``path``; ``None`` gives a fresh ``WhitespaceTokenizer``."""
    if path is None:
        return WhitespaceTokenizer()
    if (Path(path) / WHITESPACE_VOCAB_FILE).is_file():
        return WhitespaceTokenizer.from_pretrained(path)
    return GLMTokenizer.from_pretrained(path)
