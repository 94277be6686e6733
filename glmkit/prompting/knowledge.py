"""Knowledge for the prompt: BM25 retrieval (Okapi BM25, the ``rank-bm25`` package) over documents that carry an id,
their text and a citation, e.g. the verses of the bundled corpus with "Genesis 11:12".

Text is tokenized the same way for documents and queries: lower-cased words of letters and digits for English (and
other space-separated scripts), overlapping character bigrams for Chinese (a run of one character is kept as is), the
usual choice for Chinese retrieval without a word segmenter. Ranking is deterministic: equal scores keep document
order. ``retrieve`` numbers its snippets ``"1"``..``"k"`` in rank order, the ids the prompt shows as ``[1]`` and a
model cites; the document's own citation (or its id, where it has none) goes with each snippet.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from rank_bm25 import BM25Okapi

from ..finetune.data import DataError, OnError, read_jsonl, report
from .types import Snippet

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]+|[^\W_{_CJK}]+(?:'[^\W_{_CJK}]+)?")


def tokenize(text: str) -> list[str]:
    """Retrieval tokens of ``text``: English words (``"Salah"`` -> ``"salah"``), Chinese character bigrams."""
    out: list[str] = []
    for m in _TOKEN.finditer(text.lower()):
        tok = m.group(0)
        if re.match(rf"[{_CJK}]", tok):
            out += [tok] if len(tok) == 1 else [tok[i : i + 2] for i in range(len(tok) - 1)]
        else:
            out.append(tok)
    return out


class LuceneBM25(BM25Okapi):
    """Okapi BM25 with Lucene's idf, log(1 + (N - n + 0.5) / (n + 0.5)): always above 0, where rank-bm25's own
    idf is 0 for a word in half the documents and floored by a share of the mean idf (0 or below in a small corpus),
    which would hide a document that matches."""

    def _calc_idf(self, nd: dict[str, int]) -> None:
        for word, freq in nd.items():
            self.idf[word] = math.log(1.0 + (self.corpus_size - freq + 0.5) / (freq + 0.5))


class KnowledgeSource(Protocol):
    def retrieve(self, query: str, k: int) -> list[Snippet]: ...


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    citation: str = ""


class BM25Knowledge:
    """A ``KnowledgeSource`` ranking ``documents`` by Okapi BM25 with Lucene's idf (``k1``, ``b``: 1.5 and 0.75)."""

    def __init__(self, documents: Iterable[Document], k1: float = 1.5, b: float = 0.75) -> None:
        self.documents = list(documents)
        if not self.documents:
            raise ValueError("documents: a knowledge source needs at least one document")
        ids = [d.id for d in self.documents]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"documents: the id {dup!r} is given twice")
        corpus = [tokenize(d.text) for d in self.documents]
        if not any(corpus):
            raise ValueError("documents: none holds a word to index")
        self._bm25 = LuceneBM25(corpus, k1=k1, b=b)

    @classmethod
    def from_jsonl(cls, path: str | Path, on_error: OnError = "raise", **kwargs: float) -> BM25Knowledge:
        """Documents from a jsonl file of ``{"id", "text", "citation"}`` rows (citation optional); a bad row is a
        ``DataError`` naming its line, or with ``on_error="skip"`` a warning."""
        docs = []
        for rec in read_jsonl(path, on_error):
            row = rec.data
            if not all(isinstance(row.get(k), str) for k in ("id", "text")):
                report(DataError(f"{rec.where}: a document needs string fields 'id' and 'text'"), on_error)
                continue
            docs.append(Document(row["id"], row["text"], str(row.get("citation") or "")))
        return cls(docs, **kwargs)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query`` (in document order)."""
        tokens = tokenize(query)
        return self._bm25.get_scores(tokens) if tokens else np.zeros(len(self.documents))

    def retrieve(self, query: str, k: int) -> list[Snippet]:
        """The ``k`` best documents sharing a word with ``query``, best first, as snippets ``"1"``..``"k"``."""
        if k <= 0:
            return []
        scores = self.scores(query)
        order = np.argsort(-scores, kind="stable")
        out: list[Snippet] = []
        for i in order:
            if len(out) == k:
                break
            if scores[i] <= 0:  # shares no word with the query (every idf is above 0)
                break
            doc = self.documents[int(i)]
            out.append(Snippet(str(len(out) + 1), doc.text, doc.citation or doc.id, float(scores[i])))
        return out
