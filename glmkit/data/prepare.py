"""``glmkit prepare-data``: text corpora -> memory-mapped token shards that pretraining reads without loading.

Tokenizing once, ahead of training, keeps the training loop free of text handling and lets every data-parallel
rank memory-map the same files. Inputs stream through Hugging Face ``datasets`` (``streaming=True``), so a corpus
larger than memory flows through in bounded batches; tokenization runs in ``num_proc`` worker processes and the
output is identical for any ``num_proc``.

Inputs: ``.txt`` (one document per blank-line-separated paragraph), ``.jsonl`` (one JSON object per line, the text
in ``text_field``), ``.parquet`` (column ``text_field``), folders of these (searched recursively) and
``hf:NAME[:SPLIT]`` (a hub dataset, where the network allows). Empty documents and undecodable ones (invalid
UTF-8, which shows up as U+FFFD, bad JSON, a non-string text) are skipped and counted.

Output folder::

    manifest.json           counts, dtype, special tokens, sentence-end ids and the shard list
    train-00000.bin         the tokens of many documents back to back (uint16 if the vocabulary fits, else uint32)
    train-00000.idx.npy     int64 offsets: document k is tokens[offsets[k]:offsets[k + 1]] (no eos stored)
    val-00000.bin/.idx.npy  the held-out split (each document goes there with probability val_fraction)
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..tokenizer import TokenizerLike
from .packing import sentence_end_ids
from .shards import MANIFEST, ShardWriter, remove_prepared, write_manifest

logger = logging.getLogger(__name__)

SUFFIX_KIND = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
DEFAULT_SHARD_TOKENS = 1 << 30
_BATCH_DOCS = 256


@dataclass
class _Source:
    kind: str  # txt | jsonl | parquet | hub
    paths: list[str]
    split: str = "train"  # hub only


@dataclass
class _Counts:
    documents: int = 0
    tokens: int = 0
    skipped_empty: int = 0
    skipped_undecodable: int = 0
    skipped_missing_field: int = 0


def held_out_draws(val_fraction: float, seed: int) -> Iterator[bool]:
    """Whether each non-empty document, in input order, goes to the held-out split: the one rule ``prepare_data``
    applies, so that scripts can name a run's held-out documents (e.g. tasks built on held-out chapters)."""
    rng = np.random.default_rng(seed)
    while True:
        yield bool(rng.random() < val_fraction)


