"""What a fine-tuning task is made of: patterns with one blank, the examples rows become, and the metrics.

A pattern (PET, Schick & Schütze 2021; THUDM/GLM ``tasks/superglue/pvp.py``) turns a row into text with one blank:
a list of parts, each a string, a ``Shortenable`` string (cut first, from its end, when the text does not fit) or
``BLANK``. A pattern may also return two lists ``(parts_a, parts_b)``: they are laid out one after the other (GLM's
patterns add no separator), and the split only decides truncation, which takes tokens from the side with more
shortenable text — as the reference's ``PVP.truncate``.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class _Blank:
    def __repr__(self) -> str:
        return "BLANK"


BLANK = _Blank()
"""The one blank of a pattern: [MASK] in Part A, the answer in Part B."""


@dataclass(frozen=True)
class Shortenable:
    """Pattern text that may lose tokens from its end when the example does not fit ``max_length``."""

    text: str


Part = str | Shortenable | _Blank


def shortenable(text: str) -> Shortenable:
    return Shortenable(text)


def remove_final_punc(text: str) -> str:
    return text.rstrip(string.punctuation)


def lowercase_first(text: str) -> str:
    return text[:1].lower() + text[1:]


@dataclass(frozen=True)
class ClozeExample:
    """A row under a pattern: the text around the blank, the answers that may fill it, and which one is right.

    ``candidates`` are answer texts (the verbalizer's words in label order, or a row's own choices); ``label`` is
    the index of the right one (``None``: unlabeled). ``meta`` carries what a metric groups or compares by.
    """

    parts_a: tuple[Part, ...]
    parts_b: tuple[Part, ...]
    candidates: tuple[str, ...]
    label: int | None
    where: str = ""
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


class Task(Protocol):
    """What ``finetune`` / ``evaluate_task`` need of a task (``ClozeTask``, ``Seq2SeqTask``)."""

    name: str
    metric_names: tuple[str, ...]

    def prepare(self, tokenizer: Any, rows: Sequence[Any], *, train: bool, on_error: str = "raise") -> list[Any]:
        """Token-level items of ``rows`` (records or dicts); ``train``: rows the task trains on."""
        ...

    def collate(self, items: Sequence[Any]) -> dict:
        """One batch of items, as ``glmkit.train.loop.fit`` takes it."""
        ...

    def loss(self, model: Any, batch: dict) -> Any:
        """The training loss of a batch (a scalar tensor)."""
        ...

    def evaluate(self, model: Any, items: Sequence[Any], batch_size: int = 16) -> dict[str, float]:
        """Held-out metrics of ``items`` (``loss`` among them)."""
        ...


# ---- metrics ---------------------------------------------------------------------------------------------------


def accuracy(examples: Sequence[ClozeExample], predictions: Sequence[int]) -> dict[str, float]:
    labelled = [(e.label, p) for e, p in zip(examples, predictions, strict=True) if e.label is not None]
    return {"accuracy": sum(g == p for g, p in labelled) / max(len(labelled), 1)}


def f1_macro(golds: Sequence[int], preds: Sequence[int], n_classes: int) -> float:
    """Mean over classes of F1 (a class never predicted nor present scores 0, as scikit-learn's default)."""
    scores = []
    for c in range(n_classes):
        tp = sum(g == c and p == c for g, p in zip(golds, preds, strict=True))
        fp = sum(g != c and p == c for g, p in zip(golds, preds, strict=True))
        fn = sum(g == c and p != c for g, p in zip(golds, preds, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / n_classes


def accuracy_and_f1_macro(examples: Sequence[ClozeExample], predictions: Sequence[int]) -> dict[str, float]:
    """CB's metrics: accuracy and macro-F1 over its labels."""
    pairs = [(e.label, p) for e, p in zip(examples, predictions, strict=True) if e.label is not None]
    n = max((len(e.candidates) for e in examples), default=1)
    golds, preds = [g for g, _ in pairs], [p for _, p in pairs]
    return {**accuracy(examples, predictions), "f1_macro": f1_macro(golds, preds, n)}


def multirc_metrics(examples: Sequence[ClozeExample], predictions: Sequence[int]) -> dict[str, float]:
    """MultiRC: F1 over all answer options (``f1a``, positive label 1 = " Yes"), exact match per question (``em``,
    every option of the question right) and accuracy. Questions are told apart by (passage, question) index."""
    golds = [e.label for e in examples]
    tp = sum(g == 1 and p == 1 for g, p in zip(golds, predictions, strict=True))
    fp = sum(g == 0 and p == 1 for g, p in zip(golds, predictions, strict=True))
    fn = sum(g == 1 and p == 0 for g, p in zip(golds, predictions, strict=True))
    per_q: dict[Any, bool] = defaultdict(lambda: True)
    for e, g, p in zip(examples, golds, predictions, strict=True):
        per_q[e.meta["question"]] &= g == p
    return {
        "f1a": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
        "em": sum(per_q.values()) / max(len(per_q), 1),
        **accuracy(examples, predictions),
    }


def normalize_answer(text: str) -> str:
    """SQuAD/ReCoRD answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def record_metrics(examples: Sequence[ClozeExample], predictions: Sequence[int]) -> dict[str, float]:
    """ReCoRD: exact match and token F1 of the chosen entity against the best of the gold answers (the official
    ReCoRD v1.0 evaluation)."""
    em = f1 = 0.0
    for e, p in zip(examples, predictions, strict=True):
        chosen, golds = e.candidates[p].strip(), e.meta.get("answers", ())
        if golds:
            em += max(float(normalize_answer(chosen) == normalize_answer(g)) for g in golds)
            f1 += max(token_f1(chosen, g) for g in golds)
    n = max(len(examples), 1)
    return {"em": em / n, "f1": f1 / n}


def truth_accuracy(examples: Sequence[ClozeExample], predictions: Sequence[int]) -> dict[str, float]:
    """Accuracy of a yes/no decision (prediction 1 = true) against ``meta["truth"]`` (WSC without candidates)."""
    pairs = [(e.meta["truth"], p) for e, p in zip(examples, predictions, strict=True) if "truth" in e.meta]
    return {"accuracy": sum(int(t) == p for t, p in pairs) / max(len(pairs), 1)}
