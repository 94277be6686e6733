"""Sample packing for pretraining: THUDM/GLM ``data_utils.datasets.BlockDataset`` (docs/glm-notes.md).

A sample is ``[CLS] d1 [eos] [CLS] d2 [eos] ...`` of at most ``seq_length`` tokens: documents are drawn with
probability proportional to their length; a document longer than a sample gives one random window (snapped to a
sentence start, cut at a sentence end); shorter ones are concatenated until the sample is full, the last one cut at
a sentence end. Sample ``i`` is a pure function of ``(seed, i)``, so a run resumes at an exact data position and
data-parallel ranks that read different indices see different samples.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np

from ..config import SpecialTokens

# what THUDM/GLM's contains_sentence_end looks for in a token's text
SENTENCE_END_CHARS = ".?!;:。？！；…\n"


def sentence_end_ids(token_text: Callable[[int], str], vocab_size: int, exclude: Collection[int] = ()) -> list[int]:
    """Ids whose text contains a sentence-ending character (``token_text(id)`` is e.g. ``tok.decode([id])``).

    The reference tests the vocabulary string instead; with decoded text a byte-level BPE newline ("Ċ") counts too.
    """
    skip = set(exclude)
    return [i for i in range(vocab_size) if i not in skip and any(ch in token_text(i) for ch in SENTENCE_END_CHARS)]


class PackedDataset:
    """``dataset[i]`` -> one packed sample (int64 numpy array of <= ``seq_length`` tokens, starting with [CLS]).

    Args:
        documents: token arrays without [eos] (e.g. ``TokenShards``); a ``lengths`` attribute, if present, saves
            one pass over the corpus.
        seq_length: the longest sample.
        special: token ids; [CLS] and eos are used.
        seed: with the index, fixes every random choice of a sample.
        num_samples: ``len(dataset)``; default 1000 per document, as in the reference.
        sentence_end_ids: token ids that end a sentence (``sentence_end_ids()``); without them windows start
            and end at arbitrary tokens.
        non_sentence_start: probability that a window of a long document is not snapped to a sentence start.
    """

    def __init__(
        self,
        documents: Sequence[np.ndarray | Sequence[int]],
        seq_length: int,
        special: SpecialTokens,
        *,
        seed: int = 0,
        num_samples: int | None = None,
        sentence_end_ids: Collection[int] = (),
        non_sentence_start: float = 0.0,
    ) -> None:
        if seq_length < 4:
            raise ValueError(f"seq_length: must be at least 4, got {seq_length}")
        if not 0.0 <= non_sentence_start <= 1.0:
            raise ValueError(f"non_sentence_start: must be a probability in [0, 1], got {non_sentence_start}")
        lengths = getattr(documents, "lengths", None)
        lengths = np.asarray([len(d) for d in documents] if lengths is None else lengths, dtype=np.int64)
        self._cumulative = np.cumsum(lengths)
        self.total_tokens = int(self._cumulative[-1]) if len(lengths) else 0
        if self.total_tokens == 0:
            raise ValueError("documents: the corpus holds no tokens")
        self.documents, self.seq_length, self.special = documents, seq_length, special
        self.seed = seed
        self.num_samples = 1000 * len(lengths) if num_samples is None else num_samples
        if self.num_samples < 1:
            raise ValueError(f"num_samples: must be positive, got {num_samples}")
        self.ends = frozenset(sentence_end_ids)
        self.non_sentence_start = non_sentence_start

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} is outside the dataset of {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, index])
        cls, n = self.special.cls, self.seq_length
        tokens = self._draw(rng)
        if len(tokens) > n - 1:  # a long document: one window
            left = int(rng.integers(len(tokens) - n + 1))
            if rng.random() > self.non_sentence_start:
                left = self._snap_start(tokens, left, backwards=rng.random() < 0.5)
            return self._right_strip(np.concatenate([[cls], tokens[left:]]), n)
        sample = [np.concatenate([[cls], tokens])]
        filled = len(sample[0])
        while filled < n:  # short documents: append more, the last one cut at a sentence end
            new = np.concatenate([[cls], self._draw(rng)])
            is_last = len(new) >= n - filled
            new = self._right_strip(new, n - filled)
            sample.append(new)
            filled += len(new)
            if is_last:
                break
        return np.concatenate(sample)

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        """A document drawn with probability proportional to its length, with its [eos] appended."""
        i = int(np.searchsorted(self._cumulative, rng.integers(self.total_tokens), side="right"))
        return np.append(np.asarray(self.documents[i], dtype=np.int64), self.special.eos)

    def _is_end(self, token: int) -> bool:
        return int(token) in self.ends

    def _snap_start(self, tokens: np.ndarray, left: int, backwards: bool) -> int:
        """Move ``left`` (at most seq_length // 2 tokens) to just after a sentence end."""
        for _ in range(self.seq_length // 2):
            if backwards and left > 0 and not self._is_end(tokens[left - 1]):
                left -= 1
            elif not backwards and left < len(tokens) and not self._is_end(tokens[left - 1]):
                left += 1  # at left == 0 the reference looks at tokens[-1] (the eos); so do we
            else:
                break
        return left

    def _right_strip(self, tokens: np.ndarray, length: int) -> np.ndarray:
        """Cut to ``length`` tokens, back to the last sentence end unless that keeps fewer than length // 2."""
        if len(tokens) <= length:
            return tokens
        keep = length
        while keep > 1 and not self._is_end(tokens[keep - 1]):
            keep -= 1
        return tokens[: keep if keep >= length // 2 else length]


def rank_batch_indices(batch_index: int, batch_size: int, dp_rank: int = 0, dp_world: int = 1) -> range:
    """Dataset indices of local batch ``batch_index`` on rank ``dp_rank`` of ``dp_world`` (disjoint across ranks)."""
    if not 0 <= dp_rank < dp_world:
        raise ValueError(f"dp_rank: must be in [0, dp_world={dp_world}), got {dp_rank}")
    start = (batch_index * dp_world + dp_rank) * batch_size
    return range(start, start + batch_size)