def prepare_data(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    tokenizer: str | Path | TokenizerLike,
    val_fraction: float = 0.01,
    text_field: str = "text",
    num_proc: int = 1,
    seed: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into token shards under ``out_dir``; returns the manifest (also written there).

    ``tokenizer`` is a tokenizer folder (loaded with ``glmkit.tokenizer.load_tokenizer``) or a loaded tokenizer.
    Raises FileNotFoundError for a missing input and ValueError for a bad argument or a corpus without text.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: must be in [0, 1), got {val_fraction}")
    if num_proc < 1:
        raise ValueError(f"num_proc: must be at least 1, got {num_proc}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens: must be positive, got {shard_tokens}")
    inputs = [str(i) for i in inputs]
    sources = _resolve(inputs)
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        if not overwrite:
            raise ValueError(f"out_dir: {out} already holds prepared data (pass overwrite=True / --overwrite)")
        remove_prepared(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = _load_tokenizer(tokenizer)
    vocab_size = tok.vocab_size  # read once: a vocabulary that grows while encoding is an error below
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)

    counts = _Counts()
    writers = {split: ShardWriter(out, split, dtype, shard_tokens) for split in ("train", "val")}
    held_out = held_out_draws(val_fraction, seed)
    try:
        texts = (t for s in sources for t in _read(s, text_field, counts))
        for flat, lengths in _encode_stream(_chunks(texts, _BATCH_DOCS), tokenizer, tok, num_proc):
            if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
                raise ValueError(f"tokenizer: produced id {int(flat.max())} outside its vocab_size={vocab_size}")
            for doc in np.split(flat, np.cumsum(lengths)[:-1]):
                if doc.size == 0:
                    counts.skipped_empty += 1
                    continue
                writers["val" if next(held_out) else "train"].add(doc)
                counts.documents += 1
                counts.tokens += int(doc.size)
                if counts.documents % 100_000 == 0:
                    logger.info("prepare-data: %d documents, %d tokens", counts.documents, counts.tokens)
        splits = {name: w.finish() for name, w in writers.items()}
        if counts.documents == 0:
            raise ValueError(
                f"inputs: no usable text in {inputs} ({counts.skipped_empty} empty, {counts.skipped_undecodable} "
                f"undecodable, {counts.skipped_missing_field} without the field {text_field!r} (see --text-field))"
            )
    except BaseException:
        for w in writers.values():
            w.discard()
        raise

    token_text = _token_text(tok)
    special_ids = [i for i in tok.special.to_dict().values() if i is not None]
    manifest = {
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "special_tokens": tok.special.to_dict(),
        "sentence_end_ids": sentence_end_ids(token_text, vocab_size, special_ids) if token_text else [],
        **asdict(counts),
        "val_fraction": val_fraction,
        "seed": seed,
        "text_field": text_field,
        "inputs": inputs,
        "splits": splits,
    }
    return write_manifest(out, manifest)


# ---- reading -----------------------------------------------------------------------------------------------


def _resolve(inputs: list[str]) -> list[_Source]:
    if not inputs:
        raise ValueError("inputs: no input given")
    sources: list[_Source] = []
    for item in inputs:
        if item.startswith("hf:"):
            name, _, split = item[3:].partition(":")
            sources.append(_Source("hub", [name], split or "train"))
            continue
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIX_KIND)
            if not files:
                raise ValueError(f"{p}: folder holds no {', '.join(SUFFIX_KIND)} files")
            for kind in dict.fromkeys(SUFFIX_KIND[f.suffix] for f in files):
                sources.append(_Source(kind, [str(f) for f in files if SUFFIX_KIND[f.suffix] == kind]))
        elif p.is_file():
            if p.suffix not in SUFFIX_KIND:
                raise ValueError(f"{p}: unsupported file type (expected {', '.join(SUFFIX_KIND)})")
            sources.append(_Source(SUFFIX_KIND[p.suffix], [str(p)]))
        else:
            raise FileNotFoundError(f"input not found: {item}")
    return sources


_MISSING = object()  # a JSON record without a usable text field


def _read(source: _Source, text_field: str, counts: _Counts) -> Iterator[str]:
    """The usable texts of one source, in order; skipped records are counted."""
    from datasets import load_dataset

    if source.kind in ("txt", "jsonl"):
        # both read as text so one bad record is skipped instead of failing the file
        sample_by = "paragraph" if source.kind == "txt" else "line"
        ds = load_dataset(
            "text",
            data_files=source.paths,
            split="train",
            streaming=True,
            sample_by=sample_by,
            encoding_errors="replace",
        )
        column = "text"
    elif source.kind == "parquet":
        import pyarrow.parquet as pq

        for path in source.paths:
            names = pq.read_schema(path).names
            if text_field not in names:
                raise ValueError(f"{path}: no column {text_field!r} (columns: {names}); set --text-field")
        ds = load_dataset("parquet", data_files=source.paths, split="train", streaming=True, columns=[text_field])
        column = text_field
    else:
        try:
            ds = load_dataset(source.paths[0], split=source.split, streaming=True)
        except Exception as e:  # offline, unknown name, gated: say which input failed
            raise ValueError(f"hf:{source.paths[0]}: could not load the hub dataset ({e})") from e
        if ds.column_names is not None and text_field not in ds.column_names:
            raise ValueError(f"hf:{source.paths[0]}: no column {text_field!r} (columns: {ds.column_names})")
        column = text_field
    for batch in ds.iter(batch_size=1024):
        for value in batch[column]:
            if source.kind == "jsonl":
                if not value.strip():
                    continue  # a blank line is no record
                value = _json_text(value, text_field, counts)
                if value is _MISSING:
                    continue
            elif source.kind == "txt":
                value = value.strip("\n")
            text = _usable(value, counts)
            if text is not None:
                yield text


