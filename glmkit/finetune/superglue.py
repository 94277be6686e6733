"""The SuperGLUE tasks as the GLM paper fine-tunes them: its patterns and verbalizers (THUDM/GLM
``tasks/superglue/pvp.py``) over the SuperGLUE jsonl files (``train.jsonl`` / ``val.jsonl`` / ``test.jsonl``).

``superglue_task(name, pattern_id)`` builds the ``ClozeTask``; the default pattern is the one the reference's
per-task scripts use (``scripts/finetune_superglue.sh``: RTE 0, CB 3, BoolQ 4, WiC 1, MultiRC 0, COPA 0, WSC 2,
ReCoRD 0). What each jsonl line becomes follows the reference's ``tasks/superglue/dataset.py``: COPA trains on
every row and its mirror (choices swapped); MultiRC gives one row per answer option; ReCoRD one row per query, with
the passage's entities as candidates (in training: per gold answer, that answer and up to 9 other entities); WSC
trains on its positive rows only, generatively (the referent's span likelihood), and is judged right when the
referent is the model's greedy fill of the blank exactly when the row is labelled true.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cloze import ClozeTask
from .data import OnError, Record, read_jsonl
from .tasks import (
    BLANK,
    accuracy,
    accuracy_and_f1_macro,
    lowercase_first,
    multirc_metrics,
    record_metrics,
    remove_final_punc,
    shortenable,
    truth_accuracy,
)

TASKS = ("boolq", "cb", "copa", "rte", "wic", "wsc", "multirc", "record")
DEFAULT_PATTERN = {"rte": 0, "cb": 3, "boolq": 4, "wic": 1, "multirc": 0, "copa": 0, "wsc": 2, "record": 0}
SPLIT_FILES = {"train": "train.jsonl", "val": "val.jsonl", "dev": "val.jsonl", "test": "test.jsonl"}


def load_split(folder: str | Path, split: str, on_error: OnError = "raise") -> list[Record]:
    """The rows of one split of a SuperGLUE task folder (``train``, ``val``/``dev`` or ``test``)."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split: expected one of {sorted(SPLIT_FILES)}, got {split!r}")
    return read_jsonl(Path(folder) / SPLIT_FILES[split], on_error)


