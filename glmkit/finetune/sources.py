"""Task data from files: jsonl (``read_jsonl``: every row keeps its line), csv / tsv and parquet (read by the
``datasets`` library), ``hf:NAME[:SPLIT]`` (a hub dataset through ``datasets.load_dataset``, or a folder written by
``Dataset.save_to_disk``) and plain text (one row ``{"text": ...}`` per file, for language-model tasks).

Rows of csv / parquet / ``hf:`` are named ``FILE row N`` (1-based, the header not counted), so a row found bad later
(a missing field, a label the task lacks) is still named. A csv line that does not parse (a wrong number of fields)
stops the run naming pandas' line number, or with ``on_error="skip"`` is reported with its line and left out.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .data import DataError, OnError, Record, check_on_error, read_jsonl

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")


def read_rows(spec: str | Path, on_error: OnError = "raise") -> list[Record]:
    """The rows of a data file or ``hf:`` dataset (see the module notes); the format comes from the suffix."""
    check_on_error(on_error)
    text = str(spec)
    if text.startswith("hf:"):
        return _hf_rows(text[3:], on_error)
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path, on_error)
    if suffix == ".txt":
        return [Record({"text": path.read_text(encoding="utf-8")}, 0, str(path))]
    if suffix in (".csv", ".tsv"):
        return _csv_rows(path, on_error)
    if suffix == ".parquet":
        from datasets import Dataset

        try:
            ds = Dataset.from_parquet(str(path), keep_in_memory=True)
        except Exception as e:  # pyarrow's and datasets' errors alike: the file is unreadable as parquet
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {_first_line(e)})") from e
        return _records(ds, str(path))
    raise ValueError(f"{path}: unknown data format {suffix!r}; expected one of {', '.join(SUFFIXES)} or hf:NAME")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _records(ds, source: str) -> list[Record]:
    return [Record(dict(row), 0, f"{source} row {i}") for i, row in enumerate(ds, start=1)]


def _csv_rows(path: Path, on_error: OnError) -> list[Record]:
    from datasets import Dataset

    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = Dataset.from_csv(
                str(path), sep=sep, keep_in_memory=True, on_bad_lines="error" if on_error == "raise" else "warn"
            )
        except Exception as e:  # pandas' ParserError (wrapped by datasets) names the line
            cause = e.__cause__ or e.__context__ or e
            raise DataError(f"{path}: {_first_line(cause)}") from e
    for w in caught:  # pandas reports each skipped line as "Skipping line N: ..."
        if "line" in str(w.message):
            warnings.warn(f"skipped: {path}: {str(w.message).strip()}", stacklevel=2)
    return _records(ds, str(path))


def _hf_rows(spec: str, on_error: OnError) -> list[Record]:
    """``NAME[:SPLIT]``: a ``save_to_disk`` folder, or a dataset ``datasets.load_dataset`` finds."""
    import datasets

    name, sep, split = spec.rpartition(":")
    if not sep or "/" in split or not name:
        name, split = spec, ""
    if not name:
        raise ValueError("hf: expected hf:NAME or hf:NAME:SPLIT")
    if Path(name).is_dir() and any(Path(name).glob("*.json")):
        ds = datasets.load_from_disk(name)
    else:
        try:
            ds = datasets.load_dataset(name, split=split or None)
        except Exception as e:
            raise DataError(f"hf:{spec}: cannot load the dataset ({type(e).__name__}: {_first_line(e)})") from e
    if isinstance(ds, datasets.DatasetDict):
        splits = sorted(ds)
        if not split and len(splits) == 1:
            split = splits[0]
        if split not in ds:
            raise ValueError(f"hf:{spec}: name a split as hf:NAME:SPLIT; the dataset has {splits}")
        ds = ds[split]
    return _records(ds, f"hf:{name}" + (f"[{split}]" if split else ""))
