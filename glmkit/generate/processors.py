"""Logits processors with transformers' math, order and defaults (transformers ``generation/logits_process.py`` and
``GenerationMixin._get_logits_processor``; docs/generation-semantics.md).

Each processor is a callable ``(ids [N, T], scores [N, V]) -> scores`` where ``ids`` is the whole sequence the
row has seen (prompt, ``<sop>`` and generated tokens, left-padded like transformers' ``input_ids``). The
operations mirror transformers 5.24 op for op (same sorts, cumsums and comparisons), so a processed row is
bitwise what transformers computes from the same scores; TV-5/TV-6 and the parity tests check this.
Greedy and sampling feed raw float32 logits, beam search feeds ``log_softmax`` (TV-6).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .config import GenerationConfig

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RepetitionPenalty:
    """CTRL: a score of a token already in ``ids`` is divided by θ if positive, multiplied by θ if negative.

    ``ignore[n]`` leading positions of row n (its left padding) are skipped, as transformers 5.24 does.
    """

    def __init__(self, penalty: float, ignore: torch.Tensor | None = None) -> None:
        self.penalty, self.ignore = penalty, ignore

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        V = scores.shape[-1]
        if self.ignore is not None:
            positions = torch.arange(ids.shape[1], device=ids.device)
            ids = ids.masked_fill(positions[None, :] < self.ignore.to(ids.device)[:, None], V)
        ids = ids.clamp(max=V)
        padded = torch.nn.functional.pad(scores, (0, 1))  # column V absorbs ignored positions
        score = torch.gather(padded, 1, ids)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return padded.scatter(1, ids, score)[..., :V]


class NoRepeatNGram:
    """Ban every token that would complete an n-gram already present in ``ids`` (prompt included)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        T = ids.shape[-1]
        if T < self.n:
            return scores
        prefix = ids[:, T + 1 - self.n :]
        windows = ids.unfold(dimension=1, size=self.n, step=1)
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
        V = scores.shape[-1]
        banned = scores.new_zeros((scores.shape[0], V + 1), dtype=torch.bool)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)
        return scores.masked_fill(banned[:, :V], -float("inf"))


class MinLength:
    """Stop ids get ``-inf`` while ``ids`` minus its first ``skip`` tokens is shorter than ``min_length``.

    ``skip = 0`` is transformers' ``MinLengthLogitsProcessor`` (the prompt counts), ``skip = prompt length`` its
    ``MinNewTokensLengthLogitsProcessor``.
    """

    def __init__(self, min_length: int, eos_ids: Sequence[int], skip: int = 0) -> None:
        self.min_length, self.skip, self.eos = min_length, skip, torch.tensor(list(eos_ids))

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if ids.shape[-1] - self.skip >= self.min_length:
            return scores
        is_eos = torch.isin(torch.arange(scores.shape[-1], device=scores.device), self.eos.to(scores.device))
        return torch.where(is_eos, -math.inf, scores)


class SuppressFrom:
    """Ban every id >= ``start``: rows of a padded embedding table that the tokenizer cannot decode."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        extra = scores.shape[-1] - self.start
        if extra <= 0:
            return scores
        return torch.nn.functional.pad(scores[..., : self.start], (0, extra), value=-math.inf)


class Temperature:
    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    """Keep scores >= the k-th largest (ties with it survive, so more than k may remain)."""

    def __init__(self, k: int, min_keep: int = 1) -> None:
        self.k = max(k, min_keep)

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.k, scores.size(-1))
        return scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -float("inf"))


class TopP:
    """Nucleus: keep the smallest top set whose probability reaches ``p`` (ascending-sort cumsum, as HF)."""

    def __init__(self, p: float, min_keep: int = 1) -> None:
        self.p, self.min_keep = p, min_keep

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - self.p)
        remove[..., -self.min_keep :] = 0
        remove = remove.scatter(1, sorted_indices, remove)
        return scores.masked_fill(remove, -float("inf"))


class MinP:
    """Drop tokens whose probability is below ``p`` times the top token's probability."""

    def __init__(self, p: float, min_keep: int = 1) -> None:
        self.p, self.min_keep = p, min_keep

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1)
        remove = probs < self.p * probs.amax(dim=-1, keepdim=True)
        keep = torch.topk(probs, min(self.min_keep, probs.shape[-1]), dim=-1).indices
        remove.scatter_(-1, keep, False)
        return scores.masked_fill(remove, -float("inf"))


class Typical:
    """Locally typical sampling (Meister et al. 2022): keep tokens closest to the entropy up to mass ``p``."""

    def __init__(self, mass: float, min_keep: int = 1) -> None:
        self.mass, self.min_keep = mass, min_keep

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        normalized = torch.nn.functional.log_softmax(scores, dim=-1)
        p = torch.exp(normalized)
        entropy = -(normalized * p).nansum(-1, keepdim=True)
        sorted_scores, sorted_indices = torch.sort(torch.abs((-normalized) - entropy), descending=False)
        cumulative = scores.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < self.mass).sum(dim=1)
        last.clamp_(max=sorted_scores.shape[-1] - 1)
        remove = sorted_scores > sorted_scores.gather(1, last.view(-1, 1))
        remove[..., : self.min_keep] = 0
        remove = remove.scatter(1, sorted_indices, remove)
        return scores.masked_fill(remove, -float("inf"))


def build_processors(
    config: GenerationConfig,
    eos_ids: Sequence[int],
    prompt_length: int,
    left_padding: torch.Tensor | None = None,
    decodable: int | None = None,
) -> list[Processor]:
    """The processors ``config`` asks for, in transformers' order (penalties, then warpers if sampling).

    ``prompt_length`` is the (padded) prompt width of ``ids``; ``left_padding[n]`` the pad count of row n.
    ``decodable``: ids from there on are banned (where transformers' ``suppress_tokens`` would act), so a model
    whose vocabulary is padded past its tokenizer's never emits an id the tokenizer cannot decode.
    """
    procs: list[Processor] = []
    if config.repetition_penalty != 1.0:
        procs.append(RepetitionPenalty(config.repetition_penalty, left_padding))
    if config.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGram(config.no_repeat_ngram_size))
    if config.min_length > 0 and eos_ids:
        procs.append(MinLength(config.min_length, eos_ids))
    if config.min_new_tokens > 0 and eos_ids:
        procs.append(MinLength(config.min_new_tokens, eos_ids, skip=prompt_length))
    if decodable is not None:
        procs.append(SuppressFrom(decodable))
    if config.do_sample:
        # beams keep one token more than there are stop ids, so a non-stop continuation always exists
        keep = (len(eos_ids) + 1 if eos_ids else 2) if config.num_beams > 1 else 1
        if config.temperature != 1.0:
            procs.append(Temperature(config.temperature))
        if config.top_k:
            procs.append(TopK(config.top_k, keep))
        if config.top_p < 1.0:
            procs.append(TopP(config.top_p, keep))
        if config.min_p is not None:
            procs.append(MinP(config.min_p, keep))
        if config.typical_p < 1.0:
            procs.append(Typical(config.typical_p, keep))
    return procs


def apply_processors(procs: Sequence[Processor], ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for proc in procs:
        scores = proc(ids, scores)
    return scores