def _text(row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise TypeError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _bool_label(row: dict) -> str | None:
    if "label" not in row:
        return None
    if not isinstance(row["label"], bool):
        raise TypeError(f"label must be true or false, got {row['label']!r}")
    return str(row["label"]).lower()


# ---- RTE, CB ---------------------------------------------------------------------------------------------------


def _entailment_pattern(pattern_id: int, cb: bool) -> Callable[[dict], Any]:
    def pattern(row: dict):
        premise, raw_hyp = _text(row, "premise"), _text(row, "hypothesis")
        hyp = raw_hyp.rstrip(string.punctuation)
        if pattern_id == 0:
            return ['"', shortenable(hyp), '" ?'], [BLANK, ', "', shortenable(premise), '"']
        if pattern_id == 1:
            return [shortenable(hyp), "?"], [BLANK, ",", shortenable(" " + premise)]
        if pattern_id == 2:
            return ['"', shortenable(hyp), '" ?'], [BLANK, '. "', shortenable(premise), '"']
        if pattern_id == 3:
            return [shortenable(hyp), "?"], [BLANK, ".", shortenable(" " + premise)]
        if cb:
            return [
                shortenable(premise),
                " question:",
                shortenable(" " + raw_hyp),
                " true, false or neither? answer:",
                BLANK,
            ]
        return [shortenable(premise), " question:", shortenable(" " + hyp), " True or False? answer:", BLANK]

    return pattern


def _rte(pattern_id: int) -> dict:
    words = (" true", " false") if pattern_id == 4 else (" Yes", " No")
    return {
        "pattern": _entailment_pattern(pattern_id, cb=False),
        "verbalizer": dict(zip(("entailment", "not_entailment"), words, strict=True)),
    }


def _cb(pattern_id: int) -> dict:
    words = (" true", " false", " neither") if pattern_id == 4 else (" Yes", " No", " Maybe")
    return {
        "pattern": _entailment_pattern(pattern_id, cb=True),
        "verbalizer": dict(zip(("entailment", "contradiction", "neutral"), words, strict=True)),
        "metric": accuracy_and_f1_macro,
        "metric_names": ("accuracy", "f1_macro"),
    }


# ---- BoolQ, WiC, MultiRC ---------------------------------------------------------------------------------------


def _boolq(pattern_id: int) -> dict:
    def pattern(row: dict):
        passage, question = _text(row, "passage"), _text(row, "question")
        if pattern_id < 2:
            return [shortenable(passage), " Question:", shortenable(" " + question), "? Answer:", BLANK, "."]
        if pattern_id < 4:
            return [
                shortenable(passage),
                " Based on the previous passage,",
                shortenable(" " + question),
                "?",
                BLANK,
                ".",
            ]
        return [
            "Based on the following passage ",
            shortenable(" " + question),
            "?",
            BLANK,
            ".",
            shortenable(" " + passage),
        ]

    words = (" No", " Yes") if pattern_id in (0, 2, 4) else (" false", " true")
    return {"pattern": pattern, "verbalizer": dict(zip(("false", "true"), words, strict=True)), "label": _bool_label}


def _wic(pattern_id: int) -> dict:
    def pattern(row: dict):
        s1, s2, word = _text(row, "sentence1"), _text(row, "sentence2"), _text(row, "word")
        if pattern_id == 0:
            return [shortenable(f'"{s1}" / "{s2}"'), f' Similar sense of "{word}"?', BLANK, "."]
        if pattern_id == 1:
            return [
                shortenable(s1),
                shortenable(" " + s2),
                f" Does {word} have the same meaning in both sentences?",
                BLANK,
            ]
        return [word, " . Sense (1) (a)", shortenable(f' "{s1}"'), " (", BLANK, ') "', s2, '"']

    words = ("2", "b") if pattern_id == 2 else (" No", " Yes")
    return {"pattern": pattern, "verbalizer": dict(zip(("false", "true"), words, strict=True)), "label": _bool_label}


def _multirc_rows(rec: Record, train: bool) -> list[dict]:
    passage = rec.data["passage"]
    text = _text(passage, "text")
    rows = []
    for q in passage["questions"]:
        for a in q["answers"]:
            rows.append({
                "passage": text, "question": _text(q, "question"), "answer": _text(a, "text"),
                "label": a.get("label"), "question_key": (rec.data.get("idx"), q.get("idx")),
            })  # fmt: skip
    return rows


def _multirc(pattern_id: int) -> dict:
    def pattern(row: dict):
        passage = shortenable(remove_final_punc(row["passage"].rstrip()))
        question, answer = remove_final_punc(row["question"].rstrip()), row["answer"]
        if pattern_id == 0:
            return [passage, ". Question:", " " + question, "? Is it", " " + answer, "?", BLANK, "."]
        if pattern_id == 1:
            return [passage, ". Question:", " " + question, '? Is the correct answer "', answer, '"?', BLANK, "."]
        if pattern_id == 2:
            return [passage, ". Based on the previous passage,", " " + question, '? Is "', answer,
                    '" a correct answer?', BLANK, "."]  # fmt: skip
        return [passage, " " + question, "- [", BLANK, "]", answer]

    words = (" False", " True") if pattern_id == 3 else (" No", " Yes")
    return {
        "pattern": pattern,
        "verbalizer": dict(zip((0, 1), words, strict=True)),
        "rows": _multirc_rows,
        "meta": lambda row: {"question": row["question_key"]},
        "metric": multirc_metrics,
        "metric_names": ("f1a", "em", "accuracy"),
        "max_length": 512,
    }


# ---- COPA, WSC, ReCoRD (answers of several tokens) ----------------------------------------------------------


def _copa_rows(rec: Record, train: bool) -> list[dict]:
    row = dict(rec.data)
    if row.get("question") not in ("cause", "effect"):
        raise ValueError(f"question must be 'cause' or 'effect', got {row.get('question')!r}")
    if not train:
        return [row]
    label = row.get("label")
    mirror = {
        **row,
        "choice1": row["choice2"],
        "choice2": row["choice1"],
        "label": None if label is None else 1 - label,
    }
    return [row, mirror]


def _copa(pattern_id: int) -> dict:
    def choice(row: dict, key: str) -> str:
        return remove_final_punc(lowercase_first(_text(row, key)))

    def pattern(row: dict):
        premise = shortenable(remove_final_punc(" " + _text(row, "premise")))
        c1, c2 = choice(row, "choice1"), choice(row, "choice2")
        joiner = " because" if row["question"] == "cause" else ", so"
        if pattern_id == 0:
            return ['"', c1, '" or "', c2, '"?', premise, joiner, BLANK, "."]
        return [c1, " or", " " + c2, "?", premise, joiner, BLANK, "."]

    return {
        "pattern": pattern,
        "choices": lambda row: [" " + choice(row, "choice1"), " " + choice(row, "choice2")],
        "rows": _copa_rows,
    }


def _wsc_rows(rec: Record, train: bool) -> list[dict]:
    row, target = rec.data, rec.data["target"]
    label = row.get("label")
    if train and label is not True:
        return []  # trained generatively: the referent of the positive rows only
    words = _text(row, "text").split()
    i, pronoun = target["span2_index"], _text(target, "span2_text")
    if not 0 <= i < len(words):
        raise ValueError(f"span2_index {i} is outside the text's {len(words)} words")
    if words[i] != pronoun:  # the dataset's indices are off by one in places (the reference corrects them too)
        i = next((j for j in (i - 1, i + 1) if 0 <= j < len(words) and words[j] == pronoun), i)
    if not words[i].startswith(pronoun):
        raise ValueError(f"span2_text {pronoun!r} is not at word {target['span2_index']} of the text")
    words[i] = f"*{words[i]}*"
    out = {"text": " ".join(words), "pronoun": pronoun, "referent": _text(target, "span1_text"), "label": label}
    return [out]


def _wsc(pattern_id: int) -> dict:
    def pattern(row: dict):
        p = row["pronoun"]
        ask = {
            0: f" The pronoun '*{p}*' refers to",
            1: f" In the previous sentence, the pronoun '*{p}*' refers to",
            2: f" Question: In the passage above, what does the pronoun '*{p}*' refer to? Answer:",
        }[pattern_id]
        return [shortenable(row["text"]), ask, BLANK, "."]

    return {
        "pattern": pattern,
        "choices": lambda row: [" " + row["referent"]],
        "label": lambda row: 0 if row["label"] is True else None,
        "rows": _wsc_rows,
        "meta": lambda row: {} if row["label"] is None else {"truth": bool(row["label"])},
        "loss_kind": "mix",
        "decide": "greedy",
        "metric": truth_accuracy,
        "max_length": 128,
    }


def _record_rows(rec: Record, train: bool) -> list[dict]:
    passage = rec.data["passage"]
    raw = _text(passage, "text")
    entities = sorted({raw[e["start"] : e["end"] + 1] for e in passage["entities"]})  # end is inclusive
    text = raw.replace("@highlight\n", "- ")  # as the reference, after GPT-3's handling of the highlights
    rows = []
    for q in rec.data["qas"]:
        query = _text(q, "query")
        if "@placeholder" not in query:
            raise ValueError(f"query {query!r} has no @placeholder")
        answers = sorted({a["text"] for a in q.get("answers", [])})
        base = {"passage": text, "query": query, "answers": answers}
        if not train:
            label = next((i for i, e in enumerate(entities) if e in answers), None) if answers else None
            rows.append({**base, "candidates": entities, "label": label})
            continue
        others = [e for e in entities if e not in answers]
        random.Random(f"{rec.data.get('idx')}-{q.get('idx')}").shuffle(others)
        rows += [{**base, "candidates": [a, *others[:9]], "label": 0} for a in answers]
    return rows


def _record(pattern_id: int) -> dict:
    def pattern(row: dict):
        left, right = row["query"].split("@placeholder", 1)
        return [shortenable(row["passage"]), " " + left.rstrip(), BLANK, right]

    return {
        "pattern": pattern,
        "choices": lambda row: [" " + c for c in row["candidates"]],
        "rows": _record_rows,
        "meta": lambda row: {"answers": tuple(row["answers"])},
        "metric": record_metrics,
        "metric_names": ("em", "f1"),
        "max_length": 512,
    }


_BUILDERS: dict[str, tuple[Callable[[int], dict], int]] = {
    "rte": (_rte, 5),
    "cb": (_cb, 5),
    "boolq": (_boolq, 6),
    "wic": (_wic, 3),
    "multirc": (_multirc, 4),
    "copa": (_copa, 2),
    "wsc": (_wsc, 3),
    "record": (_record, 1),
}


def superglue_task(name: str, pattern_id: int | None = None, **overrides: Any) -> ClozeTask:
    """The ``ClozeTask`` of a SuperGLUE task with GLM's pattern ``pattern_id`` (default: the reference script's);
    ``overrides`` replace ``ClozeTask`` fields (e.g. ``multi_token=True``, ``max_length=128``)."""
    key = name.lower()
    if key not in _BUILDERS:
        raise ValueError(f"task: unknown SuperGLUE task {name!r}; known: {', '.join(TASKS)}")
    build, n_patterns = _BUILDERS[key]
    pattern_id = DEFAULT_PATTERN[key] if pattern_id is None else pattern_id
    if pattern_id not in range(n_patterns):
        raise ValueError(f"pattern_id: {key} has patterns 0..{n_patterns - 1}, got {pattern_id}")
    fields = {"metric": accuracy, "metric_names": ("accuracy",), **build(pattern_id), **overrides}
    return ClozeTask(name=key, **fields)
