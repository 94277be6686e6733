"""GLM's pretraining objective: autoregressive blank infilling over packed samples (paper §2.1; THUDM/GLM
``blocklm_utils.py``, ``ConstructBlockStrategy``; docs/glm-notes.md).

This follows THUDM/GLM ``blocklm_utils.ConstructBlockStrategy`` rule for rule and random draw for random draw: given
the same ``random.Random`` the reference collator and ``BlankInfillCollator.build`` choose the same objective, spans
and Part-B order. What differs is only around the edges, on purpose:

- the generator of a batch is derived from ``(seed, batch_index, dp_rank, dp_world)`` instead of a call counter, so
  a batch is a pure function of its index (resuming is exact) and ranks see different batches;
- ``block_mask_prob`` draws from that generator, not the global ``random`` (the reference is not reproducible there);
- a sentence never starts with the [CLS] of the next document (the reference masks and predicts that [CLS]);
- settings with which the reference crashes (mask ratio > 0.5 on short documents, gpt_min_ratio = 1) are clamped.

Layouts, positions and masks come from glmkit.masks; this module only decides what to blank.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from ..config import ConfigError, SpecialTokens
from ..masks import BlankSample, Span, collate, make_block_data, make_prefix_lm_data

Objective = Literal["bert", "sentence", "gpt"]  # the reference's batch ``mode`` names


class IndexedTexts(Protocol):
    """Anything indexable by sample number, such as ``packing.PackedDataset``."""

    def __getitem__(self, index: int) -> Sequence[int] | np.ndarray: ...


@dataclass
class BlankInfillConfig:
    """How a batch is corrupted. Defaults are GLM-Base/Large (token infilling only); GLM-2B/10B used
    ``bert_prob=0.5, gap_sentence_prob=0.3, gpt_min_ratio=0.25, block_mask_prob=0.1, short_seq_prob=0.02``.

    Attributes:
        seq_length: packed sample length; also bounds the short-sequence re-split.
        mask_ratio: token mode masks at least ``int(mask_ratio * L)`` tokens (reference ``bert_ratio``).
        avg_block_length: Poisson mean of token-mode span lengths.
        max_block_length: span lengths are drawn from 1 .. max_block_length - 1.
        bert_prob / gap_sentence_prob: per-batch probability of token / sentence mode; the rest is document mode.
        gap_sentence_ratio: sentence mode blanks whole sentences until this fraction of L is covered.
        gpt_min_ratio: document mode blanks from ``gpt_min_ratio`` of the batch's shortest text up to L - 2 tokens.
        gpt_infill_prob: probability of the prefix-LM form for a single-document sample in document mode.
        block_mask_prob: token mode replaces each Part-B input span token by [dBLOCK] (``dblock_id``) this often.
        short_seq_prob: per-batch probability of re-splitting samples into shorter pieces, as ``BlockDataset`` does.
        single_span_prob: per-batch probability of token mode with ONE Poisson span per sample (10B "longer").
        shuffle_blocks: Part B in a random order (False: left to right, the ``--no-shuffle-block`` ablation).
        seed: base seed of every batch's generator.
    """

    seq_length: int = 512
    mask_ratio: float = 0.15
    avg_block_length: float = 3.0
    max_block_length: int = 40
    bert_prob: float = 1.0
    gap_sentence_prob: float = 0.0
    gap_sentence_ratio: float = 0.15
    gpt_min_ratio: float = 0.5
    gpt_infill_prob: float = 0.5
    block_mask_prob: float = 0.0
    dblock_id: int | None = None
    short_seq_prob: float = 0.0
    single_span_prob: float = 0.0
    shuffle_blocks: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("mask_ratio", "gap_sentence_ratio"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"{name}: must be in (0, 1), got {getattr(self, name)!r}")
        for name in (
            "bert_prob",
            "gap_sentence_prob",
            "gpt_infill_prob",
            "block_mask_prob",
            "short_seq_prob",
            "single_span_prob",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: must be a probability in [0, 1], got {getattr(self, name)!r}")
        if self.bert_prob + self.gap_sentence_prob > 1.0 + 1e-9:
            raise ConfigError(
                f"gap_sentence_prob: bert_prob + gap_sentence_prob must be <= 1 (the rest is document mode), "
                f"got {self.bert_prob} + {self.gap_sentence_prob}"
            )
        if not 0.0 < self.gpt_min_ratio <= 1.0:
            raise ConfigError(f"gpt_min_ratio: must be in (0, 1], got {self.gpt_min_ratio!r}")
        if not self.avg_block_length > 0:
            raise ConfigError(f"avg_block_length: must be positive, got {self.avg_block_length!r}")
        if self.max_block_length < 2:
            raise ConfigError(f"max_block_length: must be at least 2, got {self.max_block_length!r}")
        min_length = 34 if self.short_seq_prob > 0 else 4  # the re-split draws a length in [32, seq_length - 1)
        if self.seq_length < min_length:
            raise ConfigError(f"seq_length: must be at least {min_length}, got {self.seq_length!r}")
        if self.block_mask_prob > 0 and self.dblock_id is None:
            raise ConfigError("dblock_id: block_mask_prob > 0 needs the [dBLOCK] token id")
        if self.seed < 0:
            raise ConfigError(f"seed: must be non-negative, got {self.seed!r}")

    def for_objective(self, objective: Objective) -> BlankInfillConfig:
        """The same settings with every batch using ``objective`` (per-objective held-out loss)."""
        probs = {"bert": (1.0, 0.0), "sentence": (0.0, 1.0), "gpt": (0.0, 0.0)}[objective]
        return dataclasses.replace(
            self, bert_prob=probs[0], gap_sentence_prob=probs[1], short_seq_prob=0.0, single_span_prob=0.0
        )

    def span_length_weights(self) -> list[float]:
        """Unnormalised Poisson(avg_block_length) pmf of span lengths 1 .. max_block_length - 1 (scipy's formula)."""
        lam = self.avg_block_length
        return [math.exp(k * math.log(lam) - math.lgamma(k + 1) - lam) for k in range(1, self.max_block_length)]


@dataclass
class InfillSamples:
    """One corrupted batch before padding: the samples kept, the objective and how many samples were dropped."""

    samples: list[BlankSample]
    objective: Objective
    dropped: int


class BlankInfillCollator:
    """Turns a batch of packed texts (each ``[CLS] d1 [eos] [CLS] d2 ...``) into a GLM training batch.

    ``sentence_end_ids`` are the ids of tokens that end a sentence (see ``packing.sentence_end_ids``); sentence
    mode needs them. [sMASK] / [gMASK] are used when the vocabulary has them, [MASK] otherwise (no ``--task-mask``).
    """

    def __init__(
        self,
        config: BlankInfillConfig,
        special: SpecialTokens,
        *,
        sentence_end_ids: Collection[int] = (),
        dp_rank: int = 0,
        dp_world: int = 1,
    ) -> None:
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank: must be in [0, dp_world={dp_world}), got {dp_rank}")
        if config.gap_sentence_prob > 0 and not sentence_end_ids:
            raise ValueError("sentence_end_ids: sentence mode (gap_sentence_prob > 0) needs the sentence-end token ids")
        self.config, self.special = config, special
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.sentence_ends = frozenset(sentence_end_ids)
        self.smask_id = special.smask if special.smask is not None else special.mask
        self.gmask_id = special.gmask if special.gmask is not None else special.mask
        self._lengths = range(1, config.max_block_length)
        self._weights = config.span_length_weights()

    def rng(self, batch_index: int) -> random.Random:
        """The generator of batch ``batch_index`` on this data-parallel rank."""
        state = np.random.SeedSequence([self.config.seed, batch_index, self.dp_rank, self.dp_world]).generate_state(4)
        return random.Random(int.from_bytes(state.tobytes(), "little"))

    def __call__(self, texts: Sequence[Sequence[int]], batch_index: int) -> dict[str, Any]:
        """Collated batch (``masks.collate`` tensors) plus ``objective`` (str) and ``dropped`` (int)."""
        out = self.build(texts, self.rng(batch_index))
        if not out.samples:
            raise ValueError(
                f"batch {batch_index}: all {out.dropped} samples were dropped because their spans did not fit; the "
                f"documents are too short for mask_ratio={self.config.mask_ratio} (pack longer documents)"
            )
        batch: dict[str, Any] = collate(out.samples, pad_id=self.special.pad)
        batch["objective"], batch["dropped"] = out.objective, out.dropped
        return batch

    def build(self, texts: Sequence[Sequence[int]], rng: random.Random) -> InfillSamples:
        """The reference ``construct_blocks``: pick the batch's objective, then corrupt every sample with it."""
        cls = self.special.cls
        texts = [np.asarray(t).tolist() for t in texts]
        for t in texts:
            if len(t) < 3 or t[0] != cls:
                raise ValueError(f"texts: every sample must start with [CLS]={cls} and hold >= 3 tokens, got {t[:8]}")
        c = self.config
        if rng.random() < c.short_seq_prob:
            texts = self._split_samples(texts, rng)
        single_span = rng.random() < c.single_span_prob
        r = 0.0 if single_span else rng.random()
        if r < c.bert_prob:
            objective: Objective = "bert"
            samples = [self._token_sample(t, rng, single_span) for t in texts]
        elif r < c.bert_prob + c.gap_sentence_prob:
            objective = "sentence"
            samples = [self._sentence_sample(t, rng) for t in texts]
        else:
            objective = "gpt"
            samples = self._document_samples(texts, rng)
        kept = [s for s in samples if s is not None]
        return InfillSamples(kept, objective, len(samples) - len(kept))

    # ---- the three objectives ----------------------------------------------------------------------------

    def _token_sample(self, text: list[int], rng: random.Random, single_span: bool) -> BlankSample | None:
        lengths = [rng.choices(self._lengths, weights=self._weights)[0]] if single_span else []
        masked, goal = sum(lengths), int(self.config.mask_ratio * len(text))
        while not single_span and masked < goal:
            lengths.append(rng.choices(self._lengths, weights=self._weights)[0])
            masked += lengths[-1]
        return self._blank_spans(text, lengths, self.special.mask, rng, block_mask=True)

    def _sentence_sample(self, text: list[int], rng: random.Random) -> BlankSample:
        sentences: list[Span] = []
        start = 1
        for i, t in enumerate(text):
            if t in self.sentence_ends:
                if start < i + 1:
                    sentences.append((start, i + 1))
                start = i + 1
            elif t == self.special.eos:
                start = i + 2 if i + 1 < len(text) and text[i + 1] == self.special.cls else i + 1
        if start < len(text):
            sentences.append((start, len(text)))
        rng.shuffle(sentences)
        chosen: list[Span] = []
        for span in sentences:
            chosen.append(span)
            if sum(e - s for s, e in chosen) >= int(self.config.gap_sentence_ratio * len(text)):
                break
        return self.layout(text, chosen, self.smask_id, rng)

    def _document_samples(self, texts: list[list[int]], rng: random.Random) -> list[BlankSample | None]:
        lens = [len(t) for t in texts]
        high = max(lens) - 2
        target = rng.randint(min(max(1, int(self.config.gpt_min_ratio * min(lens))), high), high)
        out: list[BlankSample | None] = []
        for text in texts:
            n = min(target, len(text) - 2)
            eos_at = text.index(self.special.eos) if self.special.eos in text else -1
            if eos_at not in (-1, len(text) - 1) or rng.random() < self.config.gpt_infill_prob:
                s = make_prefix_lm_data(text, n, gmask_id=self.gmask_id, sop_id=self.special.sop)
                # the document loss mask: no loss on the [CLS] of a following document
                s.loss_mask = [m * (t != self.special.cls) for m, t in zip(s.loss_mask, s.targets, strict=True)]
                out.append(s)
            else:
                out.append(self._blank_spans(text, [n], self.gmask_id, rng))
        return out

    # ---- span placement (sample_span_in_document / sample_spans) and layout ------------------------------

    def _blank_spans(
        self, text: list[int], lengths: list[int], mask_id: int, rng: random.Random, block_mask: bool = False
    ) -> BlankSample | None:
        rng.shuffle(lengths)  # generate_blank_data shuffles, then sample_span_in_document shuffles again
        spans = self._place_in_documents(text, lengths, rng)
        if len(spans) < len(lengths):
            return None
        sample = self.layout(text, spans, mask_id, rng)
        if block_mask and self.config.block_mask_prob > 0:
            for i in range(sample.sep, len(sample)):
                if sample.block_position_ids[i] > 1 and rng.random() < self.config.block_mask_prob:
                    sample.tokens[i] = self.config.dblock_id
        return sample

    def _place_in_documents(self, text: list[int], lengths: list[int], rng: random.Random) -> list[Span]:
        """Split at eos, give each shorter document its share, the longest the rest; spans never touch."""
        rng.shuffle(lengths)
        documents: list[tuple[int, int]] = []  # (offset, usable length); the sample's final token is never used
        last = len(text)
        for index in reversed([-1] + [i for i, t in enumerate(text) if t == self.special.eos]):
            start = index + 1 if index + 1 < len(text) and text[index + 1] == self.special.cls else index
            length = last - start - 1
            if last == len(text) and length > 0:
                length -= 1
            documents.append((start + 1, length))
            last = index
        documents.sort(key=lambda d: d[1])
        spans: list[Span] = []
        k = 0
        for i, (offset, length) in enumerate(documents):
            # the longest document takes what is left; a shorter one at most its mask_ratio share
            cap = length if i == len(documents) - 1 else int(length * self.config.mask_ratio)
            count, total = 0, 0
            while k + count < len(lengths):
                nxt = lengths[k + count]
                if total + nxt > cap or total + nxt + count > length:  # spans need >= 1 free token between them
                    break
                total, count = total + nxt, count + 1
            if count:
                spans += _sample_spans(lengths[k : k + count], length, offset, rng)
            k += count
        return spans

    def layout(self, text: Sequence[int], spans: Sequence[Span], mask_id: int, rng: random.Random) -> BlankSample:
        """Lay out ``text`` with ``spans`` blanked (``masks.make_block_data``), Part B in an order from ``rng``."""
        order = list(range(len(spans)))  # shuffling indices draws exactly what shuffling the spans would
        if self.config.shuffle_blocks:
            rng.shuffle(order)
        else:
            order.sort(key=lambda k: spans[k][0])
        return make_block_data(
            text, spans, mask_id=mask_id, sop_id=self.special.sop, eop_id=self.special.eop, order=order
        )

    # ---- short-sequence re-split (split_samples) ---------------------------------------------------------

    def _split_samples(self, texts: list[list[int]], rng: random.Random) -> list[list[int]]:
        target = rng.randrange(32, self.config.seq_length - 1)
        eos = self.special.eos

        def boundary(t: int) -> bool:
            return t in self.sentence_ends or t == eos

        out = []
        for text in texts:
            body = text[1:]
            for _ in range((self.config.seq_length - 1) // target):
                if target >= len(body):
                    out.append([self.special.cls] + body)
                    continue
                start = rng.randrange(0, len(body) - target)
                while start > 0 and (body[start] == eos or not boundary(body[start - 1])):
                    start -= 1
                end = start + target
                while end > start and not boundary(body[end - 1]):
                    end -= 1
                if end - start < target // 2:
                    end = start + target
                out.append([self.special.cls] + body[start:end])
        return out


def _sample_spans(lengths: Sequence[int], total: int, offset: int, rng: random.Random) -> list[Span]:
    """Place spans of ``lengths`` (in this order) in ``[offset, offset + total)`` with >= 1 free token between."""
    free = total - sum(lengths) - len(lengths) + 1
    places = sorted([rng.randrange(free + 1) for _ in lengths])
    spans = []
    for place, n in zip(places, lengths, strict=True):
        spans.append((offset + place, offset + place + n))
        offset += n + 1
    return spans


class PretrainBatches:
    """A ``BatchSource`` for ``glmkit.train.loop``: global micro-batch index -> collated batch.

    Batch ``g`` holds samples ``dataset[g * batch_size + i]`` and is corrupted with generator
    ``collator.rng(g)``; the global index already differs per rank, so the collator keeps ``dp_rank=0,
    dp_world=1`` here and a batch depends on ``(seed, g)`` only (any rank/accumulation layout sees the same).
    """

    def __init__(self, dataset: IndexedTexts, collator: BlankInfillCollator, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be positive, got {batch_size}")
        self.dataset, self.collator, self.batch_size = dataset, collator, batch_size

    def __call__(self, index: int) -> dict[str, Any]:
        start = index * self.batch_size
        texts = [self.dataset[i] for i in range(start, start + self.batch_size)]
        return self.collator(texts, index)
