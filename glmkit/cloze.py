"""Zero-shot single-word cloze: can a GLM fill one blanked word of held-out text?

Items come from held-out documents: a random alphabetic word is replaced by ``[MASK]`` inside a window of its
context. Two ways to answer, each against a unigram-frequency baseline that sees the same information:

- open: the model fills the blank greedily with one word (decoding constrained to tokens that start a word, then
  to tokens that continue it or end the span); right when the word equals the answer, case-insensitively. The
  baseline answers every item with the most frequent training word.
- choice (as the Children's Book Test): the answer and ``n_choices - 1`` distractors drawn from the training
  words by frequency; the model picks the candidate whose span (``<sop> word`` → ``word <eop>``) has the highest
  log-likelihood, which is how GLM scores multi-token cloze answers (THUDM/GLM ``model/downstream.py``;
  docs/glm-notes.md) and the scorer cloze fine-tuning uses (``glmkit.finetune.cloze``). The baseline picks the most
  frequent candidate.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

_WORD = re.compile(r"^[A-Za-z]+$")
_STRIP = re.compile(r"^[^A-Za-z]+|[^A-Za-z]+$")


@dataclass(frozen=True)
class ClozeItem:
    text: str  # context with one [MASK]
    answer: str
    choices: tuple[str, ...] = ()  # the answer and distractors, shuffled


@dataclass
class ClozeResult:
    items: int
    open_accuracy: float
    open_baseline: float
    baseline_word: str
    n_choices: int
    choice_accuracy: float
    choice_baseline: float


def word_counts(texts: Iterable[str]) -> Counter:
    return Counter(w for t in texts for w in t.split() if _WORD.match(w))


def build_cloze_items(
    texts: Sequence[str],
    n: int,
    seed: int = 0,
    before: int = 48,
    after: int = 12,
    counts: Counter | None = None,
    n_choices: int = 5,
) -> list[ClozeItem]:
    """``n`` items, each a window of ``before`` words, the blank, and ``after`` words, from random documents;
    with ``counts`` (training word frequencies) each also gets ``n_choices`` candidates."""
    rng = random.Random(seed)
    vocab, weights = (list(counts), list(counts.values())) if counts else ([], [])
    docs = [t.split() for t in texts if len(t.split()) > 8]
    if not docs:
        raise ValueError("texts: no document has enough words to build cloze items")
    items = []
    for _ in range(100 * n):
        if len(items) == n:
            break
        words = rng.choice(docs)
        i = rng.randrange(1, len(words))
        if not _WORD.match(words[i]):
            continue
        window = words[max(0, i - before) : i] + ["[MASK]"] + words[i + 1 : i + 1 + after]
        choices: tuple[str, ...] = ()
        if vocab:
            options = {words[i]}
            while len(options) < min(n_choices, len(vocab)):
                options.add(rng.choices(vocab, weights)[0])
            choices = tuple(rng.sample(sorted(options), len(options)))
        items.append(ClozeItem(" ".join(window), words[i], choices))
    return items


def unigram_word(counts: Counter) -> str:
    lower = Counter()
    for w, c in counts.items():
        lower[w.lower()] += c
    if not lower:
        raise ValueError("texts: no words to count")
    return lower.most_common(1)[0][0]


def first_word(span: str) -> str:
    parts = span.split()
    return _STRIP.sub("", parts[0]).lower() if parts else ""


class WordFiller:
    """Greedy one-word blank filling over the model's KV cache, constrained to word tokens."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_new_tokens: int = 6) -> None:
        self.model, self.tok, self.max_new = model.eval(), tokenizer, max_new_tokens
        pieces = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
        starts = [i for i, p in enumerate(pieces) if re.fullmatch(r" [A-Za-z]+", p)]
        conts = [i for i, p in enumerate(pieces) if re.fullmatch(r"[A-Za-z]+", p)]
        V = model.config.vocab_size
        self.first = torch.full((V,), float("-inf"))
        self.first[starts] = 0.0
        self.next = torch.full((V,), float("-inf"))
        self.next[conts + [tokenizer.special.eop]] = 0.0

    @torch.inference_mode()
    def __call__(self, text: str) -> str:
        from .kv_cache import KVCache
        from .masks import find_blanks

        sp = self.tok.special
        ids = [sp.cls] + self.tok.encode(text) + [sp.eos]
        blanks = find_blanks(ids, sp.mask_ids())
        if len(blanks) != 1:
            raise ValueError(f"text: a cloze item needs exactly one blank, found {len(blanks)}")
        cache = KVCache.for_model(self.model, 1, len(ids) + self.max_new + 1)
        self.model(torch.tensor([ids]), None, len(ids), cache)  # Part A, bidirectional
        token, out = sp.sop, []
        for k in range(self.max_new):
            pos = torch.tensor([[[blanks[0]], [k + 1]]])
            logits = self.model(torch.tensor([[token]]), pos, 0, cache)[0, -1].float()
            token = int((logits + (self.first if k == 0 else self.next)).argmax())
            if token == sp.eop:
                break
            out.append(token)
        return self.tok.decode(out)


def choice_scores(model: torch.nn.Module, tokenizer, item: ClozeItem) -> list[float]:
    """Log-likelihood of each candidate filling the blank: Σ log p over ``word <eop>`` in Part B, scored as cloze
    fine-tuning scores answers (``glmkit.finetune.cloze.score_choices``)."""
    from .finetune.cloze import score_choices

    return score_choices(model, tokenizer, item.text, item.choices)


def evaluate_cloze(
    model: torch.nn.Module, tokenizer, items: Sequence[ClozeItem], counts: Counter, max_new_tokens: int = 6
) -> ClozeResult:
    """Both tasks on ``items`` (built with ``counts``, the training word frequencies)."""
    baseline = unigram_word(counts)
    fill = WordFiller(model, tokenizer, max_new_tokens)
    n = len(items)
    open_right = sum(first_word(fill(item.text)) == item.answer.lower() for item in items)
    choice_right = base_right = 0
    for item in items:
        scores = choice_scores(model, tokenizer, item)
        choice_right += item.choices[max(range(len(scores)), key=scores.__getitem__)] == item.answer
        base_right += max(item.choices, key=lambda w: counts[w]) == item.answer
    open_base = sum(item.answer.lower() == baseline for item in items)
    k = len(items[0].choices) if items else 0
    return ClozeResult(n, open_right / n, open_base / n, baseline, k, choice_right / n, base_right / n)


def shard_texts(data: str | Path, split: str, tokenizer) -> list[str]:
    """Decode the documents of a prepared split back to text."""
    from .data.shards import TokenShards

    docs = TokenShards(data, split)
    return [tokenizer.decode([int(t) for t in docs[i]], skip_special_tokens=True) for i in range(len(docs))]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    p.add_argument("--data", required=True, help="prepared data folder: items from 'val', the baseline from 'train'")
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from .bundled import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model)
    counts = word_counts(shard_texts(args.data, "train", tok))
    items = build_cloze_items(shard_texts(args.data, "val", tok), args.items, args.seed, counts=counts)
    res = evaluate_cloze(model, tok, items, counts)
    if args.json:
        print(json.dumps(asdict(res)))
        return 0
    print(f"{res.items} held-out single-word blanks")
    print(
        f"  open, greedy word:  model {res.open_accuracy:6.1%}   unigram '{res.baseline_word}' {res.open_baseline:6.1%}"
    )
    print(f"  {res.n_choices}-way choice:      model {res.choice_accuracy:6.1%}   frequent {res.choice_baseline:6.1%}")
    return 0
