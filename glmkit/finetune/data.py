"""Task data: jsonl rows that remember where they came from, the bad-row policy, and deterministic epochs.

Every row keeps its file and line, so a problem found anywhere later (a label the verbalizer lacks, a field of the
wrong type, a text too long to fit) names the line it is on. A bad row either stops the run (``on_error="raise"``,
the default) or is reported with a warning and left out (``"skip"``).
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

OnError = Literal["raise", "skip"]


class DataError(ValueError):
    """A row that cannot be used; the message names its file and line."""


@dataclass(frozen=True)
class Record:
    """One row of task data: the parsed object and where it was read (``line`` is 1-based; 0 = not from a file)."""

    data: dict[str, Any]
    line: int = 0
    source: str = "<rows>"

    @property
    def where(self) -> str:
        return f"{self.source} line {self.line}" if self.line else self.source


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")


def report(problem: DataError, on_error: OnError) -> None:
    """Apply the bad-row policy to ``problem``: raise it, or warn and let the caller skip the row."""
    if on_error == "raise":
        raise problem
    warnings.warn(f"skipped: {problem}", stacklevel=3)


def read_jsonl(path: str | Path, on_error: OnError = "raise") -> list[Record]:
    """The rows of a jsonl file (one JSON object a line; blank lines are ignored). A line that is not valid JSON or
    not an object is a ``DataError`` naming the file and line, or (``on_error="skip"``) a warning."""
    check_on_error(on_error)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such jsonl file")
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                report(DataError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})"), on_error)
                continue
            if not isinstance(row, dict):
                report(DataError(f"{path} line {n}: expected a JSON object, found {type(row).__name__}"), on_error)
                continue
            records.append(Record(row, n, str(path)))
    return records


def as_records(rows: Sequence[Record | dict[str, Any]]) -> list[Record]:
    """Rows given in memory (dicts) numbered 1, 2, ... as if read from a file; records pass through."""
    out = []
    for i, r in enumerate(rows, start=1):
        if isinstance(r, Record):
            out.append(r)
        elif isinstance(r, dict):
            out.append(Record(r, i, "<rows>"))
        else:
            raise TypeError(f"rows: item {i} is a {type(r).__name__}, expected a dict or a Record")
    return out


def convert(
    records: Sequence[Record], fn: Callable[[Record], list[Any]], on_error: OnError = "raise"
) -> Iterator[tuple[Record, Any]]:
    """``fn`` over each record, each of its results paired with the record. A ``KeyError`` / ``TypeError`` /
    ``ValueError`` from ``fn`` (a missing field, a wrong type) becomes a ``DataError`` naming the record's line, then
    the bad-row policy applies."""
    check_on_error(on_error)
    for rec in records:
        try:
            items = fn(rec)
        except DataError as e:
            report(e, on_error)
            continue
        except KeyError as e:
            report(DataError(f"{rec.where}: missing field {e.args[0]!r}"), on_error)
            continue
        except (TypeError, ValueError, AttributeError, IndexError) as e:
            report(DataError(f"{rec.where}: {e}"), on_error)
            continue
        for item in items:
            yield rec, item


def epoch_source(n_items: int, batch_size: int, seed: int, make_batch: Callable[[list[int]], dict]):
    """A ``BatchSource`` (micro-batch index → batch) over ``n_items`` items in epochs, each a fresh seeded shuffle.

    Batch ``i`` is a pure function of ``(seed, i)``, which is what makes a resumed fine-tuning run exact. The last
    batch of an epoch may be short; no item is dropped or repeated within an epoch.
    """
    if n_items <= 0:
        raise ValueError("no training examples")
    per_epoch = math.ceil(n_items / batch_size)

    def source(index: int) -> dict:
        epoch, j = divmod(index, per_epoch)
        order = list(range(n_items))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        return make_batch(order[j * batch_size : (j + 1) * batch_size])

    return source


def steps_per_epoch(n_items: int, batch_size: int) -> int:
    return math.ceil(n_items / batch_size)


def collate_samples(items: Sequence[Any], objective: str) -> dict:
    """A training batch of items that each hold one laid-out ``sample`` (``masks.BlankSample``) and ``pad_id``."""
    from ..masks import collate

    if not items:
        raise ValueError("collate: no examples")
    batch = collate([it.sample for it in items], pad_id=items[0].pad_id)
    batch["objective"] = objective
    return batch