def _json_text(line: str, text_field: str, counts: _Counts) -> Any:
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        counts.skipped_undecodable += 1
        return _MISSING
    if text_field not in record:
        counts.skipped_missing_field += 1
        return _MISSING
    return record[text_field]


def _usable(value: Any, counts: _Counts) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            counts.skipped_undecodable += 1
            return None
    if value is None or (isinstance(value, str) and not value.strip()):
        counts.skipped_empty += 1
        return None
    if not isinstance(value, str) or "\ufffd" in value:
        counts.skipped_undecodable += 1
        return None
    return value


def _chunks(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for t in texts:
        chunk.append(t)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---- tokenizing --------------------------------------------------------------------------------------------

_worker_tokenizer: TokenizerLike | None = None


def _load_tokenizer(tokenizer: str | Path | TokenizerLike) -> TokenizerLike:
    if isinstance(tokenizer, (str, Path)):
        from ..tokenizer import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


def _init_worker(tokenizer: str | Path | TokenizerLike) -> None:
    global _worker_tokenizer
    _worker_tokenizer = _load_tokenizer(tokenizer)


def _encode(tok: TokenizerLike, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = [tok.encode(t) for t in texts]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    flat = np.fromiter((i for x in ids for i in x), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_tokenizer is not None
    return _encode(_worker_tokenizer, texts)


def _encode_stream(
    chunks: Iterator[list[str]], spec: str | Path | TokenizerLike, tok: TokenizerLike, num_proc: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encode chunks in order; at most 2 * num_proc chunks are in flight, so memory stays bounded."""
    if num_proc == 1:
        for chunk in chunks:
            yield _encode(tok, chunk)
        return
    # spawn: a forked child would inherit torch's and the tokenizer's threads in an undefined state
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_init_worker, initargs=(spec,)) as pool:
        pending: deque[Any] = deque()
        for chunk in chunks:
            pending.append(pool.submit(_encode_in_worker, chunk))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _token_text(tok: TokenizerLike) -> Callable[[int], str] | None:
    """How to see a token's text, for sentence ends: ``decode`` if the tokenizer has it, else its token strings."""
    convert = getattr(tok, "decode", None) or getattr(tok, "convert_ids_to_tokens", None)
    if convert is None:
        return None

    def text(i: int) -> str:
        try:
            out = convert([i])
        except ValueError:  # an id the vocabulary leaves unassigned (e.g. 50005 of the Chinese vocabulary)
            return ""
        return out if isinstance(out, str) else str(out[0])

    return text


# ---- command line ------------------------------------------------------------------------------------------


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help=".txt / .jsonl / .parquet files or folders, or hf:NAME[:SPLIT]")
    p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl records / .parquet columns")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    p.add_argument("--num-proc", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("--overwrite", action="store_true", help="replace data already prepared in --out")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    m = prepare_data(
        args.inputs,
        args.out,
        args.tokenizer,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        num_proc=args.num_proc,
        seed=args.seed,
        shard_tokens=args.shard_tokens,
        overwrite=args.overwrite,
    )
    s = m["splits"]
    print(
        f"wrote {args.out}: {m['documents']} documents, {m['tokens']} tokens ({m['dtype']}); "
        f"train {s['train']['documents']} / val {s['val']['documents']} documents; skipped "
        f"{m['skipped_empty']} empty, {m['skipped_undecodable']} undecodable, {m['skipped_missing_field']} without "
        f"{args.text_field!r}"
    )
    return 0
