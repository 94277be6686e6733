"""Sequence classification and multiple choice with GLM's pooled-[CLS] head (``glmkit.hf.heads``:
``out_proj(dropout(tanh(dense(h)))`` on the ``[CLS]`` hidden state; THUDM/GLM ``PoolingModel``), the paper's
baseline beside cloze fine-tuning, trained through the one loop like every task.

A row is laid out ``[CLS] text <eos>`` (the hub tokenizer's layout, ``glmkit.hf.GLMTokenizerFast``), its text from
``template`` (``{field}`` placeholders). The model is ``GLMForSequenceClassification`` around a glmkit GLM
(``classification_model``), whose ``out/best`` is transformers' folder that ``AutoModelForSequenceClassification``
loads. Multiple choice (``MultipleChoiceTask``) lays out one row per choice, ``[CLS] text choice <eos>``, and the
head's one score per row ranks an example's choices (``GLMForMultipleChoice``); an example with fewer choices than
the widest of its batch gets placeholder rows whose scores are masked out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .data import DataError, Record, as_records, convert
from .tasks import f1_macro
from .template import fill_template, template_fields


@dataclass
class ClassItem:
    ids: list[int]
    label: int  # -1: unlabeled
    pad_id: int
    text: str
    where: str


@dataclass(frozen=True)
class ClassificationTask:
    """Rows ``{fields of template..., label_field: one of labels}`` → one of ``labels`` by the pooled-[CLS] head."""

    labels: tuple[Any, ...]
    name: str = "classification"
    template: str = "{text}"
    label_field: str = "label"
    max_length: int = 256
    metric_names: tuple[str, ...] = ("accuracy", "f1_macro")

    def __post_init__(self) -> None:
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels: need two or more distinct labels, got {list(self.labels)}")
        template_fields(self.template)
        if self.max_length < 3:
            raise ValueError(f"max_length: must be at least 3, got {self.max_length}")

    def _item(self, tokenizer, rec: Record, train: bool) -> list[ClassItem]:
        sp = tokenizer.special
        text = fill_template(self.template, rec.data)
        value = rec.data.get(self.label_field)
        if value is None and train:
            raise DataError(f"{rec.where}: a training row needs {self.label_field!r}")
        if value is not None and value not in self.labels:
            raise DataError(f"{rec.where}: label {value!r} is not one of {list(self.labels)}")
        ids = [sp.cls, *tokenizer.encode(text)[: self.max_length - 2], sp.eos]
        label = -1 if value is None else self.labels.index(value)
        return [ClassItem(ids, label, sp.pad, text, rec.where)]

    def prepare(self, tokenizer, rows, *, train: bool, on_error: str = "raise") -> list[ClassItem]:
        return [it for _, it in convert(as_records(rows), lambda r: self._item(tokenizer, r, train), on_error)]

    def collate(self, items: Sequence[ClassItem]) -> dict:
        if not items:
            raise ValueError("collate: no examples")
        width = max(len(it.ids) for it in items)
        ids = torch.tensor([it.ids + [it.pad_id] * (width - len(it.ids)) for it in items])
        mask = torch.tensor([[1] * len(it.ids) + [0] * (width - len(it.ids)) for it in items])
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([it.label for it in items])}

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits = model(batch["input_ids"], batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"])

    @torch.no_grad()
    def probabilities(self, model: torch.nn.Module, items: Sequence[ClassItem], batch_size: int = 16):
        """``[N, labels]`` softmax of the head's logits, in the order of ``items``."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = []
        try:
            for i in range(0, len(items), batch_size):
                b = self.collate(items[i : i + batch_size])
                logits = model(b["input_ids"].to(device), b["attention_mask"].to(device)).logits
                out.append(torch.softmax(logits.float(), -1).cpu())
        finally:
            model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def metrics(self, items: Sequence[ClassItem], probs: torch.Tensor) -> dict[str, float]:
        labelled = [(i, it.label) for i, it in enumerate(items) if it.label >= 0]
        if not labelled:
            return {}
        rows, golds = [i for i, _ in labelled], [g for _, g in labelled]
        preds = probs[rows].argmax(-1).tolist()
        nll = -torch.log(probs[rows, golds].clamp_min(1e-12)).mean()
        return {
            "loss": float(nll),
            "accuracy": sum(p == g for p, g in zip(preds, golds, strict=True)) / len(golds),
            "f1_macro": f1_macro(golds, preds, len(self.labels)),
        }

    def evaluate(self, model: torch.nn.Module, items: Sequence[ClassItem], batch_size: int = 16) -> dict:
        return self.metrics(items, self.probabilities(model, items, batch_size))


@dataclass
class ChoiceItem:
    rows: list[list[int]]  # one [CLS] text choice <eos> row per choice
    label: int
    pad_id: int
    text: str
    choices: list[str]
    where: str


