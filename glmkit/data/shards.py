"""The on-disk format of prepared pretraining data: token shards, offsets and a manifest (see ``prepare``).

Kept apart from the preparation code so that training imports only this reader: numpy memory maps, no
``datasets``, no tokenizer.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..config import SpecialTokens

MANIFEST = "manifest.json"
FORMAT = "glmkit.token_shards/1"


class TokenShards:
    """The documents of one split of prepared data: ``docs[i]`` is a memory-mapped token array (no eos).

    ``lengths`` (int64, one per document) lets ``PackedDataset`` weight documents without reading them.
    """

    def __init__(self, path: str | Path, split: str = "train") -> None:
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise FileNotFoundError(f"{self.path}: no {MANIFEST}; run `glmkit prepare-data` first")
        self.manifest = json.loads((self.path / MANIFEST).read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{self.path}: unknown format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        if split not in self.manifest["splits"]:
            raise ValueError(f"split: {split!r} is not one of {sorted(self.manifest['splits'])}")
        self.split = split
        shards = self.manifest["splits"][split]["shards"]
        dtype = np.dtype(self.manifest["dtype"])
        self._tokens = [np.memmap(self.path / s["tokens_file"], dtype=dtype, mode="r") for s in shards]
        self._offsets = [np.load(self.path / s["offsets_file"], mmap_mode="r") for s in shards]
        self._first = np.cumsum([0] + [len(o) - 1 for o in self._offsets])
        self.lengths = np.concatenate([np.diff(o) for o in self._offsets]) if shards else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"document {index} is outside the {self.split} split of {n} documents")
        index %= n
        shard = int(np.searchsorted(self._first, index, side="right")) - 1
        offsets = self._offsets[shard]
        local = index - int(self._first[shard])
        return self._tokens[shard][int(offsets[local]) : int(offsets[local + 1])]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def special(self) -> SpecialTokens:
        return SpecialTokens.from_dict(self.manifest["special_tokens"])

    @property
    def sentence_end_ids(self) -> list[int]:
        return list(self.manifest["sentence_end_ids"])


@dataclass
class ShardWriter:
    """Appends the documents of one split to shard files of about ``shard_tokens`` tokens each."""

    out: Path
    split: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    _file: BinaryIO | None = None
    _offsets: array = field(default_factory=lambda: array("q", [0]))

    def add(self, doc: np.ndarray) -> None:
        if self._file is not None and self._offsets[-1] + doc.size > self.shard_tokens:
            self._close_shard()
        if self._file is None:
            self._file = open(self.out / f"{self._name()}.bin", "wb", buffering=1 << 20)
        doc.astype(self.dtype).tofile(self._file)
        self._offsets.append(self._offsets[-1] + doc.size)

    def finish(self) -> dict[str, Any]:
        if self._file is not None:
            self._close_shard()
        return {
            "documents": sum(s["documents"] for s in self.shards),
            "tokens": sum(s["tokens"] for s in self.shards),
            "shards": self.shards,
        }

    def discard(self) -> None:
        """Remove every file written (after a failure)."""
        if self._file is not None:
            self._file.close()
            self.shards.append({"tokens_file": f"{self._name()}.bin", "offsets_file": f"{self._name()}.idx.npy"})
        for s in self.shards:
            for key in ("tokens_file", "offsets_file"):
                (self.out / s[key]).unlink(missing_ok=True)
        self._file, self.shards = None, []

    def _name(self) -> str:
        return f"{self.split}-{len(self.shards):05d}"

    def _close_shard(self) -> None:
        assert self._file is not None
        self._file.close()
        name = self._name()
        np.save(self.out / f"{name}.idx.npy", np.frombuffer(self._offsets, dtype=np.int64))
        self.shards.append(
            {
                "tokens_file": f"{name}.bin",
                "offsets_file": f"{name}.idx.npy",
                "documents": len(self._offsets) - 1,
                "tokens": int(self._offsets[-1]),
            }
        )
        self._file, self._offsets = None, array("q", [0])


def remove_prepared(out: Path) -> None:
    """Delete the manifest and every shard it lists."""
    manifest = json.loads((out / MANIFEST).read_text())
    for split in manifest.get("splits", {}).values():
        for s in split["shards"]:
            for key in ("tokens_file", "offsets_file"):
                (out / s[key]).unlink(missing_ok=True)
    (out / MANIFEST).unlink()


def write_manifest(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` last and atomically (a folder with a manifest is complete); returns what it wrote."""
    manifest = {"format": FORMAT, **manifest}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    tmp.replace(out / MANIFEST)
    return manifest
