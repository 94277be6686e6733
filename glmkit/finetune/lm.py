"""Language modelling over text: perplexity by sliding windows, and fine-tuning on the same windows.

How GLM scores text left to right: as the continuation of a ``[gMASK]`` blank, ``[CLS] context [gMASK] <sop> text``
with the text generated in Part B (each token sees the bidirectional context and the text before it). That is the
"gpt" form of GLM's pretraining objective (``masks.make_prefix_lm_data``, the layout glmkit's pretraining trains
and ``glmkit generate`` continues a text with) and the layout of THUDM/GLM's own zero-shot language modelling
(``tasks/language_model``, WikiText perplexity). Scoring each token as a one-token blank (``[MASK]`` in the
text, all else visible) would be a pseudo-likelihood: it sees the words after the token too, so its "perplexity" is
not a language model's and is not comparable with one.

A long text is scored in windows of ``max_length`` positions (context + text; the context's ``[CLS]`` and
``[gMASK]`` take two): every token is scored exactly once, each window after the first carrying ``overlap`` tokens
of the previous one as context (THUDM/GLM's ``--overlapping-eval``, 32 there). The loss is the mean NLL over all
scored tokens; perplexity is its exponential.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..masks import BlankSample, make_prefix_lm_data
from ..train.loop import batch_loss
from .data import DataError, Record, as_records, collate_samples, convert


@dataclass
class LMWindow:
    sample: BlankSample
    pad_id: int
    doc: int  # index of the row the window is from
    where: str
    text: str


def windows(ids: Sequence[int], max_length: int, overlap: int) -> list[tuple[list[int], list[int]]]:
    """``(context, scored)`` token lists covering ``ids``: each token scored once, in windows of at most
    ``max_length - 2`` tokens, each after the first with ``overlap`` tokens of context."""
    width = max_length - 2
    if not 0 <= overlap < width:
        raise ValueError(f"overlap: must be in [0, {width}) for max_length {max_length}, got {overlap}")
    out, done = [], 0
    while done < len(ids):
        begin = max(0, done - overlap)
        end = min(len(ids), begin + width)
        out.append((list(ids[begin:done]), list(ids[done:end])))
        done = end
    return out


@dataclass(frozen=True)
class LMTask:
    """Rows ``{text_field: text}`` (a ``.txt`` file is one row), scored and trained as left-to-right text."""

    name: str = "lm"
    text_field: str = "text"
    max_length: int = 256
    """Positions per window (the model's context at most)."""
    overlap: int = 32
    metric_names: tuple[str, ...] = ("loss", "perplexity")

    def __post_init__(self) -> None:
        windows([], self.max_length, self.overlap)

    def _windows(self, tokenizer, rec: Record, doc: int) -> list[LMWindow]:
        sp = tokenizer.special
        text = rec.data[self.text_field]
        if not isinstance(text, str):
            raise DataError(f"{rec.where}: field {self.text_field!r} must be text")
        ids = tokenizer.encode(text)
        if not ids:
            raise DataError(f"{rec.where}: the text has no tokens")
        gmask = sp.gmask if sp.gmask is not None else sp.mask
        out = []
        for context, scored in windows(ids, self.max_length, self.overlap):
            sample = make_prefix_lm_data([sp.cls, *context, *scored], len(scored), gmask_id=gmask, sop_id=sp.sop)
            out.append(LMWindow(sample, sp.pad, doc, rec.where, text))
        return out

    def prepare(self, tokenizer, rows, *, train: bool, on_error: str = "raise") -> list[LMWindow]:
        records = as_records(rows)
        index = {id(r): i for i, r in enumerate(records)}
        return [w for _, w in convert(records, lambda r: self._windows(tokenizer, r, index[id(r)]), on_error)]

    def collate(self, items: Sequence[LMWindow]) -> dict:
        return collate_samples(items, self.name)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return batch_loss(model, batch)

    @torch.no_grad()
    def token_nll(self, model: torch.nn.Module, items: Sequence[LMWindow], batch_size: int = 16) -> list[list[float]]:
        """The NLL (nats) of every scored token of each window, in order."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out: list[list[float]] = []
        try:
            for i in range(0, len(items), batch_size):
                b = self.collate(items[i : i + batch_size])
                b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                keep = b["loss_mask"] > 0
                logits = model(b["input_ids"], b["position_ids"], b["attention_mask"], logits_mask=keep).float()
                nll = F.cross_entropy(logits, b["targets"][keep], reduction="none").cpu()
                counts = keep.sum(1).tolist()
                out += [chunk.tolist() for chunk in torch.split(nll, counts)]
        finally:
            model.train(was_training)
        return out

    def evaluate(self, model: torch.nn.Module, items: Sequence[LMWindow], batch_size: int = 16) -> dict:
        nlls = [x for row in self.token_nll(model, items, batch_size) for x in row]
        loss = sum(nlls) / max(len(nlls), 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": float(len(nlls))}
