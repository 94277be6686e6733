"""Cloze fine-tuning (PET style, GLM paper §2.3): a task is a pattern with one blank and a verbalizer, and the
model answers by filling the blank.

Layout (THUDM/GLM ``tasks/data_utils.py`` ``build_input_from_ids``): Part A = ``[CLS] pattern text [eos]`` with the
blank as [MASK]; Part B = ``<sop> answer``, every Part-B token at the blank's position with block positions 1, 2, ...
The sample is ``masks.make_block_data`` of the text with the answer where the blank is, so positions and the mask
come from glmkit's one layout module; Part A is the prompt layout's ``infilling`` (``prompts.py``) with ``[eos]``
always closing it, as the fine-tuning code does even after a final blank.

Scoring (THUDM/GLM ``model/downstream.py``):

- one-token answers (``GLMForSingleTokenCloze``): the logits at ``<sop>`` (index ``sep``) of the K verbalizer
  tokens, raw, and cross-entropy over the K labels;
- answers of any length (``GLMForMultiTokenCloze``): one row per candidate, its score the sum of the log-probabilities
  of its tokens and ``<eop>``, divided by ``n_tokens ** length_penalty`` when that is set, and cross-entropy over the
  candidates of each example (rows padded with −10000, as the reference masks missing choices).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..masks import BlankSample, collate, make_block_data
from ..prompts import layout
from .data import DataError, Record, as_records, convert
from .tasks import BLANK, ClozeExample, Part, Shortenable, accuracy

MISSING_CHOICE = -10000.0  # the reference's score of a padded candidate slot


def _row_label(row: dict) -> Any:
    return row.get("label")


@dataclass(frozen=True)
class ClozeTask:
    """A cloze task: ``pattern`` puts a row's text around one ``BLANK``; the answers are the ``verbalizer``'s words
    (label → word, in label order) or, for multiple choice, ``choices(row)`` with the label an index into them.

    ``rows(record, train)`` turns one line of data into the rows the pattern sees (default: the line itself; MultiRC
    and ReCoRD give several). ``multi_token`` scores verbalizer words of any length by their span likelihood; without
    it a verbalizer word must be one token (a ``ValueError`` names the word otherwise). ``decide="greedy"`` answers
    "true" when the single candidate is the model's greedy fill (WSC trained without negatives).
    """

    name: str
    pattern: Callable[[dict], Sequence[Part] | tuple[Sequence[Part], Sequence[Part]]]
    verbalizer: Mapping[Any, str] | None = None
    choices: Callable[[dict], Sequence[str]] | None = None
    label: Callable[[dict], Any] = _row_label
    rows: Callable[[Record, bool], list[dict]] | None = None
    multi_token: bool = False
    length_penalty: float = 0.0
    loss_kind: Literal["ce", "mix"] = "ce"
    """``mix`` adds −(mean score of the right answer) to the cross-entropy (the reference's WSC ``--loss-func mix``)."""
    decide: Literal["argmax", "greedy"] = "argmax"
    metric: Callable[[Sequence[ClozeExample], Sequence[int]], dict[str, float]] = accuracy
    metric_names: tuple[str, ...] = ("accuracy",)
    max_length: int = 256
    meta: Callable[[dict], dict] | None = None

    def __post_init__(self) -> None:
        if (self.verbalizer is None) == (self.choices is None):
            raise ValueError(f"task {self.name}: give exactly one of verbalizer (label -> word) or choices(row)")
        if self.verbalizer is not None and not self.verbalizer:
            raise ValueError(f"task {self.name}: the verbalizer is empty")
        if self.max_length < 4:
            raise ValueError(f"task {self.name}: max_length must be at least 4, got {self.max_length}")

    @property
    def single_token(self) -> bool:
        return self.verbalizer is not None and not self.multi_token

    # ---- rows -> examples (no tokenizer) ------------------------------------------------------------------

    def _examples_of(self, rec: Record, train: bool) -> list[ClozeExample]:
        out = []
        for row in self.rows(rec, train) if self.rows else [rec.data]:
            made = self.pattern(row)
            parts_a, parts_b = made if isinstance(made, tuple) else (made, ())
            if sum(p is BLANK for p in [*parts_a, *parts_b]) != 1:
                raise ValueError(f"task {self.name}: the pattern must hold exactly one BLANK")
            value = self.label(row)
            if self.verbalizer is not None:
                candidates = tuple(self.verbalizer.values())
                if value is not None and value not in self.verbalizer:
                    raise DataError(
                        f"{rec.where}: label {value!r} is not in the verbalizer of task {self.name} "
                        f"(labels: {', '.join(map(repr, self.verbalizer))})"
                    )
                label = None if value is None else list(self.verbalizer).index(value)
            else:
                candidates = tuple(self.choices(row))
                if not candidates:
                    raise DataError(f"{rec.where}: no answer candidates")
                if value is not None and (isinstance(value, bool) or value not in range(len(candidates))):
                    raise DataError(f"{rec.where}: label {value!r} is not an index into its {len(candidates)} choices")
                label = value
            meta = self.meta(row) if self.meta else {}
            out.append(ClozeExample(tuple(parts_a), tuple(parts_b), candidates, label, rec.where, meta))
        return out

    def examples(self, rows: Sequence[Record | dict], *, train: bool = False, on_error: str = "raise"):
        """The ``ClozeExample`` of each row; a bad row is a ``DataError`` naming its line (or skipped, with
        ``on_error="skip"``)."""
        return [ex for _, ex in convert(as_records(rows), lambda r: self._examples_of(r, train), on_error)]

    # ---- the Task protocol -------------------------------------------------------------------------------

    def prepare(self, tokenizer, rows, *, train: bool, on_error: str = "raise") -> list[ClozeFeatures]:
        choice_ids = verbalizer_ids(self, tokenizer) if self.single_token else None

        def features(rec: Record) -> list[ClozeFeatures]:
            out = []
            for ex in self._examples_of(rec, train):
                if train and ex.label is None:
                    raise DataError(f"{rec.where}: a training row needs a label")
                out.append(encode_example(tokenizer, ex, self.max_length, choice_ids))
            return out

        return [f for _, f in convert(as_records(rows), features, on_error)]

    def collate(self, items: Sequence[ClozeFeatures]) -> dict:
        batch = collate_features(items)
        batch["objective"] = self.name
        return batch

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits, _ = choice_logits(model, batch, self.length_penalty)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        if self.loss_kind == "mix":
            loss = loss - logits.gather(1, batch["labels"][:, None]).float().mean()
        return loss

    def evaluate(self, model: torch.nn.Module, items: Sequence[ClozeFeatures], batch_size: int = 16) -> dict:
        predictions, losses = [], []
        for scores, greedy, item in predict(model, items, self.length_penalty, batch_size):
            if item.label >= 0:
                losses.append(float(-torch.log_softmax(torch.tensor(scores), 0)[item.label]))
            best = max(range(len(scores)), key=scores.__getitem__)
            predictions.append(int(greedy[0]) if self.decide == "greedy" else best)
        metrics = self.metric([it.example for it in items], predictions)
        return {"loss": sum(losses) / max(len(losses), 1), **metrics}


# ---- layout --------------------------------------------------------------------------------------------------


@dataclass
class ClozeFeatures:
    """One example laid out: a single sample scored at ``<sop>`` (one-token answers) or one sample per candidate."""

    example: ClozeExample
    samples: list[BlankSample]
    label: int  # -1: unlabeled
    pad_id: int
    choice_ids: list[int] = field(default_factory=list)  # the verbalizer's tokens, one-token scoring only

    @property
    def single_token(self) -> bool:
        return bool(self.choice_ids)


def verbalizer_ids(task: ClozeTask, tokenizer) -> list[int]:
    """The one token of each verbalizer word; a word of several tokens (or a special token) is a ``ValueError``
    naming it (THUDM/GLM ``get_verbalization_ids`` with ``force_single_token``)."""
    special = set(tokenizer.special.to_dict().values())
    out = []
    for label, word in task.verbalizer.items():
        ids = tokenizer.encode(word)
        if len(ids) != 1 or ids[0] in special:
            raise ValueError(
                f"task {task.name}: verbalizer word {word!r} (label {label!r}) is {len(ids)} tokens {ids} in this "
                "tokenizer, and one-token cloze scores a single token at the blank; choose a one-token word or "
                "score whole spans with multi_token=True"
            )
        out.append(ids[0])
    return out


def _encode_parts(tokenizer, parts: Sequence[Part], mask_id: int) -> list[tuple[list[int], bool]]:
    out = []
    for p in parts:
        if p is BLANK:
            out.append(([mask_id], False))
        elif isinstance(p, Shortenable):
            out.append((tokenizer.encode(p.text), True))
        else:
            out.append((tokenizer.encode(p), False))
    return out


def _shortenable_len(parts: list[tuple[list[int], bool]]) -> int:
    return sum(len(ids) for ids, s in parts if s)


def _truncate(a, b, excess: int, where: str, max_length: int) -> None:
    """Take ``excess`` tokens, one at a time, off the end of the last shortenable part of whichever side holds more
    shortenable tokens (THUDM/GLM ``PVP.truncate``)."""
    for _ in range(excess):
        side = a if _shortenable_len(a) > _shortenable_len(b) else b
        if _shortenable_len(side) == 0:
            side = a if side is b else b
        candidates = [i for i, (ids, s) in enumerate(side) if s and ids]
        if not candidates:
            raise DataError(f"{where}: longer than max_length={max_length} tokens even with all shortenable text cut")
        i = candidates[-1]
        side[i] = (side[i][0][:-1], True)


def encode_example(tokenizer, example: ClozeExample, max_length: int, choice_ids: list[int] | None) -> ClozeFeatures:
    """Lay ``example`` out for the model: one sample ending at ``<sop>`` when ``choice_ids`` (one-token scoring),
    else one ``[CLS] A [eos] <sop> answer`` sample per candidate (answer = the candidate's tokens, then ``<eop>``)."""
    sp = tokenizer.special
    answers = [None] if choice_ids else [tokenizer.encode(c) for c in example.candidates]
    empty = [c for c, ids in zip(example.candidates, answers, strict=False) if ids is not None and not ids]
    if empty:
        raise DataError(f"{example.where}: answer {empty[0]!r} has no tokens")
    samples = []
    for answer in answers:
        a = _encode_parts(tokenizer, example.parts_a, sp.mask)
        b = _encode_parts(tokenizer, example.parts_b, sp.mask)
        n_answer = len(answer) if answer else 0
        # [CLS] + eos + <sop>, then the answer's tokens (its <eop> is a target, not an input)
        total = sum(len(ids) for ids, _ in a + b) + 3 + n_answer
        if total > max_length:
            _truncate(a, b, total - max_length, example.where, max_length)
        body, blank = [], -1
        for (ids, _), part in zip(a + b, [*example.parts_a, *example.parts_b], strict=True):
            if part is BLANK:
                blank = len(body)
            body += ids
        part_a = layout(sp).infilling(body)
        if part_a[-1] != sp.eos:  # the fine-tuning layout closes Part A with eos even after a final blank
            part_a.append(sp.eos)
        k = 1 + blank  # after [CLS]
        span = answer if answer else [choice_ids[0]]
        text = part_a[:k] + span + part_a[k + 1 :]
        sample = make_block_data(text, [(k, k + len(span))], mask_id=sp.mask, sop_id=sp.sop, eop_id=sp.eop)
        if not answer:  # one-token scoring reads the logits at <sop> only: Part B is just <sop>
            n = sample.sep + 1
            sample = BlankSample(
                sample.tokens[:n],
                sample.targets[:n],
                sample.loss_mask[:n],
                sample.position_ids[:n],
                sample.block_position_ids[:n],
                sample.sep,
                sample.blank_positions,
            )
        samples.append(sample)
    label = -1 if example.label is None else example.label
    return ClozeFeatures(example, samples, label, sp.pad, list(choice_ids or []))


def collate_features(items: Sequence[ClozeFeatures]) -> dict:
    """A batch of examples: ``masks.collate`` of their samples plus ``labels [B]`` and either ``choice_ids [B, K]``
    (one-token) or ``choice_rows [B, Kmax]`` (each candidate's sample row, −1 where an example has fewer)."""
    if not items:
        raise ValueError("collate: no examples")
    single = items[0].single_token
    if any(it.single_token != single for it in items):
        raise ValueError("collate: one-token and span-scored examples cannot share a batch")
    samples = [s for it in items for s in it.samples]
    batch = collate(samples, pad_id=items[0].pad_id)
    batch["labels"] = torch.tensor([it.label for it in items])
    if single:
        batch["choice_ids"] = torch.tensor([it.choice_ids for it in items])
        return batch
    k_max = max(len(it.samples) for it in items)
    rows = torch.full((len(items), k_max), -1, dtype=torch.long)
    at = 0
    for b, it in enumerate(items):
        rows[b, : len(it.samples)] = torch.arange(at, at + len(it.samples))
        at += len(it.samples)
    batch["choice_rows"] = rows
    return batch


# ---- scoring -------------------------------------------------------------------------------------------------


def verbalizer_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """``[B, K]``: the logits at each row's ``<sop>`` (index ``sep``) of its verbalizer tokens (no softmax)."""
    ids = batch["input_ids"]
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[torch.arange(ids.shape[0], device=ids.device), batch["sep"].to(ids.device)] = True
    logits = model(ids, batch["position_ids"], batch["attention_mask"], logits_mask=keep)  # [B, V]
    return logits.gather(1, batch["choice_ids"].to(logits.device))


def span_scores(model: torch.nn.Module, batch: dict, length_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample row: Σ log p of its Part-B targets (the answer and ``<eop>``), divided by
    ``n_tokens ** length_penalty``; and whether every target is the argmax (the answer is the greedy fill)."""
    keep = batch["loss_mask"] > 0
    logits = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], logits_mask=keep).float()
    target = batch["targets"][keep]
    logp = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
    rows = keep.nonzero()[:, 0]
    n_rows = keep.shape[0]
    scores = torch.zeros(n_rows, device=logp.device, dtype=logp.dtype).index_add(0, rows, logp)
    missed = torch.zeros(n_rows, device=logp.device).index_add(0, rows, (logits.argmax(-1) != target).float())
    if length_penalty:
        scores = scores / keep.sum(1).to(scores.dtype) ** length_penalty
    return scores, missed == 0


def choice_logits(
    model: torch.nn.Module, batch: dict, length_penalty: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, K]`` answer scores of a batch (verbalizer logits, or span scores with missing choices at −10000) and,
    for span scoring, ``[B, K]`` greedy flags."""
    if "choice_ids" in batch:
        return verbalizer_logits(model, batch), None
    scores, greedy = span_scores(model, batch, length_penalty)
    rows = batch["choice_rows"].to(scores.device)
    valid = rows >= 0
    matrix = torch.where(valid, scores[rows.clamp_min(0)], torch.full_like(scores[rows.clamp_min(0)], MISSING_CHOICE))
    return matrix, greedy[rows.clamp_min(0)] & valid


@torch.no_grad()
def predict(model: torch.nn.Module, items: Sequence[ClozeFeatures], length_penalty: float = 0.0, batch_size: int = 16):
    """``(scores, greedy, item)`` for each item, in order: its candidates' scores and greedy flags (all False for
    one-token scoring, which has no span to be greedy about)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate_features(chunk).items()}
            matrix, greedy = choice_logits(model, batch, length_penalty)
            for b, item in enumerate(chunk):
                k = len(item.choice_ids) or len(item.samples)
                flags = greedy[b, :k].tolist() if greedy is not None else [False] * k
                yield matrix[b, :k].float().tolist(), flags, item
    finally:
        model.train(was_training)


def score_choices(
    model: torch.nn.Module, tokenizer, text: str, choices: Sequence[str], length_penalty: float = 0.0
) -> list[float]:
    """Zero-shot: the span score of each choice filling the one ``[MASK]`` of ``text`` (a space is put before each
    choice, as the GLM patterns write answers)."""
    if text.count("[MASK]") != 1:
        raise ValueError(f"text: a cloze item needs exactly one [MASK], found {text.count('[MASK]')}")
    left, right = text.split("[MASK]")
    example = ClozeExample((left.rstrip(), BLANK, right), (), tuple(" " + c for c in choices), None)
    item = encode_example(tokenizer, example, model.config.n_positions, None)
    return next(iter(predict(model, [item], length_penalty)))[0]
