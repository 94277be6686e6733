"""``glmkit train-tokenizer``: a byte-level BPE for pretraining GLM from scratch on your own corpus.

Byte-level BPE (GPT-2 style, Hugging Face ``tokenizers``) has no unknown tokens and round-trips any text exactly,
which is what GLM-2B/10B use. The corpus is streamed (``.txt`` line by line, ``.jsonl`` record by record), so its
size is bounded by disk, not memory.

Special-token layout: the GLM specials take the FIXED ids 0..8, in the order of the GLM-2B/10B GPT-2 layout
(id = GPT-2 id - 50256)::

    0 <|endoftext|> (eos = pad)  1 <|startofpiece|> (sop)  2 <|endofpiece|> (eop)  3 [CLS]  4 [MASK]
    5 [SEP]  6 [UNK]  7 [gMASK]  8 [sMASK]

then the 256 byte symbols, then the learned merges. Why first rather than after the learned vocabulary (as the
released vocabularies do): the ids then do not depend on ``--vocab-size`` or on the corpus, so data prepared, configs
written and checkpoints trained with one trained tokenizer keep valid special ids with any other; they are below
every vocab size, so padding the embedding table never moves them; and ``BpeTrainer`` places its special tokens
first, so no id is patched after training. [UNK] is never produced by a byte-level model; it is kept so that every
GLM command token exists, as in the GPT-2 layout. The three blank tokens strip whitespace to their left (lstrip),
as in the released GPT-2 / RoBERTa / Chinese tokenizers.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from .tokenizer import BPE_SPECIAL_TOKENS, GLMTokenizer

CORPUS_SUFFIXES = (".txt", ".jsonl")
_MIN_VOCAB = len(BPE_SPECIAL_TOKENS) + 256  # the specials and the byte alphabet


def corpus_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files to read: each given file as is, each folder's ``.txt`` / ``.jsonl`` files (recursively, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in CORPUS_SUFFIXES)
            if not found:
                raise ValueError(f"{p}: folder has no {' or '.join(CORPUS_SUFFIXES)} files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"corpus file {p} does not exist")
    return out


def iter_texts(files: Sequence[Path], text_field: str = "text") -> Iterator[str]:
    """Non-blank texts: each line of a text file, the ``text_field`` string of each ``.jsonl`` record."""
    for path in files:
        with path.open(encoding="utf-8") as f:
            try:
                for n, line in enumerate(f, 1):
                    if path.suffix != ".jsonl":
                        if line.strip():
                            yield line
                        continue
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line).get(text_field)
                    except (json.JSONDecodeError, AttributeError) as e:
                        raise ValueError(f"{path}:{n}: not a JSON object ({e})") from e
                    if isinstance(text, str) and text.strip():
                        yield text
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e})") from e


def train_tokenizer(
    files: list[str | Path],
    out_dir: str | Path,
    vocab_size: int = 8000,
    text_field: str = "text",
    min_frequency: int = 2,
) -> GLMTokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` ids (specials and bytes included) and save it to ``out_dir``.

    Returns the tokenizer loaded back from ``out_dir`` (kind ``"bpe"``). Raises ValueError when the corpus holds
    no usable text, FileNotFoundError naming a missing corpus file.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= _MIN_VOCAB:
        raise ValueError(f"vocab_size: must exceed {_MIN_VOCAB} (9 special tokens + 256 bytes), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency: must be at least 1, got {min_frequency}")
    paths = corpus_files(files)
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in iter_texts(paths, text_field):
            seen += 1
            yield text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(s, special=True, normalized=False, lstrip=s.endswith("MASK]")) for s in BPE_SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        where = f"a non-empty {text_field!r} string field (.jsonl) or non-blank lines"
        raise ValueError(f"corpus has no usable text: {len(paths)} file(s) read, none with {where}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    trained = GLMTokenizer.from_pretrained(out)
    trained.save_pretrained(out)  # adds the hub-style tokenizer_config.json / added_tokens.json
    return trained


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", nargs="+", help="text files (.txt: a text per line; .jsonl: one JSON object per line) "
                   "or folders of them")  # fmt: skip
    p.add_argument("--out", required=True, help="folder to write the tokenizer to")
    p.add_argument("--vocab-size", type=int, default=8000, help="ids in all, specials and 256 bytes included")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl records")
    p.add_argument("--min-frequency", type=int, default=2, help="merges seen fewer times are not learned")


def run(args: argparse.Namespace) -> int:
    tok = train_tokenizer(args.corpus, args.out, args.vocab_size, args.text_field, args.min_frequency)
    sp = tok.special
    print(f"wrote {args.out}: byte-level BPE, {tok.vocab_size} ids; eos/pad {sp.eos}, sop {sp.sop}, eop {sp.eop}, "
          f"[CLS] {sp.cls}, [MASK] {sp.mask}, [gMASK] {sp.gmask}, [sMASK] {sp.smask}")  # fmt: skip
    return 0
