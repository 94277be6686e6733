"""Few-shot exemplars for a question: a fixed list (Med-PaLM's clinician-written sets) or the most similar solved
questions of a pool (kNN by BM25 over question and option text, as Medprompt selects by similarity), stratified by
subject and question type.

Both leave out the question itself: an exemplar with its id, or a near-duplicate of it (the Jaccard similarity of
their word sets at least ``near_duplicate``), never shows the answer being asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from .knowledge import LuceneBM25, tokenize
from .types import Exemplar, Question


class ExemplarSelector(Protocol):
    def select(self, q: Question, k: int) -> list[Exemplar]: ...


def _words(q: Question) -> list[str]:
    return tokenize(" ".join([q.question, *q.options.values()]))


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


class _Guard:
    """Tells an exemplar that is the question itself or a near-duplicate of it."""

    def __init__(self, exemplars: Sequence[Exemplar], near_duplicate: float) -> None:
        if not 0.0 < near_duplicate <= 1.0:
            raise ValueError(f"near_duplicate: a Jaccard similarity in (0, 1], got {near_duplicate}")
        self.near_duplicate = near_duplicate
        self.words = [set(tokenize(ex.question.question)) for ex in exemplars]
        self.ids = [ex.question.id for ex in exemplars]

    def allowed(self, q: Question) -> list[bool]:
        mine = set(tokenize(q.question))
        return [
            i != q.id and _jaccard(mine, w) < self.near_duplicate for i, w in zip(self.ids, self.words, strict=True)
        ]


class FixedSelector:
    """The given exemplars, in their order (the first ``k`` that are not the question itself)."""

    def __init__(self, exemplars: Iterable[Exemplar], near_duplicate: float = 0.9) -> None:
        self.exemplars = list(exemplars)
        self._guard = _Guard(self.exemplars, near_duplicate)

    def select(self, q: Question, k: int) -> list[Exemplar]:
        ok = self._guard.allowed(q)
        return [ex for ex, keep in zip(self.exemplars, ok, strict=True) if keep][: max(k, 0)]


class SimilaritySelector:
    """The ``k`` exemplars of ``pool`` most similar to the question (BM25 over question and option words), most
    similar first.

    ``stratify=True`` prefers exemplars of the question's own stratum: those sharing its subject and question type
    first, then its question type, then its subject, then the rest, each tier by similarity. ``round_robin=True``
    instead takes one exemplar from each (subject, question type) stratum in turn (the question's own stratum first,
    the others by their best similarity), so that the shots cover the kinds of question. Equal scores are ordered by a
    shuffle seeded with ``seed``, so a selection is the same on every run.
    """

    def __init__(
        self,
        pool: Iterable[Exemplar],
        *,
        stratify: bool = True,
        round_robin: bool = False,
        seed: int = 0,
        near_duplicate: float = 0.9,
    ) -> None:
        self.pool = list(pool)
        if not self.pool:
            raise ValueError("pool: a similarity selector needs at least one exemplar")
        self.stratify, self.round_robin = stratify, round_robin
        self._guard = _Guard(self.pool, near_duplicate)
        corpus = [_words(ex.question) for ex in self.pool]
        self._bm25 = LuceneBM25([c or ["<empty>"] for c in corpus])
        self._tiebreak = np.random.default_rng(seed).permutation(len(self.pool))

    def select(self, q: Question, k: int) -> list[Exemplar]:
        if k <= 0:
            return []
        words = _words(q)
        scores = self._bm25.get_scores(words) if words else np.zeros(len(self.pool))
        ok = self._guard.allowed(q)
        # best score first; equal scores in the seeded shuffle's order
        ranked = [int(i) for i in np.lexsort((self._tiebreak, -scores)) if ok[int(i)]]
        if self.round_robin:
            ranked = self._round_robin(q, ranked)
        elif self.stratify:
            ranked.sort(key=lambda i: self._tier(q, self.pool[i].question))  # stable: similarity within a tier
        return [self.pool[i] for i in ranked[:k]]

    @staticmethod
    def _tier(q: Question, other: Question) -> int:
        return 2 * (other.qtype != q.qtype) + (other.subject != q.subject)

    def _round_robin(self, q: Question, ranked: list[int]) -> list[int]:
        strata: dict[tuple[str | None, str | None], list[int]] = {}
        for i in ranked:  # strata in the order of their best member; members by similarity
            ex = self.pool[i].question
            strata.setdefault((ex.subject, ex.qtype), []).append(i)
        order = sorted(strata.values(), key=lambda members: self._tier(q, self.pool[members[0]].question) != 0)
        out: list[int] = []
        for depth in range(max(map(len, order), default=0)):
            out += [members[depth] for members in order if depth < len(members)]
        return out
