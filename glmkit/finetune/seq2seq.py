"""Sequence-to-sequence fine-tuning (THUDM/GLM ``tasks/seq2seq``): the source is Part A with one blank, the target
is trained as that blank's Part B, ``<sop> target`` → ``target <eop>``.

The source is laid out as ``glmkit generate`` lays out a typed text (``prompts.text_prompt``): a source holding a
blank ([MASK] or [sMASK]) has it filled, ``[CLS] source [eos]``; a source without one is continued at a generation
blank appended to it ([gMASK], or [MASK] in a vocabulary without task masks). So a fine-tuned model answers at
inference exactly the prompt it was trained on. GLM's summarization recipe writes the blank first:
``template="[MASK] Content: {source}"`` (``SUMMARIZATION_TEMPLATE``; [sMASK] for the task-mask models). The target
is tokenized with a leading space, as the reference does. The loss is cross-entropy over the target tokens and
``<eop>`` with optional label smoothing ε: ``(1 − ε)·CE + ε·mean over the vocabulary of −log p`` (the reference
uses ε = 0.1; it is ``torch.nn.functional.cross_entropy``'s ``label_smoothing``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..masks import BlankSample, find_blanks, make_block_data
from ..prompts import layout, text_prompt
from .data import DataError, Record, as_records, collate_samples, convert

SUMMARIZATION_TEMPLATE = "[MASK] Content: {source}"


@dataclass
class Seq2SeqItem:
    sample: BlankSample
    pad_id: int
    where: str


@dataclass(frozen=True)
class Seq2SeqTask:
    """Rows ``{source_key: text, target_key: text}``; ``template`` places the source (``{source}``) in the prompt."""

    name: str = "seq2seq"
    source_key: str = "source"
    target_key: str = "target"
    template: str = "{source}"
    max_source_length: int = 192
    """Part A tokens at most ([CLS], the blank and [eos] included); the source loses tokens from its end to fit."""
    max_target_length: int = 32
    """Part B tokens at most (``<eop>`` included); a longer target is cut, its ``<eop>`` kept."""
    label_smoothing: float = 0.0
    target_space: bool = True
    """Tokenize the target with a leading space, as the reference does; False: exactly as given (an answer that
    continues the prompt's text, e.g. ``"B)"`` after ``"Answer: ("``, scored as glm_score scores a continuation)."""
    metric_names: tuple[str, ...] = ("loss", "token_accuracy")

    def __post_init__(self) -> None:
        if "{source}" not in self.template:
            raise ValueError(f"template: {self.template!r} has no {{source}} placeholder")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.max_source_length < 3 or self.max_target_length < 2:
            raise ValueError(
                f"max_source_length / max_target_length: need at least 3 / 2, got "
                f"{self.max_source_length} / {self.max_target_length}"
            )

    def _item(self, tokenizer, rec: Record) -> list[Seq2SeqItem]:
        sp = tokenizer.special
        source, target = rec.data[self.source_key], rec.data[self.target_key]
        if not isinstance(source, str) or not isinstance(target, str):
            raise DataError(f"{rec.where}: {self.source_key!r} and {self.target_key!r} must be strings")
        prompts = layout(sp)
        body = tokenizer.encode(self.template.replace("{source}", source))
        blanks = find_blanks(body, prompts.blank_ids())
        if len(blanks) > 1:
            raise DataError(f"{rec.where}: the source has {len(blanks)} blanks; a seq2seq target fills one")
        part_a = text_prompt(prompts, body)
        while len(part_a) > self.max_source_length:  # cut the source's end, never its blank
            cut = [i for i in range(len(body)) if i not in set(find_blanks(body, prompts.blank_ids()))]
            if not cut:
                raise DataError(f"{rec.where}: the prompt does not fit max_source_length={self.max_source_length}")
            drop = set(cut[-(len(part_a) - self.max_source_length) :])
            body = [t for i, t in enumerate(body) if i not in drop]
            part_a = text_prompt(prompts, body)
        answer = tokenizer.encode(" " * self.target_space + target)[: self.max_target_length - 1]
        if not answer:
            raise DataError(f"{rec.where}: the target is empty")
        k = find_blanks(part_a, prompts.blank_ids())[0]
        text = part_a[:k] + answer + part_a[k + 1 :]
        sample = make_block_data(text, [(k, k + len(answer))], mask_id=part_a[k], sop_id=sp.sop, eop_id=sp.eop)
        return [Seq2SeqItem(sample, sp.pad, rec.where)]

    def prepare(self, tokenizer, rows, *, train: bool, on_error: str = "raise") -> list[Seq2SeqItem]:
        return [it for _, it in convert(as_records(rows), lambda r: self._item(tokenizer, r), on_error)]

    def collate(self, items: Sequence[Seq2SeqItem]) -> dict:
        return collate_samples(items, self.name)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        ce, _ = target_losses(model, batch, self.label_smoothing)
        weights = batch["loss_mask"][batch["loss_mask"] > 0].float()
        return (ce * weights).sum() / weights.sum().clamp_min(1.0)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, items: Sequence[Seq2SeqItem], batch_size: int = 16) -> dict:
        """Teacher-forced held-out loss (no smoothing) and the share of target tokens that are the argmax."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total = right = n = 0.0
        try:
            for i in range(0, len(items), batch_size):
                batch = self.collate(items[i : i + batch_size])
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                ce, hit = target_losses(model, batch, 0.0)
                total, right, n = total + float(ce.sum()), right + float(hit.sum()), n + ce.numel()
        finally:
            model.train(was_training)
        return {"loss": total / max(n, 1), "token_accuracy": right / max(n, 1)}


def target_losses(model: torch.nn.Module, batch: dict, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per Part-B target (row-major): the (smoothed) cross-entropy, and whether the target is the argmax."""
    keep = batch["loss_mask"] > 0
    logits = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], logits_mask=keep).float()
    target = batch["targets"][keep]
    ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    return ce, logits.argmax(-1) == target
