"""Selective prediction and calibration metrics over per-question outcomes (numpy only).

A question's outcome is ``correct`` (its answer equals the gold, abstaining included where declining is the gold),
``confidence`` in [0, 1] and ``answered`` (False for an abstention or an answer the extractor could not parse).

* **Coverage** ranks questions by confidence, abstentions last: accuracy at coverage ``c`` is the accuracy over the
  ``round(c * n)`` most confident questions, so accuracy at coverage 1.0 is plain accuracy (an abstention counts as
  an error unless abstaining is the gold). Questions of equal confidence are ranked in every order with equal
  chance: a tie group cut by the coverage contributes its mean correctness, so no metric depends on the input order
  (vote shares of self-consistency tie a lot).
* **Risk–coverage curve** (Geifman & El-Yaniv, 2017): the risk (1 - accuracy) at each coverage k/n; **AURC** is its
  mean over k = 1..n.
* **ECE** (Guo et al., 2017): over answered questions, sum over bins of |bin| / n * |accuracy - mean confidence|,
  with equal-width ("uniform") or equal-count ("quantile") bins. **Brier** (Brier, 1950): the multiclass score,
  sum over classes of (p - y)^2, averaged over the questions that have a distribution.
* **Bootstrap**: 95 % percentile intervals over questions resampled with replacement, seeded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Binning = Literal["uniform", "quantile"]


@dataclass(frozen=True)
class Outcomes:
    """Per-question arrays, all of length n."""

    correct: np.ndarray  # bool
    confidence: np.ndarray  # float in [0, 1]
    answered: np.ndarray  # bool

    @classmethod
    def of(cls, correct: Sequence[bool], confidence: Sequence[float], answered: Sequence[bool]) -> Outcomes:
        c, p, a = np.asarray(correct, bool), np.asarray(confidence, float), np.asarray(answered, bool)
        if not (len(c) == len(p) == len(a)):
            raise ValueError(f"outcomes: correct/confidence/answered lengths differ ({len(c)}, {len(p)}, {len(a)})")
        if len(p) and (np.isnan(p).any() or p.min() < 0 or p.max() > 1):
            raise ValueError("confidence: every value must be a number in [0, 1]")
        return cls(c, p, a)

    def __len__(self) -> int:
        return len(self.correct)

    def take(self, index: np.ndarray) -> Outcomes:
        return Outcomes(self.correct[index], self.confidence[index], self.answered[index])


def accuracy(o: Outcomes) -> float:
    return float(o.correct.mean()) if len(o) else float("nan")


def abstention_rate(o: Outcomes) -> float:
    return float(1 - o.answered.mean()) if len(o) else float("nan")


def _expected_correct_at(o: Outcomes) -> np.ndarray:
    """``E[correct among the top k]`` for k = 0..n, ties in rank broken uniformly at random."""
    n = len(o)
    out = np.zeros(n + 1)
    if not n:
        return out
    # abstentions rank below every answer: their key is -1 whatever confidence they carry
    key = np.where(o.answered, o.confidence, -1.0)
    order = np.argsort(-key, kind="stable")
    key, correct = key[order], o.correct[order].astype(float)
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])  # each run of equal confidence
    sums, sizes = np.add.reduceat(correct, starts), np.diff(np.r_[starts, n])
    group = np.repeat(np.arange(len(starts)), sizes)
    before = np.r_[0.0, np.cumsum(sums)[:-1]]  # correct answers ranked above each run
    within = np.arange(n) - starts[group] + 1  # 1-based place inside its run
    out[1:] = before[group] + (sums / sizes)[group] * within
    return out


def accuracy_at_coverage(o: Outcomes, coverage: float) -> float:
    """Accuracy over the ``round(coverage * n)`` (at least 1) most confident questions."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage: expected a number in (0, 1], got {coverage!r}")
    if not len(o):
        return float("nan")
    k = max(1, int(round(coverage * len(o))))
    return float(_expected_correct_at(o)[k] / k)


def risk_coverage(o: Outcomes) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk) at k = 1..n most confident questions."""
    k = np.arange(1, len(o) + 1)
    return k / max(len(o), 1), 1 - _expected_correct_at(o)[1:] / k


def aurc(o: Outcomes) -> float:
    """Area under the risk–coverage curve (mean risk over k = 1..n); lower is better."""
    return float(risk_coverage(o)[1].mean()) if len(o) else float("nan")


def _bin_ids(confidence: np.ndarray, n_bins: int, binning: Binning) -> tuple[np.ndarray, np.ndarray]:
    """The bin of each value and the bin edges (``n_bins + 1``)."""
    if binning == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif binning == "quantile":
        edges = np.quantile(confidence, np.linspace(0.0, 1.0, n_bins + 1)) if len(confidence) else np.zeros(2)
    else:
        raise ValueError(f"binning: expected 'uniform' or 'quantile', got {binning!r}")
    # right-closed bins, the first one also closed on the left: a confidence of exactly 1.0 falls in the last bin
    ids = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, len(edges) - 2)
    return ids, edges


def reliability_bins(o: Outcomes, n_bins: int = 10, binning: Binning = "uniform") -> list[dict[str, float]]:
    """Per non-empty bin of the answered questions: edges, count, accuracy and mean confidence."""
    c, p = o.correct[o.answered], o.confidence[o.answered]
    ids, edges = _bin_ids(p, n_bins, binning)
    bins = []
    for b in range(len(edges) - 1):
        inside = ids == b
        if inside.any():
            bins.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "count": int(inside.sum()),
                    "accuracy": float(c[inside].mean()),
                    "confidence": float(p[inside].mean()),
                }
            )
    return bins


def ece(o: Outcomes, n_bins: int = 10, binning: Binning = "uniform") -> float:
    """Expected calibration error over the answered questions."""
    n = int(o.answered.sum())
    if not n:
        return float("nan")
    bins = reliability_bins(o, n_bins, binning)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins))


def brier(distributions: Sequence[Mapping[str, float]], gold: Sequence[str | None]) -> float:
    """Mean multiclass Brier score over the questions with a distribution and a gold answer; a gold class missing
    from a distribution has probability 0."""
    scores = []
    for dist, g in zip(distributions, gold, strict=True):
        if not dist or g is None:
            continue
        scores.append(sum((p - (k == g)) ** 2 for k, p in dist.items()) + (0.0 if g in dist else 1.0))
    return float(np.mean(scores)) if scores else float("nan")


def bootstrap_ci(
    n: int, statistic: Callable[[np.ndarray], float], *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of ``statistic(index)`` over ``resamples`` draws of n indices with replacement."""
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)])
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def fit_threshold(dev: Outcomes, target_coverage: float) -> float:
    """The highest confidence threshold t at which answering only when confidence >= t covers at least
    ``target_coverage`` of the dev questions (abstentions never count as covered; 0.0 when too few were answered)."""
    if not 0 < target_coverage <= 1:
        raise ValueError(f"target_coverage: expected a number in (0, 1], got {target_coverage!r}")
    if not len(dev):
        raise ValueError("dev: no question to fit a threshold on")
    key = np.sort(np.where(dev.answered, dev.confidence, -1.0))[::-1]
    return float(max(key[int(np.ceil(target_coverage * len(dev))) - 1], 0.0))
