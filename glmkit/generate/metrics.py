"""Text-quality metrics for comparing decoding strategies (Holtzman et al. 2020 and their ``ari-holtzman/degen``
metrics; docs/generation-semantics.md).

Every metric takes tokenized texts (any hashable tokens: model token ids, or words), so the numbers do not depend on
how text is split for display. Definitions:

- distinct-n (Li et al. 2016): distinct n-grams / all n-grams, pooled over the corpus (not degen's hapax ratio).
- BLEU-4: sentence BLEU with uniform weights up to 4-grams, counts clipped by the most frequent reference,
  brevity penalty against the reference length closest to the hypothesis (shorter on ties), 0 without a common
  unigram, and NLTK's ``SmoothingFunction().method1`` (a zero n-gram match count becomes 0.1) so short texts do
  not score 0.
  Implemented here rather than depending on nltk/sacrebleu; the formulas are NLTK's ``sentence_bleu``.
- self-BLEU-4 (Zhu et al. 2018, Texygen): mean BLEU-4 of each text against all the others; lower = more diverse.
- repetition rate: rep-4 of Welleck et al. 2020, the share of a text's 4-grams that repeat an earlier 4-gram of
  the same text, pooled over texts (sum of repeats / sum of 4-grams); 0 for no loops, near 1 for a degenerate loop.
- perplexity: ``exp`` of the mean token negative log-likelihood pooled over all scored tokens (degen's definition).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import torch

from ..masks import part_b_positions, prefix_lm_mask

Tokens = Sequence[Hashable]


def ngrams(tokens: Tokens, n: int) -> list[tuple[Hashable, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[Tokens], n: int) -> float:
    """Distinct n-grams over all n-grams of the corpus; 0.0 when no text has n tokens."""
    grams = [g for t in texts for g in ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(hypothesis: Tokens, references: Sequence[Tokens], max_n: int = 4) -> float:
    """Sentence BLEU-``max_n`` of ``hypothesis`` against ``references`` (see the module docstring)."""
    if not hypothesis or not references:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        counts = Counter(ngrams(hypothesis, n))
        most: Counter = Counter()
        for ref in references:
            for g, c in Counter(ngrams(ref, n)).items():
                most[g] = max(most[g], c)
        matched = sum(min(c, most[g]) for g, c in counts.items())
        if n == 1 and matched == 0:  # no unigram in common: NLTK returns 0 before smoothing
            return 0.0
        log_precision += math.log((matched or 0.1) / max(1, sum(counts.values()))) / max_n
    h = len(hypothesis)
    r = min((abs(len(ref) - h), len(ref)) for ref in references)[1]
    brevity = 1.0 if h > r else math.exp(1 - r / h)
    return brevity * math.exp(log_precision)


def self_bleu(texts: Sequence[Tokens], max_n: int = 4) -> float:
    """Mean BLEU of each text against all the others (needs at least two texts)."""
    if len(texts) < 2:
        raise ValueError(f"texts: self-BLEU needs at least two texts, got {len(texts)}")
    return sum(bleu(t, texts[:i] + texts[i + 1 :], max_n) for i, t in enumerate(texts)) / len(texts)


def repetition_rate(texts: Sequence[Tokens], n: int = 4) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same text, pooled over ``texts``."""
    total = repeats = 0
    for t in texts:
        grams = ngrams(t, n)
        total += len(grams)
        repeats += len(grams) - len(set(grams))
    return repeats / total if total else 0.0


@torch.inference_mode()
def span_nll(
    model: torch.nn.Module, context: Sequence[int], span: Sequence[int], sop_id: int, blank: int
) -> list[float]:
    """Negative log-likelihood of each ``span`` token generated at ``context[blank]`` (one forward, Part A =
    ``context`` bidirectional, then ``<sop> span`` at (blank, block 1, 2, ...)), in the model's dtype."""
    if not span:
        return []
    L = len(context)
    ids = list(context) + [sop_id] + list(span[:-1])
    pos_b, block_b = part_b_positions(blank, len(span))
    device = next(model.parameters()).device
    positions = torch.tensor([[list(range(L)) + pos_b, [0] * L + block_b]], device=device)
    logits = model(torch.tensor([ids], device=device), positions, prefix_lm_mask(L, len(ids), device=device))
    target = torch.tensor(list(span), device=device)
    return torch.nn.functional.cross_entropy(logits[0, L:].float(), target, reduction="none").tolist()


def perplexity(nlls: Sequence[float]) -> float:
    """``exp(mean NLL)`` over pooled token NLLs; NaN when there are none."""
    return math.exp(sum(nlls) / len(nlls)) if nlls else math.nan
