"""Question sets from files, in the layouts the medical QA benchmarks ship, as ``Question`` objects:

- ``medqa``: jsonl rows ``{"question", "options": {letter: text}, "answer_idx", "answer"?, "meta_info"?}`` (the MedQA
  USMLE release; 4 or 5 options). ``answer``, where given, must be the text of option ``answer_idx``.
- ``medmcqa``: rows ``{"question", "opa".."opd", "cop", "exp"?, "subject_name"?, "topic_name"?, "choice_type"?,
  "id"?}``. ``cop`` counts from 1 in the MedMCQA GitHub release (``"cop": 1`` is option a) and from 0 in the Hugging
  Face copy (a ``ClassLabel`` over a..d). ``cop_base="auto"`` decides per file: a 0 anywhere means 0-based, a 4
  anywhere 1-based, both is an error, and a file with only 1..3 is read as the Hugging Face layout (0-based) with a
  warning; give ``cop_base=0`` or ``1`` to say it. A ``cop`` of ``"a"``..``"d"`` is read as the letter.
- ``pubmedqa``: the original ``{pubid: {"QUESTION", "CONTEXTS", "final_decision", ...}}`` json, or jsonl / a json
  list of such rows (or of the Hugging Face rows ``{"pubid", "question", "context": {"contexts"}, "final_decision"}``);
  options (A) yes (B) no (C) maybe, the contexts joined as the question's context.
- ``glmkit``: jsonl rows with ``Question``'s own fields (``id``, ``question``, ``options``, ``answer``, ``reference``,
  ``context``, ``subject``, ``qtype``, ``source``, ``meta``); other keys go into ``meta``.

``layout="auto"`` tells them apart by the first row's keys. A malformed row is a ``DataError`` naming the file and
line (``on_error="raise"``) or a warning and left out (``"skip"``); the returned ``QuestionSet`` counts those.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from ..finetune.data import DataError, OnError, check_on_error, report
from .types import ABSTAIN, Question

Layout = Literal["auto", "medqa", "medmcqa", "pubmedqa", "glmkit"]
LAYOUTS = ("auto", "medqa", "medmcqa", "pubmedqa", "glmkit")
PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
_MEDMCQA_KEYS = ("opa", "opb", "opc", "opd")


class QuestionSet(list):
    """The questions read from a file (a ``list[Question]``), with how many rows were skipped and why."""

    def __init__(self, questions: list[Question], skipped: list[str], layout: str) -> None:
        super().__init__(questions)
        self.errors = skipped
        self.layout = layout

    @property
    def skipped(self) -> int:
        return len(self.errors)


def load_questions(
    path: str | Path, layout: Layout = "auto", on_error: OnError = "skip", *, cop_base: Literal["auto", 0, 1] = "auto"
) -> QuestionSet:
    """The questions of ``path`` (see the module's notes for the layouts and the bad-row policy)."""
    check_on_error(on_error)
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if cop_base not in ("auto", 0, 1):
        raise ValueError(f"cop_base: expected 'auto', 0 or 1, got {cop_base!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such question file")
    errors: list[str] = []

    def bad(problem: str) -> None:
        report(DataError(problem), on_error)
        errors.append(problem)

    entries = _rows(path)
    rows = [(line, key, row) for line, key, row in entries if isinstance(row, dict)]
    if layout == "auto":
        layout = _detect(path, rows)
    readers = {"medqa": _medqa, "pubmedqa": _pubmedqa, "glmkit": _glmkit}
    convert = readers[layout] if layout in readers else _medmcqa_reader(path, rows, cop_base)
    out: list[Question] = []
    ids: set[str] = set()
    for line, key, row in entries:  # in file order, so that on_error="raise" stops at the first bad row
        where = f"{path} line {line}" if line else f"{path} entry {key!r}"
        if isinstance(row, str):
            bad(f"{where}: {row}")
            continue
        try:
            q = convert(row, key or f"{path.stem}-{line}")
        except (KeyError, TypeError, ValueError) as e:
            detail = f"missing field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
            bad(f"{where}: {detail}")
            continue
        if q.id in ids:
            bad(f"{where}: the id {q.id!r} was used by an earlier row")
            continue
        ids.add(q.id)
        out.append(replace(q, line=line, source=q.source or layout))
    return QuestionSet(out, errors, layout)


def _rows(path: Path) -> list[tuple[int, str | None, dict | str]]:
    """(line, key, row or what is wrong with it) of each entry: jsonl rows by line; a json document's list items or
    ``{id: row}`` entries (line 0, their index or key)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from e
        if isinstance(doc, dict):
            items = [(str(k), v) for k, v in doc.items()]
        elif isinstance(doc, list):
            items = [(f"{path.stem}-{i}", v) for i, v in enumerate(doc)]
        else:
            raise DataError(f"{path}: expected a JSON object or list, found {type(doc).__name__}")
        return [(0, key, _object(row)) for key, row in items]
    out: list[tuple[int, str | None, dict | str]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append((n, None, _object(json.loads(line))))
            except json.JSONDecodeError as e:
                out.append((n, None, f"not valid JSON ({e.msg} at column {e.colno})"))
    return out


def _object(row: Any) -> dict | str:
    return row if isinstance(row, dict) else f"expected a JSON object, found {type(row).__name__}"


def _detect(path: Path, rows: list[tuple[int, str | None, dict]]) -> str:
    if not rows:
        raise DataError(f"{path}: no questions to read")
    keys = set(rows[0][2])
    if "answer_idx" in keys:
        return "medqa"
    if "cop" in keys or "opa" in keys:
        return "medmcqa"
    if keys & {"QUESTION", "final_decision", "CONTEXTS"}:
        return "pubmedqa"
    if "question" in keys:
        return "glmkit"
    raise DataError(f"{path}: cannot tell the layout from the first row's keys {sorted(keys)}; pass layout=")


def _text(row: Mapping[str, Any], key: str) -> str:
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {key!r} must be non-empty text, got {value!r}")
    return value.strip()


def _options(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"field 'options' must map letters to text, got {value!r}")
    out = {}
    for letter, text in value.items():
        if not (isinstance(letter, str) and len(letter) == 1 and letter.isupper()):
            raise ValueError(f"option letter {letter!r} is not one capital letter")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"option {letter} must be non-empty text, got {text!r}")
        out[letter] = text.strip()
    return out


def _medqa(row: dict, default_id: str) -> Question:
    options = _options(row["options"])
    letter = _text(row, "answer_idx")
    if letter not in options:
        raise ValueError(f"answer_idx {letter!r} is not among the options {list(options)}")
    if row.get("answer") is not None and str(row["answer"]).strip() != options[letter]:
        raise ValueError(f"answer {row['answer']!r} is not the text of option {letter} ({options[letter]!r})")
    meta = {k: v for k, v in row.items() if k not in ("question", "options", "answer_idx", "answer", "id")}
    return Question(str(row.get("id", default_id)), _text(row, "question"), options, letter, meta=meta)


def _medmcqa_reader(path: Path, rows: list[tuple[int, str | None, dict]], cop_base: Any) -> Callable:
    base = cop_base
    if base == "auto":
        cops = {r.get("cop") for _, _, r in rows if isinstance(r.get("cop"), int)}
        if 0 in cops and 4 in cops:
            raise DataError(f"{path}: 'cop' holds both 0 and 4: pass cop_base=0 or 1 to say how it counts")
        base = 0 if 0 in cops else 1 if 4 in cops else None
        if base is None and cops:
            warnings.warn(f"{path}: 'cop' is only ever 1..3, read as 0-based (Hugging Face's layout)", stacklevel=3)
        base = base or 0

    def convert(row: dict, default_id: str) -> Question:
        options = {"ABCD"[i]: _text(row, key) for i, key in enumerate(_MEDMCQA_KEYS)}
        cop = row["cop"]
        if isinstance(cop, str) and cop.lower() in ("a", "b", "c", "d"):
            letter = cop.upper()
        elif isinstance(cop, int) and not isinstance(cop, bool) and 0 <= cop - base < 4:
            letter = "ABCD"[cop - base]
        else:
            raise ValueError(f"cop {cop!r} is not an option ({base}-based index or a..d)")
        meta = {k: row[k] for k in ("exp", "topic_name") if row.get(k)}
        return Question(
            str(row.get("id") or default_id),
            _text(row, "question"),
            options,
            letter,
            subject=row.get("subject_name") or None,
            qtype=row.get("choice_type") or None,
            meta=meta,
        )

    return convert


def _pubmedqa(row: dict, default_id: str) -> Question:
    question = _text(row, "QUESTION" if "QUESTION" in row else "question")
    contexts = row["CONTEXTS"] if "CONTEXTS" in row else row["context"]
    if isinstance(contexts, dict):  # Hugging Face: {"contexts": [...], "labels": [...], "meshes": [...]}
        contexts = contexts["contexts"]
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise ValueError(f"the contexts must be a list of text, got {contexts!r}")
    decision = str(row["final_decision"]).strip().lower()
    letter = next((k for k, v in PUBMEDQA_OPTIONS.items() if v == decision), None)
    if letter is None:
        raise ValueError(f"final_decision {row['final_decision']!r} is not yes, no or maybe")
    meta = {k: row[k] for k in ("LONG_ANSWER", "long_answer", "YEAR", "reasoning_required_pred") if row.get(k)}
    return Question(
        str(row.get("pubid") or default_id),
        question,
        dict(PUBMEDQA_OPTIONS),
        letter,
        context=" ".join(c.strip() for c in contexts) or None,
        meta=meta,
    )


_FIELDS = ("id", "question", "options", "answer", "reference", "context", "subject", "qtype", "source", "meta")


def _glmkit(row: dict, default_id: str) -> Question:
    options = _options(row["options"]) if row.get("options") else {}
    answer = row.get("answer")
    if answer is not None and options and answer != ABSTAIN and answer not in options:
        raise ValueError(f"answer {answer!r} is not among the options {list(options)} (or {ABSTAIN})")
    for key in ("reference", "context", "subject", "qtype", "source"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f"field {key!r} must be text, got {row[key]!r}")
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"field 'meta' must be an object, got {meta!r}")
    meta = {**meta, **{k: v for k, v in row.items() if k not in _FIELDS}}
    return Question(
        str(row.get("id") or default_id),
        _text(row, "question"),
        options,
        answer if answer is None else str(answer),
        reference=row.get("reference"),
        context=row.get("context"),
        subject=row.get("subject"),
        qtype=row.get("qtype"),
        source=row.get("source") or "",
        meta=meta,
    )
