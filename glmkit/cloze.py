"""Zero-shot single-word cloze: can a GLM fill one blanked word of held-out text?

Items come from held-out documents: a random alphabetic word is replaced by ``[MASK]`` inside a window of its
context. The model fills the blank greedily with one word: decoding is constrained to tokens that start a word,
then to tokens that continue it or end the span (the item says the answer is a word; the baseline knows that
too). It is right when the word equals the answer, case-insensitively. The baseline answers every item with the
most frequent training word.
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


@dataclass
class ClozeResult:
    items: int
    model_accuracy: float
    baseline_accuracy: float
    baseline_word: str


def build_cloze_items(
    texts: Sequence[str], n: int, seed: int = 0, before: int = 48, after: int = 12
) -> list[ClozeItem]:
    """``n`` items, each a window of ``before`` words, the blank, and ``after`` words, from random documents."""
    rng = random.Random(seed)
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
        items.append(ClozeItem(" ".join(window), words[i]))
    return items


def unigram_word(texts: Iterable[str]) -> str:
    counts = Counter(w.lower() for t in texts for w in t.split() if _WORD.match(w))
    if not counts:
        raise ValueError("texts: no words to count")
    return counts.most_common(1)[0][0]


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


def evaluate_cloze(
    model: torch.nn.Module, tokenizer, items: Sequence[ClozeItem], train_texts: Iterable[str], max_new_tokens: int = 6
) -> ClozeResult:
    baseline = unigram_word(train_texts)
    fill = WordFiller(model, tokenizer, max_new_tokens)
    right = sum(first_word(fill(item.text)) == item.answer.lower() for item in items)
    n = len(items)
    base = sum(item.answer.lower() == baseline for item in items)
    return ClozeResult(n, right / n, base / n, baseline)


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
    items = build_cloze_items(shard_texts(args.data, "val", tok), args.items, args.seed)
    res = evaluate_cloze(model, tok, items, shard_texts(args.data, "train", tok))
    if args.json:
        print(json.dumps(asdict(res)))
    else:
        print(
            f"{res.items} held-out single-word blanks: model {res.model_accuracy:.1%}, "
            f"unigram baseline ('{res.baseline_word}') {res.baseline_accuracy:.1%}"
        )
    return 0