@dataclass(frozen=True)
class MultipleChoiceTask:
    """Rows ``{fields of template..., choices_field: [text, ...], label_field: index}``: the right choice by the
    pooled-[CLS] score of each ``[CLS] text choice <eos>`` row."""

    name: str = "multiple_choice"
    template: str = "{text}"
    choices_field: str = "choices"
    label_field: str = "label"
    max_length: int = 256
    metric_names: tuple[str, ...] = ("accuracy",)

    def __post_init__(self) -> None:
        template_fields(self.template)
        if self.max_length < 4:
            raise ValueError(f"max_length: must be at least 4, got {self.max_length}")

    def _item(self, tokenizer, rec: Record, train: bool) -> list[ChoiceItem]:
        sp = tokenizer.special
        text, choices = fill_template(self.template, rec.data), rec.data[self.choices_field]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{rec.where}: {self.choices_field!r} must be a list of two or more texts")
        label = rec.data.get(self.label_field)
        if label is None and train:
            raise DataError(f"{rec.where}: a training row needs {self.label_field!r}")
        if label is not None and (isinstance(label, bool) or label not in range(len(choices))):
            raise DataError(f"{rec.where}: label {label!r} is not an index into its {len(choices)} choices")
        context = tokenizer.encode(text)
        rows = []
        for choice in choices:  # the context loses tokens from its end; the choice is kept whole
            answer = tokenizer.encode(" " + choice)[: self.max_length - 3]
            rows.append([sp.cls, *context[: self.max_length - 2 - len(answer)], *answer, sp.eos])
        return [ChoiceItem(rows, -1 if label is None else label, sp.pad, text, list(choices), rec.where)]

    def prepare(self, tokenizer, rows, *, train: bool, on_error: str = "raise") -> list[ChoiceItem]:
        return [it for _, it in convert(as_records(rows), lambda r: self._item(tokenizer, r, train), on_error)]

    def collate(self, items: Sequence[ChoiceItem]) -> dict:
        if not items:
            raise ValueError("collate: no examples")
        n_choices = max(len(it.rows) for it in items)
        width = max(len(r) for it in items for r in it.rows)
        ids = torch.full((len(items), n_choices, width), items[0].pad_id)
        mask = torch.zeros_like(ids)
        for b, it in enumerate(items):
            rows = it.rows + [it.rows[0][:1] + it.rows[0][-1:]] * (n_choices - len(it.rows))  # [CLS] <eos>
            for c, row in enumerate(rows):
                ids[b, c, : len(row)], mask[b, c, : len(row)] = torch.tensor(row), 1
        valid = torch.tensor([[c < len(it.rows) for c in range(n_choices)] for it in items])
        labels = torch.tensor([it.label for it in items])
        return {"input_ids": ids, "attention_mask": mask, "choice_mask": valid, "labels": labels}

    def scores(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits = model(batch["input_ids"], batch["attention_mask"]).logits.float()
        return logits.masked_fill(~batch["choice_mask"].to(logits.device), float("-inf"))

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self.scores(model, batch), batch["labels"])

    @torch.no_grad()
    def probabilities(self, model: torch.nn.Module, items: Sequence[ChoiceItem], batch_size: int = 16):
        """Each item's softmax over its own choices, in order."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out: list[torch.Tensor] = []
        try:
            for i in range(0, len(items), batch_size):
                chunk = items[i : i + batch_size]
                b = {k: v.to(device) for k, v in self.collate(chunk).items()}
                probs = torch.softmax(self.scores(model, b), -1).cpu()
                out += [probs[j, : len(it.rows)] for j, it in enumerate(chunk)]
        finally:
            model.train(was_training)
        return out

    def metrics(self, items: Sequence[ChoiceItem], probs: Sequence[torch.Tensor]) -> dict[str, float]:
        labelled = [(p, it.label) for p, it in zip(probs, items, strict=True) if it.label >= 0]
        if not labelled:
            return {}
        return {
            "loss": float(sum(-torch.log(p[g].clamp_min(1e-12)) for p, g in labelled) / len(labelled)),
            "accuracy": sum(int(p.argmax()) == g for p, g in labelled) / len(labelled),
        }

    def evaluate(self, model: torch.nn.Module, items: Sequence[ChoiceItem], batch_size: int = 16) -> dict:
        return self.metrics(items, self.probabilities(model, items, batch_size))


def classification_model(
    glm: torch.nn.Module, task: ClassificationTask | MultipleChoiceTask, tokenizer
) -> torch.nn.Module:
    """The pooled-[CLS] head model of ``task`` around ``glm`` (weights shared), the head new."""
    from ..hf.heads import GLMForMultipleChoice, GLMForSequenceClassification

    if isinstance(task, MultipleChoiceTask):
        return GLMForMultipleChoice.from_glm(glm, tokenizer.special)
    names = {i: str(label) for i, label in enumerate(task.labels)}
    return GLMForSequenceClassification.from_glm(
        glm, tokenizer.special, num_labels=len(task.labels), id2label=names, label2id={v: k for k, v in names.items()}
    )
